"""The admin flow's key tests again, with the controller on PostgreSQL (issue 18), in every
`make test`: a session end to end, commands to clients, the Python API, the audit chain.
`make test-postgresql` runs the whole admin-flow set on PostgreSQL (SCALEOUT_TEST_STORE).

The tests are those of their own modules, collected here once more with this module's
``fed``: a Federation whose controllers keep their state in a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Federation, federation
from test_api import test_scaleout_drives_a_federation_from_python_also_inside_a_running_loop as test_python_api_on_postgresql
from test_audit import test_admin_actions_and_commits_are_listed_and_the_chain_verifies as test_audit_chain_on_postgresql
from test_commands import test_commands_reach_every_client_and_each_failure_is_stored as test_commands_on_postgresql
from test_session import test_mixed_dtypes_two_combiners_local_package as test_session_end_to_end_on_postgresql

__all__ = [
    "test_audit_chain_on_postgresql", "test_commands_on_postgresql", "test_python_api_on_postgresql", "test_session_end_to_end_on_postgresql",
]


@pytest.fixture
def fed(tmp_path: Path, pg_url: str) -> Iterator[Federation]:
    with federation(tmp_path, store=pg_url) as f:
        yield f
    state_db = f.data / "state.db"
    assert not state_db.exists() or not state_db.stat().st_size, "the controller wrote state.db, not PostgreSQL"
