"""A mistyped command gets one line offering the commands people use, never the hidden ones."""

from __future__ import annotations

import pytest

from scaleout.cli import EXIT_USAGE, HIDDEN_COMMANDS, build_parser


def test_a_typo_lists_the_commands_but_not_the_hidden_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["sesion", "ls"])
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid choice: 'sesion'" in err and "'session'" in err and "'simulate'" in err, err
    for name in HIDDEN_COMMANDS:
        assert name not in err, err
    # The hidden command itself still parses (scaleout simulate starts it).
    assert build_parser().parse_known_args(["simulate-clients"])[0] is not None
