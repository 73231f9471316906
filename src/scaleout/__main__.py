"""`python -m scaleout`, the zipapp and the frozen binary all enter here."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("SCALEOUT_AS_PYTHON") == "1":
    # The single-file executable standing in for `python` in a package's commands.
    from scaleout.package.interpreter import act_as_python

    sys.exit(act_as_python(sys.argv[1:]))

from scaleout.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
