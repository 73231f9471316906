"""The control plane at fleet scale: membership travels as deltas in pages, is written in
batches, and big listings still come back whole."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import Federation

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.core import messages as m
from scaleout.security.tls import client_context
from scaleout.transport.link import Incoming
from scaleout.transport.net import connect

WAIT = 30.0


async def stand_in(fed: Federation, token: str, name: str, script: Any) -> Any:
    """A combiner connection that registers and then runs ``script(link)``."""
    link = await connect(fed.url, token, client_context(fed.ca), max_payload=1 << 20)

    async def on_message(inc: Incoming) -> None:
        pass

    reader = asyncio.create_task(link.run(on_message=on_message))
    try:
        await link.request("combiner.register", {"name": name}, timeout=WAIT)
        await link.request("combiner.ready", {"url": "wss://127.0.0.1:9"}, timeout=WAIT)
        return await script(link)
    finally:
        await link.ws.close()
        reader.cancel()


def test_thousands_of_joins_as_paged_deltas(fed: Federation) -> None:
    fed.controller()
    names = [f"edge-{i:05d}" for i in range(10_000)]  # client ls: well over one 1 MiB frame
    combiner_token, client_token = fed.identity("combiner", "big"), fed.identity("client", "newcomer")
    proofs = [fed.ticket(n, "big") for n in names]  # each as the controller gave it to that client

    async def script(link: Any) -> dict[str, Any]:
        page = m.MAX_PROOFS
        await link.send(m.ClientsChanged(joined=names[:page], proofs=proofs[:page], reset=True))
        for i in range(page, len(names), page):
            await link.send(m.ClientsChanged(joined=names[i : i + page], proofs=proofs[i : i + page]))
        assert fed.conn is not None
        await asyncio.wait_for(call_async(fed.conn, "client.wait", {"count": 10_000, "timeout": WAIT}), WAIT)
        listed = (await call_async(fed.conn, "client.ls"))[0]["clients"]
        await link.send(m.ClientsChanged(left=names[:1000]))
        # A page over the limit is refused with a reason; the link and the registry stay.
        await link.send(m.ClientsChanged(joined=[f"x{i}" for i in range(m.MAX_NAMES + 1)]))
        as_client = Connection(fed.conn.url, client_token, fed.conn.ca, False)
        assigned = (await call_async(as_client, "client.assign", {"name": "newcomer"}))[0]
        after = (await call_async(fed.conn, "client.ls"))[0]["clients"]
        combiners = (await call_async(fed.conn, "combiner.ls"))[0]["combiners"]
        return {"listed": listed, "after": after, "combiners": combiners, "assigned": assigned}

    out = asyncio.run(stand_in(fed, combiner_token, "big", script))
    assert len(out["listed"]) == 10_000 and all(c["status"] == "online" and c["combiner"] == "big" for c in out["listed"])
    online = sorted(c["name"] for c in out["after"] if c["status"] == "online")
    assert online == names[1000:], len(online)
    assert sorted(c["name"] for c in out["after"] if c["status"] == "offline") == names[:1000]
    (big,) = out["combiners"]
    assert big["clients"] == 9000 and big["status"] == "online"
    assert out["assigned"]["combiner"] == "big"
    assert "at most 2000 names" in fed.procs[0].text()
