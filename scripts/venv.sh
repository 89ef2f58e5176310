# Sourced by demo.sh and test.sh: creates .venv with Python >= 3.11 and installs the project into
# it (again only when pyproject.toml changed).
#
# Usage: venv_extras=dev; source scripts/venv.sh
# The extras come in the variable `venv_extras` (empty: the plain install the demo needs), never
# from the positional arguments: a sourced script sees its caller's "$@", which are meant for
# `cbir demo` or pytest, not for pip.
#
# One marker per pyproject.toml and extras set: .venv/.installed-<hash>[-<extras>]. Every extra
# includes the plain install, so the demo accepts any install of the current pyproject.toml (the
# test tools' `dev` install among them), and test.sh adds its extra once; neither undoes the other.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${venv_extras:-}
python=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))'; then
    python=$candidate; break
  fi
done
[[ -n $python ]] || { echo "cbir needs Python 3.11, 3.12 or 3.13 (python3.11 not found)" >&2; exit 1; }
if [[ ! -x $repo/.venv/bin/python ]]; then
  echo "creating $repo/.venv with $($python --version)"
  "$python" -m venv "$repo/.venv"
fi
hash=$(sha256sum <"$repo/pyproject.toml" | cut -c1-16)
stamp="$repo/.venv/.installed-$hash${extras:+-$extras}"
installed=false
if [[ -e $stamp ]]; then
  installed=true
elif [[ -z $extras ]] && compgen -G "$repo/.venv/.installed-$hash-*" >/dev/null; then
  installed=true  # an install with extras (e.g. test.sh's dev) holds everything the demo needs
fi
if [[ $installed == false ]]; then
  what="cbir${extras:+[$extras]} and its pinned dependencies"
  if compgen -G "$repo/.venv/.installed-$hash*" >/dev/null; then
    echo "adding ${extras:+the [$extras] extra of }$what to .venv"
  elif compgen -G "$repo/.venv/.installed-*" >/dev/null; then
    echo "pyproject.toml changed: updating $what in .venv"
  else
    echo "installing $what into .venv (first time: a few minutes, TensorFlow is large)"
  fi
  "$repo/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$repo/.venv/bin/python" -m pip install --quiet -e "$repo${extras:+[$extras]}"
  # markers of older pyproject.toml versions are stale; those of this version stay (other extras)
  find "$repo/.venv" -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash*" -delete
  touch "$stamp"
fi
export PATH="$repo/.venv/bin:$PATH"
