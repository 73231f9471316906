#!/usr/bin/env bash
# dist/scaleout: a PyInstaller one-file executable from scaleout.spec, runnable where there is
# no Python at all (same OS and CPU kind, glibc at least the build machine's).
# Usage: build/frozen.sh PYTHON   (a Python with PyInstaller and scaleout's dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: build/frozen.sh PYTHON}
mkdir -p dist build/frozen-work
"$PY" -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/frozen-work scaleout.spec
ls -l dist/scaleout
