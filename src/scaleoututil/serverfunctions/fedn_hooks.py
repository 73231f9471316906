# mypy: disable-error-code="empty-body"
"""FEDn's ``fedn.network.combiner.hooks.serverfunctionsbase``: the same class as Scaleout
Edge's, but ``client_selection(client_ids)`` has no round type (FEDn calls it for training
rounds only). The server-functions worker serves it under FEDn's module names."""

from typing import Dict, List, Tuple

import numpy as np

from scaleoututil.serverfunctions.serverfunctionsbase import ServerFunctionsBase as _EdgeBase


class ServerFunctionsBase(_EdgeBase):
    """Base class of a FEDn ``ServerFunctions`` class: every method is optional."""

    def client_selection(self, client_ids: List[str]) -> List:  # type: ignore[override]
        """The clients of ``client_ids`` that train in the next round."""
        pass

    def client_settings(self, global_model: List[np.ndarray]) -> Dict:
        pass

    def aggregate(self, previous_global: List[np.ndarray], client_updates: Dict[str, Tuple[List[np.ndarray], Dict]]) -> List[np.ndarray]:
        pass


# base implementation
class ServerFunctions(ServerFunctionsBase):
    pass
