"""Error texts for peers: no absolute paths of ours."""

from __future__ import annotations

import pytest

from scaleout.transport.link import scrub_paths


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("no space left on device while writing model /var/lib/scaleout/models/ab.safetensors", "no space left on device while writing model .../ab.safetensors"),
        ("stored models file /tmp/x y is corrupt", "stored models file .../x y is corrupt"),
        ("cannot open '/etc/scaleout/state.db'", "cannot open '.../state.db'"),
        ("at /a and at /b/c", "at .../a and at .../c"),
        ("cannot reach wss://10.0.0.1:8090/: refused", "cannot reach wss://10.0.0.1:8090/: refused"),
        ("1/2 of the clients, a/b/c relative, ~/x home", "1/2 of the clients, a/b/c relative, ~/x home"),
        ("", ""),
    ],
)
def test_absolute_paths_become_their_last_part(text: str, want: str) -> None:
    assert scrub_paths(text) == want
