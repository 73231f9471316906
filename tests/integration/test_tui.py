"""`scaleout tui` driven with App.run_test() and pilot.press() against a real federation:
controller, combiner and clients as processes on loopback with TLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, QUICKSTART, Federation, wait_line

from scaleout.tui.app import ClientDetail, MetricPlot, ScaleoutApp, SessionForm, TextDialog, TokenDialog

SIZE = (160, 48)


async def until(pilot: Any, cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Let the app run until ``cond()`` holds (a condition, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


@contextlib.asynccontextmanager
async def loaded_app(fed: Federation) -> AsyncIterator[tuple[ScaleoutApp, Any]]:
    """The app on ``fed``'s controller, run for a test: (app, pilot) once it has the snapshot."""
    assert fed.conn is not None
    app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view.loaded, "the snapshot")
        yield app, pilot


async def click(pilot: Any, screen: Any, selector: str) -> None:
    """Click a button once its last press has settled (a button ignores clicks for 0.2 s after one)."""
    button = screen.query_one(selector)
    await until(pilot, lambda: not button.has_class("-active"), f"{selector} to settle")
    await pilot.click(selector)


def ready(fed: Federation, clients: int = 2) -> None:
    fed.controller()
    fed.activate(QUICKSTART)
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    for i in range(1, clients + 1):
        fed.client(f"client-{i}")
    fed.wait_clients(clients)


def rows(app: ScaleoutApp, table: str) -> list[list[str]]:
    t = app.query_one(f"#{table}")
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def test_network_is_live_filterable_and_sortable(fed: Federation) -> None:
    ready(fed)
    assert fed.conn is not None

    async def go() -> None:
        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: len(rows(app, "clients")) == 2, "two clients")
            assert rows(app, "combiners")[0][:3] == ["c1", "online", "2"]
            assert all(r[5].startswith("client.tgz (") for r in rows(app, "clients")), rows(app, "clients")  # the package each runs
            # A client joining and one leaving show up as they happen.
            late = fed.client("client-3")
            await until(pilot, lambda: any(r[0] == "client-3" and r[1] == "online" for r in rows(app, "clients")), "client-3 joining")
            late.stop()
            await until(pilot, lambda: any(r[0] == "client-3" and r[1] == "offline" for r in rows(app, "clients")), "client-3 leaving")
            await until(pilot, lambda: rows(app, "combiners")[0][2] == "2", "the combiner's count")
            assert "2 online of 3" in str(app.query_one("#clients-title").render())
            # The filter box (/ focuses it) narrows the table; sorting reorders it.
            await pilot.press("/")
            await pilot.press(*"offline")
            await until(pilot, lambda: [r[0] for r in rows(app, "clients")] == ["client-3"], "the filter")
            await pilot.press("escape")
            app.query_one("#client-filter").value = ""
            await until(pilot, lambda: len(rows(app, "clients")) == 3, "the filter cleared")
            app.query_one("#clients").focus()
            await pilot.press("o")  # sort by status: offline after online
            await until(pilot, lambda: [r[1] for r in rows(app, "clients")] == ["offline", "online", "online"], "sorted by status")
            # Enter on a client opens its detail; escape closes it.
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ClientDetail), "the client detail")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, ClientDetail), "the detail closed")
            # Other views are a key away; the event log says what happened in words.
            await pilot.press("3")
            await until(pilot, lambda: any("client-3 left combiner c1" in r[2] for r in rows(app, "log")), "the event log")
            await pilot.press("/")
            await pilot.press(*"joined")
            await until(pilot, lambda: rows(app, "log") and all("joined" in r[2] for r in rows(app, "log")), "the event log filtered")
            await pilot.press("escape")
            app.query_one("#log").focus()
            await pilot.press("q")
        assert app.return_code in (0, None)

    asyncio.run(go())


def test_start_a_session_from_the_form_and_watch_its_rounds(fed: Federation, tmp_path: Path) -> None:
    ready(fed)
    assert fed.conn is not None

    async def go() -> None:
        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: len(rows(app, "clients")) == 2, "two clients")
            assert "no session yet" in str(app.query_one("#session-info").render())
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SessionForm), "the session form")
            form = app.screen
            form.query_one("#f-rounds").value = "3"
            form.query_one("#f-min_clients").value = "x"
            await pilot.click("#start")
            await until(pilot, lambda: "min clients must be a number" in str(form.query_one("#form-error").render()), "the form's complaint")
            form.query_one("#f-min_clients").value = "2"
            form.query_one("#f-settings").value = '{"epochs": 2}'
            form.query_one("#f-settings").focus()
            await pilot.press("enter")  # enter in any field starts it
            await until(pilot, lambda: not isinstance(app.screen, SessionForm), "the form to close", timeout=5)
            # Its rounds appear as they end, with the metric plot growing.
            await until(pilot, lambda: [r[1] for r in rows(app, "rounds")] == ["succeeded"] * 3, "three rounds", timeout=60)
            await until(pilot, lambda: "finished" in str(app.query_one("#session-info").render()), "the session to finish")
            plot = app.query_one("#plot", MetricPlot)
            await until(pilot, lambda: [x for x, _ in plot.points] == [1.0, 2.0, 3.0], "the plot of three rounds")
            assert app.metric == "validation:validation_accuracy"
            assert any(0x2800 < ord(ch) <= 0x28FF for ch in str(plot.render()))
            assert app.view.training.get("train_loss"), "log_metric values reach the TUI"
            await pilot.press("v")  # one line per client
            await until(pilot, lambda: set(plot.lines) == {"client-1", "client-2"}, "per-client lines")
            # Each client's last round is the session's last.
            assert [r[4] for r in rows(app, "clients")] == ["3", "3"]  # the last round each took part in
            # The trail has the seed and three models; a model's detail names its contributors.
            await pilot.press("2")
            await until(pilot, lambda: len(rows(app, "models")) == 4, "the model trail")
            assert [r[3] for r in rows(app, "models")] == ["-", "1", "2", "3"]
            app.query_one("#models").move_cursor(row=3)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TextDialog), "the model's detail")
            detail = str(app.screen.query_one("#detail-text").render())
            assert "contributors (2): client-1, client-2" in detail and "round 3" in detail, detail
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, TextDialog), "the detail closed")
            # ... and d downloads it.
            await pilot.press("d")
            await until(pilot, lambda: app.screen.query("#answer"), "the download dialog")
            out = tmp_path / "last.npz"
            app.screen.query_one("#answer").value = str(out)
            await pilot.press("enter")
            await until(pilot, lambda: out.exists() and out.stat().st_size > 0, "the download")
            await pilot.press("q")

    asyncio.run(go())
    import numpy as np

    assert len(np.load(tmp_path / "last.npz").files) == 4


def test_refused_updates_show_with_their_reasons(fed: Federation) -> None:
    fed.controller()
    fed.activate(QUICKSTART)
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("good")
    fed.client("nan", package=FIXTURES / "nan_client")  # trains NaN weights: refused
    fed.wait_clients(2)
    assert fed.conn is not None

    async def go() -> None:
        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: len(rows(app, "clients")) == 2, "two clients")
            await asyncio.to_thread(fed.run_session, rounds=1, min_clients=1, validate=False)
            await until(pilot, lambda: rows(app, "rounds") and rows(app, "rounds")[0][1] == "succeeded", "the round")
            assert rows(app, "rounds")[0][4].startswith("1 left out"), rows(app, "rounds")
            app.query_one("#rounds").focus()
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TextDialog), "the round's detail")
            detail = str(app.screen.query_one("#detail-text").render())
            assert "left out (1)" in detail and "nan:" in detail and "NaN" in detail, detail
            await pilot.press("escape")
            await pilot.press("3")
            await until(pilot, lambda: any("client nan: round 1 train refused" in r[2] and "NaN" in r[2] for r in rows(app, "log")), "the refusal in the log")
            await pilot.press("q")

    asyncio.run(go())


def test_the_plot_follows_validation_accuracy_once_it_appears_until_the_user_picks_a_metric(fed: Federation) -> None:
    """A training metric logged in round 1 comes before the first validation: the plot moves to
    validation accuracy when that appears, but a metric the user picked stays picked. The
    events are handed to the app as its controller worker hands them (Happened), in the
    order that made the plot stick to the training metric."""
    from scaleout.core import messages as m
    from scaleout.tui.app import Happened

    fed.controller()

    async def go() -> None:
        async with loaded_app(fed) as (app, pilot):
            app.post_message(Happened(m.SessionStarted(session_id="s-plot", config={"rounds": 2})))
            app.post_message(Happened(m.MetricLogged(session_id="s-plot", round_index=1, client="a", step=0, values={"train_loss": 2.0})))
            await until(pilot, lambda: app.metric == "training:train_loss", "the training metric plotted (the only one)")
            app.post_message(Happened(m.ClientReported(session_id="s-plot", round_index=1, client="a", task="validate", values={"validation_accuracy": 0.5})))
            await until(pilot, lambda: app.metric == "validation:validation_accuracy", "the plot to move to validation accuracy", timeout=5)
            app.query_one("#metric").value = "training:train_loss"  # the user's pick
            await until(pilot, lambda: app.metric == "training:train_loss", "the user's pick plotted")
            app.post_message(Happened(m.ClientReported(session_id="s-plot", round_index=2, client="a", task="validate", values={"validation_accuracy": 0.6, "validation_loss": 1.0})))
            await until(pilot, lambda: "validation:validation_loss" in app._metric_names, "the new metric in the choices")
            assert app.metric == "training:train_loss"  # kept
            await pilot.press("q")

    asyncio.run(go())


def test_token_is_shown_once_and_copyable(fed: Federation) -> None:
    fed.controller()

    async def go() -> str:
        async with loaded_app(fed) as (app, pilot):
            await pilot.press("t")
            await until(pilot, lambda: isinstance(app.screen, TokenDialog), "the token dialog")
            dialog = app.screen
            dialog.query_one("#t-ttl").value = "forever"
            await click(pilot, dialog, "#create")
            await until(pilot, lambda: "ttl" in str(dialog.query_one("#t-error").render()).lower(), "a refused lifetime")
            dialog.query_one("#t-ttl").value = "2h"
            await click(pilot, dialog, "#create")
            await until(pilot, lambda: dialog.token is not None, "the token")
            token = dialog.token
            assert dialog.query_one("#t-token").value == token
            await click(pilot, dialog, "#copy")
            assert app.clipboard == token
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, TokenDialog), "the dialog closed")
            assert dialog.token is None  # shown once: forgotten when closed
            await pilot.press("q")
            return str(token)

    from scaleout.security.tokens import peek

    claims = peek(asyncio.run(go()))
    assert claims.role == "client" and 7000 < claims.exp - time.time() <= 7200


def focus_ring(app: ScaleoutApp) -> str:
    return str(app.focused.id if app.focused is not None else None)


async def tab_through(pilot: Any, app: ScaleoutApp, n: int, key: str = "tab") -> list[str]:
    """Press ``key`` ``n`` times; the id focused after each press."""
    seen = []
    for _ in range(n):
        await pilot.press(key)
        seen.append(focus_ring(app))
    return seen


def test_every_form_and_dialog_works_by_keyboard_alone(fed: Federation) -> None:
    """Tab and Shift+Tab reach every field and button (out of text fields too), Enter
    submits, Escape closes: a session with non-default settings and an admin token, keys only."""
    ready(fed)
    assert fed.conn is not None

    async def go() -> str:
        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: len(rows(app, "clients")) == 2, "two clients")
            # The main screen: Tab leaves the filter box.
            await pilot.press("/")
            assert focus_ring(app) == "client-filter"
            assert await tab_through(pilot, app, 1) == ["clients"]
            # The start form, every field in order and back.
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SessionForm), "the session form")
            assert focus_ring(app) == "f-rounds"
            order = ["f-round_timeout", "f-min_clients", "f-aggregator", "f-aggregator_kwargs", "f-settings", "f-validate", "f-name", "cancel", "start"]
            assert await tab_through(pilot, app, len(order)) == order
            assert await tab_through(pilot, app, len(order), "shift+tab") == [*reversed(order[:-1]), "f-rounds"]
            await pilot.press(*"2")  # the field's text is selected on focus: typing replaces it
            await pilot.press("tab", *"30", "tab", "tab", "tab", "tab", *'{"epochs": 1}', "tab", "space", "tab", *"by-keys")
            assert focus_ring(app) == "f-name"
            await pilot.press("enter")  # Enter in a field starts it
            await until(pilot, lambda: not isinstance(app.screen, SessionForm), "the form to close", timeout=5)
            await until(pilot, lambda: app.view.session is not None and app.view.session.status == "finished", "the session", timeout=60)
            s = app.view.session
            assert s is not None
            assert (s.config["rounds"], s.config["round_timeout"], s.config["settings"], s.config["validate"], s.config["name"]) == (
                2, 30.0, {"epochs": 1}, False, "by-keys"
            ), s.config
            # Escape closes the form, and a button is pressed with Enter: Cancel.
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SessionForm), "the form again")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, SessionForm), "escape to close it")
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, SessionForm), "the form again")
            await pilot.press("shift+tab", "shift+tab")
            assert focus_ring(app) == "cancel"
            await pilot.press("enter")
            await until(pilot, lambda: not isinstance(app.screen, SessionForm), "cancel to close it")
            # A single-key action of the main screen does nothing in a dialog.
            await pilot.press("t")
            await until(pilot, lambda: isinstance(app.screen, TokenDialog), "the token dialog")
            dialog = app.screen
            assert focus_ring(app) == "t-role"
            assert await tab_through(pilot, app, 5) == ["t-ttl", "t-name", "close", "create", "t-role"]  # Copy is off until a token exists
            await pilot.press("s")
            assert isinstance(app.screen, TokenDialog)
            # An admin token with a lifetime of 2 hours, keys only: the role list opens with Enter.
            await pilot.press("enter", "down", "down", "enter")
            await until(pilot, lambda: dialog.query_one("#t-role").value == "admin", "the admin role chosen")
            await pilot.press("tab", *"2h", "tab", *"kbd", "enter")  # Enter in a field creates it
            await until(pilot, lambda: dialog.token is not None, "the token")
            token = str(dialog.token)
            assert focus_ring(app) == "copy"
            await pilot.press("enter")
            assert app.clipboard == token
            await pilot.press("shift+tab")
            assert focus_ring(app) == "close"
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, TokenDialog), "escape to close it")
            # The one-line dialogs: Tab reaches their buttons, Escape closes them.
            await pilot.press("p")
            await until(pilot, lambda: bool(app.screen.query("#answer")), "the package dialog")
            assert focus_ring(app) == "answer"
            assert await tab_through(pilot, app, 3) == ["cancel", "ok", "answer"]
            await pilot.press("escape")
            await until(pilot, lambda: not app.screen.query("#answer"), "escape to close it")
            await pilot.press("q")
            return token

    from scaleout.security.tokens import peek

    claims = peek(asyncio.run(go()))
    assert claims.role == "admin" and 7000 < claims.exp - time.time() <= 7200


def test_the_status_line_follows_the_active_model_and_package(fed: Federation) -> None:
    """model set-seed and package set-active from the CLI, and a session's models, show at once."""
    from conftest import scaleout

    from scaleout.package.archive import create_archive

    ready(fed, clients=1)
    assert fed.conn is not None
    seed = next(p for p in (fed.tmp / f"build-{QUICKSTART.name}").iterdir() if p.suffix in (".npz", ".safetensors"))
    other = create_archive(QUICKSTART, fed.tmp / "other.tgz")

    async def go() -> None:
        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]

        def line() -> str:
            return str(app.query_one("#status-line").render())

        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.view.active_model is not None and app.view.active_model[:12] in line(), "the seed on the status line")
            first_model = str(app.view.active_model)
            assert "client.tgz" in line()
            # A session's last model.
            await asyncio.to_thread(fed.run_session, rounds=1, min_clients=1, validate=False)
            await until(pilot, lambda: app.view.active_model != first_model, "the round's model")
            await until(pilot, lambda: str(app.view.active_model)[:12] in line(), "the round's model on the status line")
            # The CLI: a package and a seed set from another terminal.
            r = await asyncio.to_thread(scaleout, "package", "set-active", str(other), "--data-dir", str(fed.data))
            assert r.returncode == 0, r.stderr
            await until(pilot, lambda: "other.tgz" in line(), "the new package on the status line")
            r = await asyncio.to_thread(scaleout, "model", "set-seed", str(seed), "--data-dir", str(fed.data))
            assert r.returncode == 0, r.stderr
            await until(pilot, lambda: first_model[:12] in line(), "the seed again on the status line")
            await pilot.press("q")

    asyncio.run(go())


def test_the_progress_bar_of_a_stopped_session_shows_its_real_fraction(fed: Federation) -> None:
    ready(fed, clients=1)
    assert fed.conn is not None

    async def go() -> None:
        from textual.widgets import ProgressBar

        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.view.loaded, "the snapshot")
            session = (await asyncio.to_thread(fed.admin, "session.start", {"rounds": 10, "round_timeout": 30, "min_clients": 1, "validate": False}))[0]["session"]
            await until(pilot, lambda: any(r.status == "succeeded" for r in app.view.rounds.values()), "the first round", timeout=60)
            await asyncio.to_thread(fed.admin, "session.stop", {"id": session["id"]})
            await until(pilot, lambda: app.view.session is not None and app.view.session.status != "running", "the session stopped")
            bar = app.query_one("#round-progress", ProgressBar)
            done = sum(1 for r in app.view.rounds.values() if r.status != "running")
            await until(pilot, lambda: bar.total == 10, "the bar to count rounds")
            assert 1 <= done < 10 and bar.progress == done and bar.percentage == done / 10, (done, bar.progress, bar.total)
            assert f"{done}/10 rounds" in str(app.query_one("#session-info").render())
            await pilot.press("q")

    asyncio.run(go())


def test_command_palette_lists_the_actions(fed: Federation) -> None:
    fed.controller()
    assert fed.conn is not None

    async def go() -> None:
        app = ScaleoutApp(fed.conn)  # type: ignore[arg-type]
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.view.loaded, "the snapshot")
            await pilot.press("ctrl+p")
            await pilot.press(*"start a sess")
            await until(pilot, lambda: "Start a session" in str(app.screen.query_one("CommandList").get_option_at_index(0).prompt), "the palette hit")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, SessionForm), "the form from the palette")
            await pilot.press("escape")
            await pilot.press("q")

    asyncio.run(go())


def test_unreachable_controller_and_refused_token_are_said_on_the_status_line(fed: Federation) -> None:
    fed.controller()
    assert fed.conn is not None
    from scaleout.commands.connection import Connection

    with socket_closed() as port:
        nowhere = Connection(f"wss://127.0.0.1:{port}", fed.conn.token, fed.conn.ca, False)
        bad_token = Connection(fed.conn.url, fed.token("client"), fed.conn.ca, False)

        async def go(conn: Connection, text: str) -> None:
            app = ScaleoutApp(conn)
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: text in str(app.query_one("#status-line").render()), text)
                await pilot.press("s")  # an action without a controller says so, and nothing breaks
                await until(pilot, lambda: isinstance(app.screen, SessionForm), "the form")
                await pilot.press("enter")
                await until(pilot, lambda: not isinstance(app.screen, SessionForm), "the form closed")
                await pilot.press("q")

        asyncio.run(go(nowhere, "controller unreachable"))
        asyncio.run(go(bad_token, "cannot connect"))


@contextlib.contextmanager
def socket_closed() -> Any:
    """A loopback port nobody listens on (bound, never listening, for the test's length)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_tui_attaches_with_data_dir_and_refuses_without_a_terminal(fed: Federation) -> None:
    fed.controller()
    from conftest import scaleout

    r = scaleout("tui", "--data-dir", str(fed.data))
    assert r.returncode == 2 and "needs a terminal" in r.stderr and "Traceback" not in r.stderr
    r = scaleout("tui", "--data-dir", str(fed.tmp / "nowhere"))
    assert r.returncode == 2 and "not the data directory of a started controller" in r.stderr
    r = scaleout("tui", "--controller", fed.url, "--ca", fed.ca, "--token", fed.token("client"))
    assert r.returncode == 3 and "needs an admin token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = scaleout("tui", "--session", "s-nope", "--data-dir", str(fed.data))
    assert r.returncode == 2 and "s-nope" in r.stderr and "session ls" in r.stderr, r.stderr
    r = scaleout("tui", "--web", "--port", "70000", "--data-dir", str(fed.data))
    assert r.returncode == 2 and "--port must be 0 to 65535" in r.stderr


def test_web_mode_serves_the_app_to_a_browser(fed: Federation) -> None:
    """The page is served; where Chromium is installed, the app runs in it, talks to the
    controller, and keys typed in the browser act on the federation."""
    fed.controller()
    fed.seed_from(QUICKSTART)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "tui", "--web", "--port", "0", "--data-dir", str(fed.data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = wait_line(proc.stdout, "serving the TUI on", 30, "scaleout tui --web")
        url = re.search(r"http://\S+", line)[0]  # type: ignore[index]
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "textual" in page.lower() and "/ws" in page
        browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if browser is None:
            pytest.skip("no headless browser installed (chromium): the page is served, the app in a browser is not checked")
        ctl = fed.procs[0]
        shot = asyncio.run(_in_browser(browser, url, fed.tmp / "chromium", ctl))
        assert shot.stat().st_size > 20000  # the app drawn, not a blank page (kept with the test's files)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def web_tui(fed: Federation, *extra: str) -> Any:
    """A real `scaleout tui --web` on port 0: yields (process, the printed URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scaleout", "tui", "--web", "--port", "0", "--data-dir", str(fed.data), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = wait_line(proc.stdout, "serving the TUI on", 30, "scaleout tui --web")
        yield proc, re.search(r"http://\S+", line)[0]  # type: ignore[index]
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(20)


def http(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    """GET ``url``: (status, body, headers), a refusal included."""
    import urllib.error

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read().decode(errors="replace"), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), exc.headers


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def web_page(url: str, origin: str | None, cookie: str | None) -> Any:
    """A websocket to the TUI's /ws as a page would open it (or a page of another site)."""
    from websockets.asyncio.client import connect

    base = url.split("/?")[0]
    headers = {"Cookie": cookie} if cookie else {}
    return await connect(base.replace("http://", "ws://") + "/ws?width=120&height=40", origin=origin, additional_headers=headers, max_size=None)  # type: ignore[arg-type]


def test_web_mode_refuses_other_sites_keyless_pages_and_too_many_pages(fed: Federation) -> None:
    """The attack of issue 20: a page of another site, or without the printed URL's key,
    cannot drive `tui --web`; the number of app processes is bounded; SIGTERM ends them."""
    fed.controller()
    ctl = fed.procs[0]
    with web_tui(fed, "--max-sessions", "2") as (proc, url):
        base, key = url.split("/?key=")
        port = base.rsplit(":", 1)[1]
        # The page: only with the key, only for this address, never for another site.
        assert http(f"{base}/")[0] == 403
        assert http(f"{base}/?key=wrong")[0] == 403
        assert http(url, {"Host": f"evil.example.com:{port}"})[0] == 403  # DNS rebinding
        assert http(url, {"Origin": "http://evil.example.com"})[0] == 403
        assert http(f"{base}/static/js/textual.js")[0] == 403
        status, page, headers = http(url)
        assert status == 200 and "/ws" in page
        cookie = headers["Set-Cookie"]
        assert key in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
        jar = cookie.split(";")[0]
        assert http(f"{base}/static/js/textual.js", {"Cookie": jar})[0] == 200  # the page's own requests carry the cookie
        assert http(f"http://localhost:{port}/?key={key}")[0] == 200  # the same server by another name of it

        async def attack() -> None:
            from websockets.exceptions import InvalidStatus

            for origin, cookie_ in (("http://evil.example.com", jar), (base, None), (None, jar), (base, "scaleout-tui-1=" + key)):
                with pytest.raises(InvalidStatus) as refused:
                    await web_page(url, origin, cookie_)
                assert refused.value.response.status_code == 403, (origin, cookie_)
            assert children(proc.pid) == set(), "a refused page started an app"
            # With the key and this origin: accepted, up to --max-sessions pages.
            pages = [await web_page(url, base, jar), await web_page(url, base, jar)]
            with pytest.raises(InvalidStatus) as refused:
                await web_page(url, base, jar)
            assert refused.value.response.status_code == 503
            deadline = time.monotonic() + 30
            while len(children(proc.pid)) != 2:
                assert time.monotonic() < deadline, children(proc.pid)
                await asyncio.sleep(0.1)  # polling /proc, bounded by the deadline
            apps = children(proc.pid)
            # The attack's keys on an accepted page: an admin token, then Copy. The token is shown in
            # the page, but no clipboard sequence (OSC 52) carries it to the page.
            received = bytearray()

            async def read(page: Any, until_: bytes, timeout: float = 30) -> None:
                end = time.monotonic() + timeout
                while until_ not in received:
                    left = end - time.monotonic()
                    assert left > 0, f"the page never showed {until_!r}"
                    try:
                        data = await asyncio.wait_for(page.recv(), left)
                    except TimeoutError:
                        continue
                    if isinstance(data, bytes):
                        received.extend(data)

            async def keys(page: Any, *typed: str) -> None:
                for k in typed:
                    await page.send(__import__("json").dumps(["stdin", k]))

            page = pages[0]
            await read(page, b"Overview")
            while "subscribed to events" not in ctl.text():
                await asyncio.sleep(0.1)  # polling a log, bounded below
                assert time.monotonic() < deadline + 30, ctl.text()[-2000:]
            await keys(page, "t")
            await read(page, b"Create a token")
            await keys(page, "\r", "\x1b[B", "\x1b[B", "\r")  # the role list: admin
            await read(page, b"admin")
            await keys(page, "\t", "\t", "\r")  # Enter in "For whom" creates it
            await read(page, b"sco1.")
            await keys(page, "c")
            await read(page, b"Copy is off")
            assert b"\x1b]52;" not in received
            for p in pages:
                await p.close()
            pages.clear()
            # A closed page ends its app.
            deadline2 = time.monotonic() + 20
            while not all(gone(pid) for pid in apps):
                assert time.monotonic() < deadline2, [pid for pid in apps if not gone(pid)]
                await asyncio.sleep(0.1)  # polling /proc, bounded by the deadline
            # SIGTERM of `tui --web` ends the apps of pages still open.
            pages.append(await web_page(url, base, jar))
            received.clear()
            await read(pages[0], b"Overview")
            left = children(proc.pid)
            assert len(left) == 1
            proc.terminate()
            assert await asyncio.to_thread(proc.wait, 20) == 0
            assert all(gone(pid) for pid in left), "an app outlived tui --web"

        asyncio.run(attack())


def test_web_page_needs_nothing_from_the_internet(fed: Federation) -> None:
    """Every asset of the page is served locally: no http(s) URL to another host, the font included."""
    fed.controller()
    with web_tui(fed) as (_, url):
        base = url.split("/?")[0]
        status, page, headers = http(url)
        assert status == 200
        jar = (headers.get("Set-Cookie") or "").split(";")[0]
        assert not re.findall(r"https?://", page), re.findall(r"https?://\S+", page)
        refs = re.findall(r"(?:href|src)=\"([^\"]+)\"", page) + re.findall(r"url\(\"?([^\")]+)", page)
        assert any(r.endswith(".ttf") for r in refs), refs  # the font, from here
        for ref in refs:
            assert ref.startswith("/static/"), ref
            status, body, _ = http(base + ref, {"Cookie": jar})
            assert status == 200, ref
            if ref.endswith(".css"):
                assert not re.findall(r"(?:url\(|@import)\s*[\"']?https?://", body), ref


async def _in_browser(browser: str, url: str, profile: Path, ctl: Any, timeout: float = 60) -> Path:
    """Open ``url`` in headless Chromium (driven over the DevTools protocol with the
    websockets library): start the app, wait until it subscribed to the controller, type
    s and Enter (the session form, sent with its defaults), and wait for the session to
    start on the controller. Returns a screenshot of the page."""
    import base64
    import json as _json

    from websockets.asyncio.client import connect

    chrome = await asyncio.create_subprocess_exec(
        browser, "--headless=new", "--no-sandbox", "--remote-debugging-port=0", f"--user-data-dir={profile}",
        "--window-size=1600,1000", "about:blank", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert chrome.stderr is not None
        while True:
            line = (await asyncio.wait_for(chrome.stderr.readline(), 30)).decode()
            assert line, "chromium exited before it listened"
            if "DevTools listening on" in line:
                port = int(re.search(r"ws://127.0.0.1:(\d+)/", line)[1])  # type: ignore[index]
                break
        targets = _json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read()))
        page = next(t for t in targets if t["type"] == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params: Any) -> dict[str, Any]:
                n = next(ids)
                await ws.send(_json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    reply = _json.loads(await ws.recv())
                    if reply.get("id") == n:
                        return dict(reply.get("result") or {})

            async def wait_log(text: str) -> None:
                deadline = time.monotonic() + timeout
                while text not in ctl.text():
                    assert time.monotonic() < deadline, f"the controller did not log {text!r}:\n{ctl.text()[-3000:]}"
                    await asyncio.sleep(0.2)  # polling a log file, bounded by the deadline

            async def key(name: str, text: str, code: int) -> None:
                for kind in ("keyDown", "keyUp"):
                    await call("Input.dispatchKeyEvent", type=kind, key=name, code=name, text=text if kind == "keyDown" else "",
                               windowsVirtualKeyCode=code, nativeVirtualKeyCode=code)

            await call("Page.navigate", url=url)
            await wait_log("subscribed to events")  # the app, started by the page, is on the controller
            await call("Runtime.evaluate", expression="document.querySelector('.xterm-helper-textarea').focus()")
            await key("s", "s", 83)
            # Enter in the form's first field sends it; until the form is up, Enter does nothing.
            deadline = time.monotonic() + timeout
            while "session s-" not in ctl.text():
                assert time.monotonic() < deadline, f"no session started from the browser:\n{ctl.text()[-3000:]}"
                await key("Enter", "\r", 13)
                await asyncio.sleep(0.5)  # polling the controller's log, bounded by the deadline
            shot = profile.parent / "web.png"
            shot.write_bytes(base64.b64decode((await call("Page.captureScreenshot"))["data"]))
            return shot
    finally:
        chrome.kill()
        await chrome.wait()


def test_dev_opens_the_tui_on_a_terminal_and_quitting_stops_the_federation(tmp_path: Path) -> None:
    """`scaleout dev` on a terminal (a pty here): the TUI shows the session; q stops it all."""
    import pty
    import select
    import signal

    data = tmp_path / "dev"
    pid, fd = pty.fork()
    if pid == 0:  # the child: scaleout dev on the pty
        os.environ.update(TERM="xterm-256color", COLUMNS="140", LINES="40")
        os.execv(sys.executable, [sys.executable, "-m", "scaleout", "dev", "-p", str(QUICKSTART), "--clients", "2", "--rounds", "3", "--data-dir", str(data)])
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    seen = b""
    ansi = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[>=]")

    def read_until(text: bytes, timeout: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in ansi.sub(b"", seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal within {timeout}s:\n{ansi.sub(b'', seen)[-3000:].decode(errors='replace')}")
            if select.select([fd], [], [], left)[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    break

    try:
        read_until(b"3/3 rounds", 90)  # the TUI's session panel, on the federation dev started
        read_until(b"client-2", 10)
        os.write(fd, b"q")
        read_until(b"stopping the federation", 30)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "scaleout dev did not exit after q"
            if select.select([fd], [], [], 0.2)[0]:  # keep the pty drained while it stops
                with contextlib.suppress(OSError):
                    seen += os.read(fd, 65536)
        assert os.waitstatus_to_exitcode(status) == 0, ansi.sub(b"", seen)[-2000:].decode(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    # Every process of the federation stopped: the controller released its data dir.
    log = (data / "logs" / "controller.log").read_text()
    assert "controller shutting down" in log and "Traceback" not in log
