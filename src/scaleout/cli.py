"""The `scaleout` command: wires subcommands to roles; nothing else.

Heavy modules (numpy, websockets, textual, cryptography) are imported inside the
commands so `scaleout --help` and `--version` stay fast on small devices.

Exit codes: 0 success, 1 the operation failed (a round failed, the peer refused),
2 usage or configuration error, 3 cannot reach or authenticate with a peer, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scaleout.commands.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, UsageError  # still importable from here

LEVELS = ("debug", "info", "warning", "error")


HIDDEN_COMMANDS = ("simulate-clients",)  # started by scaleout simulate, not by people: never offered


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        for name in HIDDEN_COMMANDS:  # argparse lists every choice after a typo
            message = message.replace(f", '{name}'", "").replace(f"'{name}', ", "")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class VersionAction(argparse.Action):
    """``--version``: the text is worked out only when asked for (it imports the wire schema)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        from scaleout.runtime import version_text

        print(version_text())
        parser.exit()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=LEVELS, default=None, help="how much to log on stderr (default: info)")


def _config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE.toml", help="read settings from a TOML file; flags override it")


def _connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("controller connection (else SCALEOUT_CONTROLLER / SCALEOUT_TOKEN / SCALEOUT_CA)")
    g.add_argument("--controller", metavar="URL", help="controller address, e.g. wss://host:8090")
    g.add_argument("--token", help="access token (an admin token for admin commands)")
    g.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate to trust (the controller's DIR/ca.pem)")
    g.add_argument("--data-dir", type=Path, metavar="DIR", help="data directory of a local controller: read its address, admin token and CA from it")
    g.add_argument("--insecure", action="store_true", default=None, help="connect without TLS (only to a controller started with --insecure)")


def _join_token(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("join_token", nargs="?", metavar="TOKEN", help=f"a join token from scaleout serve or scaleout token create --role {role}: all it needs to connect safely (or @FILE)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help=f"where this {role} keeps its enrolled identity and the controller's CA (default: ~/.local/state/scaleout" + (", or --work-dir" if role == "client" else "") + ")")


def _connect_rate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-connect-rate", type=float, metavar="N",
        help="new connections per second one address may open (bursts of 10 s worth); more get HTTP 429 (default: 200; 0: no limit)",
    )


def _package_limit_flags(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"compute package limits ({what})")
    g.add_argument("--package-max-mb", type=int, metavar="MIB", help="total unpacked size, in MiB (default: 1024)")
    g.add_argument("--package-max-files", type=int, metavar="N", help="files and directories (default: 10000)")
    g.add_argument("--package-max-depth", type=int, metavar="N", help="directory levels (default: 32)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scaleout", description="Federated learning from the terminal: one binary for controller, combiners and clients.")
    parser.add_argument("--version", action=VersionAction, help="print the version, the wire protocol version and the build kind (source, zipapp, frozen), then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True

    p = sub.add_parser("serve", help="run the controller")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="where state, models, keys and tokens live (default: ./scaleout-data)")
    p.add_argument(
        "--store", metavar="URL",
        help="keep the state and models in PostgreSQL: postgresql://USER[:PW]@HOST:PORT/DB (env SCALEOUT_STORE; default: state.db and files in the data dir)",
    )
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default: 8090)")
    p.add_argument("--san", action="append", metavar="NAME|IP", help="another name or address clients dial, for the generated certificate (repeatable); listening on 0.0.0.0 or :: already adds this machine's addresses")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve this certificate instead of the generated one")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert")
    p.add_argument("--insecure", action="store_true", default=None, help="no TLS (not for real deployments)")
    p.add_argument("--max-payload-mb", type=int, help="largest model or package accepted, in MiB (default: 4096)")
    p.add_argument("--combiner-cert-ttl", metavar="TTL", help="lifetime of the certificates signed for combiners, renewed after 2/3 of it: 7d, 12h, 3600s (default: 7d)")
    p.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free one and logs it (default: off)",
    )
    p.add_argument(
        "--metrics-host", metavar="HOST",
        help="address for --metrics-port (default: 127.0.0.1, this machine only; 0.0.0.0 lets a Prometheus elsewhere scrape, unauthenticated)",
    )
    p.add_argument(
        "--no-resume", action="store_true", default=None,
        help="leave a session that was running when the controller stopped 'interrupted' (carry on with: scaleout session continue ID) instead of resuming it",
    )
    _connect_rate_flag(p)
    p.add_argument(
        "--max-enrol-rate", type=float, metavar="N",
        help="nodes one join token may enrol per minute (a minute's worth at once); more are refused and retry (default: 60; 0: no limit)",
    )
    p.add_argument("--key-file", type=Path, metavar="PATH", help="with a postgresql store: the key (mode 0600) that seals the CA and signing keys in it, the same for every controller (scaleout store keygen --out PATH)")
    p.add_argument("--advertise", metavar="wss://HOST:PORT", help="the address nodes dial for this controller, named by standbys while it is active (default: its own url)")
    _package_limit_flags(p, "package set-active refuses a package beyond these, as clients would")
    _config_flag(p)
    _common(p)

    p = sub.add_parser("combine", help="run a combiner (aggregation node)")
    _join_token(p, "combiner")
    _connection(p)
    p.add_argument("--host", help="address to listen on for clients (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port for clients; 0 picks a free one (default: 0)")
    p.add_argument("--name", help="combiner name (default: the one it enrolled with, kept in the state dir; else from the host name)")
    p.add_argument("--advertise", metavar="HOST[:PORT]", help="address clients should dial, when it differs from --host/--port (NAT, proxies)")
    p.add_argument("--san", action="append", metavar="NAME|IP", help="another name or address clients dial, for this combiner's certificate (repeatable); listening on 0.0.0.0 or :: already adds this machine's addresses")
    p.add_argument("--max-payload-mb", type=int, help="largest model accepted, in MiB (default: 4096)")
    _connect_rate_flag(p)
    _config_flag(p)
    _common(p)

    p = sub.add_parser("join", help="run a client: train on local data when the controller asks")
    _join_token(p, "client")
    _connection(p)
    p.add_argument("--name", help="client name (default: the one it enrolled with, kept in the state dir; else host name plus a random suffix)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--package", type=Path, metavar="DIR", help="use this local compute package instead of downloading one")
    src.add_argument("--local-package", action="store_true", default=None, help="use ./client as the local compute package")
    p.add_argument("--work-dir", type=Path, metavar="DIR", help="where downloaded packages are unpacked (the newest 3 kept), and the identity kept unless --state-dir is given (default: a temporary folder)")
    p.add_argument("--dispatcher", action="store_true", default=None, help="run the package's train/validate/predict entry points as commands (automatic when they are {command: ...})")
    p.add_argument("--command-timeout", type=float, metavar="SECONDS", help="time limit of each dispatcher command (default: 3600); an entry's `timeout:` in the project file wins")
    p.add_argument("--managed-env", action="store_true", default=None, help="run the package in a venv made from its python_env.yaml (created once, cached by the file's hash)")
    p.add_argument("--env-cache", type=Path, metavar="DIR", help="where --managed-env keeps its venvs (default: ~/.cache/scaleout/envs)")
    p.add_argument("--max-payload-mb", type=int, help="largest model accepted, in MiB (default: 4096)")
    _package_limit_flags(p, "a downloaded package beyond these is refused")
    _config_flag(p)
    _common(p)

    p = sub.add_parser("token", help="create, list and revoke access tokens")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    tsub.required = True
    t = tsub.add_parser("create", help="create a token (needs an admin token)")
    t.add_argument("--role", required=True, choices=("admin", "combiner", "client"))
    t.add_argument("--ttl", default="30d", help="lifetime: 30d, 12h, 15m, 3600s (default: 30d)")
    t.add_argument("--name", help="what the token is for, shown by token ls and in the audit log (e.g. site-17, lab-laptops)")
    t.add_argument("--uses", type=int, metavar="N", help="how many nodes may enrol with it (default: any number until it expires)")
    t.add_argument("--san", action="append", metavar="NAME|IP", help="a combiner token: a name or address its certificate may carry, i.e. where clients dial it (repeatable; loopback is always allowed)")
    _connection(t)
    _json_flag(t)
    _common(t)
    t = tsub.add_parser("ls", help="list tokens: id, role, name, expiry, uses, last use (never the secret)")
    _connection(t)
    _json_flag(t)
    _common(t)
    t = tsub.add_parser("revoke", help="revoke a token: refused from now on, its open links closed within seconds")
    t.add_argument("id", metavar="ID", help="the token's id (see scaleout token ls; a unique prefix will do)")
    t.add_argument("--with-nodes", action="store_true", help="also remove the nodes that enrolled with it (they stop, exit 3)")
    _connection(t)
    _json_flag(t)
    _common(t)

    p = sub.add_parser("run", help="run a compute package entry point locally")
    rsub = p.add_subparsers(dest="action", metavar="ENTRY", parser_class=ArgumentParser)
    rsub.required = True
    r = rsub.add_parser("build", help="call build() to write the seed model")
    r.add_argument("-p", "--path", type=Path, default=Path("client"), metavar="DIR", help="compute package folder (default: ./client)")
    r.add_argument("-o", "--output", type=Path, metavar="DIR", help="where build() writes (default: the package folder)")
    r.add_argument("--managed-env", action="store_true", help="build with the Python of a venv made from the package's python_env.yaml (as join --managed-env)")
    r.add_argument("--env-cache", type=Path, metavar="DIR", help="where --managed-env keeps its venvs (default: ~/.cache/scaleout/envs)")
    _common(r)
    r = rsub.add_parser("install", help="pip install the dependencies in the package's python_env.yaml into this Python environment")
    r.add_argument("-p", "--path", type=Path, default=Path("client"), metavar="DIR", help="compute package folder (default: ./client)")
    r.add_argument("--dry-run", action="store_true", help="print what would be installed, install nothing")
    _json_flag(r)
    _common(r)

    p = sub.add_parser("package", help="create and activate compute packages")
    psub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    psub.required = True
    c = psub.add_parser("create", help="pack a compute package folder into a .tgz, honouring .scaleoutignore")
    c.add_argument("--path", "-p", type=Path, default=Path("client"), metavar="DIR", help="compute package folder (default: ./client)")
    c.add_argument("-o", "--output", type=Path, metavar="FILE", help="archive to write (default: DIR.tgz beside DIR)")
    _json_flag(c)
    _common(c)
    c = psub.add_parser("set-active", help="upload a .tgz (or a package folder, packed as package create does) and make it the package clients run")
    c.add_argument("file", type=Path, metavar="FILE")
    c.add_argument("--name", help="package name shown in listings (default: the file name)")
    _connection(c)
    _json_flag(c)
    _common(c)

    p = sub.add_parser("model", help="the global model and its trail")
    msub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    msub.required = True
    c = msub.add_parser("set-seed", help="upload the initial global model (.npz from numpyhelper, or .safetensors)")
    c.add_argument("file", type=Path, metavar="FILE")
    _connection(c)
    _json_flag(c)
    _common(c)
    c = msub.add_parser("ls", help="list models, oldest first")
    c.add_argument("--session", help="only models of this session")
    _connection(c)
    _json_flag(c)
    _common(c)
    c = msub.add_parser("show", help="show one model: trail and tensors")
    c.add_argument("id", metavar="ID", help="model id (or a unique prefix of at least 6 characters)")
    _connection(c)
    _json_flag(c)
    _common(c)
    c = msub.add_parser("set-active", help="make a model of the trail the global model again (roll back; audited)")
    c.add_argument("id", metavar="ID", help="model id (or a unique prefix of at least 6 characters)")
    _connection(c)
    _json_flag(c)
    _common(c)
    c = msub.add_parser("download", help="save a model as .safetensors (or .npz)")
    c.add_argument("id", metavar="ID", help="model id, unique prefix, or 'active'")
    c.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    _connection(c)
    _json_flag(c)
    _common(c)

    p = sub.add_parser("session", help="start, watch and stop training sessions")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    ssub.required = True
    c = ssub.add_parser("start", help="start a session of federated rounds")
    c.add_argument("--rounds", type=int, default=5, help="number of rounds (default: 5)")
    c.add_argument("--round-timeout", type=float, default=180.0, metavar="SECONDS", help="how long a round waits for updates, at most 7 days (default: 180)")
    c.add_argument("--min-clients", type=int, default=1, help="fewest updates a round needs at its timeout, 1 to 1,000,000 (default: 1)")
    c.add_argument(
        "--aggregator", default="fedavg",
        help="aggregation strategy: fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, fedmedian, trimmedmean, krum, multikrum, bulyan or dpfedavg (default: fedavg; README: Aggregators)",
    )
    c.add_argument(
        "--aggregator-kwargs", default="{}", metavar="JSON",
        help="the strategy's hyperparameters, e.g. fedadam: '{\"learning_rate\": 0.01, \"beta1\": 0.9, \"beta2\": 0.99, \"tau\": 1e-4}'",
    )
    c.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True, help="have clients validate each new global model (default: on)")
    c.add_argument("--settings", default="{}", metavar="JSON", help="training settings passed to the train callback, e.g. '{\"epochs\": 2}'")
    c.add_argument("--max-examples-per-client", type=int, default=1_000_000, metavar="N", help="a client's weight (num_examples) is clipped to N; 0: no cap (default: 1000000)")
    c.add_argument(
        "--max-update-norm", default="10", metavar="X",
        help="refuse an update whose change exceeds X times the model's norm (at least sqrt(parameters)); 0 or 'off': no bound (default: 10)",
    )
    c.add_argument(
        "--clients-per-round", metavar="N|FRACTION",
        help="clients drawn to train each round: a number (2), or a fraction of those connected (0.1, at least 1) (default: all)",
    )
    c.add_argument("--seed", type=int, metavar="S", help="seed of the per-round draws, recorded on the session (default: a fresh one, recorded)")
    c.add_argument("--clients", metavar="A,B,C", help="only these clients take part (names, comma-separated; all must be known to the controller)")
    c.add_argument(
        "--server-functions", type=Path, metavar="FILE.py",
        help="a Python file defining class ServerFunctions(ServerFunctionsBase) (Scaleout Edge's server functions), run on the controller",
    )
    c.add_argument(
        "--server-functions-timeout", type=float, default=60.0, metavar="SECONDS",
        help="how long one server-function call may take before the built-in behaviour is used for it (default: 60)",
    )
    c.add_argument("--name", help="a name for the session")
    c.add_argument("--model", metavar="ID", help="start from this model of the trail instead of the global model (model ls lists them)")
    c.add_argument("--wait", action="store_true", help="follow the rounds until the session ends")
    _connection(c)
    _json_flag(c)
    _common(c)
    c = ssub.add_parser(
        "continue", help="carry on a finished, stopped, failed or interrupted session from its last model, with its settings",
    )
    c.add_argument("id", metavar="ID", help="session id (session ls lists them)")
    c.add_argument("--rounds", type=int, help="how many more rounds (default: the rounds it had left, or as many as it had)")
    c.add_argument("--round-timeout", type=float, metavar="SECONDS", help="a new round timeout (default: the session's)")
    c.add_argument("--wait", action="store_true", help="follow the rounds until the session ends")
    _connection(c)
    _json_flag(c)
    _common(c)
    for action, text in (
        ("ls", "list sessions"),
        ("show", "show a session and its rounds"),
        ("watch", "follow a session's rounds as they end; exit 0 if it succeeded, 1 if it failed or was stopped"),
        ("stop", "stop a running session"),
    ):
        c = ssub.add_parser(action, help=text)
        if action != "ls":
            c.add_argument("id", nargs="?", metavar="ID", help="session id (default: the latest)")
        if action == "show":
            c.add_argument("--clients", action="store_true", help="also show each client's training result and validation per round")
        _connection(c)
        _json_flag(c)
        _common(c)

    p = sub.add_parser("status", help="what the controller is doing: address, active model and package, session, nodes")
    p.add_argument(
        "--wait", nargs="?", const=60.0, type=float, metavar="SECONDS",
        help="wait until the controller is up and answers (default 60 s; exit 3 if it is not by then)",
    )
    _connection(p)
    _json_flag(p)
    _common(p)

    for noun in ("client", "combiner"):
        p = sub.add_parser(noun, help=f"{noun}s known to the controller")
        nsub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
        nsub.required = True
        c = nsub.add_parser("ls", help=f"list {noun}s")
        _connection(c)
        _json_flag(c)
        _common(c)
        c = nsub.add_parser("rm", help=f"remove an enrolled {noun}'s identity: its link closes and it stops (exit 3); its name is free again")
        c.add_argument("name", metavar="NAME")
        _connection(c)
        _json_flag(c)
        _common(c)
        if noun == "client":
            c = nsub.add_parser("show", help="show one client: status, package, attributes, recent commands")
            c.add_argument("name", metavar="NAME")
            _connection(c)
            _json_flag(c)
            _common(c)

    _job_parsers(sub)

    p = sub.add_parser("metric", help="what clients logged with log_metric")
    msub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    msub.required = True
    c = msub.add_parser(
        "ls", help="list logged metric values (session, round, client, step, value), oldest first: the latest --limit of them",
    )
    c.add_argument("--session", metavar="ID", help="only this session ('latest' for the latest one)")
    c.add_argument("--round", type=int, metavar="N", help="only this round")
    c.add_argument("--client", metavar="NAME", help="only this client (a glob such as 'site-*' works)")
    c.add_argument("--key", metavar="KEY", help="only this metric (a glob such as 'train_*' works)")
    c.add_argument("--limit", type=int, default=100, metavar="N", help="show the latest N values; 0 shows all (default: 100)")
    c.add_argument("--telemetry", action="store_true", help="list the numbers clients sent with log_telemetry (payload 'value') instead")
    _connection(c)
    _json_flag(c)
    _common(c)
    p = sub.add_parser("tui", help="watch and drive the federation live in a terminal UI (or a browser with --web)")
    p.add_argument("--session", metavar="ID", help="session to show (default: the running or latest one, following new ones)")
    p.add_argument("--web", action="store_true", help="serve the TUI to a browser (textual-serve) instead of this terminal")
    p.add_argument("--host", default="127.0.0.1", help="with --web: address to listen on (default: 127.0.0.1; whoever opens the page acts as admin)")
    p.add_argument("--port", type=int, default=8000, help="with --web: port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--max-sessions", type=int, default=3, metavar="N", help="with --web: at most N pages (app processes) at once; more are refused (default: 3)")
    _connection(p)
    _common(p)

    p = sub.add_parser("audit", help="the controller's audit log: admin actions and model commits, hash-chained")
    asub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    asub.required = True
    c = asub.add_parser("ls", help="list audit entries, oldest first")
    c.add_argument("--since", metavar="T", help="only entries from T on: an ISO time (2026-11-29T10:00:00Z) or a time ago (90s, 15m, 1h, 2d, 1w)")
    c.add_argument("--limit", type=int, default=100, metavar="N", help="at most the N newest entries; 0 shows all (default: 100)")
    _connection(c)
    _json_flag(c)
    _common(c)
    c = asub.add_parser("verify", help="check the audit log's hash chain: exit 0 if it holds, 1 naming the first broken entry")
    c.add_argument("--state", type=Path, metavar="FILE", help="check this state.db (a stopped controller's, or a copy) instead of asking the controller")
    c.add_argument("--store", metavar="URL", help="check the log in this PostgreSQL store instead of asking the controller, against the signed head the store keeps (give --key-file or --data-dir to check its signature)")
    c.add_argument("--key-file", type=Path, metavar="PATH", help="with --store: the controllers' key file (serve --key-file); it unseals the audit key the store's signed head is checked with")
    c.add_argument("--head", type=Path, metavar="FILE", help="also check against a copy of DATA_DIR/audit.head kept elsewhere: the log must still hold the entry it names")
    _connection(c)
    _json_flag(c)
    _common(c)

    p = sub.add_parser("store", help="the controller's store: move a data dir into PostgreSQL; key files for serve --key-file")
    ssub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    ssub.required = True
    c = ssub.add_parser("migrate", help="copy a stopped controller's state.db and models into an empty PostgreSQL database")
    c.add_argument("--from", dest="source", type=Path, required=True, metavar="DIR", help="the controller's data dir (serve --data-dir)")
    c.add_argument("--to", required=True, metavar="URL", help="postgresql://USER[:PW]@HOST:PORT/DB (an empty database)")
    c.add_argument("--replace", action="store_true", help="drop the Scaleout store the target already holds first")
    _common(c)
    k = ssub.add_parser("keygen", help="write a new key file (mode 0600) for serve --key-file: give every controller on one store the same file")
    k.add_argument("--out", type=Path, required=True, metavar="PATH", help="where to write it (an existing file is never replaced)")
    _common(k)

    p = sub.add_parser("dev", help="run a whole local federation on one machine (controller, combiners, clients)")
    p.add_argument("-p", "--path", type=Path, default=Path("client"), metavar="DIR", help="compute package folder (default: ./client)")
    p.add_argument("--clients", type=int, default=3, help="number of clients (default: 3)")
    p.add_argument("--combiners", type=int, default=1, help="number of combiners (default: 1)")
    p.add_argument("--rounds", type=int, default=3, help="number of rounds (default: 3)")
    p.add_argument("--round-timeout", type=float, default=120.0, metavar="SECONDS", help="round timeout (default: 120)")
    p.add_argument("--settings", default="{}", metavar="JSON", help="training settings for the train callback")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True, help="validate each new global model (default: on)")
    p.add_argument("--headless", action="store_true", help="print rounds as text instead of opening the TUI (the default when not on a terminal)")
    p.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report of the session")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="keep the controller's data here (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="headless: keep the federation up after the session, for commands, predictions and admin commands, until Ctrl-C (the TUI keeps it up while it is open)")
    p.add_argument("--dispatcher", action="store_true", help="clients run the package's entry points as commands (join --dispatcher)")
    p.add_argument("--managed-env", action="store_true", help="build and run the package in a venv made from its python_env.yaml (join --managed-env)")
    _common(p)

    p = sub.add_parser("simulate", help="a real controller and combiners with thousands of lightweight simulated clients")
    p.add_argument("--clients", type=int, default=100, help="number of simulated clients (default: 100)")
    p.add_argument("--combiners", type=int, default=1, help="number of combiner processes (default: 1)")
    p.add_argument("--rounds", type=int, default=2, help="number of rounds (default: 2)")
    p.add_argument("--model-size", type=int, default=10_000, metavar="P", help="float32 parameters of the model (default: 10000)")
    p.add_argument("--train-time", type=float, default=0.0, metavar="S", help="seconds each client 'trains' before it answers (default: 0)")
    p.add_argument("--round-timeout", type=float, default=300.0, metavar="SECONDS", help="round timeout (default: 300)")
    p.add_argument("--connect-timeout", type=float, default=300.0, metavar="SECONDS", help="how long all clients may take to connect (default: 300)")
    p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=False, help="have clients validate each new model (default: off)")
    p.add_argument("--report", type=Path, metavar="FILE", help="write a JSON report: the dev schema plus time split and peak RSS per round")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="keep the controller's data and logs here (default: a temporary folder)")
    _common(p)

    # Started by `simulate`, one per few hundred clients; not for direct use.
    p = sub.add_parser("simulate-clients")
    p.add_argument("--first", type=int, default=1)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--train-time", type=float, default=0.0)
    _connection(p)
    _common(p)
    return parser


def _job_parsers(sub: Any) -> None:
    """`command`, `predict` and `telemetry`: run package callbacks on clients, list results."""
    for noun, text in (("command", "run a custom command on clients and list its results"), ("predict", "run the predict callback on clients and list its results")):
        p = sub.add_parser(noun, help=text)
        jsub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
        jsub.required = True
        if noun == "command":
            c = jsub.add_parser("run", help="call the callback a package registered with set_custom_callback(NAME, cb) on clients")
            c.add_argument("name", metavar="NAME", help="the command (with or without Scaleout Edge's Custom_ prefix)")
        else:
            c = jsub.add_parser("run", help="call the callback a package registered with set_predict_callback(cb) on clients")
            c.add_argument("--model", metavar="ID", help="model id, unique prefix or 'active' (default: the active model)")
        c.add_argument("--params", default="{}", metavar="JSON", help="a JSON object passed to the callback (default: {})")
        who = c.add_mutually_exclusive_group()
        who.add_argument("--clients", metavar="A,B", help="only these clients (comma-separated)")
        who.add_argument("--all", action="store_true", help="every connected client (the default)")
        default = "60" if noun == "command" else "300"
        c.add_argument("--timeout", type=float, metavar="SECONDS", help=f"how long each client's callback may run (default: {default})")
        c.add_argument("--wait", action="store_true", help="wait for the results and print them; exit 1 if any client failed")
        _connection(c)
        _json_flag(c)
        _common(c)
        c = jsub.add_parser("ls", help=f"list {noun} jobs, oldest first, with counts of results")
        c.add_argument("--limit", type=int, default=100, help="the latest N (default: 100)")
        _connection(c)
        _json_flag(c)
        _common(c)
        c = jsub.add_parser("show", help="each client's result, error or 'no such command'")
        c.add_argument("id", nargs="?", metavar="ID", help="job id or unique prefix (default: the latest)")
        _connection(c)
        _json_flag(c)
        _common(c)
    p = sub.add_parser("telemetry", help="what packages sent with log_telemetry")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgumentParser)
    tsub.required = True
    c = tsub.add_parser("ls", help="list telemetry records, oldest first")
    c.add_argument("--client", metavar="NAME", help="only this client's")
    c.add_argument("--key", help="only records of this key")
    c.add_argument("--limit", type=int, default=100, help="the latest N (default: 100, at most 1000)")
    _connection(c)
    _json_flag(c)
    _common(c)


def _setup_logging(level: str | None) -> None:
    logging.basicConfig(
        level=getattr(logging, (level or "info").upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("scaleout.transport.ws").setLevel(logging.WARNING)


def _commands() -> dict[tuple[str, str | None], Callable[[argparse.Namespace], int]]:
    from scaleout.commands import admin, dev, jobs, launch, simulate, store, tui

    table: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
        ("serve", None): launch.serve,
        ("combine", None): launch.combine,
        ("join", None): launch.join,
        ("run", "build"): launch.run_build,
        ("run", "install"): launch.run_install,
        ("package", "create"): launch.package_create,
        ("store", "keygen"): launch.store_keygen,
        ("dev", None): dev.main,
        ("simulate", None): simulate.main,
        ("simulate-clients", None): simulate.clients_main,
        ("tui", None): tui.main,
    }
    for key, fn in admin.COMMANDS.items():
        table[key] = fn
    table.update(jobs.COMMANDS)
    for key, fn in store.COMMANDS.items():
        table[key] = fn
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "combine"):  # before _commands() imports numpy
        from scaleout.commands.launch import keep_freed_buffers, one_blas_thread

        one_blas_thread()
        keep_freed_buffers()
    _setup_logging(args.log_level)
    from scaleout.core.errors import AuthError, ConfigError, PackageError, ScaleoutError, StoreUnreachable

    command = _commands()[(args.command, getattr(args, "action", None))]
    try:
        return command(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (UsageError, ConfigError, PackageError) as exc:
        _fail(exc)
        return EXIT_USAGE
    except AuthError as exc:
        _fail(exc)
        return EXIT_UNREACHABLE
    except ScaleoutError as exc:
        from scaleout.transport.net import ConnectError

        _fail(exc)
        if isinstance(exc, ConnectError | StoreUnreachable) or exc.code in (AuthError.code, "link_closed", "timeout"):
            return EXIT_UNREACHABLE
        return EXIT_USAGE if exc.code in (ConfigError.code, PackageError.code) else EXIT_FAILED
    except BrokenPipeError:  # `scaleout model ls | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (OSError, ConnectionError) as exc:
        _fail(exc)
        return EXIT_FAILED


def _fail(exc: BaseException) -> None:
    print(f"scaleout: error: {exc}", file=sys.stderr)


def env(name: str) -> str | None:
    return os.environ.get(name) or None


def entry() -> Any:
    sys.exit(main())
