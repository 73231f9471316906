"""Token and identity commands: token create / ls / revoke, client rm, combiner rm."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from scaleout.commands.exits import EXIT_OK, UsageError

Call = Callable[..., tuple[dict[str, Any], bytes | None]]
Emit = Callable[[argparse.Namespace, Any, Callable[[], None]], None]
When = Callable[[float | None], str]


def token_create(args: argparse.Namespace, call: Call, emit: Emit, when: When) -> int:
    from scaleout.core.config import parse_sans
    from scaleout.security.tokens import parse_ttl

    if args.uses is not None and args.uses <= 0:
        raise UsageError(f"--uses must be a positive number, got {args.uses}")
    sans = parse_sans(args.san, "token") if args.san else []
    if sans and args.role != "combiner":
        raise UsageError("--san is for combiner tokens: the names and addresses a combiner's certificate may carry")
    req = {"role": args.role, "ttl_s": parse_ttl(args.ttl), "name": args.name, "uses": args.uses, "sans": sans}
    result, _ = call(args, "token.create", req)
    shown = {k: result.get(k) for k in ("id", "role", "name", "expires", "uses", "sans", "join_token", "token")}
    emit(args, shown, lambda: print(result["join_token"]))
    if not args.json:
        uses = f", {result['uses']} use{'s' if result['uses'] != 1 else ''}" if result.get("uses") else ""
        print(f"({args.role} join token {result['id']}, expires {when(result['expires'])}{uses})", file=sys.stderr)
        if args.role in ("client", "combiner"):
            command = "join" if args.role == "client" else "combine"
            print(f"on the node: scaleout {command} TOKEN --name NAME", file=sys.stderr)
    return EXIT_OK


TOKEN_COLUMNS = [
    ("id", "ID"), ("role", "ROLE"), ("name", "NAME"), ("status", "STATUS"), ("expires_s", "EXPIRES"), ("uses_s", "USES"), ("nodes", "NODES"),
    ("last_used_s", "LAST USED"), ("recent_s", "LAST ENROLLED"),
]
IDENTITY_COLUMNS = [("id", "ID"), ("role", "ROLE"), ("name", "NAME"), ("status", "STATUS"), ("token_id", "ENROLLED WITH"), ("created_s", "ENROLLED")]


def token_ls(args: argparse.Namespace, call: Call, emit: Emit, when: When) -> int:
    from scaleout.commands.admin import table

    result, _ = call(args, "token.ls")
    rows = result["tokens"]
    nodes = result.get("identities", [])

    def human() -> None:
        for r in rows:
            recent = r.get("recent") or []
            r.update(
                expires_s=when(r["expires"]), last_used_s=when(r["last_used"]),
                uses_s=f"{r['uses']}/{r['max_uses']}" if r["max_uses"] is not None else str(r["uses"]),
                recent_s=f"{when(r.get('last_enrolled'))} ({', '.join(recent)})" if recent else "-",
            )
        table(rows, TOKEN_COLUMNS, "no tokens yet (create one with: scaleout token create --role client)")
        if nodes:
            # Each enrolled node's own credential: revoke one with scaleout token revoke ID.
            print(f"\nnode credentials ({len(nodes)}; revoke one with: scaleout token revoke ID)")
            for n in nodes:
                n["created_s"] = when(n["created"])
            table(nodes, IDENTITY_COLUMNS, "")

    by_token: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        by_token.setdefault(n["token_id"], []).append(n)
    for r in rows:  # in JSON, each token lists the node credentials enrolled with it
        r["node_credentials"] = by_token.get(r["id"], [])
    emit(args, rows, human)
    return EXIT_OK


def token_revoke(args: argparse.Namespace, call: Call, emit: Emit, when: When) -> int:
    result, _ = call(args, "token.revoke", {"id": args.id, "with_nodes": args.with_nodes})

    def human() -> None:
        nodes = ", ".join(f"{n['role']} {n['name']}" for n in result["nodes"])
        # Links to the controller close now; combiners close their clients' links as the revocation reaches them.
        print(f"token {result['id']} revoked ({result['closed']} links to the controller closed; combiners close their nodes' links within seconds)"
              + (f"; removed {nodes}" if nodes else ""))

    emit(args, result, human)
    return EXIT_OK


def _node_rm(role: str, args: argparse.Namespace, call: Call, emit: Emit) -> int:
    result, _ = call(args, f"{role}.rm", {"name": args.name})
    emit(args, result, lambda: print(f"{role} {result['name']} removed" + (" (its link was closed)" if result["closed"] else "")))
    return EXIT_OK


def client_rm(args: argparse.Namespace, call: Call, emit: Emit, when: When) -> int:
    return _node_rm("client", args, call, emit)


def combiner_rm(args: argparse.Namespace, call: Call, emit: Emit, when: When) -> int:
    return _node_rm("combiner", args, call, emit)
