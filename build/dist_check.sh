#!/usr/bin/env bash
# make dist-check: run build/dist_check.py against dist/ in a clean environment: env -i, a
# fresh HOME (so the zipapp unpacks into an empty ~/.shiv), no venv on PATH.
# Usage: build/dist_check.sh SOURCE_PYTHON   (a Python with scaleout installed from this tree)
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE_PY=$(cd "$(dirname "${1:?usage: build/dist_check.sh SOURCE_PYTHON}")" && pwd)/$(basename "$1")
for f in dist/scaleout.pyz dist/scaleout; do
    [ -f "$f" ] || { echo "dist-check: $f is missing: run make dist" >&2; exit 2; }
done
# Other CPython minor versions on this machine (on PATH, or pyenv's) run the same zipapp too.
others=()
for v in 3.12 3.13 3.14; do
    for py in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v"*/bin/"python$v" "$(command -v "python$v" || true)"; do
        # pyenv's shims answer only for the versions pyenv has selected: use the real binaries.
        if [ -n "$py" ] && [ -x "$py" ] && [[ "$py" != */shims/* ]]; then others+=(--other-python "$py"); break; fi
    done
done
home=$(mktemp -d -t scaleout-dist-home-XXXXXX)
trap 'rm -rf "$home"' EXIT
env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" LANG=C.UTF-8 TMPDIR="${TMPDIR:-/tmp}" \
    python3 build/dist_check.py --source-python "$SOURCE_PY" "${others[@]}"
