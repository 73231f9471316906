"""`scaleout command ...`, `scaleout predict ...`, `client show` and `telemetry ls`.

``command run`` / ``predict run`` start a job on the clients and print its id (stdout; a
note on stderr); with ``--wait`` they print each client's result once all answered or the
timeout passed, and exit 0 when every client returned a result, 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from scaleout.commands.exits import EXIT_FAILED, EXIT_OK, UsageError
from scaleout.commands.admin import call, emit, public, table, when

SHOWN_CHARS = 160  # a result on a terminal line; --json has it whole


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--params must be a JSON object, e.g. '{{\"n\": 3}}', got {type(value).__name__}")
    return value


def _clients(args: argparse.Namespace) -> list[str] | None:
    if args.clients is None:
        return None  # --all, or neither: every connected client
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    if not names:
        raise UsageError("--clients needs at least one name (A,B,...), or use --all")
    return names


def _run(args: argparse.Namespace, kind: str) -> int:
    req: dict[str, Any] = {"kind": kind, "params": _params(args.params), "clients": _clients(args)}
    if kind == "command":
        req["name"] = args.name
    else:
        req["model"] = args.model
    if args.timeout is not None:
        if not args.timeout > 0:
            raise UsageError("--timeout must be a number of seconds above 0")
        req["timeout"] = args.timeout
    result, _ = call(args, "command.run", req)
    job = result["job"]
    if not args.wait:
        if args.json:
            print(json.dumps(public(job), indent=2, default=str))
        else:
            print(job["id"])
            missing = job["clients"] - job["connected"]
            note = f" ({missing} not connected)" if missing else ""
            print(f"{_title(job)} started on {job['clients']} clients{note}; results: scaleout {kind} show {job['id']}", file=sys.stderr)
        return EXIT_OK
    if not args.json:
        print(f"{_title(job)} started on {job['clients']} clients; waiting up to {job['timeout']:g} s", file=sys.stderr, flush=True)
    done, _ = call(args, "command.wait", {"kind": kind, "id": job["id"]})
    job = done["job"]
    emit(args, job, lambda: _print_job(job))
    return EXIT_OK if all(r["status"] == "ok" for r in job["results"]) else EXIT_FAILED


def _title(job: dict[str, Any]) -> str:
    if job["kind"] == "predict":
        return f"prediction {job['id']} on model {str(job['model_id'])[:12]}"
    return f"command {job['id']} {job['name']!r}"


def _shown(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "), default=str)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + " ..."


def _print_job(job: dict[str, Any]) -> None:
    print(f"{_title(job)}  {job['status']}  started {when(job['created'])}" + (f"  ({job['reason']})" if job.get("reason") else ""))
    if job["params"]:
        print(f"params  {_shown(job['params'])}")
    rows = []
    for r in job["results"]:
        took = f"{r['duration_s']:.2f}s" if r.get("duration_s") is not None else "-"
        if r["status"] == "ok":
            shown = _shown(r["data"])
        elif r["status"] == "error":
            shown = " ".join(str(r["error"] or "").split())
            shown = shown if len(shown) <= SHOWN_CHARS * 2 else shown[: SHOWN_CHARS * 2 - 4] + " ..."
        else:
            shown = "waiting for its answer"
        rows.append({"client": r["client"], "status": r["status"], "code": r.get("code"), "took": took, "result": shown})
    table(rows, [("client", "CLIENT"), ("status", "STATUS"), ("code", "WHY"), ("took", "TOOK"), ("result", "RESULT")], "no clients were asked")
    counts = {s: sum(r["status"] == s for r in job["results"]) for s in ("ok", "error", "pending")}
    print(f"{len(job['results'])} clients: {counts['ok']} ok, {counts['error']} failed" + (f", {counts['pending']} pending" if counts["pending"] else ""))


def command_run(args: argparse.Namespace) -> int:
    return _run(args, "command")


def predict_run(args: argparse.Namespace) -> int:
    return _run(args, "predict")


def _ls(args: argparse.Namespace, kind: str) -> int:
    if not 0 < args.limit <= 100_000:
        raise UsageError("--limit must be from 1 to 100000")
    result, _ = call(args, "command.ls", {"kind": kind, "limit": args.limit})
    rows = result["jobs"]

    def human() -> None:
        for r in rows:
            r["started"] = when(r["created"])
            r["what"] = r["name"] if kind == "command" else str(r["model_id"])[:12]
            r["results"] = f"{r['ok']} ok, {r['error']} failed" + (f", {r['pending']} pending" if r["pending"] else "")
        what = "NAME" if kind == "command" else "MODEL"
        hint = "scaleout command run NAME" if kind == "command" else "scaleout predict run"
        table(rows, [("id", "ID"), ("what", what), ("status", "STATUS"), ("started", "STARTED"), ("results", "RESULTS")], f"none yet (start one with: {hint})")

    emit(args, rows, human)
    return EXIT_OK


def command_ls(args: argparse.Namespace) -> int:
    return _ls(args, "command")


def predict_ls(args: argparse.Namespace) -> int:
    return _ls(args, "predict")


def _show(args: argparse.Namespace, kind: str) -> int:
    result, _ = call(args, "command.show", {"kind": kind, "id": args.id or "latest"})
    job = result["job"]
    emit(args, job, lambda: _print_job(job))
    return EXIT_OK


def command_show(args: argparse.Namespace) -> int:
    return _show(args, "command")


def predict_show(args: argparse.Namespace) -> int:
    return _show(args, "predict")


def client_show(args: argparse.Namespace) -> int:
    result, _ = call(args, "client.show", {"name": args.name})
    row = result["client"]

    def human() -> None:
        print(f"client      {row['name']}  {row['status']}" + (f" on {row['connected_to']}" if row.get("connected_to") else ""))
        print(f"first seen  {when(row['first_seen'])}   last seen {when(row['last_seen'])}")
        package = row.get("package") or "-"
        print(f"package     {package[:12] if package != 'local' else 'local (-p DIR)'}" + (f"  cannot load it: {row['package_error']}" if row.get("package_error") else ""))
        attributes = row.get("attributes") or {}
        print("attributes" + ("  -" if not attributes else ""))
        for k, v in attributes.items():
            print(f"  {k:<20} {_shown(v)}")
        if row.get("recent"):
            print("recent commands and predictions")
            for r in row["recent"]:
                what = r["name"] if r["kind"] == "command" else "predict"
                print(f"  {r['id']:<16} {what:<20} {r['status']:<8} {r.get('code') or ''}")

    emit(args, row, human)
    return EXIT_OK


def telemetry_ls(args: argparse.Namespace) -> int:
    if not 0 < args.limit <= 1000:
        raise UsageError("--limit must be from 1 to 1000")
    result, _ = call(args, "telemetry.ls", {"client": args.client, "key": args.key, "limit": args.limit})
    rows = result["telemetry"]

    def human() -> None:
        for r in rows:
            r["time"] = when(r["created"])
            r["shown"] = _shown(r["payload"])
        filtered = args.client is not None or args.key is not None
        table(
            rows, [("time", "TIME"), ("client", "CLIENT"), ("key", "KEY"), ("shown", "PAYLOAD")],
            "no telemetry matches" if filtered else "no telemetry yet (packages send it with client.log_telemetry)",
        )

    emit(args, rows, human)
    total = result.get("total", len(rows))
    if total > len(rows):
        print(f"(the latest {len(rows)} of {total} records; --limit N shows more, up to 1000)", file=sys.stderr)
    return EXIT_OK


COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    ("command", "run"): command_run,
    ("command", "ls"): command_ls,
    ("command", "show"): command_show,
    ("predict", "run"): predict_run,
    ("predict", "ls"): predict_ls,
    ("predict", "show"): predict_show,
    ("client", "show"): client_show,
    ("telemetry", "ls"): telemetry_ls,
}
