"""The worker's line to the controller: set by scaleout/roles/sfn_worker.py, used by
``api_client``. Outside a worker it is unset and a question says so."""

from typing import Any, Callable, Optional

_ask: Optional[Callable[[str, list], Any]] = None


def ask(name: str, args: list) -> Any:
    if _ask is None:
        raise RuntimeError("api_client answers only inside a session's server functions (they run on the controller)")
    return _ask(name, args)
