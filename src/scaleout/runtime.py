"""How this scaleout was shipped (a source install, the zipapp or the frozen binary) and how
to start another process of the same one.

Light on purpose: `scaleout --version` reads it, so it imports nothing heavy.

- frozen: PyInstaller sets ``sys.frozen``; the executable is its own interpreter.
- zipapp: shiv's bootstrap (the ``_bootstrap`` package inside the .pyz) ran first and was
  imported from the archive, so its ``__file__`` names the archive.
- source: anything else (an editable or a regular pip install, ``python -m scaleout``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

Kind = Literal["source", "zipapp", "frozen"]


def zipapp_path() -> Path | None:
    """The .pyz this process runs from, or None when it is not a zipapp."""
    boot = sys.modules.get("_bootstrap")
    file = getattr(boot, "__file__", None) or ""
    marker = f"{os.sep}_bootstrap{os.sep}"
    if marker not in file:
        return None
    archive = Path(file.rsplit(marker, 1)[0])
    return archive.resolve() if archive.is_file() else None


def build_kind() -> Kind:
    if getattr(sys, "frozen", False):
        return "frozen"
    if zipapp_path() is not None:
        return "zipapp"
    return "source"


def self_command() -> list[str]:
    """The argv prefix that starts another scaleout of the same build as this one: the
    frozen binary itself, ``python3 path/to/scaleout.pyz``, or ``python -m scaleout``."""
    kind = build_kind()
    if kind == "frozen":
        return [sys.executable]
    if kind == "zipapp":
        return [sys.executable, str(zipapp_path())]
    return [sys.executable, "-m", "scaleout"]


def version_text() -> str:
    """``scaleout 0.1.0 (protocol 2, zipapp)``: what support needs to know about a device."""
    from scaleout import __version__
    from scaleout.core.messages import PROTOCOL_VERSION

    return f"scaleout {__version__} (protocol {PROTOCOL_VERSION}, {build_kind()})"


# Modules whose pip distribution has another name: `import sklearn` needs `pip install scikit-learn`.
DISTRIBUTIONS = {
    "sklearn": "scikit-learn", "cv2": "opencv-python", "PIL": "pillow", "yaml": "PyYAML", "skimage": "scikit-image",
    "bs4": "beautifulsoup4", "dateutil": "python-dateutil", "dotenv": "python-dotenv", "jwt": "PyJWT",
    "Crypto": "pycryptodome", "OpenSSL": "pyOpenSSL", "serial": "pyserial", "usb": "pyusb", "attr": "attrs",
    "google.protobuf": "protobuf", "tensorflow_datasets": "tensorflow-datasets", "Levenshtein": "python-Levenshtein",
    "magic": "python-magic", "fitz": "PyMuPDF", "docx": "python-docx", "pptx": "python-pptx", "sentencepiece": "sentencepiece",
    "lightning": "lightning", "pytorch_lightning": "pytorch-lightning", "torchvision": "torchvision",
}


def pip_name(module: str) -> str:
    """The pip distribution that provides ``module`` (its top-level name when not known to differ)."""
    if module in DISTRIBUTIONS:
        return DISTRIBUTIONS[module]
    top = module.split(".")[0]
    return DISTRIBUTIONS.get(top, top)


MANAGED_ENV_HINT = "or list it in the package's python_env.yaml and start the client with --managed-env"


def missing_module_hint(module: str) -> str:
    """What to do when a compute package imports a module this scaleout does not carry."""
    kind = build_kind()
    top = pip_name(module)
    if kind == "zipapp":
        return (
            f"this scaleout is a zipapp, which carries only its own dependencies (numpy, safetensors, PyYAML ...): "
            f"install {top} for the Python that runs it ({sys.executable} -m pip install {top}) and run "
            f"`{sys.executable} {zipapp_path()} ...` again, or install scaleout and {top} in a venv, {MANAGED_ENV_HINT}"
        )
    if kind == "frozen":
        return (
            f"this scaleout is a single-file executable, which carries only its own dependencies "
            f"(numpy, safetensors, PyYAML ...) and cannot load {top}: run the zipapp with a Python that has "
            f"{top} (python3 -m pip install {top}; python3 scaleout.pyz ...), or install scaleout and {top} in a venv"
        )
    return f"install it in the environment that runs scaleout ({sys.executable} -m pip install {top}), {MANAGED_ENV_HINT}"
