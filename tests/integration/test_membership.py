"""Attacks with a node's credential (issue 20 #1, #6, #11; issue 19 #21), against real processes.

A rogue combiner enrolled with the combiner token claims clients it does not serve and
speaks for them; a client connecting to it must not hand it a credential usable at the
controller. An admin token may not mint a node credential; every credential is listed. A
used-up join token opens nothing, enrolments per token are rate-limited, and a client that
could not keep its credential finishes the same enrolment instead of burning its token.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import QUICKSTART, Federation, Proc, scaleout, tmpfs

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.core import messages as m
from scaleout.core.errors import AuthError, RemoteError
from scaleout.security import tls, tokens
from scaleout.transport.link import Link
from scaleout.transport.net import connect, serve

WAIT = 20.0


def where(fed: Federation) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["combiner"], c["status"]) for c in fed.admin("client.ls")[0]["clients"]}


async def where_now(fed: Federation) -> dict[str, tuple[str, str]]:
    assert fed.conn is not None
    return {c["name"]: (c["combiner"], c["status"]) for c in (await call_async(fed.conn, "client.ls"))[0]["clients"]}


class Rogue:
    """A combiner enrolled with the combiner token, speaking the protocol by hand: it
    serves clients (keeping the bearer each one shows) and says what it likes upstream."""

    def __init__(self, fed: Federation, tmp: Path, identity: str) -> None:
        self.fed, self.tmp, self.identity = fed, tmp, identity
        self.bearers: asyncio.Queue[str] = asyncio.Queue()

    async def start(self) -> None:
        fed = self.fed
        self.link = await connect(fed.url, self.identity, tls.client_context(fed.ca), max_payload=1 << 20)
        self.reader = asyncio.create_task(self.link.run())
        csr, key = tls.make_csr(["127.0.0.1"], "evilcomb")
        reply, _ = await self.link.request("combiner.register", {"name": "evilcomb", "csr": csr.decode()}, timeout=WAIT)
        tls.write_private(self.tmp / "evil.key", key)
        (self.tmp / "evil.pem").write_text(reply["cert"])

        def authenticate(token: str | None) -> tokens.TokenClaims:
            assert token
            self.bearers.put_nowait(token)  # whatever a client shows, kept
            return tokens.peek(token)

        async def on_link(link: Link) -> None:
            await link.run()

        ctx = tls.server_context(self.tmp / "evil.pem", self.tmp / "evil.key")
        self.server, port = await serve(on_link, authenticate, "127.0.0.1", 0, ctx, max_payload=1 << 20)
        self.url = f"wss://127.0.0.1:{port}"
        await self.barrier()

    async def barrier(self) -> None:
        """A request answered after every message sent before it was handled."""
        await self.link.request("combiner.ready", {"url": self.url}, timeout=WAIT)

    async def stop(self) -> None:
        self.server.close()
        await self.link.ws.close()
        self.reader.cancel()


def test_a_rogue_combiner_cannot_claim_clients_speak_for_them_or_take_their_credential(fed: Federation, tmp_path: Path) -> None:
    ctl = fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    for name in ("k0", "k1"):
        fed.client(name, package=QUICKSTART)
    fed.wait_clients(2)
    admin = fed.conn
    assert admin is not None
    k2: list[Proc] = []
    evil = fed.identity("combiner", "evilcomb")  # enrolled with the combiner token, as any combiner
    fed.token("client")

    async def attack() -> dict[str, Any]:
        rogue = Rogue(fed, tmp_path, evil)
        await rogue.start()
        try:
            # Claims without proof, with a forged one, and with a real ticket of another client: all refused.
            await rogue.link.send(m.ClientsChanged(joined=["k1", "ghost-1"]))
            await rogue.link.send(m.ClientsChanged(joined=["k1", "ghost-1"], proofs=["sco1.e30.AAAA", "x"]))
            # Forged reports, attributes and status for clients it does not serve.
            await rogue.link.send(m.Report(kind="metric", session_id="s-x", round_index=1, client="k1", data={"metrics": {"loss": -1.0}, "step": 1}))
            await rogue.link.send(m.Report(kind="train", session_id="s-x", round_index=1, client="k0", data={}, error="forged failure"))
            # ... and in a round's Reports message (its own client k2 beside them does not carry them in).
            forged = [{"client": "k2", "data": {}, "error": None}, {"client": "k0", "data": {}, "error": "forged batch failure"}]
            await rogue.link.send(m.Reports(kind="train", session_id="s-x", round_index=1, entries=forged, failed=1))
            await rogue.link.send(m.ClientLog(kind="attributes", data={"site": "evil"}, client="k1"))
            await rogue.link.send(m.ClientStatus(package=None, error="forged: cannot load", client="k0"))
            await rogue.barrier()
            before = await where_now(fed)
            # A new client is sent to the rogue (the least loaded) and connects: what does it show?
            k2.append(fed.client("k2", package=QUICKSTART))
            bearer = await asyncio.wait_for(rogue.bearers.get(), 60)
            stolen = {}
            for op, args in (("client.assign", {"name": "k2"}), ("package.get", {})):
                try:
                    await call_async(Connection(fed.url, bearer, Path(fed.ca), False), op, args)
                    stolen[op] = "worked"
                except (AuthError, RemoteError) as exc:
                    stolen[op] = str(exc)
            # A ticket is no identity: with the shared client join token plus identity=<ticket>, the
            # rogue asks for k2's combiner (c1, to take k2 over there; itself, to mint a fresh ticket).
            as_k2 = {}
            for prefer in ("c1", "evilcomb"):
                try:
                    got = await call_async(Connection(fed.url, fed.token("client"), Path(fed.ca), False), "client.assign", {"name": "k2", "identity": bearer, "prefer": prefer})
                    as_k2[prefer] = f"worked: {got[0]}"
                except (AuthError, RemoteError) as exc:
                    as_k2[prefer] = str(exc)
            # The ticket proves k2 is here, and nothing else: not k1.
            with_k2 = m.ClientsChanged(joined=["k1"], proofs=[bearer])
            await rogue.link.send(with_k2)
            await rogue.link.send(m.ClientsChanged(joined=["k2"], proofs=[bearer]))
            await rogue.barrier()
            after = await where_now(fed)
            shown = {n: (await call_async(admin, "client.show", {"name": n}))[0]["client"] for n in ("k0", "k1")}
            metrics = (await call_async(admin, "metric.ls", {"client": "k1"}))[0]
        finally:
            await rogue.stop()
        return {"before": before, "bearer": bearer, "stolen": stolen, "as_k2": as_k2, "after": after, "shown": shown, "metrics": metrics}

    out = asyncio.run(asyncio.wait_for(attack(), 120))
    assert out["before"]["k1"] == ("c1", "online") and out["before"]["k0"] == ("c1", "online"), out["before"]
    assert "ghost-1" not in out["before"] and "ghost-1" not in out["after"], out
    assert out["after"]["k1"] == ("c1", "online"), out["after"]
    assert out["after"]["k2"] == ("evilcomb", "online"), out["after"]  # its own proven client, only
    claims = tokens.peek(out["bearer"])
    assert claims.sub == "k2" and claims.aud == "evilcomb", claims  # a ticket for this combiner, not k2's credential
    assert all("a ticket is good only at the combiner it names" in v for v in out["stolen"].values()), out["stolen"]
    assert all("a ticket is good only at the combiner it names" in v for v in out["as_k2"].values()), out["as_k2"]
    assert out["metrics"]["total"] == 0, out["metrics"]
    assert "site" not in (out["shown"]["k1"].get("attributes") or {}), out["shown"]
    assert "forged" not in json.dumps(out["shown"]["k0"]), out["shown"]
    log = ctl.text()
    assert "combiner evilcomb announced client k1 without a valid proof: refused" in log
    assert "is now on combiner evilcomb" not in log
    assert "another client connected as k2" not in k2[0].text(), k2[0].text()


def refused(fed: Federation, token: str, op: str, args: dict[str, Any] | None = None) -> RemoteError:
    conn = Connection(fed.url, token, Path(fed.ca), False)
    with pytest.raises(RemoteError) as info:
        asyncio.run(asyncio.wait_for(call_async(conn, op, args), WAIT))
    return info.value


def enrol_with(fed: Federation, token: str, name: str) -> str:
    conn = Connection(fed.url, token, Path(fed.ca), False)
    return str(asyncio.run(asyncio.wait_for(call_async(conn, "node.enrol", {"name": name}), WAIT))[0]["token"])


def test_an_admin_token_mints_no_node_credential_and_every_credential_is_listed(fed: Federation) -> None:
    fed.controller()
    short = fed.admin("token.create", {"role": "admin", "ttl_s": 60})[0]["token"]
    err = refused(fed, short, "node.enrol", {"name": "backdoor"})
    assert err.code == "unauthorized" and "an admin token may not" in str(err), err
    enrol_with(fed, fed.token("client"), "site-1")
    listed = json.loads(scaleout("token", "ls", "--json", "--data-dir", str(fed.data)).stdout)
    creds = [n for t in listed for n in t["node_credentials"]]
    assert [(n["role"], n["name"], n["status"]) for n in creds] == [("client", "site-1", "valid")], creds
    human = scaleout("token", "ls", "--data-dir", str(fed.data)).stdout
    assert "node credentials (1;" in human and "site-1" in human and "backdoor" not in human, human
    # One of them revoked by its id, as listed.
    r = scaleout("token", "revoke", creds[0]["id"], "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    listed = json.loads(scaleout("token", "ls", "--json", "--data-dir", str(fed.data)).stdout)
    assert [n["status"] for t in listed for n in t["node_credentials"]] == ["revoked"]


def test_a_used_up_join_token_opens_nothing_and_enrolments_are_rate_limited(fed: Federation) -> None:
    fed.controller("--max-enrol-rate", "2")
    fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    once = fed.admin("token.create", {"role": "client", "ttl_s": 3600, "uses": 1})[0]["token"]
    own = enrol_with(fed, once, "a")
    for op, args in (("package.get", {}), ("client.assign", {"name": "a", "identity": own}), ("node.enrol", {"name": "b"})):
        err = refused(fed, once, op, args)
        assert err.code == "unauthorized" and "used up" in str(err), (op, err)
    # The node it enrolled uses its own credential: it is not locked out.
    assert asyncio.run(call_async(Connection(fed.url, own, Path(fed.ca), False), "package.get"))[1] is not None
    # A fresh, unlimited token: two enrolments a minute, then refused with a wait.
    many = fed.token("client")
    enrol_with(fed, many, "n0")
    enrol_with(fed, many, "n1")
    err = refused(fed, many, "node.enrol", {"name": "n2"})
    assert err.code == "rate_limited" and "at most 2 nodes a minute" in str(err), err
    row = next(t for t in fed.admin("token.ls")[0]["tokens"] if t["id"] == tokens.peek(many).jti)
    assert row["uses"] == 2 and row["recent"] == ["n1", "n0"] and row["last_enrolled"] is not None, row
    # Finishing an enrolment again (same token, same key) issues a credential each time: it counts too.
    again = fed.token("combiner")
    conn = Connection(fed.url, again, Path(fed.ca), False)
    first = asyncio.run(call_async(conn, "node.enrol", {"name": "r", "key": "k" * 20}))[0]
    second = asyncio.run(call_async(conn, "node.enrol", {"name": "r", "key": "k" * 20}))[0]
    assert second["id"] == first["id"], (first, second)
    err = refused(fed, again, "node.enrol", {"name": "r", "key": "k" * 20})
    assert err.code == "rate_limited", err


def test_a_client_that_could_not_keep_its_credential_finishes_its_enrolment(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.combiner("c1")
    once = fed.admin("token.create", {"role": "client", "ttl_s": 3600, "uses": 1})[0]["token"]
    state = tmp_path / "state"
    state.mkdir()
    args = ["join", "--controller", fed.url, "--token", once, "--ca", fed.ca, "--name", "full", "--state-dir", str(state),
            "--work-dir", str(tmp_path / "work"), "-p", str(QUICKSTART)]
    # Room for the state dir, its identities folder and one small file, no more (inodes).
    with tmpfs(state, "1m,nr_inodes=4"):
        (state / "filler").write_text("x")
        r = scaleout(*args, timeout=60)
        assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
        (state / "filler").unlink()  # space back
        p = Proc("full", args, fed.logs, False)
        fed.procs.append(p)
        try:
            fed.wait_clients(1)  # the same token, used up, finished the enrolment it started
            assert where(fed)["full"][1] == "online"
            row = next(t for t in fed.admin("token.ls")[0]["tokens"] if t["id"] == tokens.peek(once).jti)
            assert row["uses"] == 1 and row["nodes"] == 1, row
        finally:
            p.stop()
    assert "finished its enrolment" in fed.procs[0].text()
