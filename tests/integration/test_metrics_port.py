"""Idle connections to --metrics-port cannot take the controller's file descriptors (issue 20 #9)."""

from __future__ import annotations

import json
import resource
import socket
import time
from urllib.parse import urlsplit
from urllib.request import urlopen

from conftest import Federation


def test_idle_half_requests_to_the_metrics_port_starve_nothing(fed: Federation) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the controller starts with a small soft limit
    try:
        ctl = fed.controller("--metrics-port", "0")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    metrics = json.loads((fed.data / "controller.json").read_text())["metrics_url"]
    parts = urlsplit(metrics)
    held: list[socket.socket] = []
    try:
        for _ in range(400):  # more than the 256 files it started with
            s = socket.create_connection((parts.hostname, parts.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends it
            held.append(s)
        # Those past the limit of connections served at once are closed at once.
        closed = 0
        for s in held:
            s.settimeout(0.05)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 400 - 32, closed
        # The controller still answers its own clients, and a scrape once a slot is free.
        assert fed.admin("status")[0]["session"] is None
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 15
    while True:  # the held slots are given back as their connections close
        try:
            with urlopen(metrics, timeout=5) as r:
                assert b"scaleout_rounds_total" in r.read()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)  # polling a port that announces nothing
    log = ctl.text()
    assert "Traceback" not in log and log.count("metrics port:") <= 2, log[-3000:]
    assert "open files limit raised from 256" in log, log[:3000]
