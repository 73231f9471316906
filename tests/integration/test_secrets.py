"""Secrets and files: the data dir 0700, state.db, models and packages 0600; tokens never in
logs or --json output; errors sent to peers carry no paths; a package whose signature does
not verify is refused by the client; set-active refuses what a client would."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import stat
import tarfile
from contextlib import closing
from pathlib import Path

import pytest
from conftest import QUICKSTART, Federation, scaleout, sqlite_only

from scaleout.core.errors import RemoteError
from scaleout.package.archive import create_archive
from scaleout.security.tls import client_context
from scaleout.transport.net import connect


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_dir_is_private(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    d = fed.data
    assert mode(d) == 0o700
    sqlite = ("state.db", "state.db-wal", "state.db-shm") if fed.store is None else ()  # on PostgreSQL: rows and blobs in the server
    for name in (*sqlite, "token.key", "package.key", "admin.token", "ca.key", "server.key", ".lock"):
        assert mode(d / name) == 0o600, name
    for name in ("ca.pem", "server.pem", "controller.json"):  # public, inside a private dir
        assert mode(d / name) == 0o644, name
    for kind in ("models", "packages") if fed.store is None else ():
        assert mode(d / kind) == 0o700, kind
        files = list((d / kind).iterdir())
        assert files and all(mode(f) == 0o600 for f in files), [(f.name, oct(mode(f))) for f in files]


def test_an_older_world_readable_data_dir_is_made_private(fed: Federation) -> None:
    sqlite_only("it loosens the modes of state.db and a model file in the data dir; on PostgreSQL neither is there")
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.procs[0].stop()
    d = fed.data
    os.chmod(d, 0o755)
    os.chmod(d / "state.db", 0o644)
    (model,) = (d / "models").iterdir()
    os.chmod(model, 0o644)
    os.chmod(d / "models", 0o755)
    fed.procs.clear()
    fed.controller()
    assert (mode(d), mode(d / "state.db"), mode(d / "models"), mode(model)) == (0o700, 0o600, 0o700, 0o600)


def test_tokens_never_appear_in_logs_or_json_output(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    fed.combiner("c1")
    fed.client("a")
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, validate=False)
    assert session["status"] == "finished", session
    secrets = [(fed.data / "admin.token").read_text().strip(), fed.token("client"), fed.token("combiner")]
    outputs = []
    for args in (("audit", "ls"), ("client", "ls"), ("combiner", "ls"), ("status",), ("session", "show"), ("model", "ls")):
        r = scaleout(*args, "--json", "--data-dir", str(fed.data))
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout + r.stderr)
    fed.stop_all()
    logs = [p.text() for p in fed.procs]  # every role logged at debug level
    for secret in secrets:
        signature = secret.rsplit(".", 1)[1]
        for text in logs + outputs:
            assert secret not in text and signature not in text
    audit = json.loads(outputs[0])
    assert {e["detail"]["jti"] for e in audit if e["action"] == "token.create"}  # ids only


def test_errors_sent_to_a_node_name_no_path_of_ours(fed: Federation) -> None:
    sqlite_only("it corrupts a model file in the data dir and checks the path the error names; on PostgreSQL the model is a large object")
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    model = fed.data / "models" / f"{seed}.safetensors"
    model.write_bytes(b"not the model any more")  # the disk went bad
    token = fed.identity("combiner", "c1")

    async def fetch_as_combiner() -> RemoteError:
        link = await connect(fed.url, token, client_context(fed.ca), max_payload=1 << 30)
        reader = asyncio.create_task(link.run())
        try:
            await link.request("combiner.register", {"name": "c1"}, timeout=10)
            with pytest.raises(RemoteError) as info:
                await link.request("model.get", {"id": seed}, timeout=10)
            return info.value
        finally:
            await link.ws.close()
            reader.cancel()

    message = str(asyncio.run(fetch_as_combiner()))
    assert "is corrupt" in message and f"{seed}.safetensors" in message and ".../models" in message, message
    assert str(fed.tmp) not in message and "/models/" not in message, message
    # The controller's own admin is told where the file is.
    with pytest.raises(RemoteError) as info:
        fed.admin("model.get", {"id": seed})
    assert str(model.parent) in str(info.value) and f"{seed}.safetensors" in str(info.value)


def tgz(files: dict[str, bytes], deep: int = 0, pax: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = dict(pax or {})
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_set_active_refuses_what_a_client_would_refuse(fed: Federation) -> None:
    fed.controller()
    yaml = (QUICKSTART / "scaleout.yaml").read_bytes()
    deep = "pkg/" + "/".join(["d"] * 2000) + "/x.py"
    cases = {
        "deep.tgz": (tgz({"pkg/scaleout.yaml": yaml, deep: b"x"}), "has a path longer than 1024 characters"),
        "levels.tgz": (tgz({"pkg/scaleout.yaml": yaml, "pkg/" + "d/" * 40 + "x.py": b"x"}), "42 levels deep; the limit is 32"),
        "bomb.tgz": (tgz({"pkg/scaleout.yaml": yaml, "pkg/zeros.bin": bytes(200 << 20)}), "compression bomb"),
        # Issue 20 #8: a pax header of 64 MiB (800 MB took the controller to 3.25 GB).
        "header.tgz": (tgz({"pkg/scaleout.yaml": yaml}, pax={"comment": "a" * (64 << 20)}), "a header bomb"),
    }
    for name, (data, why) in cases.items():
        path = fed.tmp / name
        path.write_bytes(data)
        r = scaleout("package", "set-active", str(path), "--data-dir", str(fed.data))
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert why in r.stderr and "internal error" not in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    assert fed.admin("status")[0]["active_package"] is None
    # Limits are the controller's to set: a smaller file count refuses the quickstart package too.
    fed.procs[0].stop()
    fed.procs.clear()
    fed.controller("--package-max-files", "2")
    archive = create_archive(QUICKSTART, fed.tmp / "qs.tgz")
    r = scaleout("package", "set-active", str(archive), "--data-dir", str(fed.data))
    assert r.returncode == 2 and "more than 2 files and directories" in r.stderr, r.stderr


def test_a_client_refuses_a_package_whose_signature_does_not_verify(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    package = fed.activate(QUICKSTART)
    fed.combiner("c1")
    ok = fed.client("ok")
    fed.wait_clients(1)
    assert "signature verified" in ok.text()
    cache = fed.tmp / "ok" / "package"
    assert mode(cache) == 0o700 and mode(fed.tmp / "ok" / "controller-package.pub") == 0o600
    # Someone with the state file swaps the signature for another package's.
    if fed.store is not None:  # the same, in PostgreSQL
        import psycopg

        with psycopg.connect(fed.store) as conn:
            (sig,) = conn.execute("SELECT signature FROM packages WHERE id=%s", (package,)).fetchone()  # type: ignore[misc]
            forged = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
            conn.execute("UPDATE packages SET signature=%s WHERE id=%s", (forged, package))
    else:
        with closing(sqlite3.connect(fed.data / "state.db")) as db:
            (sig,) = db.execute("SELECT signature FROM packages WHERE id=?", (package,)).fetchone()
            forged = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
            db.execute("UPDATE packages SET signature=? WHERE id=?", (forged, package))
            db.commit()
    bad = fed.client("bad")
    assert bad.popen.wait(30) == 2, bad.text()
    assert f"the compute package {package[:12]} is not signed by the controller" in bad.text()
    assert not (fed.tmp / "bad" / "package").exists()  # nothing unpacked
