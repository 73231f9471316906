"""Custom commands, predictions, attributes and telemetry through real roles (issue 9).

One federation (controller, two combiners, three clients running tests/fixtures/command_client)
serves every check of a test; the CLI runs as it would for a user (`scaleout command run ...`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from conftest import FIXTURES, Federation, scaleout

from scaleout.core import messages as m

PACKAGE = FIXTURES / "command_client"
CLIENTS = ["client-1", "client-2", "client-3"]


def start(fed: Federation, clients: list[str] = CLIENTS, package: Path | None = PACKAGE) -> None:
    fed.controller()
    fed.seed_from(PACKAGE)
    fed.combiner("c1")
    fed.combiner("c2")
    for name in clients:
        fed.client(name, package=package)
    fed.wait_clients(len(clients))


def cli(fed: Federation, *args: str, timeout: float = 60) -> tuple[int, Any, str]:
    """Run `scaleout ARGS --data-dir CONTROLLER` and return (exit code, stdout as JSON when it is, stderr)."""
    r = scaleout(*args, "--data-dir", str(fed.data), timeout=timeout)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = r.stdout
    return r.returncode, out, r.stderr


def run_job(fed: Federation, kind: str = "command", **args: Any) -> dict[str, Any]:
    """Run a job through the admin API (what the CLI sends) and wait for its results."""
    job = fed.admin("command.run", {"kind": kind, **args})[0]["job"]
    return fed.admin("command.wait", {"kind": kind, "id": job["id"]})[0]["job"]  # type: ignore[no-any-return]


def by_client(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["client"]: r for r in job["results"]}


def test_commands_reach_every_client_and_each_failure_is_stored(fed: Federation) -> None:
    start(fed)
    # One client raises; the others' results stand; --wait exits 1 because one failed.
    code, job, err = cli(fed, "command", "run", "echo", "--params", '{"fail_on": "client-2", "k": [1, 2]}', "--wait", "--json")
    assert code == 1, err
    results = by_client(job)
    assert sorted(results) == CLIENTS
    for name in ("client-1", "client-3"):
        assert results[name]["status"] == "ok"
        assert results[name]["data"] == {"client": name, "params": {"fail_on": "client-2", "k": [1, 2]}, "version": "a", "n": 3}
        assert results[name]["duration_s"] >= 0
    failed = results["client-2"]
    assert failed["status"] == "error" and failed["code"] == "raised"
    line = next(i for i, text in enumerate((PACKAGE / "startup.py").read_text().splitlines(), 1) if "ECHO RAISES HERE" in text)
    assert failed["error"] == f"command 'echo' failed: RuntimeError: echo refused on client-2 (startup.py:{line})"

    # Edge's Custom_ prefix is optional on either side; all succeed: exit 0, people's table.
    code, out, err = cli(fed, "command", "run", "hello", "--wait")
    assert code == 0, err
    assert {r["data"]["hello"] for r in run_job(fed, name="Custom_hello")["results"]} == set(CLIENTS)
    assert re.search(r"client-1\s+ok\s+-\s+[\d.]+s\s+\{\"hello\": \"client-1\"\}", out), out
    assert "3 clients: 3 ok, 0 failed" in out

    # Each way a callback can fail is stored with its code and a line saying why.
    expect = {
        "nosuch": ("no_such_command", "no custom command 'nosuch' registered (registered: alist, attrs, big, boom, echo, exit, hang, hello, notjson, tele)"),
        "boom": ("raised", "command 'boom' failed: ValueError: boom (startup.py:"),
        "notjson": ("not_json", "the command 'notjson' result holds a set at result['x']: not JSON"),
        "alist": ("not_json", "the command callback must return a dict (a JSON object), got a list"),
        "big": ("too_large", "the command 'big' result is 100.0 KiB as JSON; the limit is 64.0 KiB"),
        "exit": ("raised", "the command 'exit' callback called sys.exit(4) (startup.py:"),
    }
    for name, (why, text) in expect.items():
        job = run_job(fed, name=name, clients=["client-1", "client-3"])
        assert [r["client"] for r in job["results"]] == ["client-1", "client-3"]
        for r in job["results"]:
            assert (r["status"], r["code"]) == ("error", why), r
            assert r["error"].startswith(text.replace("command callback", f"command {name!r} callback")) or r["error"].startswith(text), r["error"]

    # Without --wait: the id on stdout; show finds it by a prefix; ls counts the results.
    code, out, err = cli(fed, "command", "run", "hello")
    assert code == 0 and re.fullmatch(r"c-[0-9a-f]{12}\n", out), (out, err)
    job_id = out.strip()
    assert "results: scaleout command show " + job_id in err
    deadline = time.monotonic() + 30
    while True:  # polls a state the controller reaches by itself, no sleep-as-synchronisation
        code, job, err = cli(fed, "command", "show", job_id[:8], "--json")
        assert code == 0, err
        if job["status"] == "finished" or time.monotonic() > deadline:
            break
    assert job["status"] == "finished" and job["name"] == "hello"
    assert {r["client"]: r["data"] for r in job["results"]} == {c: {"hello": c} for c in CLIENTS}
    code, rows, err = cli(fed, "command", "ls", "--json")
    assert code == 0, err
    assert rows[-1]["id"] == job_id and (rows[-1]["ok"], rows[-1]["error"], rows[-1]["pending"]) == (3, 0, 0)
    assert re.match(r"\d{4}-\d\d-\d\dT", rows[-1]["created"])  # ISO 8601 UTC in --json
    code, out, err = cli(fed, "command", "ls")
    assert code == 0 and "3 ok, 0 failed" in out

    # A hanging callback times out; the client goes on serving commands at once.
    started = time.monotonic()
    job = run_job(fed, name="hang", params={"s": 20}, timeout=1, clients=["client-1"])
    (r,) = job["results"]
    assert (r["status"], r["code"]) == ("error", "timeout")
    assert r["error"].startswith("the command 'hang' callback did not return within 1 s")
    job = run_job(fed, name="echo", clients=["client-1"])
    assert job["results"][0]["status"] == "ok", job
    assert time.monotonic() - started < 15
    # While two are still running past their timeout, new commands are refused as busy.
    run_job(fed, name="hang", params={"s": 20}, timeout=0.5, clients=["client-1"])
    job = run_job(fed, name="echo", clients=["client-1"])
    assert job["results"][0]["code"] == "busy", job
    # Other clients are not held up by client-1's stuck threads.
    job = run_job(fed, name="echo", clients=["client-2"])
    assert job["results"][0]["status"] == "ok", job


def test_predictions_run_on_the_chosen_model(fed: Federation) -> None:
    start(fed, CLIENTS[:2])
    code, job, err = cli(fed, "predict", "run", "--params", '{"add": 2.5}', "--wait", "--json")
    assert code == 0, err
    seed = fed.admin("model.show", {"id": "active"})[0]["model"]["id"]
    assert job["model_id"] == seed
    assert {r["client"]: r["data"] for r in job["results"]} == {c: {"sum": 2.5, "client": c, "version": "a"} for c in CLIENTS[:2]}
    # A session makes a new model; a prediction can still name the seed by a prefix.
    session = fed.run_session(rounds=1, min_clients=2)
    assert session["status"] == "finished", session
    code, job, err = cli(fed, "predict", "run", "--model", seed[:10], "--wait", "--json")
    assert code == 0 and job["model_id"] == seed, err
    code, shown, err = cli(fed, "predict", "show", "--json")
    assert code == 0 and shown["id"] == job["id"] and len(shown["results"]) == 2
    code, rows, err = cli(fed, "predict", "ls", "--json")
    assert code == 0 and [r["kind"] for r in rows] == ["predict", "predict"]
    code, out, err = cli(fed, "predict", "run", "--model", "0123456789", "--wait")
    assert code == 1 and "no model '0123456789'" in err


def test_attributes_and_telemetry_are_stored(fed: Federation) -> None:
    start(fed, CLIENTS[:2])
    code, job, err = cli(fed, "command", "run", "tele", "--wait", "--json")
    assert code == 0, err
    code, row, err = cli(fed, "client", "show", "client-1", "--json")
    assert code == 0, err
    assert row["attributes"] == {"site": "client-1", "fixture": "command_client"}
    assert row["package"] == "local" and row["connected_to"] in ("c1", "c2")
    assert row["recent"][0]["name"] == "tele" and row["recent"][0]["status"] == "ok"
    code, rows, err = cli(fed, "client", "ls", "--json")
    assert code == 0 and {r["name"]: r["attributes"]["site"] for r in rows} == {"client-1": "client-1", "client-2": "client-2"}
    deadline = time.monotonic() + 20
    while True:  # telemetry is relayed apart from the command's result
        code, rows, err = cli(fed, "telemetry", "ls", "--json")
        if len(rows) >= 6 or time.monotonic() > deadline:
            break
    got = sorted((r["client"], r["key"], json.dumps(r["payload"])) for r in rows)
    assert got == sorted((c, k, json.dumps({"value": v})) for c in CLIENTS[:2] for k, v in (("temperature", 41.5), ("cpu", 0.25), ("mem", 0.5)))
    code, rows, err = cli(fed, "telemetry", "ls", "--client", "client-2", "--key", "cpu", "--json")
    assert code == 0 and [(r["client"], r["key"]) for r in rows] == [("client-2", "cpu")]
    code, rows, err = cli(fed, "metric", "ls", "--telemetry", "--client", "client-1", "--json")  # listed with the metrics too
    assert code == 0 and sorted((r["key"], r["value"]) for r in rows) == [("cpu", 0.25), ("mem", 0.5), ("temperature", 41.5)], rows
    code, out, err = cli(fed, "client", "show", "nobody")
    assert code == 1 and "no client 'nobody'" in err


def test_bad_requests_get_one_clear_line(fed: Federation) -> None:
    start(fed, CLIENTS[:1])
    for args, code, text in [
        (["command", "run", "echo", "--params", "{nope"], 2, "--params is not valid JSON"),
        (["command", "run", "echo", "--params", "[1]"], 2, "--params must be a JSON object"),
        (["command", "run", "echo", "--timeout", "0"], 2, "--timeout must be a number of seconds above 0"),
        (["command", "run", "echo", "--clients", ","], 2, "--clients needs at least one name"),
        (["command", "run", "echo", "--clients", "client-1", "--all"], 2, "not allowed with argument"),
        (["command", "run", "echo", "--clients", "ghost"], 1, "no client 'ghost'"),
        (["command", "run", "bad name"], 2, "a command name is 1-128 printable characters without spaces"),
        (["command", "run", "echo", "--timeout", "1e9"], 2, "timeout: must be a number of seconds above 0 and at most 86400"),
        (["command", "show", "c-000000000000"], 1, "no command 'c-000000000000'"),
        (["predict", "show", "nope"], 1, "no predict 'nope'"),
        (["telemetry", "ls", "--limit", "0"], 2, "--limit must be from 1 to 1000"),
    ]:
        r, out, err = cli(fed, *args)
        assert r == code, (args, r, err)
        assert text in err and "Traceback" not in err, (args, err)
    # A client that left is recorded as not connected; the job does not wait for it.
    fed.procs[-1].stop()
    deadline = time.monotonic() + 20
    while fed.admin("client.ls")[0]["clients"][0]["status"] != "offline" and time.monotonic() < deadline:
        fed.admin("client.ls")
    code, job, err = cli(fed, "command", "run", "echo", "--clients", "client-1", "--wait", "--json")
    assert code == 1 and job["results"][0]["code"] == "not_connected", job
    code, out, err = cli(fed, "command", "run", "echo")
    assert code == 1 and "no clients are connected" in err


def test_a_misbehaving_client_gets_errors_and_disturbs_nobody(fed: Federation) -> None:
    """Raw protocol from a client: bad telemetry, results for jobs it was not given, a flood
    of attributes. Each gets an error back (or is dropped); the combiner stays registered
    and a real client's command still works."""
    import asyncio

    from websockets.asyncio.client import connect

    from scaleout.security.tls import client_context

    start(fed, CLIENTS[:1])
    combiner_url = fed.procs[1].url
    assert combiner_url is not None

    headers = {"Authorization": f"Bearer {fed.assigned_ticket('rogue', prefer='c1')}"}

    async def abuse() -> list[str]:
        errors: list[str] = []
        async with connect(combiner_url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None) as ws:
            await ws.send(m.serialize(m.Hello(name="rogue")))
            await ws.send(m.serialize(m.ClientLog(kind="telemetry", data={"payload": {"v": 1}})))
            await ws.send(m.serialize(m.ClientLog(kind="gossip", data={})))
            await ws.send(m.serialize(m.CommandResult(job_id="c-000000000000", ok=True, data={"x": 1}, client="client-1")))
            for i in range(40):  # about 40 x 8 KiB at once: beyond the burst of 256 KiB
                await ws.send(m.serialize(m.ClientLog(kind="attributes", data={"blob": "x" * (8 << 10), "i": i})))
            while True:
                try:
                    frame = await asyncio.wait_for(ws.recv(), 3)
                except TimeoutError:
                    return errors
                body = json.loads(frame)
                if body.get("type") == "error":
                    errors.append(body["message"])

    errors = asyncio.run(abuse())
    assert any('telemetry is {"key": text' in e for e in errors), errors
    assert any("kind must be attributes or telemetry" in e for e in errors), errors
    assert any("metrics arrive faster than" in e for e in errors), errors
    code, job, err = cli(fed, "command", "run", "echo", "--wait", "--json")
    assert code == 0 and [r["client"] for r in job["results"]] == ["client-1"], (job, err)
    assert fed.admin("combiner.ls")[0]["combiners"][0]["status"] == "online"
    code, rows, err = cli(fed, "client", "show", "rogue", "--json")
    assert code == 0 and len(json.dumps(rows["attributes"])) < 300 << 10  # what got through was bounded


def test_predict_runs_a_dispatcher_packages_predict_command(fed: Federation) -> None:
    """`scaleout predict run` reaches a dispatcher package (predict: {command: python predict.py})
    through the same hook: the runtime's predict callback, here the dispatcher's."""
    package = FIXTURES / "dispatch_client"
    fed.controller()
    fed.seed_from(package)
    fed.combiner("c1")
    fed.client("d-1", package=package)
    fed.wait_clients(1)
    code, job, err = cli(fed, "predict", "run", "--params", '{"n": 4}', "--wait", "--json")
    assert code == 0, (job, err)
    (r,) = job["results"]
    assert r["client"] == "d-1" and r["status"] == "ok" and len(r["data"]["predicted_class"]) == 4, r
