"""Watching from other tools: `scaleout serve --metrics-port` and `scaleout metric ls`.

One real federation (controller with metrics on a free port, a combiner, two quickstart
clients, one of them running the downloaded package, and a client whose updates are NaN)
runs a session of two rounds; then the metrics endpoint is scraped over HTTP and parsed
with prometheus_client's own parser, and `metric ls` lists what the clients logged.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, QUICKSTART, Federation, federation, scaleout

ROUNDS = 2
EPOCHS = 2


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``, keyed by (name, sorted labels), as Prometheus would read it."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("scaleout_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, dict[str, Any], dict[str, Any]]]:
    """(the federation, its session after it ended, what was scraped before it started)."""
    with federation(tmp_path_factory.mktemp("observe")) as fed:
        fed.controller("--metrics-port", "0")
        url = json.loads((fed.data / "controller.json").read_text())["metrics_url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
        before = scrape(url)
        seed = fed.seed_from(QUICKSTART)
        from scaleout.package.archive import create_archive

        archive = create_archive(QUICKSTART, fed.tmp / "quickstart.tgz")
        package = fed.admin("package.set_active", {"name": archive.name}, archive.read_bytes())[0]
        fed.combiner("c1")
        fed.client("good-1", package=QUICKSTART)
        fed.client("good-2")  # downloads the active package
        fed.client("odd", package=FIXTURES / "nan_client")
        fed.wait_clients(3)
        session = fed.run_session(rounds=ROUNDS, min_clients=2, validate=False, settings={"epochs": EPOCHS})
        facts = {"url": url, "before": before, "seed": seed, "package_size": package["size"]}
        yield fed, session, facts


def test_metrics_endpoint_counts_rounds_nodes_bytes_and_refusals(ran: tuple[Federation, dict[str, Any], dict[str, Any]]) -> None:
    fed, session, facts = ran
    assert session["status"] == "finished", session
    assert [r["status"] for r in session["rounds"]] == ["succeeded"] * ROUNDS

    before = facts["before"]
    assert value(before, "scaleout_rounds_total", status="succeeded") == 0
    assert value(before, "scaleout_updates_refused_total", reason="non_finite") == 0  # every label shows from the start
    assert value(before, "scaleout_combiners_connected") == 0
    assert value(before, "scaleout_build_info", version="0.1.0", protocol="2") == 1

    now = scrape(facts["url"])
    assert value(now, "scaleout_rounds_total", status="succeeded") == ROUNDS
    assert value(now, "scaleout_rounds_total", status="failed") == 0
    assert value(now, "scaleout_round_duration_seconds_count") == ROUNDS
    durations = sum(r["duration_s"] for r in session["rounds"])
    assert value(now, "scaleout_round_duration_seconds_sum") == pytest.approx(durations, abs=0.01)
    assert value(now, "scaleout_sessions_total", status="finished") == 1
    assert value(now, "scaleout_sessions_running") == 0
    # The NaN client's update is refused every round, with its reason; the others are folded.
    assert value(now, "scaleout_updates_refused_total", reason="non_finite") == ROUNDS
    assert sum(v for (name, _), v in now.items() if name == "scaleout_updates_refused_total") == ROUNDS
    assert value(now, "scaleout_updates_accepted_total") == 2 * ROUNDS
    assert value(now, "scaleout_combiners_connected") == 1
    assert value(now, "scaleout_clients_connected") == 3
    # Bytes: the seed and package came in once; the package went to the one client that
    # downloaded it; the model went to the combiner each round; partials came back.
    seed_size = len(fed.admin("model.get", {"id": facts["seed"]})[1] or b"")
    assert value(now, "scaleout_payload_bytes_total", direction="in", kind="model") == seed_size
    assert value(now, "scaleout_payload_bytes_total", direction="in", kind="package") == facts["package_size"]
    assert value(now, "scaleout_payload_bytes_total", direction="out", kind="package") == facts["package_size"]
    assert value(now, "scaleout_payload_bytes_total", direction="out", kind="model") >= ROUNDS * seed_size
    assert value(now, "scaleout_payload_bytes_total", direction="in", kind="partial") > 0
    assert value(now, "scaleout_process_resident_memory_bytes") > 0
    # `scaleout status` says where the metrics are.
    r = scaleout("status", "--data-dir", str(fed.data))
    assert r.returncode == 0 and f"metrics         {facts['url']}\n" in r.stdout, r
    assert json.loads(scaleout("status", "--json", "--data-dir", str(fed.data)).stdout)["metrics_url"] == facts["url"]


def test_metric_ls_lists_what_clients_logged(ran: tuple[Federation, dict[str, Any], dict[str, Any]]) -> None:
    fed, session, _ = ran
    conn = ["--data-dir", str(fed.data)]
    r = scaleout("metric", "ls", "--json", *conn)
    assert r.returncode == 0 and r.stderr == "", r
    rows = json.loads(r.stdout)
    # quickstart logs train_loss once per epoch, with the epoch as its step; the NaN client logs nothing.
    got = sorted((row["client"], row["round_index"], row["step"]) for row in rows)
    assert got == sorted((c, rnd, step) for c in ("good-1", "good-2") for rnd in range(1, ROUNDS + 1) for step in range(EPOCHS))
    assert {row["key"] for row in rows} == {"train_loss"} and {row["session_id"] for row in rows} == {session["id"]}
    assert all(isinstance(row["value"], float) and row["value"] > 0 for row in rows)
    assert all(row["created"].endswith("Z") for row in rows)  # ISO 8601 UTC, as every --json listing
    assert [row["created"] for row in rows] == sorted(row["created"] for row in rows)  # oldest first

    r = scaleout("metric", "ls", "--client", "good-2", "--round", "2", "--key", "train_*", "--session", "latest", *conn)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "SESSION", "ROUND", "CLIENT", "STEP", "METRIC", "VALUE"]
    assert len(lines) == 1 + EPOCHS and all(f"{session['id']}  2 " in line and " good-2 " in line for line in lines[1:]), lines

    r = scaleout("metric", "ls", "--limit", "1", *conn)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r
    total = 2 * ROUNDS * EPOCHS
    assert r.stderr == f"(the latest 1 of {total} values; --limit 0 shows all)\n"

    r = scaleout("metric", "ls", "--key", "nothing-like-this", *conn)
    assert r.returncode == 0 and r.stdout == "no metric values match\n", r
    r = scaleout("metric", "ls", "--session", "s-nope", *conn)
    assert r.returncode == 1 and r.stderr == "scaleout: error: no session 's-nope'\n", r
    r = scaleout("metric", "ls", "--limit", "-1", *conn)
    assert r.returncode == 2 and "--limit" in r.stderr and "Traceback" not in r.stderr, r
    # The operation itself refuses what the command never sends, saying what it wants.
    from scaleout.core.errors import RemoteError

    for bad in ({"limit": "10"}, {"round_index": -1}, {"client": ""}, {"key": 5}, {"session_id": "x" * 300}, {"kind": "gossip"}):
        with pytest.raises(RemoteError, match=r"^metric\.ls: ") as info:
            fed.admin("metric.ls", bad)
        assert info.value.code == "bad_message", bad
    assert fed.admin("metric.ls", {"limit": 0})[0]["total"] == total


def test_metrics_port_from_the_config_file_and_bad_values(tmp_path: Path) -> None:
    config = tmp_path / "ctl.toml"
    config.write_text("[controller]\nmetrics_port = 0\nmetrics_host = \"127.0.0.1\"\n")
    with federation(tmp_path) as fed:
        fed.controller("--config", str(config))
        url = json.loads((fed.data / "controller.json").read_text())["metrics_url"]
        assert value(scrape(url), "scaleout_clients_connected") == 0
        assert f"Prometheus metrics at {url}" in fed.procs[0].text()

    data = ["--data-dir", str(tmp_path / "other")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = scaleout("serve", *data, "--port", "0", "--metrics-port", str(port))
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines()[-1] == (
        f"scaleout: error: cannot serve metrics on 127.0.0.1:{port}: port {port} is already in use; "
        "choose another with --metrics-port (0 picks a free one)"
    )
    for flags, text in (
        (["--metrics-port", "70000"], "metrics_port: must be a whole number between 0 and 65535, got 70000"),
        (["--metrics-host", "0.0.0.0"], "--metrics-host needs --metrics-port"),
    ):
        r = scaleout("serve", *data, "--port", "0", *flags)
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, (flags, r)


def test_prometheus_client_is_imported_only_for_the_metrics_port() -> None:
    code = "import sys, scaleout.cli, scaleout.roles.controller, scaleout.commands.admin; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_metrics_while_a_round_runs_and_after_a_stop(tmp_path: Path) -> None:
    from conftest import wait_stdout

    with federation(tmp_path) as fed:
        fed.controller("--metrics-port", "0")
        url = json.loads((fed.data / "controller.json").read_text())["metrics_url"]
        fed.seed_from(QUICKSTART)
        fed.combiner("c1")
        gated = fed.client("gated", package=FIXTURES / "gate_client")
        fed.wait_clients(1)
        gate = {"gate": str(tmp_path / "never")}  # training waits for this file: the round stays under way
        session = fed.admin("session.start", {"rounds": 3, "round_timeout": 30, "validate": False, "settings": gate})[0]["session"]
        wait_stdout(gated, "gate_client: training")  # round 1 is under way
        during = scrape(url)
        assert value(during, "scaleout_sessions_running") == 1
        assert value(during, "scaleout_rounds_total", status="succeeded") == 0
        assert value(during, "scaleout_clients_connected") == 1 and value(during, "scaleout_combiners_connected") == 1
        fed.admin("session.stop", {"id": session["id"]})  # mid-round: the round fails, the session stops
        after = scrape(url)
        assert value(after, "scaleout_sessions_total", status="stopped") == 1 and value(after, "scaleout_sessions_running") == 0
        assert value(after, "scaleout_rounds_total", status="failed") == 1 and value(after, "scaleout_rounds_total", status="succeeded") == 0
        assert value(after, "scaleout_round_duration_seconds_count") == 1


def test_metrics_held_with_commit_false_arrive_with_their_round(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        fed.controller()
        fed.seed_from(FIXTURES / "held_client")
        fed.combiner("c1")
        fed.client("holder", package=FIXTURES / "held_client")
        fed.wait_clients(1)
        assert fed.run_session(rounds=2, validate=False)["status"] == "finished"
        rows = fed.admin("metric.ls", {"key": "held"})[0]["metrics"]
        # Sent at once at the task's current step (0: commit=False does not move it), as in Scaleout Edge.
        assert [(r["round_index"], r["value"], r["step"]) for r in rows] == [(1, 1.0, 0), (2, 2.0, 0)]
