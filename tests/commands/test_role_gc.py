"""Serving roles run with a raised first GC threshold and the imported objects frozen (issue 17);
a client leaves the collector as its package's code expects it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import asyncio, gc, json
from scaleout.commands.launch import _run

async def role(stop: asyncio.Event) -> None:
    print(json.dumps({"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}))

_run(role, **%s)
"""


def _seen(kwargs: str) -> dict[str, int]:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE % kwargs], capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(json.loads(out))


def test_a_serving_role_runs_with_the_raised_threshold_and_imports_frozen() -> None:
    from scaleout.commands.launch import GC_FIRST_THRESHOLD

    seen = _seen("{}")
    assert seen["threshold"] == GC_FIRST_THRESHOLD > 700
    assert seen["frozen"] > 1000  # the modules, classes and functions imported to run the role


def test_a_client_keeps_the_default_collector() -> None:
    seen = _seen("{'drain_limit': 4.0, 'tune_gc': False}")
    assert seen == {"threshold": 700, "frozen": 0}
