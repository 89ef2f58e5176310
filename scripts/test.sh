#!/usr/bin/env bash
# One command: set up .venv with the test dependencies and run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow", -k gateway).
set -euo pipefail
venv_extras=dev  # the test tools; includes everything the demo needs
source "$(dirname "$0")/venv.sh"
cd "$repo"
# The browser tests drive Debian's Chromium (or $CBIR_TEST_CHROMIUM); install it where we can
# (root on Debian/Ubuntu).
if [[ ! -x ${CBIR_TEST_CHROMIUM:-/usr/bin/chromium} ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser tests will fail" >&2
fi
exec python -m pytest "$@"
