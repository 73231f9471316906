"""The controller's Prometheus exporter: its own registry per instance, served over HTTP."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from scaleout.core.errors import ConfigError
from scaleout.roles.exporter import Observer, PrometheusObserver, start


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_two_exporters_in_one_process_count_apart() -> None:
    a, b = start("127.0.0.1", 0), start("127.0.0.1", 0)  # a second one would clash in the default registry
    try:
        assert a.url != b.url and a.url is not None and a.url.startswith("http://127.0.0.1:")
        a.round_finished("succeeded", 1.5)
        a.round_finished("failed", 0.2)
        a.update_reported("tensor 'w' contains NaN or inf")
        a.update_reported(None)
        a.moved("in", "partial", 1000)
        a.moved("out", "model", 0)  # nothing moved: nothing counted
        a.nodes(2, 7)
        b.update_reported("something nobody foresaw")
        sa, sb = scrape(a.url), scrape(b.url or "")
        assert sa[("scaleout_rounds_total", (("status", "succeeded"),))] == 1
        assert sa[("scaleout_rounds_total", (("status", "failed"),))] == 1
        assert sa[("scaleout_round_duration_seconds_sum", ())] == pytest.approx(1.7)
        assert sa[("scaleout_round_duration_seconds_bucket", (("le", "0.25"),))] == 1
        assert sa[("scaleout_updates_refused_total", (("reason", "non_finite"),))] == 1
        assert sa[("scaleout_updates_accepted_total", ())] == 1
        assert sa[("scaleout_payload_bytes_total", (("direction", "in"), ("kind", "partial")))] == 1000
        assert sa[("scaleout_combiners_connected", ())] == 2 and sa[("scaleout_clients_connected", ())] == 7
        assert sb[("scaleout_rounds_total", (("status", "succeeded"),))] == 0
        assert sb[("scaleout_updates_refused_total", (("reason", "other"),))] == 1
        assert sb[("scaleout_updates_refused_total", (("reason", "non_finite"),))] == 0
        assert all(name.startswith("scaleout_") for name, _ in sa)
    finally:
        a.close()
        b.close()
    with pytest.raises(OSError):  # closed: nobody answers any more
        urllib.request.urlopen(a.url, timeout=2)


def test_a_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: port {port} is already in use"):
            PrometheusObserver("127.0.0.1", port)


def test_the_plain_observer_counts_nothing_and_needs_no_prometheus() -> None:
    obs = Observer()
    obs.round_finished("succeeded", 1.0)
    obs.update_reported("x")
    obs.close()
    assert obs.url is None
