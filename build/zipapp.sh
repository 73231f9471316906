#!/usr/bin/env bash
# dist/scaleout.pyz: the project and its dependencies, native wheels included, for the build
# platform and the build Python's minor version (numpy and PyYAML wheels are per CPython
# version). Built with shiv: the archive unpacks once into ~/.shiv/scaleout.pyz_<sha256 of its
# contents>/ (SHIV_ROOT moves it) and every later start imports from there.
# Usage: build/zipapp.sh PYTHON   (a Python with shiv installed: the build venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: build/zipapp.sh PYTHON}
mkdir -p dist build/zipapp-out
want=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# Refuse, with a clear line, to run under another minor version than the wheels were built for.
sed "s/@PYTHON_VERSION@/$want/" build/zipapp_preamble.py > build/zipapp-out/preamble.py
rm -f dist/scaleout.pyz
"$PY" -m shiv --reproducible --compressed \
    --console-script scaleout --python '/usr/bin/env python3' \
    --preamble build/zipapp-out/preamble.py \
    --output-file dist/scaleout.pyz \
    . --quiet
ls -l dist/scaleout.pyz
