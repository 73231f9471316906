"""The `scaleout` command as people run it: `python -m scaleout ...` in real processes.

Covers --help and --version, how user mistakes are reported (one line, an exit code, no
traceback), every admin command against a real controller over TLS, `serve --config`,
`scaleout dev` and shutting a role down with SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, QUICKSTART, START_TIMEOUT, Federation, federation, scaleout, wait_line, wait_stdout

SCALEOUT_ENV = ("SCALEOUT_CONTROLLER", "SCALEOUT_TOKEN", "SCALEOUT_CA")


@pytest.fixture(autouse=True)
def _no_ambient_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests choose how the controller is found; the caller's shell must not."""
    for name in SCALEOUT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """One controller shared by the tests that only read from it or are refused by it."""
    with federation(tmp_path_factory.mktemp("ctl")) as f:
        f.controller()
        yield f


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def as_json(r: subprocess.CompletedProcess[str]) -> object:
    return json.loads(ok(r).stdout)


def user_error(r: subprocess.CompletedProcess[str], code: int | None, *needles: str) -> str:
    """Assert the way a user's mistake must look: one line on stderr, a non-zero exit code."""
    return refused(r.returncode, r.stderr, r.stdout, code, *needles)


def refused(returncode: int, stderr: str, stdout: str, code: int | None, *needles: str) -> str:
    assert "Traceback" not in stderr + stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("scaleout") and "error" in line, line
    assert returncode != 0, line
    if code is not None:
        assert returncode == code, f"exit {returncode}, expected {code}: {line}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def utc_iso(value: object) -> dt.datetime:
    """A time as --json prints it: an ISO 8601 string in UTC."""
    assert isinstance(value, str), f"{value!r} is not an ISO 8601 string"
    when = dt.datetime.fromisoformat(value)
    assert when.utcoffset() == dt.timedelta(0), value
    return when


def by_data_dir(fed: Federation) -> list[str]:
    return ["--data-dir", str(fed.data)]


def by_flags(fed: Federation, token: str) -> list[str]:
    return ["--controller", fed.url, "--token", token, "--ca", fed.ca]


# -- 1. help, version, import cost -------------------------------------------------------

HELP = [
    "serve", "combine", "join", "token create", "run build", "package create", "package set-active",
    "model set-seed", "model ls", "model show", "model download",
    "session start", "session ls", "session show", "session watch", "session stop",
    "client ls", "combiner ls", "dev",
    # the groups themselves, and the top level
    "token", "run", "package", "model", "session", "client", "combiner", "",
]  # fmt: skip


@pytest.mark.parametrize("command", HELP, ids=lambda c: c or "scaleout")
def test_help(command: str) -> None:
    words = command.split()
    r = ok(scaleout(*words, "--help", timeout=20))
    assert r.stdout.startswith(f"usage: {' '.join(['scaleout', *words])}"), r.stdout[:200]
    assert r.stderr == ""


def test_version() -> None:
    r = ok(scaleout("--version", timeout=20))
    # version, wire protocol, build kind: what support needs to know about a device
    assert r.stdout.strip() == "scaleout 0.1.0 (protocol 2, source)"


def test_help_does_not_import_heavy_modules() -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "scaleout", "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:") and "|" in line}
    assert "scaleout" in imported and "argparse" in imported  # the parse worked: it is a real listing
    heavy = imported & {"numpy", "textual", "websockets", "cryptography"}
    assert not heavy, f"scaleout --help imports {sorted(heavy)}"


# -- 2. user mistakes ----------------------------------------------------------------------


def test_bad_flags_and_commands(tmp_path: Path) -> None:
    user_error(scaleout("--bogus", cwd=tmp_path), 2)
    user_error(scaleout("model", "ls", "--bogus", cwd=tmp_path), 2, "--bogus")
    user_error(scaleout("frobnicate", cwd=tmp_path), 2, "frobnicate")
    user_error(scaleout("session", "start", "--rounds", "many", cwd=tmp_path), 2, "--rounds")


def test_local_files_that_are_missing_or_wrong(ctl: Federation, tmp_path: Path) -> None:
    user_error(scaleout("run", "build", "-p", "missing-dir", cwd=tmp_path), 2, "missing-dir")
    user_error(scaleout("package", "create", "--path", "missing", cwd=tmp_path), 2, "missing")
    user_error(scaleout("model", "set-seed", "missing.npz", *by_data_dir(ctl), cwd=tmp_path), 2, "missing.npz")
    (tmp_path / "file.txt").write_text("not a model\n")
    user_error(scaleout("model", "set-seed", "file.txt", *by_data_dir(ctl), cwd=tmp_path), 2, "file.txt")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    user_error(scaleout("model", "set-seed", "broken.npz", *by_data_dir(ctl), cwd=tmp_path), 2, "broken.npz")
    user_error(scaleout("package", "set-active", "missing.tgz", *by_data_dir(ctl), cwd=tmp_path), 2, "missing.tgz")


def test_relative_package_paths(tmp_path: Path) -> None:
    """The README's own commands, typed in the folder above the package."""
    package = shutil.copytree(QUICKSTART, tmp_path / "sample_projects" / "quickstart" / "client", ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    rel = "sample_projects/quickstart/client"
    ok(scaleout("run", "build", "-p", rel, cwd=tmp_path))
    assert (package / "seed.npz").is_file()
    ok(scaleout("run", "build", "--path", rel, "-o", "out", cwd=tmp_path))
    assert (tmp_path / "out" / "seed.npz").is_file()
    ok(scaleout("package", "create", "--path", rel, cwd=tmp_path))
    assert (package.parent / "client.tgz").is_file()
    ok(scaleout("package", "create", "-p", rel, "-o", "pkg.tgz", cwd=tmp_path))
    assert (tmp_path / "pkg.tgz").is_file()


def test_insecure_against_a_tls_address_is_one_line(tmp_path: Path) -> None:
    env = {"SCALEOUT_CONTROLLER": "wss://127.0.0.1:9", "SCALEOUT_TOKEN": "t"}
    for cmd in (["status", "--insecure"], ["join", "--insecure", "--name", "x", "-p", str(QUICKSTART)]):
        r = scaleout(*cmd, cwd=tmp_path, env=env, timeout=30)
        assert r.returncode == 2 and "drop --insecure" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_no_controller_configured(tmp_path: Path) -> None:
    user_error(scaleout("model", "ls", cwd=tmp_path), 2, "--controller")
    (tmp_path / "not-a-controller").mkdir()
    user_error(scaleout("session", "ls", "--data-dir", "not-a-controller", cwd=tmp_path), 2, "not-a-controller")


@pytest.mark.parametrize(
    "text",
    ['{"url": "wss://127.0.0.1:8090", "ca"', "{}", "[]", "", '{"url": 5}', '{"url": "wss://127.0.0.1:9"}'],
    ids=["truncated", "empty-object", "list", "empty", "url-not-text", "tls-without-ca"],
)
def test_damaged_controller_json(tmp_path: Path, text: str) -> None:
    (tmp_path / "ctl").mkdir()
    (tmp_path / "ctl" / "controller.json").write_text(text)
    (tmp_path / "ctl" / "admin.token").write_text("not.a.token\n")
    user_error(scaleout("status", "--data-dir", "ctl", cwd=tmp_path), 2, "controller.json", "scaleout serve --data-dir ctl")


def test_refused_or_unreachable_controller(ctl: Federation, tmp_path: Path) -> None:
    admin = (ctl.data / "admin.token").read_text().strip()
    user_error(scaleout("model", "ls", *by_flags(ctl, "garbage"), cwd=tmp_path), 3, "token")
    # A well-formed token whose signature does not verify.
    head, claims, sig = admin.split(".")
    forged = f"{head}.{claims}.{('B' if sig[0] != 'B' else 'C') + sig[1:]}"
    user_error(scaleout("model", "ls", *by_flags(ctl, forged), cwd=tmp_path), 3, "token")
    user_error(scaleout("model", "ls", "--controller", "wss://127.0.0.1:1", "--token", admin, "--ca", ctl.ca, cwd=tmp_path), 3, "127.0.0.1:1")
    user_error(scaleout("model", "ls", "--controller", ctl.url, "--token", admin, "--ca", "missing.pem", cwd=tmp_path), 2, "missing.pem")
    user_error(scaleout("model", "ls", "--controller", ctl.url, "--token", "@missing.token", "--ca", ctl.ca, cwd=tmp_path), 2, "missing.token")


def test_client_token_may_not_run_admin_commands(ctl: Federation, tmp_path: Path) -> None:
    r = scaleout("session", "ls", *by_flags(ctl, ctl.token("client")), cwd=tmp_path)
    user_error(r, None, "may not")
    assert r.returncode in (1, 3)


def test_session_mistakes(ctl: Federation, tmp_path: Path) -> None:
    user_error(scaleout("session", "start", "--settings", "{bad", *by_data_dir(ctl), cwd=tmp_path), 2, "--settings")
    user_error(scaleout("session", "start", "--rounds", "0", *by_data_dir(ctl), cwd=tmp_path), None, "rounds")
    user_error(scaleout("session", "start", "--aggregator-kwargs", "{bad", *by_data_dir(ctl), cwd=tmp_path), 2, "--aggregator-kwargs")
    user_error(scaleout("session", "start", "--aggregator", "median", *by_data_dir(ctl), cwd=tmp_path), 2, "unknown aggregator 'median'")
    bad_lr = ["--aggregator", "fedadam", "--aggregator-kwargs", '{"learning_rate": -1}']
    user_error(scaleout("session", "start", *bad_lr, *by_data_dir(ctl), cwd=tmp_path), 2, "learning_rate")
    user_error(scaleout("session", "show", "nonexistent", *by_data_dir(ctl), cwd=tmp_path), 1, "no session")
    user_error(scaleout("model", "show", "nonexistent", *by_data_dir(ctl), cwd=tmp_path), 1, "nonexistent")
    assert as_json(scaleout("session", "ls", "--json", *by_data_dir(ctl))) == []  # nothing was started


def test_join_without_a_compute_package(ctl: Federation, tmp_path: Path) -> None:
    (tmp_path / "empty-package").mkdir()
    r = scaleout("join", "-p", "empty-package", *by_flags(ctl, ctl.token("client")), cwd=tmp_path, timeout=20)
    user_error(r, 2, "scaleout.yaml")


def test_serve_configuration_mistakes(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    r = scaleout("serve", "--data-dir", "d", "--port", "0", "--tls-cert", "cert.pem", cwd=tmp_path, timeout=20)
    user_error(r, 2, "--tls-key")
    (tmp_path / "bad.toml").write_text("[controller]\nport = [\n")
    user_error(scaleout("serve", "--config", "bad.toml", cwd=tmp_path, timeout=20), 2, "bad.toml")
    (tmp_path / "typo.toml").write_text('[controller]\nport = 0\nhots = "127.0.0.1"\n')
    user_error(scaleout("serve", "--config", "typo.toml", cwd=tmp_path, timeout=20), 2, "hots")
    user_error(scaleout("serve", "--config", "missing.toml", cwd=tmp_path, timeout=20), 2, "missing.toml")
    (tmp_path / "port.toml").write_text('[controller]\nport = "eighty"\n')
    user_error(scaleout("serve", "--config", "port.toml", "--data-dir", "d", cwd=tmp_path, timeout=20), 2, "port")
    assert not (tmp_path / "d").exists() and not (tmp_path / "scaleout-data").exists()


# -- 3. admin commands against a real controller -------------------------------------------


def test_admin_flow_session_over_the_cli(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    conn = by_data_dir(fed)
    work = tmp_path / "work"
    work.mkdir()

    token = as_json(scaleout("token", "create", "--role", "client", "--json", *conn))
    assert isinstance(token, dict) and token["role"] == "client" and token["token"].count(".") == 2
    assert utc_iso(token["expires"]) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=29)

    # package create honours .scaleoutignore and writes DIR.tgz beside DIR
    mixed = shutil.copytree(FIXTURES / "mixed_client", work / "mixed")
    ok(scaleout("package", "create", "--path", str(mixed)))
    with tarfile.open(work / "mixed.tgz") as tar:
        names = set(tar.getnames())
    assert {"mixed/scaleout.yaml", "mixed/build.py", "mixed/startup.py"} <= names, names
    assert not any(n.startswith("mixed/data") or n.endswith(".tmp") for n in names), names

    # build, pack and activate the quickstart package; set its seed
    quick = shutil.copytree(QUICKSTART, work / "client", ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    ok(scaleout("run", "build", "-p", str(quick)))
    assert (quick / "seed.npz").is_file()
    info = as_json(scaleout("package", "create", "--path", str(quick), "--json"))
    assert isinstance(info, dict) and Path(info["file"]) == work / "client.tgz"
    with tarfile.open(work / "client.tgz") as tar:
        assert "client/seed.npz" not in tar.getnames()  # *.npz is ignored by the package
    active = as_json(scaleout("package", "set-active", str(work / "client.tgz"), "--json", *conn))
    assert isinstance(active, dict) and active["name"] == "client.tgz"
    assert active["id"] == hashlib.sha256((work / "client.tgz").read_bytes()).hexdigest()
    seed = as_json(scaleout("model", "set-seed", str(quick / "seed.npz"), "--json", *conn))
    assert isinstance(seed, dict)
    seed_id = seed["id"]

    models = as_json(scaleout("model", "ls", "--json", *conn))
    assert isinstance(models, list) and [m["id"] for m in models] == [seed_id] and models[0]["active"]
    utc_iso(models[0]["created"])
    shown = as_json(scaleout("model", "show", seed_id[:8], "--json", *conn))
    with np.load(quick / "seed.npz") as npz:
        arrays = [npz[str(i)] for i in range(len(npz.files))]
    assert isinstance(shown, dict) and shown["id"] == seed_id
    assert [(t["dtype"], list(t["shape"])) for t in shown["tensors"].values()] == [(str(a.dtype), list(a.shape)) for a in arrays]

    ok(scaleout("model", "download", seed_id, "-o", str(work / "seed.safetensors"), *conn))
    assert hashlib.sha256((work / "seed.safetensors").read_bytes()).hexdigest() == seed_id
    ok(scaleout("model", "download", "active", "-o", str(work / "seed-copy.npz"), *conn))
    with np.load(work / "seed-copy.npz") as npz:
        assert sorted(npz.files, key=int) == [str(i) for i in range(len(arrays))]
        for i, a in enumerate(arrays):
            np.testing.assert_array_equal(npz[str(i)], a)
            assert npz[str(i)].dtype == a.dtype

    assert as_json(scaleout("client", "ls", "--json", *conn)) == []
    assert as_json(scaleout("combiner", "ls", "--json", *conn)) == []
    assert as_json(scaleout("session", "ls", "--json", *conn)) == []

    # a session of 2 rounds with one combiner and two clients that download the package
    fed.combiner("c1")
    fed.client("client-a")
    fed.client("client-b")
    fed.wait_clients(2)
    r = scaleout("session", "start", "--rounds", "2", "--min-clients", "2", "--round-timeout", "30", "--wait", "--json", *conn)
    session = as_json(r)
    assert isinstance(session, dict) and session["status"] == "finished", session
    assert [(rnd["index"], rnd["status"]) for rnd in session["rounds"]] == [(1, "succeeded"), (2, "succeeded")]
    assert all(sorted(rnd["participants"]) == ["client-a", "client-b"] for rnd in session["rounds"])
    # One name for a round's number, ISO 8601 UTC for times, numbers for durations.
    assert utc_iso(session["created"]) <= utc_iso(session["finished"])
    for rnd in session["rounds"]:
        assert "idx" not in rnd and utc_iso(rnd["started"]) <= utc_iso(rnd["finished"])
        assert isinstance(rnd["duration_s"], float | int)
    detailed = as_json(scaleout("session", "show", "--clients", "--json", *conn))
    assert isinstance(detailed, dict) and [rnd["index"] for rnd in detailed["rounds"]] == [1, 2]
    for rnd in detailed["rounds"]:
        assert {c["round_index"] for c in rnd["clients"]} == {rnd["index"]}
        for c in rnd["clients"]:
            utc_iso(c["created"])
    listed = as_json(scaleout("session", "ls", "--json", *conn))
    assert isinstance(listed, list) and utc_iso(listed[0]["created"]) and utc_iso(listed[0]["finished"])

    shown = as_json(scaleout("session", "show", session["id"], "--json", *conn))
    latest = as_json(scaleout("session", "show", "--json", *conn))
    assert isinstance(shown, dict) and isinstance(latest, dict)
    assert shown["id"] == latest["id"] == session["id"] and shown["status"] == "finished" and len(shown["rounds"]) == 2
    listed = as_json(scaleout("session", "ls", "--json", *conn))
    assert isinstance(listed, list) and [(s["id"], s["status"]) for s in listed] == [(session["id"], "finished")]
    models = as_json(scaleout("model", "ls", "--json", *conn))
    assert isinstance(models, list) and [m["id"] for m in models] == [seed_id] + [rnd["model_id"] for rnd in session["rounds"]]

    clients = as_json(scaleout("client", "ls", "--json", *conn))
    assert isinstance(clients, list) and sorted(c["name"] for c in clients) == ["client-a", "client-b"]
    assert all(utc_iso(c["first_seen"]) <= utc_iso(c["last_seen"]) for c in clients)
    combiners = as_json(scaleout("combiner", "ls", "--json", *conn))
    assert isinstance(combiners, list) and [(c["name"], c["clients"]) for c in combiners] == [("c1", 2)]
    assert all(utc_iso(c["first_seen"]) <= utc_iso(c["last_seen"]) for c in combiners)

    # stopping a session that already finished is refused with a clear message
    user_error(scaleout("session", "stop", session["id"], *conn), None, "not running")
    # the human-readable forms work too
    text = ok(scaleout("session", "show", *conn)).stdout
    assert session["id"] in text and "round 2" in text
    text = ok(scaleout("model", "ls", *conn)).stdout
    assert "active" in text and seed_id[:16] in text


def test_session_failed_round_interrupt_and_stop(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    conn = by_data_dir(fed)
    # no clients: the round fails at its timeout and --wait exits 1
    r = scaleout("session", "start", "--rounds", "1", "--round-timeout", "1", "--wait", *conn)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"^round 1\s+failed", r.stdout, re.M) and re.search(r"^session \S+ failed", r.stdout, re.M), r.stdout
    # Ctrl-C while following a session: exit 130, the session keeps running
    p = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "session", "start", "--rounds", "1", "--round-timeout", "60", "--wait", *conn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may inherit SIG_IGN
    )
    try:
        assert p.stdout is not None and p.stderr is not None
        started = p.stdout.readline()
        assert re.match(r"session (\S+) started", started), started + p.stderr.read()
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 130
        sid = started.split()[1]
        stderr = p.stderr.read()
        assert "Traceback" not in stderr and f"scaleout session watch {sid}" in stderr, stderr
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    shown = as_json(scaleout("session", "show", "--json", *conn))
    assert isinstance(shown, dict) and (shown["id"], shown["status"]) == (sid, "running")
    # follow it again (the latest by default), and see it end when an admin stops it
    w = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "session", "watch", *conn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert w.stdout is not None
        line = w.stdout.readline()
        assert line.startswith(f"session {sid} running: following"), line
        r = ok(scaleout("session", "stop", *conn))
        assert r.stdout.strip() == f"session {sid} stopped"
        out, err = w.communicate(timeout=30)
        assert w.returncode == 1, (w.returncode, out, err)
        assert re.fullmatch(rf"round 1\s+failed\s+0 participants\s+\S+s\s+session stopped\nsession {sid} stopped: .*\n", out), out
        assert "Traceback" not in err, err
    finally:
        if w.poll() is None:
            w.kill()
            w.communicate()
    shown = as_json(scaleout("session", "show", sid, "--json", *conn))
    assert isinstance(shown, dict) and shown["status"] == "stopped"
    # a finished session prints its rounds and exits with its status
    r = scaleout("session", "watch", sid, "--json", *conn)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line, last = r.stdout.splitlines()  # JSON Lines: the round, then the session's outcome
    watched = json.loads(line)
    assert (watched["session_id"], watched["index"], watched["status"], watched["reason"]) == (sid, 1, "failed", "session stopped")
    assert json.loads(last)["status"] == "stopped"
    assert "idx" not in watched and utc_iso(watched["finished"]) and watched["failures"] == []


def test_session_watch_prints_rounds_with_client_failures(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    shutil.copytree(QUICKSTART, tmp_path / "good", ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    fed.client("good", package=Path("good"), cwd=tmp_path)  # a relative -p
    fed.client("odd", package=FIXTURES / "bad_client")  # its updates lack num_examples: refused
    fed.wait_clients(2)
    conn = by_data_dir(fed)
    session = fed.run_session(rounds=2, min_clients=1, validate=False)
    assert session["status"] == "finished", session
    sid = session["id"]
    r = ok(scaleout("session", "watch", *conn))
    lines = r.stdout.splitlines()
    assert len(lines) == 5, r.stdout
    for i, k in ((1, 0), (2, 2)):
        assert re.match(rf"round {i}\s+succeeded\s+1 participants", lines[k]), r.stdout
        assert re.match(r"    odd: train\S* .*num_examples", lines[k + 1]), r.stdout
    assert lines[4] == f"session {sid} finished", r.stdout
    r = ok(scaleout("session", "watch", sid, "--json", *conn))
    *rounds, end = [json.loads(line) for line in r.stdout.splitlines()]
    assert (end["status"], end["rounds"]) == ("finished", 2), end
    assert [(x["session_id"], x["index"], x["status"], x["participants"]) for x in rounds] == [(sid, 1, "succeeded", ["good"]), (sid, 2, "succeeded", ["good"])]
    for x in rounds:
        assert [f["client"] for f in x["failures"]] == ["odd"] and "num_examples" in x["failures"][0]["reason"], x
        assert utc_iso(x["started"]) <= utc_iso(x["finished"]) and isinstance(x["duration_s"], float | int)
    # a failed session: exit 1
    failed = fed.run_session(rounds=1, min_clients=3, round_timeout=1)
    r = scaleout("session", "watch", *conn)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.match(r"round 1\s+failed", r.stdout) and r.stdout.splitlines()[-1].startswith(f"session {failed['id']} failed"), r.stdout
    user_error(scaleout("session", "watch", "s-nonexistent", *conn), 1, "no session")


@pytest.mark.parametrize(
    "flags",
    [pytest.param(["--round-timeout", "nan"], id="timeout-nan"), pytest.param(["--settings", '{"lr": NaN}'], id="settings-nan")],
)
def test_session_start_non_finite_values(ctl: Federation, tmp_path: Path, flags: list[str]) -> None:
    user_error(scaleout("session", "start", *flags, *by_data_dir(ctl), cwd=tmp_path), 2)


def test_admin_by_environment(ctl: Federation, tmp_path: Path) -> None:
    env = {"SCALEOUT_CONTROLLER": ctl.url, "SCALEOUT_TOKEN": (ctl.data / "admin.token").read_text().strip(), "SCALEOUT_CA": ctl.ca}
    token = as_json(scaleout("token", "create", "--role", "combiner", "--name", "by-env", "--json", cwd=tmp_path, env=env))
    assert isinstance(token, dict) and token["role"] == "combiner"
    assert as_json(scaleout("combiner", "ls", "--json", cwd=tmp_path, env=env)) == []
    # flags win over the environment
    env_bad = {**env, "SCALEOUT_TOKEN": "garbage"}
    assert as_json(scaleout("client", "ls", "--json", "--token", env["SCALEOUT_TOKEN"], cwd=tmp_path, env=env_bad)) == []
    user_error(scaleout("client", "ls", cwd=tmp_path, env=env_bad), 3, "token")


def test_data_dir_flag_wins_over_the_environment(ctl: Federation, serve: Callable[..., Served], tmp_path: Path) -> None:
    """SCALEOUT_* point at one controller; --data-dir of another must reach that other one."""
    other = serve("--data-dir", "other", "--port", "0", cwd=tmp_path)
    port = other.wait_ready()
    env = {"SCALEOUT_CONTROLLER": ctl.url, "SCALEOUT_TOKEN": (ctl.data / "admin.token").read_text().strip(), "SCALEOUT_CA": ctl.ca}
    try:
        status = as_json(scaleout("status", "--json", "--data-dir", "other", cwd=tmp_path, env=env))
        assert isinstance(status, dict) and status["url"] == f"wss://127.0.0.1:{port}", status
        assert as_json(scaleout("status", "--json", cwd=tmp_path, env=env))["url"] == ctl.url  # type: ignore[index]
        # a flag beside the data dir still wins over the dir
        user_error(scaleout("status", "--data-dir", "other", "--token", "garbage", cwd=tmp_path, env=env), 3, "token")
    finally:
        assert other.terminate() == 0


def dialled(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Start a combiner that cannot reach its controller; return the retry line it logs
    (it waits for a controller that is not up yet), then stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaleout", *args, "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=cwd, env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stderr is not None
        line = wait_line(proc.stderr, "not reachable yet", START_TIMEOUT, "combine")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    return line


def test_role_connection_flags_then_environment_then_config_file(ctl: Federation, tmp_path: Path) -> None:
    """Each address below is unreachable: the combiner says which one it keeps dialling."""
    (tmp_path / "c.toml").write_text('[combiner]\ncontroller = "wss://127.0.0.1:1"\n')
    base = ["combine", "--config", "c.toml", "--ca", ctl.ca, "--token", "any", "--port", "0"]
    assert "wss://127.0.0.1:1" in dialled(base, tmp_path)
    env = {"SCALEOUT_CONTROLLER": "wss://127.0.0.1:2"}
    assert "wss://127.0.0.1:2" in dialled(base, tmp_path, env)
    assert "wss://127.0.0.1:3" in dialled([*base, "--controller", "wss://127.0.0.1:3"], tmp_path, env)


def test_admin_token_from_file(ctl: Federation, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text((ctl.data / "admin.token").read_text().strip() + "\n")
    r = scaleout("token", "create", "--role", "client", "--json", "--controller", ctl.url, "--token", "@admin.token", "--ca", ctl.ca, cwd=tmp_path)
    token = as_json(r)
    assert isinstance(token, dict) and token["role"] == "client"
    # the human form prints the bare join token on stdout, ready for $(...)
    r = ok(scaleout("token", "create", "--role", "client", "--controller", ctl.url, "--token", "@admin.token", "--ca", ctl.ca, cwd=tmp_path))
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("SCALEOUT-1.") and r.stdout.strip().count(".") == 1


# -- 4 and 6. serve: --config, the ready line, the data dir, SIGTERM -----------------------


class Served:
    """A `scaleout serve` process whose stdout is read line by line."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.log = cwd / "serve.log"
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "scaleout", "serve", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=log,
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.lines: list[str] = []

    def first_line(self) -> str:
        """The next line on stdout; "" when serve exited without printing one."""
        assert self.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        if not sel.select(START_TIMEOUT):
            raise AssertionError(f"serve printed nothing in {START_TIMEOUT}s:\n{self.log.read_text()}")
        line = self.popen.stdout.readline().decode()
        if line:
            self.lines.append(line)
        return line

    def wait_ready(self, scheme: str = "wss") -> int:
        line = self.first_line()
        if not line:
            raise AssertionError(f"serve exited with {self.popen.wait()}:\n{self.log.read_text()}")
        match = re.fullmatch(rf"listening on {scheme}://127\.0\.0\.1:(\d+)", line.rstrip("\n"))
        assert match, f"first stdout line {line!r} is not 'listening on {scheme}://127.0.0.1:PORT'"
        return int(match[1])

    def terminate(self, timeout: float = 10, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.popen.stdout is not None
        self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve ignored {sig.name} for {timeout}s:\n{self.log.read_text()}") from None
        self.lines += self.popen.stdout.read().decode().splitlines(keepends=True)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, cwd: Path) -> Served:
        s = Served(list(args), cwd)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def test_serve_config_file_flags_win_and_data_dir(serve: Callable[..., Served], tmp_path: Path) -> None:
    data = tmp_path / "ctl-data"
    (tmp_path / "ctl.toml").write_text(f'[controller]\nhost = "0.0.0.0"\nport = 0\ndata_dir = "{data}"\n')
    s = serve("--config", "ctl.toml", "--host", "127.0.0.1", cwd=tmp_path)
    port = s.wait_ready()  # the flag's host, the file's port 0
    assert port not in (0, 8090)
    for name in ("ca.pem", "admin.token", "state.db", "controller.json"):
        assert (data / name).is_file(), name
    assert (data / "admin.token").stat().st_mode & 0o777 == 0o600
    assert json.loads((data / "controller.json").read_text())["url"] == f"wss://127.0.0.1:{port}"
    assert as_json(scaleout("model", "ls", "--json", "--data-dir", str(data))) == []
    assert s.terminate() == 0
    assert [line for line in s.lines if line.startswith("listening on")] == [f"listening on wss://127.0.0.1:{port}\n"]
    assert len(s.lines) == 1, s.lines
    assert not (tmp_path / "scaleout-data").exists()


def test_sigterm_stops_serve_promptly(serve: Callable[..., Served], tmp_path: Path) -> None:
    s = serve("--data-dir", "ctl", "--port", "0", cwd=tmp_path)
    s.wait_ready()
    assert s.terminate(timeout=10) == 0
    log = s.log.read_text()
    assert "SIGTERM" in log and "shutting down" in log, log
    assert "Traceback" not in log


def test_serve_replaces_controller_json_atomically(serve: Callable[..., Served], tmp_path: Path) -> None:
    """A reader sees the old file or the new one, never a half-written one: serve renames a
    complete temporary file over it (a new inode) instead of rewriting it in place."""
    (tmp_path / "ctl").mkdir()
    info_file = tmp_path / "ctl" / "controller.json"
    info_file.write_text('{"url": "wss://127.0.0.1:1", "ca')  # a crash left it half-written
    stale = info_file.stat().st_ino
    s = serve("--data-dir", "ctl", "--port", "0", cwd=tmp_path)
    port = s.wait_ready()
    try:
        assert json.loads(info_file.read_text())["url"] == f"wss://127.0.0.1:{port}"
        assert info_file.stat().st_ino != stale
        assert oct(info_file.stat().st_mode & 0o777) == oct(0o644)
        assert not [p.name for p in info_file.parent.iterdir() if p.name.endswith(".tmp")]
    finally:
        assert s.terminate() == 0


def test_ctrl_c_stops_serve_with_130(serve: Callable[..., Served], tmp_path: Path) -> None:
    s = serve("--data-dir", "ctl", "--port", "0", cwd=tmp_path)
    s.wait_ready()
    assert s.terminate(sig=signal.SIGINT) == 130
    log = s.log.read_text()
    assert "SIGINT received" in log and "Traceback" not in log, log


def test_port_in_use_says_which_and_what_to_do(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = scaleout("serve", "--data-dir", "d", "--port", str(port), "--log-level", "error", cwd=tmp_path, timeout=20)
        user_error(r, 2, f"127.0.0.1:{port}", f"port {port} is already in use", "--port")
        args = ["combine", *by_flags(fed, fed.token("combiner")), "--name", "busy", "--port", str(port), "--log-level", "error"]
        user_error(scaleout(*args, cwd=tmp_path, timeout=20), 2, f"port {port} is already in use", "--port")


def test_data_dir_of_relative_serve_works_from_another_cwd(serve: Callable[..., Served], tmp_path: Path) -> None:
    s = serve("--data-dir", "ctl", "--port", "0", cwd=tmp_path)
    s.wait_ready()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        assert as_json(scaleout("model", "ls", "--json", "--data-dir", str(tmp_path / "ctl"), cwd=elsewhere)) == []
    finally:
        assert s.terminate() == 0


def test_insecure_serve_and_clients_that_must_say_so(serve: Callable[..., Served], tmp_path: Path) -> None:
    s = serve("--data-dir", "ctl", "--port", "0", "--insecure", cwd=tmp_path)
    port = s.wait_ready(scheme="ws")
    assert not (tmp_path / "ctl" / "ca.pem").exists()
    # --data-dir knows the controller is plain; a bare ws:// URL needs --insecure
    assert as_json(scaleout("model", "ls", "--json", "--data-dir", "ctl", cwd=tmp_path)) == []
    plain = ["--controller", f"ws://127.0.0.1:{port}", "--token", "@ctl/admin.token"]
    assert as_json(scaleout("model", "ls", "--json", *plain, "--insecure", cwd=tmp_path)) == []
    user_error(scaleout("model", "ls", *plain, cwd=tmp_path), 2, "--insecure")
    assert s.terminate() == 0


def test_tls_to_a_plain_controller_says_why(serve: Callable[..., Served], tmp_path: Path) -> None:
    s = serve("--data-dir", "ctl", "--port", "0", "--insecure", cwd=tmp_path)
    port = s.wait_ready(scheme="ws")
    try:
        r = scaleout("model", "ls", "--controller", f"wss://127.0.0.1:{port}", "--token", "@ctl/admin.token", cwd=tmp_path)
        line = user_error(r, 3, "cannot reach")
        assert not line.rstrip().endswith(":"), f"no reason given: {line!r}"
    finally:
        assert s.terminate() == 0


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param('data_dir = 5', id="data_dir-int"),
        pytest.param('max_payload_mb = "big"', id="max_payload_mb-str"),
        pytest.param('tls_cert = 5\ntls_key = 6', id="tls-int"),
    ],
)
def test_serve_config_value_of_the_wrong_type(setting: str, tmp_path: Path) -> None:
    (tmp_path / "ctl.toml").write_text(f"[controller]\nport = 0\n{setting}\n")
    r = scaleout("serve", "--config", "ctl.toml", cwd=tmp_path, timeout=20)
    user_error(r, 2, setting.split()[0])


def test_serve_config_insecure_must_be_a_boolean(serve: Callable[..., Served], tmp_path: Path) -> None:
    (tmp_path / "ctl.toml").write_text('[controller]\nport = 0\ndata_dir = "ctl"\ninsecure = "false"\n')
    s = serve("--config", "ctl.toml", cwd=tmp_path)
    line = s.first_line()
    assert not line, f"serve started with insecure = \"false\": {line!r}"
    refused(s.popen.wait(10), s.log.read_text(), "", 2, "insecure")


# -- 5. dev ---------------------------------------------------------------------------------


def test_dev_headless_report(tmp_path: Path) -> None:
    shutil.copytree(QUICKSTART, tmp_path / "client", ignore=shutil.ignore_patterns("*.npz", "__pycache__"))
    r = ok(scaleout("dev", "-p", "client", "--clients", "3", "--rounds", "3", "--headless", "--report", "r.json", cwd=tmp_path, timeout=60))
    report = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(report["session"]["id"], str) and report["session"]["status"] == "finished"
    rounds = report["rounds"]
    assert [rnd["index"] for rnd in rounds] == [1, 2, 3]
    for rnd in rounds:
        assert {"index", "status", "model_id", "participants", "duration_s", "validation"} <= set(rnd), rnd
        assert rnd["status"] == "succeeded"
        assert re.fullmatch(r"[0-9a-f]{64}", rnd["model_id"])
        assert rnd["participants"] == 3
        assert isinstance(rnd["duration_s"], float | int) and rnd["duration_s"] >= 0
        assert rnd["validation"] and all(isinstance(k, str) and isinstance(v, float | int) for k, v in rnd["validation"].items())
        assert "validation_accuracy" in rnd["validation"]
    assert len({rnd["model_id"] for rnd in rounds}) == 3
    for i in (1, 2, 3):
        assert re.search(rf"^\s*round {i}\s+succeeded\s+3 participants", r.stdout, re.M), r.stdout
    assert "Traceback" not in r.stderr


def test_dev_two_combiners(tmp_path: Path) -> None:
    args = ["-p", str(QUICKSTART), "--combiners", "2", "--clients", "4", "--rounds", "2", "--headless", "--report", "r.json"]
    r = ok(scaleout("dev", *args, cwd=tmp_path, timeout=60))
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(rnd["status"], rnd["participants"]) for rnd in report["rounds"]] == [("succeeded", 4)] * 2
    assert "combiner-2 listening on" in r.stdout


def test_dev_mistakes(tmp_path: Path) -> None:
    (tmp_path / "nope").mkdir()
    user_error(scaleout("dev", "-p", "nope", cwd=tmp_path), 2, "scaleout.yaml")
    user_error(scaleout("dev", "-p", str(QUICKSTART), "--clients", "0", cwd=tmp_path), 2, "--clients")


def test_model_show_active_and_a_closed_pipe(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    shown = as_json(scaleout("model", "show", "active", "--json", *by_data_dir(fed), cwd=tmp_path))
    assert isinstance(shown, dict) and shown["id"] == seed
    # `scaleout model ls | head -1`: the reader closes the pipe early; that is not an error.
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "model", "ls", *by_data_dir(fed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(60) == 0
    assert b"Broken pipe" not in proc.stderr.read()


def test_following_a_session_whose_controller_shuts_down_says_how_to_follow_again(fed: Federation, tmp_path: Path) -> None:
    ctl = fed.controller()
    fed.seed_from(FIXTURES / "slow_client")
    fed.combiner("c1")
    slow = fed.client("s1", package=FIXTURES / "slow_client")
    fed.wait_clients(1)
    args = ["session", "start", "--rounds", "1", "--round-timeout", "60", "--no-validate", "--settings", '{"slow_s": 10}', "--wait", *by_data_dir(fed)]
    proc = subprocess.Popen([sys.executable, "-m", "scaleout", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_stdout(slow, "slow_client: training")
    ctl.popen.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # The session is not over (the next start resumes it): the follower says how to follow it again.
    assert proc.returncode == 3, (out, err)
    assert "lost the controller while following session" in err and "scaleout session watch s-" in err, err


def test_admin_requests_with_absurd_arguments_are_refused_with_a_reason(ctl: Federation) -> None:
    from scaleout.core.errors import RemoteError

    with pytest.raises(RemoteError, match="100 years"):
        ctl.admin("token.create", {"role": "client", "ttl_s": 2**62})
    with pytest.raises(RemoteError, match="outside the signed 64-bit range"):  # refused as it arrives, in one line
        ctl.admin("token.create", {"role": "client", "ttl_s": 10**30})
    with pytest.raises(RemoteError, match="session_id must be"):
        ctl.admin("model.ls", {"session_id": {"a": 1}})
    with pytest.raises(RemoteError, match="rounds"):
        ctl.admin("session.start", {"rounds": 2**63 - 1})
    with pytest.raises(RemoteError, match=r"integer 100000000000\.\.\. \(401 digits\), outside the signed 64-bit range"):
        ctl.admin("session.start", {"rounds": 10**400})
