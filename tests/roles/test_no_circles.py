"""A helper split out of a role never imports its owner back, not even for typing (a small
Protocol says what it needs), and the commands never import cli.py (issue 14 #6)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "scaleout"

# module -> the modules it must not import (anywhere in it: TYPE_CHECKING and local imports count)
OWNERS = {
    "roles/admin.py": {"scaleout.roles.controller"},
    "roles/door.py": {"scaleout.roles.controller"},
    "roles/membership.py": {"scaleout.roles.controller"},
    "roles/sessions.py": {"scaleout.roles.controller"},
    "roles/command_service.py": {"scaleout.roles.controller"},
    "roles/enrolment.py": {"scaleout.roles.controller"},
    "roles/welcome.py": {"scaleout.roles.controller"},
    "roles/client_work.py": {"scaleout.roles.client"},
    "roles/command_relay.py": {"scaleout.roles.combiner"},
    "store/state.py": {"scaleout.store.commands"},
    **{f"commands/{p.name}": {"scaleout.cli"} for p in (SRC / "commands").glob("*.py")},
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # from scaleout import cli
    return names


@pytest.mark.parametrize("module", sorted(OWNERS))
def test_a_helper_does_not_import_its_owner(module: str) -> None:
    assert not imported(SRC / module) & OWNERS[module], f"{module} imports {sorted(imported(SRC / module) & OWNERS[module])}"
