"""Run by shiv's bootstrap before scaleout: the wheels inside are for one CPython minor version."""

import sys

BUILT_FOR = "@PYTHON_VERSION@"
running = "%d.%d" % sys.version_info[:2]
if running != BUILT_FOR:
    sys.exit(
        f"scaleout: error: this scaleout.pyz was built for Python {BUILT_FOR} (its numpy and other native "
        f"wheels are for that version) but runs under Python {running} ({sys.executable}): run it with a "
        f"python{BUILT_FOR}, or use the single-file executable dist/scaleout, which needs no Python"
    )
