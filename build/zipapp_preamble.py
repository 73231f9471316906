"""Run by shiv's bootstrap before scaleout: the native wheels inside are for these CPython
minor versions only."""

import sys

BUILT_FOR = "@PYTHON_VERSIONS@".split()
running = "%d.%d" % sys.version_info[:2]
if running not in BUILT_FOR:
    sys.exit(
        f"scaleout: error: this scaleout.pyz carries numpy and its other native modules for Python "
        f"{', '.join(BUILT_FOR)}, but runs under Python {running} ({sys.executable}): run it with one of "
        f"those, or use the single-file executable dist/scaleout, which needs no Python"
    )
