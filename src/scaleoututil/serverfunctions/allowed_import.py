"""What a ``ServerFunctions`` class may import, as Scaleout Edge's module has it:
``from scaleoututil.serverfunctions.allowed_import import Dict, List, Tuple, Optional,
ServerFunctionsBase, api_client, np, random, logger``.

``api_client`` answers from the controller's state while the class runs in its worker
(``get_current_attributes(client_ids)``, ``get_clients()``, ``get_active_model()``);
``print`` and ``logger`` lines go to the controller's log, marked with session and round.
"""

import logging
import random  # noqa: F401
from typing import Any, Dict, List, Optional, Tuple  # noqa: F401

import numpy as np  # noqa: F401

from scaleoututil.serverfunctions.serverfunctionsbase import RoundType, ServerFunctionsBase  # noqa: F401

logger = logging.getLogger("scaleout.serverfunctions")


class _ApiClient:
    """The controller's state as the class sees it: each call is a question to the
    controller over the worker's pipe (outside a worker there is nobody to ask)."""

    def _ask(self, name: str, *args: Any) -> Any:
        from scaleoututil.serverfunctions import _channel

        return _channel.ask(name, list(args))

    def get_current_attributes(self, client_ids: List[str]) -> Dict[str, Dict[str, Any]]:
        """Each client's attributes as it last logged them (``log_attributes``); {} for one that logged none."""
        return self._ask("get_current_attributes", list(client_ids))

    def get_clients(self, n_max: Optional[int] = None) -> Dict[str, Any]:
        """The clients the controller knows: {"count": N, "result": [{"name", "status", "combiner", ...}]}."""
        return self._ask("get_clients", n_max)

    def get_active_model(self) -> Dict[str, Any]:
        """The global model: {"model": id, "model_id": id} ({} when there is none yet)."""
        return self._ask("get_active_model")

    def get_client(self, name: str) -> Dict[str, Any]:
        """One client's row ({"name", "status", "attributes", ...}); {} for an unknown name."""
        return self._ask("get_client", name)


api_client = _ApiClient()
