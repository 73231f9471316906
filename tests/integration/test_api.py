"""`from scaleout import Scaleout`: the admin API from Python, against a real federation (issue 16)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import FIXTURES, QUICKSTART, Federation, scaleout

from scaleout.core.errors import RemoteError, ScaleoutError

COMMANDS = FIXTURES / "command_client"


def connect(fed: Federation, token: str | None = None, **kwargs: Any) -> Any:
    from scaleout import Scaleout

    port = int(fed.url.rsplit(":", 1)[1])
    kwargs.setdefault("verify", fed.ca)
    return Scaleout(host="127.0.0.1", port=port, token=token or (fed.data / "admin.token").read_text().strip(), **kwargs)


def done_when(client: Any, tgz: Path, seed_file: Path, tmp: Path) -> dict[str, Any]:
    """Issue 16's first Done-when bullet, call by call; returns the finished session."""
    clients = client.get_clients()
    assert clients["count"] == 2 and {c["name"] for c in clients["result"]} == {"k1", "k2"}
    package = client.set_active_package(tgz)
    assert package["name"] == "client.tgz"
    seed = client.set_active_model(seed_file)["id"]
    session = client.start_session(rounds=2, min_clients=1, round_timeout=60)
    rounds: list[dict[str, Any]] = []

    def on_round(r: dict[str, Any]) -> None:  # in this thread: it may use the client too
        rounds.append({**r, "model": client.get_model(r["model_id"])})

    done = client.wait_for_session(session["id"], timeout=120, callback=on_round)
    assert client.session_is_finished(session["id"]) and done["status"] == "finished"
    assert [r["idx"] for r in rounds] == [1, 2] and all(r["status"] == "succeeded" for r in rounds), rounds
    assert rounds[-1]["model"]["id"] == done["end_model"]
    assert client.get_models(session_id=session["id"])["count"] == 2
    trail = client.get_model_trail()
    assert trail["count"] == 3 and trail["result"][0]["id"] == seed and trail["result"][-1]["id"] == done["end_model"]
    saved = client.download_model(done["end_model"], tmp / f"{session['id']}.safetensors")
    assert (tmp / f"{session['id']}.safetensors").stat().st_size == saved["size"] > 0
    attributes = client.get_current_attributes(["k1", "k2"])
    assert isinstance(attributes, dict) and set(attributes) == {"k1", "k2"} and all(isinstance(a, dict) for a in attributes.values())
    return dict(done)


def test_scaleout_drives_a_federation_from_python_also_inside_a_running_loop(fed: Federation, tmp_path: Path) -> None:
    from scaleout import APIClient, AsyncScaleout, Scaleout

    assert APIClient is Scaleout
    fed.controller()
    fed.combiner("c1")
    fed.client("k1", package=QUICKSTART)
    fed.client("k2", package=QUICKSTART)
    build = tmp_path / "build"
    r = scaleout("run", "build", "-p", str(QUICKSTART), "-o", str(build))
    assert r.returncode == 0, r.stderr
    from scaleout.package.archive import create_archive

    tgz = create_archive(QUICKSTART, tmp_path / "client.tgz")  # as scaleout package create packs it

    with connect(fed) as client:
        assert client.wait_for_clients(2, timeout=30) == 2
        done = done_when(client, tgz, build / "seed.npz", tmp_path)
        session_id = done["id"]
        assert client.get_clients_count() == 2 and client.get_active_clients()["count"] == 2
        package = client.get_active_package()
        assert package["name"] == "client.tgz" and package["active"] and client.get_packages()["count"] == 1
        seed = client.get_model_trail()["result"][0]["id"]
        assert client.get_active_model()["id"] == done["end_model"]
        client.download_model("active", tmp_path / "final.npz")
        assert len(np.load(tmp_path / "final.npz").files) == len(client.load_model(done["end_model"]))

        # Validations: one row per validated round, by session or by the model validated.
        validations = client.get_validations(session_id)
        assert validations["count"] == 2 and [v["round_index"] for v in validations["result"]] == [1, 2]
        assert all(0 <= v["validation_accuracy"] <= 1 for v in validations["result"])
        last = validations["result"][-1]
        by_model = client.get_validations(model_id=done["end_model"][:12])  # a unique prefix too
        assert by_model["result"] == [last]
        assert client.get_validations(model_id=seed)["count"] == 0  # a seed is never validated in a round
        # Metrics: what log_metric sent (the quickstart logs train_loss once per epoch, 1 epoch).
        metrics = client.get_metrics(session_id=session_id, key="train_loss")
        trained = sum(len(r["participants"]) for r in client.get_rounds(session_id)["result"])
        assert metrics["count"] == trained >= 2 and {m["key"] for m in metrics["result"]} == {"train_loss"}
        assert {m["client"] for m in metrics["result"]} <= {"k1", "k2"} and client.get_metrics(key="no_such_*")["count"] == 0
        assert len(client.get_metrics(session_id=session_id, n_max=1)["result"]) == 1

        async def inside_a_running_loop() -> dict[str, Any]:  # a Jupyter kernel runs one: plain calls still work
            return done_when(client, tgz, build / "seed.npz", tmp_path)

        again = asyncio.run(inside_a_running_loop())
        assert again["id"] != session_id and client.get_sessions()["count"] == 2

    async def coroutines() -> None:  # AsyncScaleout: the same methods, awaited
        port = int(fed.url.rsplit(":", 1)[1])
        aclient = AsyncScaleout("127.0.0.1", port=port, verify=fed.ca, token=(fed.data / "admin.token").read_text().strip())
        try:
            assert (await aclient.get_clients())["count"] == 2
            assert (await aclient.get_session(session_id))["status"] == "finished"
        finally:
            await aclient.close()

    asyncio.run(coroutines())
    local = Scaleout.from_data_dir(fed.data)
    try:
        assert local.get_controller_status()["active_model"] == again["end_model"]
    finally:
        local.close()


def poll(read: Any, until: Any, timeout: float = 20) -> Any:
    """Read again until ``until(value)``: a poll of what the controller has stored (a relay
    carries it apart from the command's result), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if until(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_commands_inference_and_attribute_trail_from_python(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(COMMANDS)
    fed.combiner("c1")
    fed.client("k1", package=COMMANDS)
    fed.client("k2", package=COMMANDS)
    with connect(fed) as client:
        client.wait_for_clients(2, timeout=30)
        # A custom command on every client, then on one (Edge's Custom_ prefix is optional).
        job = client.run_custom_command("echo", parameters={"k": 1}, timeout=30)
        assert job["status"] == "finished" and {r["client"]: r["status"] for r in job["results"]} == {"k1": "ok", "k2": "ok"}
        assert all(r["data"]["params"] == {"k": 1} for r in job["results"])
        job = client.run_custom_command("Custom_hello", client_ids=["k2"])
        assert [(r["client"], r["data"]) for r in job["results"]] == [("k2", {"hello": "k2"})]
        started = client.run_custom_command("echo", blocking=False)
        assert started["id"].startswith("c-") and started["clients"] == 2

        # The attribute trail: what startup() logged, then each change (a command logs one).
        job = client.run_custom_command("attrs", parameters={"fixture": "changed"}, client_ids=["k1"])
        assert job["results"][0]["data"] == {"logged": ["fixture"]}
        trail = poll(lambda: client.get_attribute_trail("k1"), lambda t: t["count"] >= 3)
        assert [(a["key"], a["value"]) for a in trail["result"]] == [("site", "k1"), ("fixture", "command_client"), ("fixture", "changed")]
        assert client.get_attribute_trail("k1", n_max=1)["result"] == trail["result"][-1:]
        assert client.get_current_attributes(["k1"]) == {"k1": {"site": "k1", "fixture": "changed"}}
        assert [a["key"] for a in client.get_attribute_trail("k2")["result"]] == ["site", "fixture"]

        # Inference: started, then its predictions by id, by model and by client.
        started = client.start_inference(client_ids=["k1", "k2"])
        assert started["id"].startswith("p-") and started["model_id"] == seed
        finished = client.start_inference(model_id=seed[:10], parameters={"add": 1}, blocking=True)
        assert {r["status"] for r in finished["results"]} == {"ok"}
        predictions = client.get_predictions(correlation_id=finished["id"])
        assert predictions["count"] == 2 and {p["client"] for p in predictions["result"]} == {"k1", "k2"}
        assert all(p["model_id"] == seed and p["status"] == "ok" and "sum" in p["data"] for p in predictions["result"])
        assert client.get_predictions(model_id=seed)["count"] == 4
        assert client.get_predictions(client_id="k2")["count"] == 2
        assert client.get_predictions(n_max=1)["result"] == predictions["result"][-1:]


def test_each_refusal_is_the_projects_error_with_the_controllers_line(fed: Federation, tmp_path: Path) -> None:
    from scaleout import api

    fed.controller()

    def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
        text = str(exc.value)
        assert "\n" not in text and isinstance(exc.value, ScaleoutError), repr(exc.value)
        return text

    with connect(fed) as client:
        with pytest.raises(api.NotFoundError, match=r"^no model '0123456789'") as info:  # an unknown id
            client.get_model("0123456789")
        assert isinstance(info.value, RemoteError) and info.value.code == "not_found" and one_line(info)
        with pytest.raises(api.NotFoundError, match="s-nonexistent"):
            client.get_session("s-nonexistent")
        with pytest.raises(api.NotFoundError):
            client.get_validations(model_id="0123456789")
        with pytest.raises(api.NotFoundError, match="no client 'nobody'"):
            client.get_attribute_trail("nobody")
        with pytest.raises(api.ProtocolError, match="key must be text of 1-256 characters") as info:  # a bad argument
            client.get_metrics(key="")
        one_line(info)
        with pytest.raises(api.ConflictError, match="no clients are connected"):
            client.run_custom_command("echo")

        import numpy as np

        from scaleout.core import payload

        fed.admin("model.set_seed", {}, payload.encode_named({"0": np.zeros(2, np.float32)}, "list"))  # a session could start
        class ServerFunctions:  # Edge's shape, in a module that imports what server functions may not
            def aggregate(self, previous_global: Any, client_updates: Any) -> Any:
                return previous_global

        with pytest.raises(api.ConfigError, match=r"^server_functions: server functions may not import \w+; .*\(test_api.py:\d+ in <module>\)$") as info:
            client.start_session(rounds=1, server_functions=ServerFunctions)  # the module's source is sent: the controller's worker refuses it
        assert one_line(info)
        assert client.get_sessions()["count"] == 0  # refused before anything was asked

    # A client token: valid, but its role may not (a write, and a read too).
    with connect(fed, token=fed.token("client")) as client:
        with pytest.raises(api.PermissionDenied, match="a client token may not do session.start") as info:
            client.start_session(rounds=1)
        assert isinstance(info.value, api.AuthError) and info.value.code == "forbidden" and one_line(info)
        with pytest.raises(api.PermissionDenied, match="a client token may not do client.ls"):
            client.get_clients()

    # A wrong token: refused at the handshake (AuthError, not PermissionDenied).
    with connect(fed, token="not-a-token") as client:
        with pytest.raises(api.AuthError, match="check token=") as info:
            client.get_clients()
        assert not isinstance(info.value, api.PermissionDenied) and one_line(info)

    # Another CA: the certificate is not trusted.
    from scaleout.security import tls

    (tmp_path / "other.pem").write_bytes(tls.create_ca()[0])
    with connect(fed, verify=tmp_path / "other.pem") as client:
        with pytest.raises(api.ConnectionFailed, match="check verify=") as info:
            client.get_clients()
        assert isinstance(info.value, ConnectionError) and one_line(info)

    # The controller goes down under a connected client, then nothing answers at all.
    client = connect(fed)
    try:
        assert client.get_sessions()["count"] == 0
        fed.procs[0].stop()
        with pytest.raises(api.ConnectionFailed, match="check that the controller is running") as info:
            client.get_sessions()
        one_line(info)
    finally:
        client.close()
    with connect(fed) as client:
        with pytest.raises(api.ConnectionFailed, match=r"cannot reach wss://127\.0\.0\.1:\d+.*check that the controller is running"):
            client.get_clients()
