"""`scaleout tui`: the federation live, and the admin actions on it.

The controller link is one async worker (``_follow``): it subscribes to the typed event
stream and posts ``Snapshot`` and ``Event`` messages to the app; the app applies them to a
``FedView`` (tui/model.py) and redraws only what changed. Widgets never see wire data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import (
    Button, DataTable, Footer, Header, Input, Label, ProgressBar, Select, Static, Switch, TabbedContent, TabPane,
)

from scaleout.commands.connection import Connection
from scaleout.core import messages as m
from scaleout.core.units import fmt_bytes
from scaleout.tui.feed import Feed, Snapshot
from scaleout.tui.model import Changes, ClientRow, FedView
from scaleout.tui.plot import render_plot

CLIENT_COLUMNS = (
    ("name", "CLIENT"), ("status", "STATUS"), ("combiner", "COMBINER"), ("last_seen", "SEEN"), ("last_round", "ROUND"), ("package", "PACKAGE"),
)
RECONNECT_S = (0.5, 10.0)
REDRAW_S = 0.25  # the session panel and the rounds are redrawn at most this often
SLOW_REDRAW_S = 1.0  # the tables that grow with the fleet, the plot and the log: a round's reports come by the thousand


def _short(metric: str) -> str:
    return metric.replace("validation_", "val_").replace("training_", "train_")


def _metric_label(name: str) -> str:
    source, _, metric = name.partition(":")
    return metric if source == "validation" else f"{metric} (log_metric)"


def _clock(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"


def _status_text(status: str) -> Text:
    colour = {"online": "green", "offline": "grey50", "succeeded": "green", "finished": "green", "running": "yellow"}.get(status, "red")
    return Text(status, style=colour)


# -- messages from the controller worker -----------------------------------------------------


class Snapshotted(Message):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class Happened(Message):
    def __init__(self, event: m.FedEvent) -> None:
        super().__init__()
        self.event = event


class LinkState(Message):
    def __init__(self, up: bool, text: str) -> None:
        super().__init__()
        self.up = up
        self.text = text


# -- widgets ------------------------------------------------------------------------------------


class Line(Widget):
    """Text in a box of fixed size: changing it repaints this widget only (a Static's
    update lays out the whole screen again, too costly many times a second)."""

    def __init__(self, text: str | Text = "", **kw: Any) -> None:
        super().__init__(**kw)
        self.text: str | Text = text

    def update(self, text: str | Text) -> None:
        if str(text) != str(self.text) or (isinstance(text, Text) and text.spans != getattr(self.text, "spans", None)):
            self.text = text
            self.refresh()

    def render(self) -> str | Text:
        return self.text


class MetricPlot(Widget):
    """The chosen metric over rounds (validation) or steps (training), mean with spread."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.points: list[Any] = []
        self.lines: dict[str, list[tuple[float, float]]] = {}
        self.x_label = "round"

    def show(self, points: list[Any], lines: dict[str, list[tuple[float, float]]], x_label: str) -> None:
        self.points, self.lines, self.x_label = points, lines, x_label
        self.refresh()

    def render(self) -> Text:
        return render_plot(self.size.width, self.size.height, self.points, self.lines, self.x_label)


# -- dialogs ------------------------------------------------------------------------------------


class SessionForm(ModalScreen[dict[str, Any] | None]):
    """Start a session: rounds, timeout, min clients, aggregator, its settings, training settings."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, clients: int) -> None:
        super().__init__()
        self.clients = clients

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("[b]Start a session[/b]")
            for key, label, value in (
                ("rounds", "Rounds", "5"),
                ("round_timeout", "Round timeout (s)", "180"),
                ("min_clients", "Min clients", str(max(1, self.clients))),
            ):
                with Horizontal(classes="row"):
                    yield Label(label)
                    yield Input(value, id=f"f-{key}", type="number" if key != "round_timeout" else "text")
            with Horizontal(classes="row"):
                yield Label("Aggregator")
                from scaleout.core.aggregators import STRATEGIES

                yield Select([(name, name) for name in sorted(STRATEGIES)], value="fedavg", allow_blank=False, id="f-aggregator")
            with Horizontal(classes="row"):
                yield Label("Aggregator kwargs")
                yield Input("{}", id="f-aggregator_kwargs", placeholder='{"learning_rate": 0.01}')
            with Horizontal(classes="row"):
                yield Label("Settings (JSON)")
                yield Input("{}", id="f-settings", placeholder='{"epochs": 2}')
            with Horizontal(classes="row"):
                yield Label("Validate")
                yield Switch(True, id="f-validate")
            with Horizontal(classes="row"):
                yield Label("Name")
                yield Input("", id="f-name", placeholder="optional")
            yield Static("", classes="error", id="form-error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Start", variant="primary", id="start")

    def config(self) -> dict[str, Any]:
        """The form as a session config; ValueError (or ConfigError) saying what is wrong."""
        from scaleout.core.config import SessionConfig

        def value(key: str) -> str:
            return self.query_one(f"#f-{key}", Input).value.strip()

        def number(key: str, kind: Callable[[str], Any]) -> Any:
            try:
                return kind(value(key))
            except ValueError:
                raise ValueError(f"{key.replace('_', ' ')} must be a number, got {value(key)!r}") from None

        def obj(key: str) -> dict[str, Any]:
            try:
                parsed = json.loads(value(key) or "{}", parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not allowed")))
            except ValueError as exc:
                raise ValueError(f"{key.replace('_', ' ')} is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{key.replace('_', ' ')} must be a JSON object")
            return parsed

        cfg = SessionConfig(
            rounds=number("rounds", int), round_timeout=number("round_timeout", float), min_clients=number("min_clients", int),
            aggregator=str(self.query_one("#f-aggregator", Select).value), aggregator_kwargs=obj("aggregator_kwargs"),
            validate=self.query_one("#f-validate", Switch).value, settings=obj("settings"), name=value("name") or None,
        )
        return cfg.to_dict()

    @on(Button.Pressed, "#start")
    @on(Input.Submitted)
    def start(self) -> None:
        from scaleout.core.errors import ScaleoutError

        try:
            cfg = self.config()
        except (ValueError, ScaleoutError) as exc:
            self.query_one("#form-error", Static).update(str(exc))
            return
        self.dismiss(cfg)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class Ask(ModalScreen[str | None]):
    """One line of input (a file path), or a yes/no question when ``value`` is None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, hint: str, value: str | None = "", ok: str = "OK") -> None:
        super().__init__()
        self.title_text, self.hint, self.value, self.ok = title, hint, value, ok

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"[b]{self.title_text}[/b]")
            yield Static(self.hint, classes="hint")
            if self.value is not None:
                yield Input(self.value, id="answer")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self.ok, variant="primary", id="ok")

    @on(Button.Pressed, "#ok")
    @on(Input.Submitted)
    def answer(self) -> None:
        self.dismiss(self.query_one("#answer", Input).value.strip() if self.value is not None else "yes")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class TokenDialog(ModalScreen[None]):
    """Create a token; it is shown once, here, with a button to copy it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close"), Binding("c", "copy", "Copy", show=False)]

    def __init__(self, create: Callable[[str, str, str], Any]) -> None:
        super().__init__()
        self.create = create
        self.token: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("[b]Create a token[/b]")
            with Horizontal(classes="row"):
                yield Label("Role")
                yield Select([("client", "client"), ("combiner", "combiner"), ("admin", "admin")], value="client", allow_blank=False, id="t-role")
            with Horizontal(classes="row"):
                yield Label("Lifetime")
                yield Input("30d", id="t-ttl")
            with Horizontal(classes="row"):
                yield Label("For whom")
                yield Input("", id="t-name", placeholder="optional, recorded in the audit log")
            yield Static("", classes="error", id="t-error")
            yield Input("", id="t-token", classes="hidden-token", disabled=True)
            yield Static("", classes="hint", id="t-hint")
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")
                yield Button("Copy", id="copy", disabled=True)
                yield Button("Create", variant="primary", id="create")

    def on_mount(self) -> None:
        self.query_one("#t-token").display = False

    @on(Button.Pressed, "#create")
    @on(Input.Submitted, "#t-ttl, #t-name")
    async def do_create(self) -> None:
        from scaleout.core.errors import ScaleoutError
        from scaleout.security.tokens import parse_ttl

        error = self.query_one("#t-error", Static)
        try:
            ttl = parse_ttl(self.query_one("#t-ttl", Input).value)
        except (ValueError, ScaleoutError) as exc:
            error.update(str(exc))
            return
        role = str(self.query_one("#t-role", Select).value)
        try:
            result = await self.create(role, str(ttl), self.query_one("#t-name", Input).value.strip())
        except ScaleoutError as exc:
            error.update(str(exc))
            return
        error.update("")
        self.token = str(result["token"])
        box = self.query_one("#t-token", Input)
        box.value, box.display, box.disabled = self.token, True, False
        web = self.app.is_web
        self.query_one("#t-hint", Static).update(
            f"{role} token, expires {_clock(result.get('expires'))} on {dt.datetime.fromtimestamp(result.get('expires') or 0):%Y-%m-%d}: "
            + ("shown once: select it and copy it now (Copy is off in the web TUI: it would send the token to the page)" if web
               else "shown once, copy it now (c or Copy)")
        )
        self.query_one("#copy", Button).disabled = web
        self.query_one("#create", Button).disabled = True
        self.query_one("#close" if web else "#copy", Button).focus()

    @on(Button.Pressed, "#copy")
    def action_copy(self) -> None:
        # Served to a browser, the clipboard travels to the page as an OSC 52 sequence: never send a token there.
        if self.app.is_web:
            self.app.notify("Copy is off in the web TUI: select the token and copy it by hand", severity="warning")
            return
        if self.token:
            self.app.copy_to_clipboard(self.token)
            self.app.notify("token copied to the clipboard")

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.token = None
        self.dismiss(None)


class ClientDetail(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "close", "Close")]

    def __init__(self, view: FedView, name: str) -> None:
        super().__init__()
        self.view, self.name_ = view, name

    def compose(self) -> ComposeResult:
        from rich.markup import escape

        v, c = self.view, self.view.clients.get(self.name_) or ClientRow(self.name_)
        lines = [
            f"[b]client {c.name}[/b]",
            f"status      {c.status}",
            f"combiner    {c.combiner or '-'}",
            f"last seen   {_clock(c.last_seen)}",
            f"last round  {f'{c.last_round[1]} of session {c.last_round[0]}' if c.last_round else '-'}",
            f"package     {escape(c.package) or '-'}",
            "",
            f"[b]session {v.session_id or '-'}[/b]",
        ]
        for r in sorted(v.rounds.values(), key=lambda r: r.index):
            why = r.failures.get(c.name)
            vals = {k: by[c.name] for k, rounds in v.validation.items() for idx, by in rounds.items() if idx == r.index and c.name in by}
            shown = ", ".join(f"{k}={x:.4g}" for k, x in sorted(vals.items()))
            lines.append(f"  round {r.index:<4} " + (f"[red]{escape(why)}[/red]" if why else shown or "-"))
        with Vertical(classes="dialog"):
            with VerticalScroll(id="detail-body"):
                yield Static("\n".join(lines), markup=True)
            with Horizontal(classes="buttons"):
                yield Button("Close", variant="primary", id="close")

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)


class TextDialog(ModalScreen[None]):
    """Lines of text (markup) with a Close button: a round's or a model's detail."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "close", "Close")]

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            with VerticalScroll(id="detail-body"):
                yield Static("\n".join(self.lines), markup=True, id="detail-text")
            with Horizontal(classes="buttons"):
                yield Button("Close", variant="primary", id="close")

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)


def round_lines(view: FedView, index: int) -> list[str]:
    """A round's detail: outcome, progress, validation spread, and why each client left out was."""
    from rich.markup import escape

    from scaleout.core.metrics import spread

    r = view.rounds.get(index)
    if r is None:
        return [f"round {index}: not known"]
    lines = [
        f"[b]round {r.index} of session {view.session_id}[/b]  {r.status}" + (f": {escape(r.reason)}" if r.reason else ""),
        f"updates     {r.received if r.status == 'running' else r.participants} of {r.expected or r.participants} expected"
        + (f", {r.refused} refused" if r.refused else ""),
        f"time        {f'{r.duration_s:.2f}s' if r.duration_s is not None else 'running'}",
        f"bytes       {fmt_bytes(r.bytes_in)} of updates in, {fmt_bytes(r.bytes_out)} of model out",
        f"model       {r.model_id or '-'}",
    ]
    for name, rounds in sorted(view.validation.items()):
        s = spread([{name: v} for v in rounds.get(index, {}).values()]).get(name)
        if s is not None:
            lines.append(f"{name:<24} mean {s.mean:.4g}  min {s.min:.4g}  max {s.max:.4g}  ({s.n} clients)")
    lines.append("")
    lines.append(f"[b]left out ({len(r.failures)})[/b]" if r.failures else "no client was left out")
    for client, why in sorted(r.failures.items()):
        lines.append(f"  {escape(client)}: [red]{escape(' '.join(why.split())[:500])}[/red]")
    return lines


# -- the command palette ------------------------------------------------------------------------


class ScaleoutCommands(Provider):
    """Every action of the app in the command palette (ctrl+p)."""

    def _actions(self) -> list[tuple[str, str, str]]:
        app = self.app
        assert isinstance(app, ScaleoutApp)
        return app.PALETTE

    async def discover(self) -> Hits:
        app = self.app
        for title, action, help_text in self._actions():
            yield DiscoveryHit(title, partial(app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        app = self.app
        for title, action, help_text in self._actions():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(app.run_action, action), help=help_text)


# -- the app ------------------------------------------------------------------------------------


class ScaleoutApp(App[int]):
    TITLE = "scaleout"
    CSS = resources.files("scaleout.tui").joinpath("app.tcss").read_text(encoding="utf-8")
    COMMANDS = App.COMMANDS | {ScaleoutCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("s", "start_session", "Start"),
        Binding("x", "stop_session", "Stop"),
        Binding("t", "token", "Token"),
        Binding("p", "set_package", "Package", show=False),
        Binding("m", "set_seed", "Seed", show=False),
        Binding("d", "download", "Download"),
        Binding("/", "filter", "Filter"),
        Binding("v", "plot_mode", "Per-client"),
        Binding("o", "sort", "Sort", show=False),
        Binding("1", "tab('overview')", "Overview", show=False),
        Binding("2", "tab('trail')", "Trail", show=False),
        Binding("3", "tab('events')", "Events", show=False),
    ]
    SINGLE_KEY_ACTIONS: ClassVar[frozenset[str]] = frozenset(
        {"start_session", "stop_session", "token", "set_package", "set_seed", "download", "filter", "plot_mode", "sort", "tab"}
    )
    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Start a session", "start_session", "rounds, timeout, min clients, aggregator, settings"),
        ("Stop the running session", "stop_session", "its running round fails; the global model stays"),
        ("Create a token", "token", "for a client, combiner or admin; shown once"),
        ("Set the active compute package", "set_package", "a .tgz or a package folder"),
        ("Set the seed model", "set_seed", ".npz (numpyhelper) or .safetensors"),
        ("Download the selected model", "download", "from the model trail, as .safetensors or .npz"),
        ("Filter clients", "filter", "by name, status or combiner"),
        ("Sort clients by the next column", "sort", "name, status, combiner, seen, round, package"),
        ("Plot per client / aggregated", "plot_mode", "mean with spread, or one line per client"),
        ("Show the overview", "tab('overview')", "network, session and metrics"),
        ("Show the model trail", "tab('trail')", "committed models"),
        ("Show the event log", "tab('events')", "joins, drops, failures and refusals"),
    ]

    def __init__(self, conn: Connection, *, buffer: int = 4096, session_id: str | None = None, title: str | None = None) -> None:
        super().__init__()
        self.conn = conn
        self.buffer = buffer
        self.session_id = session_id
        self.view = FedView()
        self.feed: Feed | None = None
        self.filter = ""
        self.log_filter = ""
        self.sort_column = 0
        self.sort_reverse = False
        self.per_client = False
        self.metric: str | None = None
        self._metric_auto = True  # the plotted metric is chosen for the user until they choose one
        self._shown: dict[str, tuple[Any, ...]] = {}  # client rows in the table -> the cells they show
        self._pending_clients: set[str] = set()
        self._dirty = Changes()
        self._metric_names: list[str] = []
        self.connected = asyncio.Event()
        self.events_applied = 0
        self.snapshots = 0
        if title:
            self.sub_title = title

    # -- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Line("connecting ...", id="status-line")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("Overview [1]", id="overview"):
                with Horizontal(id="overview-body"):
                    with Vertical(id="network"):
                        yield Static("Combiners", classes="pane-title")
                        yield DataTable(id="combiners", cursor_type="row", zebra_stripes=True)
                        yield Line("Clients", classes="pane-title", id="clients-title")
                        yield Input(placeholder="filter clients: name, status or combiner (/)", id="client-filter")
                        yield DataTable(id="clients", cursor_type="row", zebra_stripes=True)
                    with Vertical(id="right"):
                        yield Line("no session yet: press s to start one", id="session-info")
                        yield ProgressBar(total=1, show_eta=False, id="round-progress")
                        yield DataTable(id="rounds", cursor_type="row", zebra_stripes=True)
                        with Horizontal(id="metric-bar"):
                            yield Select([], prompt="metric", id="metric", allow_blank=True)
                            yield Line("aggregated (v: per client)", id="plot-mode")
                        yield MetricPlot(id="plot")
            with TabPane("Trail [2]", id="trail"):
                yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
            with TabPane("Events [3]", id="events"):
                yield Input(placeholder="filter events: any words, e.g. refused, client-3, round 2", id="log-filter")
                yield DataTable(id="log", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        combiners = self.query_one("#combiners", DataTable)
        for key, label in (("name", "COMBINER"), ("status", "STATUS"), ("clients", "CLIENTS"), ("url", "URL")):
            combiners.add_column(label, key=key)
        clients = self.query_one("#clients", DataTable)
        for key, label in CLIENT_COLUMNS:
            clients.add_column(label, key=key)
        rounds = self.query_one("#rounds", DataTable)
        for key, label in (("index", "ROUND"), ("status", "STATUS"), ("updates", "UPDATES"), ("duration", "TIME"), ("note", "NOTE")):
            rounds.add_column(label, key=key)
        models = self.query_one("#models", DataTable)
        for key, label in (
            ("id", "MODEL"), ("parent", "PARENT"), ("session", "SESSION"), ("round", "ROUND"), ("aggregator", "AGGREGATOR"),
            ("contributors", "CONTRIBUTORS"), ("size", "SIZE"), ("created", "CREATED"), ("active", ""),
        ):
            models.add_column(label, key=key)
        log = self.query_one("#log", DataTable)
        for key, label in (("time", "TIME"), ("level", "LEVEL"), ("text", "WHAT HAPPENED")):
            log.add_column(label, key=key)
        self.query_one("#clients", DataTable).focus()
        self.set_interval(REDRAW_S, self._redraw)
        self.set_interval(SLOW_REDRAW_S, partial(self._redraw, slow=True))
        self.set_interval(1.0, self._tick)
        self._follow()

    # -- the controller link: one worker posting messages -----------------------------------

    @work(exclusive=True, group="controller")
    async def _follow(self) -> None:
        from scaleout.core.errors import AuthError, ScaleoutError
        from scaleout.transport.net import TrustError

        delay, longest = RECONNECT_S
        while True:
            feed = Feed(self.conn, self.buffer, self.session_id)
            try:
                await feed.open()
                self.feed = feed
                self.post_message(LinkState(True, f"connected to {self.conn.url}"))
                delay = RECONNECT_S[0]
                async for item in feed.items():
                    self.post_message(Snapshotted(item) if isinstance(item, Snapshot) else Happened(item))
            except (AuthError, TrustError) as exc:  # a refused token or an untrusted certificate stays so: say it, do not retry
                self.post_message(LinkState(False, f"cannot connect: {exc}"))
                return
            except (ScaleoutError, OSError) as exc:
                self.post_message(LinkState(False, f"controller unreachable: {exc}; retrying in {delay:.0f}s"))
            finally:
                self.feed = None
                await feed.close()
            await asyncio.sleep(delay)  # a backoff between tries, not a synchronisation
            delay = min(delay * 2, longest)

    def on_link_state(self, msg: LinkState) -> None:
        self.query_one("#status-line", Line).update(Text(msg.text, style="green" if msg.up else "bold red"))
        if msg.up:
            self.connected.set()
        else:
            self.connected.clear()

    def on_snapshotted(self, msg: Snapshotted) -> None:
        self.snapshots += 1
        try:
            self._dirty = self.view.load(msg.snapshot.data)
        except ValueError as exc:  # a controller of another version, say: tell, keep what is shown
            self.query_one("#status-line", Line).update(Text(str(exc), style="bold red"))
            return
        if self.snapshots > 1:
            self.view.say("warning", "resynchronised with the controller (events were dropped or the link came back)")
        self._rebuild_clients()
        self._redraw()

    def on_happened(self, msg: Happened) -> None:
        ch = self.view.apply(msg.event)
        self.events_applied += 1
        self._pending_clients |= ch.clients  # drawn with the next redraw: a round's reports come by the thousand
        d = self._dirty
        d.combiners |= ch.combiners
        d.session |= ch.session
        d.metrics |= ch.metrics
        d.models |= ch.models
        d.log |= ch.log
        d.header |= ch.header

    # -- drawing ----------------------------------------------------------------------------

    def _tick(self) -> None:
        if self.view.running_round is not None:
            self._dirty.session = True

    def _redraw(self, slow: bool = False) -> None:
        """Draw what changed: the session panel at once; with ``slow`` (or after a
        snapshot) also the tables that grow with the fleet, the plot and the log."""
        d = self._dirty
        if d.everything or d.session:
            d.session = False
            self._draw_session()
        if d.header and not d.everything and self.connected.is_set():
            d.header = False
            self._draw_status()
        if not (slow or d.everything):
            return
        self._dirty = Changes()
        if self._pending_clients and not d.everything:
            names, self._pending_clients = self._pending_clients, set()
            self._update_clients(names)
        if d.everything or d.combiners:
            self._draw_combiners()
        if d.everything or d.metrics:
            self._draw_metrics()
        if d.everything or d.models:
            self._draw_models()
        if d.everything or d.log:
            self._draw_log(rebuild=d.everything)
        if d.everything:
            self._draw_status()

    def _draw_status(self) -> None:
        v = self.view
        pkg = f"{v.active_package[1]} ({v.active_package[0][:12]})" if v.active_package else "- (p to set one)"
        text = f"{v.url}   package {pkg}   model {v.active_model[:12] if v.active_model else '- (m to set a seed)'}"
        self.query_one("#status-line", Line).update(Text(text, style="green"))

    def _draw_combiners(self) -> None:
        _sync(self.query_one("#combiners", DataTable), [
            (row.name, (row.name, _status_text(row.status), str(row.clients), row.url))
            for row in sorted(self.view.combiners.values(), key=lambda r: r.name)
        ])

    def _client_cells(self, c: ClientRow) -> tuple[Any, ...]:
        last = "-" if not c.last_round else str(c.last_round[1]) if c.last_round[0] == self.view.session_id else f"{c.last_round[1]} of {c.last_round[0]}"
        return (c.name, _status_text(c.status), c.combiner or "-", _clock(c.last_seen), last, c.package or "-")

    def _matches(self, c: ClientRow) -> bool:
        if not self.filter:
            return True
        words = self.filter.lower().split()
        hay = f"{c.name} {c.status} {c.combiner}".lower()
        return all(w in hay for w in words)

    def _rebuild_clients(self) -> None:
        table = self.query_one("#clients", DataTable)
        table.clear()
        self._shown = {}
        self._pending_clients = set()
        rows = [c for c in self.view.clients.values() if self._matches(c)]
        for c in rows:
            cells = self._client_cells(c)
            table.add_row(*cells, key=c.name)
            self._shown[c.name] = cells
        self._sort_clients()
        self._count_clients()

    def _update_clients(self, names: set[str]) -> None:
        """Incremental: only the rows of these clients change (no rebuild per event)."""
        table = self.query_one("#clients", DataTable)
        added = False
        for name in names:
            c = self.view.clients.get(name)
            if c is None:
                continue
            if not self._matches(c):
                if name in self._shown:
                    table.remove_row(name)
                    del self._shown[name]
                continue
            cells = self._client_cells(c)
            old = self._shown.get(name)
            if old is not None:
                for (key, _), value, was in zip(CLIENT_COLUMNS, cells, old):
                    if str(value) != str(was) or type(value) is not type(was):
                        table.update_cell(name, key, value)
            else:
                table.add_row(*cells, key=name)
                added = True
            self._shown[name] = cells
        if added and self.sort_column:
            self._sort_clients()
        self._count_clients()

    def _sort_clients(self) -> None:
        key = CLIENT_COLUMNS[self.sort_column][0]
        self.query_one("#clients", DataTable).sort(key, key=lambda v: str(v), reverse=self.sort_reverse)

    def _count_clients(self) -> None:
        online = sum(1 for c in self.view.clients.values() if c.status == "online")
        shown = f", {len(self._shown)} shown" if self.filter else ""
        arrow = "v" if self.sort_reverse else "^"
        self.query_one("#clients-title", Line).update(
            f"Clients: {online} online of {len(self.view.clients)}{shown}  (sorted by {CLIENT_COLUMNS[self.sort_column][1].lower()} {arrow})"
        )

    def _draw_session(self) -> None:
        v = self.view
        s = v.session
        info = self.query_one("#session-info", Line)
        bar = self.query_one("#round-progress", ProgressBar)
        if s is None:
            info.update("no session yet: press s to start one")
            bar.update(total=1, progress=0)
        else:
            rounds_total = s.config.get("rounds", "?")
            done = sum(1 for r in v.rounds.values() if r.status != "running")
            head = Text.assemble(("session ", "bold"), (s.id, "bold"), " ", _status_text(s.status), f"  {done}/{rounds_total} rounds")
            if s.config.get("aggregator"):
                head.append(f"  {s.config['aggregator']}")
            if s.reason:
                head.append(f"  ({s.reason})", "red")
            r = v.running_round
            if r is not None:
                import time

                left = max(0.0, (r.deadline or 0) - time.time())
                head.append(
                    f"\nround {r.index}: {r.received}/{r.expected} updates"
                    + (f", {r.refused} refused" if r.refused else "")
                    + f", {fmt_bytes(r.bytes_in)} in, {fmt_bytes(r.bytes_out)} out, {left:.0f}s left before the timeout"
                )
                bar.update(total=max(1, r.expected), progress=r.received + r.refused)
            else:  # between rounds and after the session: the rounds done of those asked for (1/10 for one stopped at 1)
                planned = rounds_total if isinstance(rounds_total, int) and rounds_total > 0 else max(1, done)
                bar.update(total=planned, progress=min(done, planned))
            info.update(head)
        table = self.query_one("#rounds", DataTable)
        rows: list[tuple[str, tuple[Any, ...]]] = []
        for r in sorted(v.rounds.values(), key=lambda r: r.index):
            shown = sorted(r.validation.items(), key=lambda kv: (not kv[0].startswith("validation"), kv[0]))[:2]
            note = r.reason or ", ".join(f"{_short(k)}={x:.3g}" for k, x in shown)
            if r.failures:
                note = f"{len(r.failures)} left out" + (f"; {note}" if note else "")
            updates = f"{r.participants}" if r.status != "running" else f"{r.received}/{r.expected}"
            rows.append((str(r.index), (
                str(r.index), _status_text(r.status), updates, f"{r.duration_s:.1f}s" if r.duration_s is not None else "-",
                note,
            )))
        if _sync(table, rows) and table.row_count:
            table.move_cursor(row=table.row_count - 1)

    def _draw_metrics(self) -> None:
        v = self.view
        names = v.metric_names()
        select = self.query_one("#metric", Select)
        if names != self._metric_names:
            self._metric_names = names
            select.set_options([(_metric_label(n), n) for n in names])
            if names and (self.metric not in names or self._metric_auto):
                # Until the user picks one: accuracy once it appears (a training metric, logged
                # during round 1, comes before the first validation; it held the plot before).
                preferred = [n for n in names if n == "validation:validation_accuracy"] or [n for n in names if "accuracy" in n]
                self.metric = (preferred or ([self.metric] if self.metric in names else names))[0]
            if self.metric in names:
                with self.prevent(Select.Changed):
                    select.value = self.metric
        plot = self.query_one("#plot", MetricPlot)
        if self.metric is None:
            plot.show([], {}, "round")
            return
        points, lines = v.series(self.metric, self.per_client)
        plot.show(points, lines, "round" if self.metric.startswith("validation") else "round.step")

    def _draw_models(self) -> None:
        table = self.query_one("#models", DataTable)
        table.clear()
        for row in sorted(self.view.models.values(), key=lambda r: r.created or 0):
            table.add_row(
                row.id[:16], (row.parent or "-")[:16], row.session_id or "-", str(row.round_index) if row.round_index is not None else "-",
                row.aggregator or "-", str(row.n_contributors or "-"), fmt_bytes(row.size), _clock(row.created),
                "active" if row.id == self.view.active_model else "", key=row.id,
            )

    def _draw_log(self, rebuild: bool = False) -> None:
        table = self.query_one("#log", DataTable)
        lines = list(self.view.log)
        if rebuild or not self.log_filter and table.row_count > len(lines):
            table.clear()
        words = self.log_filter.lower().split()
        start = 0 if rebuild or not table.row_count else getattr(self, "_log_seen", 0)
        for i, line in enumerate(lines[start:], start):
            if all(w in f"{line.level} {line.text}".lower() for w in words):
                table.add_row(_clock(line.time), Text(line.level, style={"error": "red", "warning": "yellow"}.get(line.level, "")), line.text)
        self._log_seen = len(lines)

    # -- input ------------------------------------------------------------------------------

    @on(Input.Changed, "#client-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter = event.value.strip()
        self._rebuild_clients()

    @on(Input.Changed, "#log-filter")
    def _log_filter_changed(self, event: Input.Changed) -> None:
        self.log_filter = event.value.strip()
        self._draw_log(rebuild=True)

    @on(Select.Changed, "#metric")
    def _metric_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            if event.value != self.metric:
                self._metric_auto = False  # the user's choice: kept
            self.metric = event.value
            self._draw_metrics()

    @on(DataTable.HeaderSelected, "#clients")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        index = next(i for i, (key, _) in enumerate(CLIENT_COLUMNS) if key == event.column_key.value)
        self.sort_reverse = not self.sort_reverse if index == self.sort_column else False
        self.sort_column = index
        self._sort_clients()
        self._count_clients()

    @on(DataTable.RowSelected, "#rounds")
    def _round_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.push_screen(TextDialog(round_lines(self.view, int(event.row_key.value))))

    @on(DataTable.RowSelected, "#models")
    @work(group="actions")
    async def _model_selected(self, event: DataTable.RowSelected) -> None:
        from rich.markup import escape

        if event.row_key.value is None:
            return
        result = await self._do("cannot read the model", "model.show", {"id": str(event.row_key.value)})
        if result is None:
            return
        row = result["model"]
        lines = [
            f"[b]model {row['id']}[/b]" + ("  (active)" if row.get("active") else ""),
            f"parent      {row.get('parent') or '-'}",
            f"session     {row.get('session_id') or '-'}   round {row.get('round_index') if row.get('round_index') is not None else '-'}",
            f"aggregator  {row.get('aggregator') or '-'}",
            f"created     {_clock(row.get('created'))}   size {fmt_bytes(row.get('size') or 0)}",
            f"contributors ({len(row.get('contributors') or [])}): {escape(', '.join(row.get('contributors') or [])) or '-'}",
            "tensors",
            *(f"  {escape(name):<24} {spec['dtype']:<8} {tuple(spec['shape'])}" for name, spec in (row.get("tensors") or {}).items()),
            "",
            "d downloads it",
        ]
        self.push_screen(TextDialog(lines))

    @on(DataTable.RowSelected, "#clients")
    def _client_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.push_screen(ClientDetail(self.view, str(event.row_key.value)))

    def action_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        # Focus goes with the tab: a focused widget in another pane would switch back to it.
        self.query_one({"overview": "#clients", "trail": "#models", "events": "#log"}[tab]).focus()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = event.pane.id or ""
        target = {"overview": "#clients", "trail": "#models", "events": "#log"}.get(pane)
        if target and (self.focused is None or event.pane not in self.focused.ancestors):
            self.query_one(target).focus()

    def action_filter(self) -> None:
        tabs = self.query_one("#tabs", TabbedContent)
        (self.query_one("#log-filter", Input) if tabs.active == "events" else self.query_one("#client-filter", Input)).focus()

    def action_sort(self) -> None:
        self.sort_column = (self.sort_column + 1) % len(CLIENT_COLUMNS)
        self.sort_reverse = False
        self._sort_clients()
        self._count_clients()

    def action_plot_mode(self) -> None:
        self.per_client = not self.per_client
        self.query_one("#plot-mode", Line).update("per client (v: aggregated)" if self.per_client else "aggregated (v: per client)")
        self._draw_metrics()

    def copy_to_clipboard(self, text: str) -> None:
        # Served to a browser (tui --web) the clipboard would travel to the page: nothing is copied there.
        if not self.is_web:
            super().copy_to_clipboard(text)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Tab and Shift+Tab always move the focus (out of a text field too: they are the app's
        # focus_next and focus_previous). Typing in a text field, or keys in a dialog, must not
        # trigger the single-key actions of the main screen.
        if action not in self.SINGLE_KEY_ACTIONS:
            return True
        if isinstance(self.focused, Input):
            return action == "tab" and len(self.screen_stack) == 1
        return len(self.screen_stack) == 1

    # -- actions on the controller ----------------------------------------------------------

    async def request(self, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None) -> tuple[dict[str, Any], bytes | None]:
        from scaleout.transport.net import ConnectError

        if self.feed is None:
            raise ConnectError("not connected to the controller yet")
        return await self.feed.request(op, args, blob)

    async def _do(self, what: str, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None) -> dict[str, Any] | None:
        from scaleout.core.errors import ScaleoutError

        try:
            return (await self.request(op, args, blob))[0]
        except ScaleoutError as exc:
            self.notify(f"{what}: {exc}", severity="error", timeout=8)
            return None

    @work(group="actions")
    async def action_start_session(self) -> None:
        online = sum(1 for c in self.view.clients.values() if c.status == "online")
        cfg = await self.push_screen_wait(SessionForm(online))
        if cfg is None:
            return
        result = await self._do("cannot start a session", "session.start", cfg)
        if result is not None:
            self.notify(f"session {result['session']['id']} started ({cfg['rounds']} rounds)")

    @work(group="actions")
    async def action_stop_session(self) -> None:
        s = self.view.session
        if s is None or s.status != "running":
            self.notify("no session is running", severity="warning")
            return
        if await self.push_screen_wait(Ask(f"Stop session {s.id}?", "Its running round fails; the global model stays as it is.", None, "Stop")):
            result = await self._do("cannot stop the session", "session.stop", {"id": s.id})
            if result is not None:
                self.notify(f"session {s.id} {result['session']['status']}")

    @work(group="actions")
    async def action_token(self) -> None:
        async def create(role: str, ttl: str, name: str) -> dict[str, Any]:
            return (await self.request("token.create", {"role": role, "ttl_s": int(ttl), "name": name or None}))[0]

        await self.push_screen_wait(TokenDialog(create))

    @work(group="actions")
    async def action_set_package(self) -> None:
        path = await self.push_screen_wait(Ask("Set the active compute package", "A .tgz (scaleout package create) or a package folder:", "", "Upload"))
        if not path:
            return
        from scaleout.core.errors import ScaleoutError

        try:
            data, name = await asyncio.to_thread(_package_bytes, Path(path).expanduser())
        except (OSError, ValueError, ScaleoutError) as exc:
            self.notify(f"cannot read the package: {exc}", severity="error", timeout=8)
            return
        result = await self._do("cannot set the package", "package.set_active", {"name": name}, data)
        if result is not None:
            self.notify(f"package {result['name']} ({result['id'][:12]}) is now active")

    @work(group="actions")
    async def action_set_seed(self) -> None:
        path = await self.push_screen_wait(Ask("Set the seed model", ".npz (numpyhelper) or .safetensors file:", "", "Upload"))
        if not path:
            return
        from scaleout.core.errors import ScaleoutError
        from scaleout.package.seed import read_model_file

        try:
            data = await asyncio.to_thread(read_model_file, Path(path).expanduser())
        except (OSError, ValueError, ScaleoutError) as exc:
            self.notify(f"cannot read the model: {exc}", severity="error", timeout=8)
            return
        result = await self._do("cannot set the seed", "model.set_seed", {}, data)
        if result is not None:
            self.notify(f"seed model {result['id'][:12]} set")

    @work(group="actions")
    async def action_download(self) -> None:
        table = self.query_one("#models", DataTable)
        if self.query_one("#tabs", TabbedContent).active != "trail" or not table.row_count:
            model_id = self.view.active_model
        else:
            model_id = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        if not model_id:
            self.notify("no model yet", severity="warning")
            return
        path = await self.push_screen_wait(Ask(f"Download model {model_id[:16]}", "Save as (.safetensors, or .npz for numpy):", f"model-{model_id[:12]}.safetensors", "Save"))
        if not path:
            return
        result = await self.request_model(model_id, Path(path).expanduser())
        if result:
            self.notify(result)

    async def request_model(self, model_id: str, out: Path) -> str | None:
        from scaleout.core.errors import ScaleoutError

        try:
            result, data = await self.request("model.get", {"id": model_id})
            assert data is not None
            await asyncio.to_thread(_save_model, data, out)
        except (ScaleoutError, OSError) as exc:
            self.notify(f"cannot download the model: {exc}", severity="error", timeout=8)
            return None
        return f"saved model {result['id'][:12]} to {out}"


def _sync(table: DataTable[Any], rows: list[tuple[str, tuple[Any, ...]]]) -> bool:
    """Make ``table`` show ``rows`` (key, cells) in order, changing only the cells that
    differ (a clear and refill would lay the screen out again); True if rows were added."""
    keys = [key for key, _ in rows]
    have = [str(k.value) for k in table.rows]
    if have != keys[: len(have)]:
        table.clear()
        have = []
    columns = list(table.columns)
    for key, cells in rows[: len(have)]:
        for column, value in zip(columns, cells):
            if str(table.get_cell(key, column)) != str(value):
                table.update_cell(key, column, value)
    for key, cells in rows[len(have):]:
        table.add_row(*cells, key=key)
    return len(rows) > len(have)


def _package_bytes(path: Path) -> tuple[bytes, str]:
    """A package's .tgz bytes: the file itself, or a folder packed (honouring .scaleoutignore)."""
    from scaleout.package.archive import package_bytes

    return package_bytes(path)


def _save_model(data: bytes, out: Path) -> None:
    if out.suffix == ".npz":
        import numpy as np

        from scaleout.core import payload

        named, _, _ = payload.read(data)
        np.savez_compressed(out, **named)  # type: ignore[arg-type]
    else:
        out.write_bytes(data)
