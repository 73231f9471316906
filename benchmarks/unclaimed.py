"""Controller RSS while 20 client-token links each push 16 payloads of 1 MiB nobody claims
(8 whole, 8 half sent), and after they close; the baseline is the idle controller's RSS,
measured in the same run. Prints one JSON line.

    PYTHONPATH=src .venv/bin/python benchmarks/unclaimed.py
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from websockets.asyncio.client import connect

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.security.tls import client_context

LINKS, PAYLOADS = 20, 16


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS")


async def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="scaleout-unclaimed-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "serve", "--data-dir", str(d), "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # listening on ...
        info = json.loads((d / "controller.json").read_text())
        conn = Connection(info["url"], (d / "admin.token").read_text().strip(), d / "ca.pem", False)
        token = (await call_async(conn, "token.create", {"role": "client", "ttl_s": 3600}))[0]["token"]
        baseline = rss_mb(proc.pid)
        data = os.urandom(1 << 20)
        sha = hashlib.sha256(data).hexdigest()
        links = []
        for i in range(LINKS):
            ws = await connect(info["url"], ssl=client_context(d / "ca.pem"), additional_headers={"Authorization": f"Bearer {token}"}, proxy=None, max_size=None)
            links.append(ws)
            for j in range(PAYLOADS):
                t = f"{i:04x}{j:012x}"
                await ws.send(json.dumps({"v": 2, "type": "blob", "id": "b" + t, "transfer": t, "size": len(data), "sha256": sha}))
                await ws.send(t.encode() + (data if j < PAYLOADS // 2 else data[: len(data) // 2]))
        await asyncio.sleep(2)  # a benchmark: let the controller read what was sent
        held = rss_mb(proc.pid)
        for ws in links:
            await ws.close()
        await asyncio.sleep(2)
        print(json.dumps({"benchmark": "unclaimed", "links": LINKS, "payloads_per_link": PAYLOADS, "baseline_mb": baseline, "held_mb": held, "after_close_mb": rss_mb(proc.pid)}))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
