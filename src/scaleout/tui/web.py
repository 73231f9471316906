"""`scaleout tui --web`: the app served to a browser (textual-serve's page and app protocol),
to whoever holds the URL printed at start, and to no other web page.

Whoever drives the page acts as admin, so every request must
- name the served address in ``Host`` (an IP literal or localhost with the served port: a
  DNS-rebinding name is refused), and in ``Origin`` when it sends one (the websocket must);
- carry the per-launch key: ``?key=`` in the printed URL, then an HttpOnly SameSite=Strict
  cookie that the page's own requests send.
At most ``max_sessions`` app processes run at once (more connections are refused); they get
the controller's token in their environment only, never see the clipboard travel to the page
(OSC 52 is stripped from their output and the app turns Copy off), and end with the server.
Every asset is served from the installed textual-serve: nothing is fetched from the internet.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from textual_serve.app_service import AppService
from textual_serve.download_manager import DownloadManager

log = logging.getLogger("scaleout.tui.web")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})
KILL_GRACE_S = 3.0
OSC52 = b"\x1b]52;"


def _page_template(templates: Path, fonts: list[str]) -> jinja2.Template:
    """textual-serve's page without anything from the internet: the Google Fonts link goes,
    the same font comes from the package's own files."""
    text = (templates / "app_index.html").read_text(encoding="utf-8")
    text = re.sub(r"<link[^>]*?href=\"https?://[^\"]*\"[^>]*>", "", text, flags=re.DOTALL)
    text = text.replace(' xmlns="http://www.w3.org/2000/svg"', "")  # inline SVG in HTML needs no namespace
    faces = "".join(
        f'@font-face {{ font-family: "Roboto Mono"; font-style: {"italic" if "Italic" in name else "normal"}; '
        f'src: url("{{{{ config.static.url }}}}fonts/{name}") format("truetype"); }}'
        for name in fonts
    )
    text = text.replace("<style>", f"<style>\n      {faces}\n", 1)
    return jinja2.Environment(autoescape=True).from_string(text)


class Osc52Filter:
    """Drops OSC 52 (set clipboard) sequences from a byte stream that may split them across chunks."""

    def __init__(self) -> None:
        self.inside = False
        self.tail = b""

    def __call__(self, data: bytes) -> bytes:
        data, self.tail = self.tail + data, b""
        out = bytearray()
        while data:
            if self.inside:
                end = [i for i in (data.find(b"\x07"), data.find(b"\x1b\\")) if i >= 0]
                if not end:  # still inside: drop the rest (but a split ESC \\ must be found next time)
                    self.tail = b"\x1b" if data.endswith(b"\x1b") else b""
                    return bytes(out)
                stop = min(end)
                data = data[stop + (1 if data[stop:stop + 1] == b"\x07" else 2):]
                self.inside = False
                continue
            start = data.find(OSC52)
            if start < 0:
                # A chunk may end with the first bytes of a sequence: keep them for the next one.
                keep = next((n for n in range(len(OSC52) - 1, 0, -1) if data.endswith(OSC52[:n])), 0)
                out += data[: len(data) - keep]
                self.tail = data[len(data) - keep:]
                return bytes(out)
            out += data[:start]
            data = data[start + len(OSC52):]
            self.inside = True
        return bytes(out)


def _die_with_parent() -> Any:
    """On Linux, a preexec function that has the child sent SIGTERM when this process dies,
    even by SIGKILL (PR_SET_PDEATHSIG), so no app outlives its server; elsewhere None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec


class AppProcess(AppService):
    """One browser page's `scaleout tui`: started without a shell in its own process group,
    with the controller's secrets in its environment only, its clipboard kept from the page."""

    def __init__(self, argv: list[str], env: dict[str, str], **kw: Any) -> None:
        super().__init__(" ".join(argv), **kw)
        self.argv, self.extra_env = argv, env
        self.osc52 = Osc52Filter()

    def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
        env = super()._build_environment(width, height)
        for key in ("SCALEOUT_CONTROLLER", "SCALEOUT_TOKEN", "SCALEOUT_CA", "SCALEOUT_DATA_DIR"):
            env.pop(key, None)
        env.update(self.extra_env)
        return env

    async def _open_app_process(self, width: int = 80, height: int = 24) -> asyncio.subprocess.Process:
        self._process = process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self._build_environment(width, height), start_new_session=True, preexec_fn=_die_with_parent(),
        )
        assert process.stdin is not None
        self._stdin = process.stdin
        return process

    async def on_data(self, payload: bytes) -> None:
        payload = self.osc52(payload)
        if payload:
            await self.remote_write_bytes(payload)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def kill(self) -> None:
        """End the process group: SIGTERM, then SIGKILL after a grace."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                await asyncio.wait_for(process.wait(), KILL_GRACE_S)
                return
            except TimeoutError:
                continue
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class WebTUI:
    """The aiohttp application: the page, its assets, the app websocket, behind the guard."""

    def __init__(self, argv: list[str], env: dict[str, str], host: str, max_sessions: int, title: str = "scaleout") -> None:
        import textual_serve

        base = Path(textual_serve.__file__).parent
        self.statics = base / "static"
        self.page = _page_template(base / "templates", sorted(p.name for p in (self.statics / "fonts").glob("*.ttf")))
        self.argv, self.env, self.host, self.title = argv, env, host, title
        self.max_sessions = max_sessions
        self.key = secrets.token_urlsafe(24)
        self.port = 0  # known once bound
        self.apps: set[AppProcess] = set()
        self.downloads = DownloadManager()

    @property
    def cookie(self) -> str:
        return f"scaleout-tui-{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard])
        app.add_routes([
            web.get("/", self.index),
            web.get("/ws", self.websocket),
            web.get("/download/{key}", self.download),
            web.static("/static", self.statics, name="static"),
        ])
        return app

    # -- who may ask --------------------------------------------------------------------------

    def host_allowed(self, value: str) -> bool:
        """``Host`` (or an Origin's host part): an IP literal or localhost, with the served port,
        naming the address served (any address when serving on all of them)."""
        name, _, port = value.rpartition(":")
        if not name or port != str(self.port):
            return False
        name = name.lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if name != "localhost":
            try:
                ipaddress.ip_address(name)
            except ValueError:
                return False  # a DNS name: could point anywhere (DNS rebinding)
        bound = self.host.lower().strip("[]")
        return bound in WILDCARD or name == bound or (bound in LOOPBACK_NAMES and name in LOOPBACK_NAMES)

    def key_given(self, request: web.Request) -> str | None:
        """'query' or 'cookie' when the request carries the launch key, else None."""
        for where, value in (("query", request.query.get("key")), ("cookie", request.cookies.get(self.cookie))):
            if value and hmac.compare_digest(value.encode(), self.key.encode()):
                return where
        return None

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        origin = request.headers.get("Origin")
        if not self.host_allowed(host):
            return web.Response(status=403, text=f"refused: Host {host!r} is not this server's address\n")
        if origin is not None and origin != f"http://{host}":
            return web.Response(status=403, text=f"refused: a page from {origin!r} may not use this TUI\n")
        if request.path == "/ws" and origin is None:
            return web.Response(status=403, text="refused: a websocket without Origin\n")
        where = self.key_given(request)
        if where is None:
            return web.Response(status=403, text="refused: open the URL that scaleout tui --web printed (it carries the key)\n")
        response = await handler(request)
        if where == "query" and request.path == "/":
            response.set_cookie(self.cookie, self.key, httponly=True, samesite="Strict", path="/")
        if isinstance(response, web.Response):
            response.headers.setdefault("Cache-Control", "no-store")
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    # -- handlers -----------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        font_size = request.query.get("fontsize", "16")
        html = self.page.render(
            font_size=int(font_size) if font_size.isdigit() and 4 <= int(font_size) <= 64 else 16,
            app_websocket_url=f"ws://{request.host}/ws",
            config={"static": {"url": "/static/"}},
            application={"name": self.title},
            ping_url="",
        )
        return web.Response(text=html, content_type="text/html")

    async def download(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound(text="nothing to download\n")  # the TUI delivers no files to the browser

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if len(self.apps) >= self.max_sessions:
            log.warning("refused a TUI page: %d already open (--max-sessions %d)", len(self.apps), self.max_sessions)
            return web.Response(status=503, text=f"refused: {self.max_sessions} TUI pages are open already (--max-sessions)\n")

        def size(key: str, default: int) -> int:
            value = request.query.get(key, "")
            return min(int(value), 1000) if value.isdigit() and int(value) > 0 else default

        ws = web.WebSocketResponse(heartbeat=15, max_msg_size=1 << 20)
        await ws.prepare(request)
        service = AppProcess(
            self.argv, self.env, write_bytes=ws.send_bytes, write_str=ws.send_str, close=ws.close, download_manager=self.downloads,
        )
        self.apps.add(service)
        try:
            await service.start(size("width", 80), size("height", 24))
            await self._pump(ws, service)
        except asyncio.CancelledError:
            pass
        finally:
            self.apps.discard(service)
            try:  # the page went: ask the app to quit, as textual-serve does, then make sure
                await asyncio.wait_for(service.stop(), KILL_GRACE_S)
            except (TimeoutError, OSError):
                pass
            await service.kill()
            await ws.close()
        return ws

    async def _pump(self, ws: web.WebSocketResponse, service: AppProcess) -> None:
        """The page's keys, resizes and pings to the app (textual-serve's protocol); a malformed
        message is ignored."""
        import json

        from aiohttp import WSMsgType

        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                envelope = json.loads(message.data)
                kind, data = envelope[0], envelope[1] if len(envelope) > 1 else None
                if kind == "stdin" and isinstance(data, str):
                    await service.send_bytes(data.encode("utf-8"))
                elif kind == "resize" and isinstance(data, dict):
                    await service.set_terminal_size(int(data["width"]), int(data["height"]))
                elif kind == "ping":
                    await ws.send_json(["pong", data])
                elif kind == "blur":
                    await service.blur()
                elif kind == "focus":
                    await service.focus()
            except (ValueError, TypeError, KeyError, IndexError):
                continue

    async def close_all(self) -> None:
        """End every app process this server started."""
        await asyncio.gather(*(service.kill() for service in list(self.apps)))
