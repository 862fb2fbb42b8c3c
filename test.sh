#!/usr/bin/env bash
# Set up and run the tests: bash test.sh [pytest args], e.g. bash test.sh -x -k resume, or bash test.sh -m "not slow"
#
# Makes .venv (python3 -m venv; set PYTHON=python3.11 to pick another interpreter), installs requirements.txt
# into it and runs `python -m pytest -q -n auto --dist=loadgroup tests` (pytest-xdist: one worker per core, at most 8;
# -n 0 runs in this one process). Nothing beside the repo is needed: the text the tests train on is in tests/. GPT-2's BPE files
# come from $TIKTOKEN_CACHE_DIR, else ../shared/tiktoken_cache, else tiktoken downloads them once; offline without
# them the tests that need them skip, saying so. TINY_SHAKESPEARE=path/to/input.txt runs the tests on that text.
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

echo "== python -m pytest -q -n auto --maxprocesses=8 --dist=loadgroup tests $*"
exec .venv/bin/python -m pytest -q -n auto --maxprocesses=8 --dist=loadgroup tests "$@"
