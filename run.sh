#!/usr/bin/env bash
# ./run.sh [mitmdump args...]   start the proxy (explicit proxy on 127.0.0.1:8080 by default)
# ./run.sh test [pytest args...] run the test suite
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    if ! python=$(find_python); then
        echo "run.sh: Python 3.12 or newer is needed and none was found (tried python3.13," >&2
        echo "python3.12, python3). Install it, e.g. 'sudo apt install python3.12 python3.12-venv'," >&2
        echo "'brew install python@3.12', or from python.org, then run ./run.sh again." >&2
        exit 1
    fi
    echo "run.sh: creating .venv with $($python --version)" >&2
    "$python" -m venv .venv
fi

# Install (again) whenever pyproject.toml changed since the last install.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "run.sh: installing dependencies into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

if [ "${1:-}" = "test" ]; then
    shift
    exec .venv/bin/python -m pytest "$@"
fi

mode_given=no
for arg in "$@"; do
    case "$arg" in --mode | -m | --mode=* | -m*) mode_given=yes ;; esac
done
if [ "$mode_given" = no ]; then
    set -- --mode regular@127.0.0.1:8080 "$@"
fi
exec .venv/bin/mitmdump -s addon/poe_openai.py "$@"
