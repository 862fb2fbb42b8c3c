#!/usr/bin/env bash
# Set up and run the tests: bash test.sh [pytest args], e.g. bash test.sh -x -k resume
#
# Makes .venv (python3 -m venv; set PYTHON=python3.11 to pick another interpreter), installs requirements.txt
# into it and runs `python -m pytest -q tests`. Uses ../shared's tiktoken cache and tiny Shakespeare when they
# are there and TIKTOKEN_CACHE_DIR / TINY_SHAKESPEARE are not set; tests that need the text skip without it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ ! -x .venv/bin/python ]]; then
    # the pinned numpy and torch need Python 3.11-3.13: say so here, not deep inside pip
    if ! "${PYTHON:-python3}" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'; then
        echo "error: $("${PYTHON:-python3}" --version 2>&1) found; this repo needs Python 3.11-3.13:" \
             "install one and run PYTHON=python3.12 bash $0" >&2
        exit 1
    fi
    echo "== creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
echo "== installing requirements.txt into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt

shared="$(dirname "$(pwd)")/shared"
if [[ -z "${TIKTOKEN_CACHE_DIR:-}" && -d "$shared/tiktoken_cache" ]]; then
    export TIKTOKEN_CACHE_DIR="$shared/tiktoken_cache"
fi
if [[ -z "${TINY_SHAKESPEARE:-}" && -f "$shared/data/tinyshakespeare/input.txt" ]]; then
    export TINY_SHAKESPEARE="$shared/data/tinyshakespeare/input.txt"
fi

echo "== python -m pytest -q tests $*"
exec .venv/bin/python -m pytest -q tests "$@"
