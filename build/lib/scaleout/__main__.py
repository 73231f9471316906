"""`python -m scaleout`, the zipapp and the frozen binary all enter here."""

from __future__ import annotations

import sys

from scaleout.cli import main

if __name__ == "__main__":
    sys.exit(main())
