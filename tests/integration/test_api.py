"""`from scaleout import Scaleout`: the admin API from Python, against a real federation (issue 16)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
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

    sampled: dict[str, Any] = {}
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

        # Validations as Edge lists them: one record per client and validated round, by
        # session, by the model validated, by client; each round's mean stays in get_rounds.
        validations = client.get_validations(session_id)
        records = validations["result"]
        rounds = client.get_rounds(session_id)["result"]
        assert validations["count"] == len(records) == sum(len(r["participants"]) for r in rounds) >= 2, (records, rounds)
        assert [v["round_index"] for v in records] == sorted(v["round_index"] for v in records) and {v["round_index"] for v in records} == {1, 2}
        for v in records:
            assert set(v) == {"id", "model_id", "session_id", "round_index", "sender", "data", "created"}, v
            assert v["session_id"] == session_id and v["sender"]["role"] == "client" and v["sender"]["name"] in {"k1", "k2"}
            assert v["model_id"] == rounds[v["round_index"] - 1]["model_id"] and 0 <= v["data"]["validation_accuracy"] <= 1
        for r in rounds:  # the round's validation is the mean of its clients' records
            mine = [v["data"]["validation_accuracy"] for v in records if v["round_index"] == r["idx"]]
            assert r["validation"]["validation_accuracy"] == pytest.approx(sum(mine) / len(mine))
        by_model = client.get_validations(model_id=done["end_model"][:12])  # a unique prefix too
        assert by_model["result"] == [v for v in records if v["model_id"] == done["end_model"]] != []
        assert client.get_validations(model_id=seed)["count"] == 0  # a seed is never validated in a round
        k1 = client.get_validations(session_id=session_id, sender_name="k1")
        assert k1["result"] == [v for v in records if v["sender"]["name"] == "k1"]
        newest = client.get_validations(session_id=session_id, n_max=1)
        assert newest == {"count": len(records), "result": records[-1:]}
        assert client.get_validations(sender_name="nobody")["count"] == 0
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

        # Client sampling with Edge's keyword: one of the two clients each round, drawn with the seed.
        sampled = client.start_session(rounds=2, min_clients=1, round_timeout=60, requested_clients=1, seed=5)
        sampled = client.wait_for_session(sampled["id"], timeout=120)
        assert sampled["status"] == "finished" and sampled["config"]["seed"] == 5, sampled
        assert [len(r["participants"]) for r in client.get_rounds(sampled["id"])["result"]] == [1, 1]

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
        assert local.get_controller_status()["active_model"] == sampled["end_model"]
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
        job = client.run_custom_command("echo", parameters={"k": 1}, timeout=30, blocking=True)
        assert job["status"] == "finished" and {r["client"]: r["status"] for r in job["results"]} == {"k1": "ok", "k2": "ok"}
        assert all(r["data"]["params"] == {"k": 1} for r in job["results"])
        job = client.run_custom_command("Custom_hello", client_ids=["k2"], blocking=True)
        assert [(r["client"], r["data"]) for r in job["results"]] == [("k2", {"hello": "k2"})]
        started = client.run_custom_command("echo")  # Edge's default: the job as it started, at once
        assert started["id"].startswith("c-") and started["clients"] == 2 and "results" not in started

        # The attribute trail: what startup() logged, then each change (a command logs one).
        job = client.run_custom_command("attrs", blocking=True, client_ids=["k1"], parameters={"fixture": "changed"})
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


def test_verify_takes_the_ca_fingerprint_a_join_token_carries(fed: Federation, tmp_path: Path) -> None:
    from scaleout import api
    from scaleout.security import jointoken, tls

    fed.controller()
    pin = jointoken.parse((fed.data / "join-client.token").read_text().strip()).ca
    assert pin is not None and pin == tls.fingerprint((fed.data / "ca.pem").read_bytes())
    # The CA is fetched without trusting it, checked against the pin, then the controller's
    # certificate is verified against it: no CA file needed.
    with connect(fed, verify=pin) as client:
        assert client.get_sessions()["count"] == 0 and client.get_controller_status()["session"] is None
    with connect(fed, verify=pin.upper().replace("SHA256:", "sha256:")) as client:  # hex digits in either case
        assert client.get_clients()["count"] == 0

    other = tls.fingerprint(tls.create_ca()[0])  # another controller's CA
    with connect(fed, verify=other) as client:
        with pytest.raises(api.ConnectionFailed, match=rf"presented CA {pin[:23]}\.\.\. but verify= pins {other[:23]}\.\.\..*check verify=") as info:
            client.get_clients()
        assert "\n" not in str(info.value)
    with pytest.raises(api.ConfigError, match="not a CA fingerprint: sha256: and 64 hex digits"):
        connect(fed, verify="sha256:0123")


class Relay:
    """A TCP relay on loopback between a Python client and the controller (TLS passes through
    untouched). ``cut_next()``: the next request the client sends is forwarded, then the
    client's side of that connection is cut before any answer reaches it (the controller
    has the request, the client never hears back); the controller's side stays open."""

    MIN_REQUEST = 60  # bytes: a TLS record holding a request, not a websocket ping (about 32)

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.armed = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next(self) -> None:
        self.armed.set()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            cut = threading.Event()
            threading.Thread(target=self._upstream, args=(down, up, cut), daemon=True).start()
            threading.Thread(target=self._downstream, args=(up, down, cut), daemon=True).start()

    def _upstream(self, down: socket.socket, up: socket.socket, cut: threading.Event) -> None:
        try:
            while data := down.recv(1 << 16):
                if self.armed.is_set() and len(data) >= self.MIN_REQUEST:
                    self.armed.clear()
                    cut.set()  # before the controller has it: no answer can slip through
                    up.sendall(data)
                    self.cuts += 1
                    down.shutdown(socket.SHUT_RDWR)
                    return
                up.sendall(data)
        except OSError:
            pass
        finally:
            if not cut.is_set():
                up.close()

    def _downstream(self, up: socket.socket, down: socket.socket, cut: threading.Event) -> None:
        try:
            while data := up.recv(1 << 16):
                if not cut.is_set():
                    down.sendall(data)  # after a cut the answer is read and dropped
        except OSError:
            pass
        finally:
            down.close()

    def close(self) -> None:
        self.server.close()


def test_reads_reconnect_and_a_write_whose_link_dropped_is_not_sent_again(fed: Federation, tmp_path: Path) -> None:
    from scaleout import Scaleout, api

    first = fed.controller()
    port = int(fed.url.rsplit(":", 1)[1])
    token = (fed.data / "admin.token").read_text().strip()
    seed = tmp_path / "seed.npz"
    np.savez(seed, np.zeros(3, dtype=np.float32))

    # The controller is killed and started again (same data, same port) between two calls:
    # the next call, a read, reconnects without the caller seeing anything.
    with connect(fed) as direct:
        assert direct.get_sessions()["count"] == 0
        first.stop(sig=signal.SIGKILL)
        fed.controller(name="controller-again", port=port)
        assert direct.get_sessions()["count"] == 0
        assert direct.set_active_model(seed)["id"]  # and then a write, on the new link

    relay = Relay(port)
    client = Scaleout("127.0.0.1", port=relay.port, verify=fed.ca, token=token)
    try:
        # A read whose link drops after it was sent is sent again, on a new link.
        assert client.get_sessions()["count"] == 0
        relay.cut_next()
        assert client.get_sessions()["count"] == 0 and relay.cuts == 1
        # A write is not: the controller started the session, the answer was lost, and the
        # caller is told to check rather than have it started twice.
        relay.cut_next()
        with pytest.raises(api.ConnectionFailed, match=r"closed after session\.start was sent.*whether it was done is unknown; check with get_sessions\(\)") as info:
            client.start_session(rounds=1, round_timeout=60)
        assert relay.cuts == 2 and "\n" not in str(info.value)
        sessions = poll(client.get_sessions, lambda s: s["count"] > 0)
        assert sessions["count"] == 1, sessions  # started once, not twice
        assert client.stop_session(sessions["result"][0]["id"])["status"] == "stopped"
    finally:
        client.close()
        relay.close()
