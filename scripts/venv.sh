# Sourced by demo.sh and test.sh: creates .venv with Python >= 3.11 and installs the project into
# it (again only when pyproject.toml changed). Usage: source scripts/venv.sh [EXTRAS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-}
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
stamp="$repo/.venv/.installed-$(cat "$repo/pyproject.toml" | sha256sum | cut -c1-16)${extras:+-$extras}"
if [[ ! -e $stamp ]]; then
  echo "installing cbir${extras:+[$extras]} and its pinned dependencies into .venv (first time: a few minutes)"
  "$repo/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$repo/.venv/bin/python" -m pip install --quiet -e "$repo${extras:+[$extras]}"
  rm -f "$repo"/.venv/.installed-*
  touch "$stamp"
fi
export PATH="$repo/.venv/bin:$PATH"
