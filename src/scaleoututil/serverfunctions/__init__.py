"""Scaleout Edge's server functions: ``ServerFunctionsBase``, ``RoundType`` and the names a
``ServerFunctions`` class may import (``allowed_import``). The class runs on the controller,
in a process of its own (scaleout/roles/sfn_worker.py)."""
