#!/usr/bin/env bash
# One command: set up .venv, build the demo index over demo/photos, run the whole stack locally.
# Extra arguments go to `cbir demo` (see `cbir demo --help`). Ctrl-C stops everything.
set -euo pipefail
venv_extras=""  # the plain install (an existing dev install will do)
source "$(dirname "$0")/venv.sh"
cd "$repo"
exec cbir demo "$@"
