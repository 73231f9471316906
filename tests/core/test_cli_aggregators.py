"""`session start --help` names every aggregator there is (the list is typed out in cli.py,
which must not import numpy to build its parser)."""

from __future__ import annotations

import re

import pytest

from scaleout.cli import build_parser
from scaleout.core.aggregators import STRATEGIES


def test_the_help_names_every_aggregator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["session", "start", "--help"])
    named = set(re.findall(r"[a-z]+", capsys.readouterr().out))
    assert set(STRATEGIES) <= named, sorted(set(STRATEGIES) - named)
