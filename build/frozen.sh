#!/usr/bin/env bash
# dist/scaleout: one executable file, runnable where there is no Python at all (same OS and CPU
# kind; the launcher is static, the program inside needs glibc at least the build machine's).
#
# PyInstaller builds scaleout.spec as one folder; build/pack_frozen.py appends that folder,
# deflated, to build/launcher.c's static binary. The first start unpacks it into
# ~/.cache/scaleout/frozen-<hash>/ (SCALEOUT_CACHE moves it); every later start execs the
# unpacked program at once (0.2 s, where PyInstaller's one-file mode unpacks 110 MB at every
# start: 0.7 s). Without a C compiler and zlib's headers it falls back to PyInstaller's one-file
# mode (SCALEOUT_FROZEN=onefile forces that).
# Usage: build/frozen.sh PYTHON   (a Python with PyInstaller and scaleout's dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: build/frozen.sh PYTHON}
mkdir -p dist build/frozen-work
rm -f dist/scaleout
mode=${SCALEOUT_FROZEN:-launcher}
if [ "$mode" != onefile ] && ! ${CC:-cc} -O2 -static -o build/frozen-work/launcher build/launcher.c -lz 2>build/frozen-work/cc.log; then
    echo "frozen.sh: cannot compile build/launcher.c (see build/frozen-work/cc.log; needs a C compiler and zlib's headers, e.g. Debian's zlib1g-dev): falling back to PyInstaller's one-file mode, which unpacks at every start" >&2
    mode=onefile
fi
if [ "$mode" = onefile ]; then
    SCALEOUT_FROZEN=onefile "$PY" -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/frozen-work scaleout.spec
else
    rm -rf build/frozen-work/scaleout-folder
    SCALEOUT_FROZEN=launcher "$PY" -m PyInstaller --noconfirm --log-level WARN --distpath build/frozen-work --workpath build/frozen-work scaleout.spec
    "$PY" build/pack_frozen.py build/frozen-work/launcher build/frozen-work/scaleout-folder dist/scaleout
fi
ls -l dist/scaleout
