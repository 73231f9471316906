# mypy: disable-error-code="empty-body"
"""Scaleout Edge's base class of server functions, with its signatures unchanged.

Override any of the methods in a class named ``ServerFunctions``; a method left out (or
one that fails) means the built-in behaviour for that call.
"""

from abc import ABC
from enum import Enum
from typing import Dict, List, Tuple

import numpy as np


class RoundType(Enum):
    TRAINING = "training"
    VALIDATION = "validation"
    PREDICTION = "prediction"


class ServerFunctionsBase(ABC):
    """Base class of a ``ServerFunctions`` class: every method is optional."""

    def __init__(self) -> None:
        pass

    def client_selection(self, client_ids: List[str], round_type: RoundType) -> List:
        """The clients (a subset of ``client_ids``, the connected clients the built-in
        selection chose) that take part in this round of ``round_type``."""
        pass

    def client_settings(self, global_model: List[np.ndarray]) -> Dict:
        """Settings (primitive types only) merged over the session's --settings and handed to
        every selected client's train callback this round."""
        pass

    def aggregate(self, previous_global: List[np.ndarray], client_updates: Dict[str, Tuple[List[np.ndarray], Dict]]) -> List[np.ndarray]:
        """The next global model from the previous one and ``{client: (parameters, metadata)}``
        (parameters in the model's tensor order; metadata holds ``num_examples``)."""
        pass

    def incremental_aggregate(self, client_id: str, model: List[np.ndarray], client_metadata: Dict, previous_global: List[np.ndarray]):
        """Fold one client's update into a running aggregate (one update at a time)."""
        pass

    def get_incremental_aggregate_model(self) -> List[np.ndarray]:
        """The running aggregate once every update was folded: the next global model."""
        pass


# base implementation
class ServerFunctions(ServerFunctionsBase):
    pass
