"""Controller RSS while 20 client-token links each push 16 payloads of 1 MiB nobody claims
(8 whole, 8 half sent), and after they close; the baseline is the idle controller's RSS.

    PYTHONPATH=src .venv/bin/python benchmarks/unclaimed.py
"""
import asyncio, hashlib, json, os, subprocess, sys, tempfile, time
from pathlib import Path
from websockets.asyncio.client import connect
from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.security.tls import client_context

def rss(pid): 
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) // 1024

async def main():
    d = Path(tempfile.mkdtemp())
    p = subprocess.Popen([sys.executable, "-m", "scaleout", "serve", "--data-dir", str(d), "--port", "0", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.readline()
    info = json.loads((d / "controller.json").read_text())
    conn = Connection(info["url"], (d / "admin.token").read_text().strip(), d / "ca.pem", False)
    tok = (await call_async(conn, "token.create", {"role": "client", "ttl_s": 3600}))[0]["token"]
    base = rss(p.pid)
    data = os.urandom(1 << 20)
    sha = hashlib.sha256(data).hexdigest()
    wss = []
    for i in range(20):
        ws = await connect(info["url"], ssl=client_context(d / "ca.pem"), additional_headers={"Authorization": f"Bearer {tok}"}, proxy=None, max_size=None)
        wss.append(ws)
        for j in range(16):
            t = f"{i:04x}{j:012x}"
            await ws.send(json.dumps({"v": 2, "type": "blob", "id": "b" + t, "transfer": t, "size": len(data), "sha256": sha}))
            await ws.send(t.encode() + (data if j < 8 else data[: len(data) // 2]))
    await asyncio.sleep(2)
    held = rss(p.pid)
    for ws in wss:
        await ws.close()
    await asyncio.sleep(2)
    after = rss(p.pid)
    print(json.dumps({"baseline_mb": base, "held_mb": held, "after_close_mb": after}))
    p.terminate(); p.wait()

asyncio.run(main())
