"""HTTP /api/v1 on the controller's own port and TLS, with a real HTTP client (issue 16, item 3)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import zipfile
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import QUICKSTART, Federation, scaleout

from scaleout.roles.httpapi import ROUTES


class Http:
    """urllib against the controller, trusting its CA (DATA/ca.pem)."""

    def __init__(self, fed: Federation, token: str | None) -> None:
        self.port = int(fed.url.rsplit(":", 1)[1])
        self.base = f"https://127.0.0.1:{self.port}"
        self.ctx = ssl.create_default_context(cafile=fed.ca)
        self.token = token

    def raw(self, method: str, path: str, body: bytes | None = None, token: str | None = "", **headers: str) -> tuple[int, dict[str, str], bytes]:
        token = self.token if token == "" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def __call__(self, method: str, path: str, value: Any = None, body: bytes | None = None, token: str | None = "") -> tuple[int, Any]:
        if value is not None:
            body = json.dumps(value).encode()
        status, headers, data = self.raw(method, path, body, token)
        assert headers["Content-Type"] == "application/json", (status, headers, data)
        return status, json.loads(data)

    def ok(self, method: str, path: str, value: Any = None, body: bytes | None = None) -> Any:
        status, answer = self(method, path, value, body)
        assert status == 200, (method, path, status, answer)
        return answer

    def refused(self, method: str, path: str, status: int, value: Any = None, body: bytes | None = None, token: str | None = "") -> str:
        got, answer = self(method, path, value, body, token)
        assert got == status, (method, path, got, answer)
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}, answer
        return str(answer["error"]["message"])

    def head_only(self, method: str, path: str, length: int) -> tuple[int, Any]:
        """Send a request whose head announces ``length`` body bytes, none of them sent."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            conn.putrequest(method, path)
            conn.putheader("Authorization", f"Bearer {self.token}")
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()


def test_a_session_driven_over_http(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.combiner("c1")
    fed.client("k1", package=QUICKSTART)
    fed.client("k2", package=QUICKSTART)
    api = Http(fed, (fed.data / "admin.token").read_text().strip())
    assert api.ok("GET", "/api/v1/sessions") == {"sessions": []}
    build = tmp_path / "build"
    r = scaleout("run", "build", "-p", str(QUICKSTART), "-o", str(build))
    assert r.returncode == 0, r.stderr
    from scaleout.package.archive import create_archive

    tgz = create_archive(QUICKSTART, tmp_path / "client.tgz")
    package = api.ok("POST", "/api/v1/packages?name=quickstart.tgz", body=tgz.read_bytes())
    assert package["name"] == "quickstart.tgz" and package["size"] == tgz.stat().st_size
    seed = api.ok("POST", "/api/v1/models", body=(build / "seed.npz").read_bytes())["id"]
    status = api.ok("GET", "/api/v1/status")
    assert status["active_package"] == package["id"] and status["active_model"] == seed
    fed.wait_clients(2)
    assert {c["name"] for c in api.ok("GET", "/api/v1/clients")["clients"]} == {"k1", "k2"}
    assert len(api.ok("GET", "/api/v1/clients?n_max=1")["clients"]) == 1
    assert [c["name"] for c in api.ok("GET", "/api/v1/combiners")["combiners"]] == ["c1"]

    started = api.ok("POST", "/api/v1/sessions", {"rounds": 2, "min_clients": 1, "round_timeout": 60, "name": "over-http"})["session"]
    sid = started["id"]
    done = fed.admin("session.wait", {"id": sid})[0]["session"]  # the websocket door sees the same session
    assert done["status"] == "finished"
    session = api.ok("GET", f"/api/v1/sessions/{sid}")["session"]
    assert session["status"] == "finished" and session["end_model"] == done["end_model"]
    assert [r["idx"] for r in api.ok("GET", f"/api/v1/sessions/{sid}/rounds")["rounds"]] == [1, 2]
    # Each client's validation, as Edge's REST API lists them; each round's mean stays in its rounds.
    listed = api.ok("GET", f"/api/v1/validations?session_id={sid}")
    validations = listed["validations"]
    assert listed["total"] == len(validations) == sum(len(r["participants"]) for r in session["rounds"]) >= 2
    assert {v["round_index"] for v in validations} == {1, 2} and all(v["session_id"] == sid for v in validations)
    assert {v["sender"]["name"] for v in validations} <= {"k1", "k2"} and all(v["sender"]["role"] == "client" for v in validations)
    assert all(v["model_id"] == session["rounds"][v["round_index"] - 1]["model_id"] and "validation_accuracy" in v["data"] for v in validations)
    assert api.ok("GET", "/api/v1/validations") == listed
    assert api.ok("GET", f"/api/v1/validations?session_id={sid}&n_max=1") == {"validations": validations[-1:], "total": len(validations)}
    k2 = api.ok("GET", f"/api/v1/validations?sender_name=k2&model_id={done['end_model'][:16]}")["validations"]
    assert k2 == [v for v in validations if v["sender"]["name"] == "k2" and v["model_id"] == done["end_model"]]
    assert "no session 's-nope'" in api.refused("GET", "/api/v1/validations?session_id=s-nope", 404)
    assert "must be a whole number from 0 (all)" in api.refused("GET", "/api/v1/validations?n_max=-1", 400)
    models = api.ok("GET", f"/api/v1/models?session_id={sid}")["models"]
    assert len(models) == 2 and len(api.ok("GET", "/api/v1/models")["models"]) == 3
    end = done["end_model"]
    assert api.ok("GET", f"/api/v1/models/{end[:16]}")["model"]["id"] == end
    assert "metrics" in api.ok("GET", f"/api/v1/metrics?session_id={sid}&limit=5")

    # The model's bytes: what the websocket door gives, and their sha256 is the id.
    status_code, headers, data = api.raw("GET", f"/api/v1/models/{end}/download")
    assert status_code == 200 and headers["Content-Type"] == "application/octet-stream"
    assert hashlib.sha256(data).hexdigest() == end and data == fed.admin("model.get", {"id": end})[1]
    assert api.raw("GET", "/api/v1/models/active/download")[2] == data

    # The literal line of the README, where curl exists.
    if shutil.which("curl"):
        token = (fed.data / "admin.token").read_text().strip()
        r2 = subprocess.run(
            f'curl -sS --cacert ca.pem -H "Authorization: Bearer $T" https://127.0.0.1:{api.port}/api/v1/sessions',
            shell=True, cwd=fed.data, env={"T": token, "PATH": "/usr/bin:/bin:/usr/local/bin"}, capture_output=True, text=True, timeout=30,
        )
        assert r2.returncode == 0, r2.stderr
        assert [s["id"] for s in json.loads(r2.stdout)["sessions"]] == [sid]

    # More rounds of it (while it runs, no new seed: 409), then stopping it; a stopped one cannot be stopped (409).
    more = api.ok("POST", f"/api/v1/sessions/{sid}/continue", {"rounds": 50, "round_timeout": 60})["session"]
    assert more["id"] == sid
    assert api.refused("POST", "/api/v1/models", 409, body=(build / "seed.npz").read_bytes()).startswith(f"session {sid} is running")
    assert api.ok("POST", f"/api/v1/sessions/{sid}/stop")["session"]["status"] == "stopped"
    assert fed.admin("session.wait", {"id": sid})[0]["session"]["status"] == "stopped"
    assert "is not running" in api.refused("POST", f"/api/v1/sessions/{sid}/stop", 409)
    audit = [e["action"] for e in fed.admin("audit.ls", {"limit": 0})[0]["entries"]]
    assert {"package.set_active", "model.set_seed", "session.start", "model.download", "session.stop"} <= set(audit)


def test_errors_have_honest_statuses_and_the_openapi_document_validates(fed: Federation, tmp_path: Path) -> None:
    (fed.tmp / "controller.toml").write_text("handshake_timeout = 1\n")  # also the wait for a stalled request's next bytes
    fed.controller("--max-payload-mb", "4", "--config", str(fed.tmp / "controller.toml"))
    api = Http(fed, (fed.data / "admin.token").read_text().strip())

    # 401: no token, a bad one, a ticket-like garbage.
    assert api.refused("GET", "/api/v1/sessions", 401, token=None).startswith("no token given")
    assert api.refused("GET", "/api/v1/sessions", 401, token="not-a-token")
    assert api.raw("GET", "/api/v1/status", token=None)[1]["WWW-Authenticate"].startswith("Bearer")

    # 403: a client token (a join token, and an enrolled client's own credential) may write nothing, nor read.
    posts = [r for r in ROUTES if r.method == "POST"]
    assert {r.path for r in posts} == {"/sessions", "/sessions/{id}/stop", "/sessions/{id}/continue", "/packages", "/models"}
    for token in (fed.token("client"), fed.identity("client", "k9"), fed.token("combiner")):
        for route in posts:
            path = "/api/v1" + route.path.replace("{id}", "s-x")
            body = b"{}" if route.body == "json" else b"PK\x03\x04 not really"
            message = api.refused("POST", path, 403, body=body, token=token)
            assert "may not do" in message or "join token" in message or "combiner token" in message, message
        assert api.refused("GET", "/api/v1/sessions", 403, token=token)
    assert api.ok("GET", "/api/v1/status")["active_model"] is None  # nothing was written

    # 404: unknown ids and routes; 405: a known path, another method.
    assert api.refused("GET", "/api/v1/sessions/s-nonexistent", 404) == "no session 's-nonexistent'"
    assert api.refused("GET", "/api/v1/models/feedbeef", 404)
    assert api.refused("GET", "/api/v1/models/feedbeef/download", 404)
    assert "openapi.json" in api.refused("GET", "/api/v1/nothing/here", 404)
    assert api.refused("DELETE", "/api/v1/sessions", 405)

    # 400: bad JSON, JSON of the wrong shape or types, unknown or bad query parameters, bad uploads.
    assert "not valid JSON" in api.refused("POST", "/api/v1/sessions", 400, body=b'{"rounds": 2')
    assert "not valid JSON" in api.refused("POST", "/api/v1/sessions", 400, body=b'{"rounds": NaN}')
    assert "JSON object" in api.refused("POST", "/api/v1/sessions", 400, body=b"[1, 2]")
    assert "rounds" in api.refused("POST", "/api/v1/sessions", 400, {"rounds": "2"})
    assert "unknown" in api.refused("POST", "/api/v1/sessions", 400, {"roundz": 2})
    assert "rounds must be a whole number" in api.refused("POST", "/api/v1/sessions/latest/continue", 400, {"rounds": 1.5})
    assert "limit must be a whole number" in api.refused("GET", "/api/v1/metrics?limit=many", 400)
    assert "unknown query parameter 'colour'" in api.refused("GET", "/api/v1/models?colour=red", 400)
    assert "n_max" in api.refused("GET", "/api/v1/sessions?n_max=-1", 400)
    assert "not a .npz or .safetensors model" in api.refused("POST", "/api/v1/models", 400, body=b"not a model at all")
    assert "not a .npz or .safetensors model" in api.refused("POST", "/api/v1/models", 400, body=b"PK\x03\x04 broken zip")
    assert api.refused("POST", "/api/v1/packages", 400, body=b"not a tgz")
    assert "needs the file" in api.refused("POST", "/api/v1/packages", 400, body=b"")

    # 409: a session with no model.
    assert "no global model" in api.refused("POST", "/api/v1/sessions", 409, {"rounds": 1})

    # 413: a body over the bound is refused from its Content-Length, before it is sent.
    status, answer = api.head_only("POST", "/api/v1/models", (4 << 20) + 1)
    assert status == 413 and answer["error"]["code"] == "limit_exceeded" and "at most 4.0 MiB" in answer["error"]["message"], answer
    bomb = tmp_path / "zeros.npz"
    np.savez_compressed(bomb, np.zeros(1 << 20))  # 8 MiB of arrays in a few KiB
    assert bomb.stat().st_size < 1 << 20
    assert "unpacked, is 8.0 MiB" in api.refused("POST", "/api/v1/models", 413, body=bomb.read_bytes())
    status, answer = api.head_only("POST", "/api/v1/sessions", 2 << 20)  # a JSON body: 1 MiB
    assert status == 413 and "at most 1.0 MiB" in answer["error"]["message"], answer

    # 411 for chunked bodies, 400 for a malformed request (raw bytes over TLS).
    import socket

    def raw(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock, api.ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            out = b""
            while chunk := tls.recv(65536):
                out += chunk
            return out

    chunked = raw(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 "), chunked
    assert raw(b"GET /api/v1/status HTTP/1.1\r\nbad header line\r\n\r\n").startswith(b"HTTP/1.1 400 "), "malformed header"
    assert raw(b"GET /api/v1/status HTTP/1.1\r\nContent-Length: lots\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # An attack's finds: digits isdigit() takes and int() does not were a traceback and no answer, with no token.
    assert raw("GET /api/v1/status HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1")).startswith(b"HTTP/1.1 400 ")
    assert "n_max must be a whole number" in api.refused("GET", "/api/v1/models?n_max=%C2%B2", 400)
    assert "n_max must be a whole number" in api.refused("GET", "/api/v1/models?n_max=" + "9" * 5000, 400)
    lying = tmp_path / "lying.npz"  # an array header declaring 8 TiB over 16 bytes: numpy allocated it first
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (2**41,)})
    with zipfile.ZipFile(lying, "w") as z:
        z.writestr("arr_0.npy", head.getvalue() + bytes(16))
    assert "declares 8796093022208 bytes" in api.refused("POST", "/api/v1/models", 400, body=lying.read_bytes())
    assert raw(b"GET /api/v1/status HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")

    # A request that stops halfway (the rest is never sent) is answered (408, 400) and closed, not waited for.
    assert raw(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408 ")
    token = api.token or ""
    half = raw(b"POST /api/v1/sessions HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"rou")
    assert half.startswith(b"HTTP/1.1 400 ") and b"stalled: nothing came for 1 s" in half, half

    # The OpenAPI document: no token needed, valid, every route in it with its operation's types.
    from openapi_spec_validator import validate

    status_code, _, data = api.raw("GET", "/api/v1/openapi.json", token=None)
    assert status_code == 200
    doc = json.loads(data)
    validate(doc)
    for route in ROUTES:
        assert doc["paths"]["/api/v1" + route.path][route.method.lower()]["x-scaleout-operation"] == route.op
    metrics = {p["name"]: p["schema"] for p in doc["paths"]["/api/v1/metrics"]["get"]["parameters"]}
    assert metrics["limit"] == {"type": "integer"} and metrics["key"] == {"type": "string"}
    start = doc["paths"]["/api/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert start["rounds"] == {"type": "integer", "default": 5} and start["model"]["type"] == ["string", "null"]

    # The websocket door and /ca.pem are as they were, on the same port.
    assert fed.admin("status")[0]["url"] == fed.url
    assert api.raw("GET", "/ca.pem", token=None)[2] == (fed.data / "ca.pem").read_bytes()
    log = fed.procs[0].text()
    assert "Traceback" not in log


def test_the_connection_rate_limit_covers_http(fed: Federation) -> None:
    fed.controller("--max-connect-rate", "2")  # bursts of 20
    api = Http(fed, (fed.data / "admin.token").read_text().strip())
    answers = [api.raw("GET", "/api/v1/status") for _ in range(30)]
    statuses = [a[0] for a in answers]
    assert statuses[:15] == [200] * 15 and 429 in statuses, statuses
    refused = next(a for a in answers if a[0] == 429)
    assert int(refused[1]["Retry-After"]) >= 1
    assert json.loads(refused[2])["error"]["message"].startswith("too many connections from 127.0.0.1")


def test_the_readme_curl_block_works_pasted(fed: Federation, tmp_path: Path) -> None:
    """README "Over HTTP", run as one shell script from a repository where "Try it by hand"
    built the package and the seed; only the data dir and the port are this test's own."""
    import re

    from conftest import ROOT

    if not shutil.which("curl"):
        pytest.skip("no curl here")
    text = (ROOT / "README.md").read_text()
    block = re.findall(r"^```\n(.*?)^```", re.search(r"^## Over HTTP\n(.*?)(?=^## )", text, re.M | re.S)[1], re.M | re.S)[0]  # type: ignore[index]
    fed.controller()
    fed.combiner("c1")
    fed.client("k1", package=QUICKSTART)
    fed.client("k2", package=QUICKSTART)
    repo = tmp_path / "repo"
    client = repo / "sample_projects" / "quickstart" / "client"
    client.mkdir(parents=True)
    r = scaleout("run", "build", "-p", str(QUICKSTART), "-o", str(client))
    assert r.returncode == 0, r.stderr
    from scaleout.package.archive import create_archive

    create_archive(QUICKSTART, client.parent / "client.tgz")
    fed.wait_clients(2)
    port = fed.url.rsplit(":", 1)[1]
    script = "set -e\n" + block.replace("/tmp/scaleout-ctl", str(fed.data)).replace("8190", port)
    done = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    sessions = fed.admin("session.ls")[0]["sessions"]
    assert len(sessions) == 1 and sessions[0]["status"] == "finished"
    assert '"session_id": "' + sessions[0]["id"] in done.stdout and '"round_index": 2' in done.stdout, done.stdout
    final = (repo / "final.safetensors").read_bytes()
    assert hashlib.sha256(final).hexdigest() == sessions[0]["end_model"]
