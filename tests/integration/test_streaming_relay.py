"""A combiner relays the round's model to its clients as it arrives from the controller
(issue 17 #1): the chunks leave before the combiner has the whole model, the task that makes
a client use it only once the whole model matched its id. A download that fails or does not
match leaves every client having dropped what it got, and the roles serve on. Real roles,
real TLS, on 127.0.0.1 port 0; the combiner reaches the controller through a TCP relay the
test can hold or cut (TLS passes through it untouched)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, Federation, Proc, sqlite_only
from test_failover import wait_stdout_log

from scaleout.core import payload

PACKAGE = FIXTURES / "shift_client"
CLIENTS = ["s1", "s2"]
MIB = 1 << 20
DROPPED = "stopped sending a payload"  # a client's link dropping a payload its combiner gave up on (link.py)


class Relay:
    """A TCP relay on loopback in front of the controller. ``arm(after, cut)``: once ``after``
    more bytes went from the controller down to the combiner, stop passing them on (held until
    ``release()``), or, with ``cut``, drop that connection. New connections pass freely."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        self.budget: int | None = None  # bytes still passed down before the hold or cut
        self.cut = False
        self.held = threading.Event()  # the hold (or the cut) happened
        self.go = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, after: int, cut: bool = False) -> None:
        with self.lock:
            self.budget, self.cut = after, cut

    def release(self) -> None:
        self.go.set()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if downstream:
                    data = self._gate(data, src, dst)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _gate(self, data: bytes, up: socket.socket, down: socket.socket) -> bytes:
        with self.lock:
            if self.budget is None or len(data) < self.budget:
                if self.budget is not None:
                    self.budget -= len(data)
                return data
            head, self.budget = data[: self.budget], None
        down.sendall(head)
        self.held.set()
        if self.cut:
            raise OSError("cut")  # both sides of this connection are shut down
        self.go.wait()
        return data[len(head) :]

    def close(self) -> None:
        self.go.set()
        self.server.close()


@pytest.fixture
def relay(fed: Federation) -> Iterator[Relay]:
    fed.controller()
    r = Relay(int(fed.url.rsplit(":", 1)[1]))
    yield r
    r.close()


def seed(fed: Federation) -> str:
    """shift_client's model with a 16 MiB float32 matrix: a payload of many chunks, whose
    progress a client logs by quarters (link.py PROGRESS_MIN_BYTES)."""
    model = [np.linspace(-1, 1, 1 << 22, dtype=np.float32).reshape(1 << 11, 1 << 11), np.arange(5, dtype=np.float64) / 3, np.array([1, 2, 3], np.int32)]
    return str(fed.admin("model.set_seed", {}, payload.encode(model))[0]["id"])


def federation_behind(fed: Federation, relay: Relay | None) -> tuple[Proc, list[Proc]]:
    """Combiner c1 (dialling the controller through ``relay``) and the two clients."""
    url = f"wss://127.0.0.1:{relay.port}" if relay is not None else fed.url
    args = ["combine", "--controller", url, "--token", fed.token("combiner"), "--ca", fed.ca, "--name", "c1", "--port", "0", "--state-dir", str(fed.tmp / "c1")]
    c1 = Proc("c1", args, fed.logs, True)
    fed.procs.append(c1)
    clients = [fed.client(name, package=PACKAGE) for name in CLIENTS]
    fed.wait_clients(len(CLIENTS))
    return c1, clients


def start(fed: Federation, **config: object) -> str:
    return str(fed.admin("session.start", {"rounds": 1, "validate": False, "round_timeout": 60, **config})[0]["session"]["id"])


def wait(fed: Federation, session_id: str) -> dict:
    return fed.admin("session.wait", {"id": session_id})[0]["session"]  # type: ignore[no-any-return]


def test_clients_get_the_model_while_it_still_arrives_and_train_on_it_once_checked(fed: Federation, relay: Relay) -> None:
    model_id = seed(fed)
    c1, clients = federation_behind(fed, relay)
    relay.arm(10 * MIB)  # 10 of the model's 16 MiB reach the combiner; the rest waits
    session = start(fed)
    assert relay.held.wait(30), c1.text()
    # While the combiner still lacks 6 MiB of the model, its clients have most of what it got.
    for client in clients:
        wait_stdout_log(client, f"of {16.0:.1f} MiB", timeout=20)  # "receiving payload from ...: 4.0 MiB of 16.0 MiB"
        assert "training on model" not in client.text()  # no task before the combiner checked the whole model
    relay.release()
    done = wait(fed, session)
    (rnd,) = done["rounds"]
    assert done["status"] == "finished" and rnd["status"] == "succeeded" and sorted(rnd["participants"]) == CLIENTS, done
    for client in clients:  # each client's link checked the model's sha256, then its task named it
        assert f"training on model {model_id[:12]}" in client.text()
        assert DROPPED not in client.text()


def test_a_model_that_does_not_match_its_id_is_never_used_and_everyone_serves_on(fed: Federation) -> None:
    sqlite_only("it flips a byte of the model file in the data dir; on PostgreSQL the model is a large object")
    fed.controller()
    model_id = seed(fed)
    fed.admin("model.get", {"id": model_id})  # the controller checked and keeps it; what it serves is read from the file again
    stored = fed.data / "models" / f"{model_id}.safetensors"
    flip(stored)  # on disk, after the check: served to the combiner with the id it no longer matches
    c1, clients = federation_behind(fed, None)
    done = wait(fed, start(fed))
    assert done["status"] == "failed", done
    assert "cannot start train: reply to model.get from" in c1.text() and "payload is corrupt" in c1.text(), c1.text()
    for client in clients:  # it had most of the model, and dropped it when told why
        wait_stdout_log(client, DROPPED, timeout=10)
        line = next(x for x in client.text().splitlines() if DROPPED in x)
        assert "of 16.0 MiB arrived" in line and "payload is corrupt" in line and model_id[:12] in line, line
        assert "training on model" not in client.text()
    flip(stored)  # repaired: the same roles run the next session
    done = wait(fed, start(fed))
    assert done["status"] == "finished" and sorted(done["rounds"][0]["participants"]) == CLIENTS, done
    for proc in [c1, *clients]:
        assert proc.popen.poll() is None


def test_a_controller_link_lost_mid_download_leaves_the_clients_clean(fed: Federation, relay: Relay) -> None:
    model_id = seed(fed)
    c1, clients = federation_behind(fed, relay)
    relay.arm(6 * MIB, cut=True)
    first = start(fed, round_timeout=5)  # the combiner's report of the round it could not start is lost with its link
    assert relay.held.wait(30), c1.text()
    for client in clients:
        wait_stdout_log(client, DROPPED, timeout=20)
        line = next(x for x in client.text().splitlines() if DROPPED in x)
        assert "of 16.0 MiB arrived" in line and f"could not fetch model {model_id[:12]}" in line, line
    wait_stdout_log(c1, "cannot start train", timeout=10)
    wait(fed, first)  # however the controller ended it (the combiner came back through the relay)
    done = wait(fed, start(fed))
    assert done["status"] == "finished" and sorted(done["rounds"][0]["participants"]) == CLIENTS, done
    for client in clients:
        assert f"training on model {model_id[:12]}" in client.text()
    for proc in [c1, *clients]:
        assert proc.popen.poll() is None


def flip(path: Path) -> None:
    with path.open("r+b") as fh:  # in place: the same file, one byte of a tensor changed
        fh.seek(-1000, 2)
        byte = fh.read(1)
        fh.seek(-1000, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
