"""`from scaleout import Scaleout`: the admin API from Python, against a real federation (issue 16, first step)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICKSTART, Federation, scaleout

from scaleout.core.errors import RemoteError


def test_scaleout_drives_a_federation_from_python_also_inside_a_running_loop(fed: Federation, tmp_path: Path) -> None:
    from scaleout import APIClient, Scaleout

    assert APIClient is Scaleout
    fed.controller()
    fed.combiner("c1")
    fed.client("k1", package=QUICKSTART)
    fed.client("k2", package=QUICKSTART)
    port = int(fed.url.rsplit(":", 1)[1])
    token = (fed.data / "admin.token").read_text().strip()
    build = tmp_path / "build"
    r = scaleout("run", "build", "-p", str(QUICKSTART), "-o", str(build))
    assert r.returncode == 0, r.stderr
    from scaleout.package.archive import create_archive

    tgz = create_archive(QUICKSTART, tmp_path / "client.tgz")  # as scaleout package create packs it

    with Scaleout(host="127.0.0.1", port=port, verify=fed.ca, token=token) as client:
        fed.wait_clients(2)
        clients = client.get_clients()
        assert clients["count"] == 2 and {c["name"] for c in clients["result"]} == {"k1", "k2"}
        assert client.get_clients_count() == 2 and client.get_active_clients()["count"] == 2
        package = client.set_active_package(tgz)
        assert package["name"] == "client.tgz" and client.get_active_package()["id"] == package["id"]
        seed = client.set_active_model(build / "seed.npz")["id"]
        assert client.get_active_model()["id"] == seed
        session = client.start_session(rounds=2, min_clients=1, round_timeout=60)
        done = client.wait_for_session(session["id"], timeout=120)
        assert done["status"] == "finished" and client.session_is_finished(session["id"])
        models = client.get_models(session_id=session["id"])
        assert models["count"] == 2
        trail = client.get_model_trail()
        assert trail["count"] == 3 and trail["result"][0]["id"] == seed and trail["result"][-1]["id"] == done["end_model"]
        saved = client.download_model(done["end_model"], tmp_path / "final.safetensors")
        assert (tmp_path / "final.safetensors").stat().st_size == saved["size"] > 0
        client.download_model("active", tmp_path / "final.npz")
        assert len(np.load(tmp_path / "final.npz").files) == len(client.load_model(done["end_model"]))
        attributes = client.get_current_attributes(["k1", "k2"])
        assert set(attributes) == {"k1", "k2"} and all(isinstance(a, dict) for a in attributes.values())
        assert client.get_validations(session["id"])["count"] == 2
        with pytest.raises(RemoteError, match="s-nonexistent") as info:
            client.get_session("s-nonexistent")
        assert info.value.code == "not_found"

        async def inside_a_running_loop() -> int:  # a Jupyter kernel runs one: plain calls still work
            return int(client.get_sessions()["count"])

        assert asyncio.run(inside_a_running_loop()) == 1

    local = Scaleout.from_data_dir(fed.data)
    try:
        assert local.get_controller_status()["active_model"] == done["end_model"]
    finally:
        local.close()
