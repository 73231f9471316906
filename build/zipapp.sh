#!/usr/bin/env bash
# dist/scaleout.pyz: the project and its dependencies, native wheels included, for the build
# platform and every CPython >= 3.11 that has wheels for all of them (build/zipapp_site.py).
# Built with shiv: the archive unpacks once into ~/.shiv/scaleout.pyz_<sha256 of its contents>/
# (SHIV_ROOT moves it) and every later start imports from there.
# Usage: build/zipapp.sh PYTHON   (a Python with shiv installed: the build venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: build/zipapp.sh PYTHON}
mkdir -p dist build/zipapp-out
versions=$("$PY" build/zipapp_site.py build/zipapp-out/site-packages)
echo "zipapp: carries native modules for Python $versions"
echo "$versions" > build/zipapp-out/versions.txt  # dist-check runs the .pyz under each it finds
# Refuse, with a clear line, to run under a Python the wheels inside were not built for.
sed "s/@PYTHON_VERSIONS@/$versions/" build/zipapp_preamble.py > build/zipapp-out/preamble.py
rm -f dist/scaleout.pyz
"$PY" -m shiv --reproducible --compressed \
    --console-script scaleout --python '/usr/bin/env python3' \
    --preamble build/zipapp-out/preamble.py \
    --site-packages build/zipapp-out/site-packages \
    --output-file dist/scaleout.pyz
ls -l dist/scaleout.pyz
