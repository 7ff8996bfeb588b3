"""devices.report: the audit finds exactly what was planted; the HTML is self-contained, escaped, parseable."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.report import SimRecord, audit, build_report, format_summary, latency_stats

T0 = 1_800_000_000.0


def rec(dev: str, seq: int, t: float = 0.0, lat: float | None = 10.0, error: str | None = None) -> SimRecord:
    return SimRecord(dev, seq, "intent", T0 + t - (lat or 0) / 1000, T0 + t, lat, error)


@st.composite
def planted(draw):  # noqa: ANN001, ANN201
    """Devices with a known seq stream, some seqs removed (never the first or last) and some duplicated."""
    n_dev = draw(st.integers(1, 4))
    ids = draw(st.lists(st.text(min_size=1, max_size=12), min_size=n_dev, max_size=n_dev, unique=True))
    devices = {}
    for dev in ids:
        start = draw(st.integers(0, 10_000))
        n = draw(st.integers(1, 120))
        inner = list(range(start + 1, start + n - 1))
        removed = sorted(draw(st.sets(st.sampled_from(inner), max_size=len(inner))) if inner else set())
        kept = [s for s in range(start, start + n) if s not in set(removed)]
        dups = draw(st.lists(st.sampled_from(kept), max_size=10))
        devices[dev] = (start, n, removed, dups)
    return devices


def ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


@settings(max_examples=150, deadline=None)
@given(planted(), st.randoms(use_true_random=False))
def test_audit_finds_exactly_the_planted_gaps_and_duplicates(devices, rnd):
    records = []
    for dev, (start, n, removed, dups) in devices.items():
        records += [rec(dev, s) for s in range(start, start + n) if s not in set(removed)]
        records += [rec(dev, s) for s in dups]
    rnd.shuffle(records)
    result = audit(records, expected={dev: n for dev, (_, n, _, _) in devices.items()})
    assert set(result["devices"]) == set(devices)
    for dev, (start, n, removed, dups) in devices.items():
        d = result["devices"][dev]
        assert d["gaps"] == ranges(removed)
        assert d["missing_seqs"] == len(removed) == d["lost"]
        assert d["duplicates"] == len(dups)
        assert d["duplicate_seqs"] == sorted(set(dups))
        assert d["unique"] == n - len(removed) and d["count"] == n - len(removed) + len(dups)
        assert (d["first_seq"], d["last_seq"]) == (start, start + n - 1)
    bad = any(removed or dups for _, _, removed, dups in devices.values())
    assert result["passed"] is (not bad)
    assert bool(result["reasons"]) is bad
    assert result["totals"]["lost"] == sum(len(r) for _, _, r, _ in devices.values())


def test_a_forward_jump_after_a_crash_is_not_loss():
    # block reservation: after a restart seq continues at the next persisted block, no input lost
    records = [rec("a", s) for s in range(0, 40)] + [rec("a", s) for s in range(100, 160)]
    ok = audit(records, expected={"a": 100}, crash_restarts={"a": 1})
    assert ok["passed"], ok["reasons"]
    d = ok["devices"]["a"]
    assert d["gaps"] == [[40, 99]] and d["unexplained_gaps"] == 0 and d["lost"] == 0
    not_ok = audit(records, expected={"a": 100})
    assert not not_ok["passed"] and not_ok["devices"]["a"]["unexplained_gaps"] == 1
    assert "not explained by 0 restarts" in not_ok["reasons"][0]
    listed = audit(records, allowed_gaps={"a": [(40, 99)]})
    assert listed["passed"]


def test_two_jumps_need_two_restarts_and_a_lost_input_still_fails():
    records = [rec("b", s) for s in [0, 1, 2, 50, 51, 100, 101]]
    assert audit(records, crash_restarts={"b": 1})["devices"]["b"]["unexplained_gaps"] == 1
    assert audit(records, crash_restarts={"b": 2})["passed"]
    lost = audit(records, expected={"b": 8}, crash_restarts={"b": 2})
    assert not lost["passed"] and lost["devices"]["b"]["lost"] == 1
    assert lost["reasons"] == ["b: 1 of 8 inputs lost"]


def test_device_that_never_answered_lost_everything_and_errors_are_counted():
    records = [rec("x", 0), rec("x", 1, error="bad_input"), rec("x", 2, error="bad_input"), rec("x", 3, error="timeout")]
    r = audit(records, expected={"x": 4, "silent": 7})
    assert r["devices"]["silent"]["lost"] == 7 and r["devices"]["silent"]["count"] == 0
    assert r["devices"]["x"]["errors_by_code"] == {"bad_input": 2, "timeout": 1}
    assert r["totals"]["errors"] == 3 and r["totals"]["lost"] == 7
    assert not r["passed"] and r["reasons"] == ["silent: 7 of 7 inputs lost"]


def test_duplicates_can_be_allowed_for_at_least_once_delivery():
    records = [rec("d", 0), rec("d", 1), rec("d", 1)]
    assert not audit(records)["passed"]
    assert audit(records, allow_duplicates=True)["passed"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e5, allow_nan=False), min_size=1, max_size=300))
def test_latency_percentiles_match_numpy(values):
    s = latency_stats(values)
    for q in (50, 95, 99):
        assert s[f"p{q}"] == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)
    assert s["max"] == max(values) and s["count"] == len(values)


class Page(HTMLParser):
    """Collects what a self-contained, escaped page must (not) have."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.open_svg = 0
        self.max_depth_ok = True
        self.urls: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        self.tags.append(tag)
        if tag == "svg":
            self.open_svg += 1
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "action") or (v and ("://" in v or v.startswith("//"))):
                self.urls.append(f"{tag} {k}={v}")

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag == "svg":
            self.open_svg -= 1

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def scenario_run() -> tuple[dict, list[SimRecord], list[dict], dict, dict]:
    rng = random.Random(3)
    evil = '<script>alert("x")</script>'
    devs = [f"dev-{i}" for i in range(12)] + [evil]
    records = []
    for dev in devs:
        for s in range(60):
            if dev == "dev-3" and s == 30:
                continue  # planted loss
            t = s * 0.5 + rng.random() * 0.4
            lat = rng.lognormvariate(3.0, 0.4) + (500.0 if 10 <= t < 14 else 0.0)
            records.append(rec(dev, s, t, lat, "bad_input" if (dev == "dev-5" and s == 7) else None))
    records.append(rec("dev-4", 12, 6.1))  # planted duplicate
    events = [{"t": 10.0, "kind": "broker_outage", "duration_s": 4.0},
              {"t": 14.5, "kind": "reconnect", "device": "dev-1"},
              {"t": 14.6, "kind": "reconnect", "device": evil},
              {"t": 20.0, "kind": "crash", "device": "dev-2"}, {"t": 21.0, "kind": "restart", "device": "dev-2"}]
    timeline = {"t": list(range(31)), "connected": [13] * 10 + [0] * 4 + [13] * 17}
    expected = {d: 60 for d in devs}
    scenario = {"name": "fleet <b>&</b> \"outage\"", "devices": len(devs), "duration_s": 30}
    return scenario, records, events, timeline, expected


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[dict, Path]:
    scenario, records, events, timeline, expected = scenario_run()
    out = tmp_path_factory.mktemp("report")
    return build_report(scenario, records, events, timeline, out, expected=expected, started_at=T0), out


def test_report_json_round_trips_and_holds_summary_audit_and_series(built):
    report, out = built
    assert json.loads((out / "report.json").read_text()) == report
    s = report["summary"]
    assert (s["devices"], s["lost"], s["duplicates"], s["reconnects"], s["crashes"], s["outages"]) == (13, 1, 1, 2, 1, 1)
    assert s["errors_by_code"] == {"bad_input": 1}
    assert not report["verdict"]["passed"]
    assert report["verdict"]["reasons"] == ["dev-3: 1 of 60 inputs lost", "dev-4: 1 duplicate results (seq 12)"]
    assert report["verdict"]["notes"] == ["dev-3: 1 seq gaps beyond 0 restarts, counted as loss"]
    assert report["audit"]["dev-2"]["crash_restarts"] == 1  # taken from the restart event
    series = report["series"]
    assert sum(series["results_per_s"]) == s["results"] == 13 * 60 - 1 + 1
    assert series["t"][:3] == [0, 1, 2]
    # the injected outage shows in the per-second p50: every result then took > 500 ms
    assert all(series["latency_p50_ms"][i] > 500 for i in (10, 11, 12, 13))
    assert all(series["latency_p50_ms"][i] < 200 for i in (2, 5, 20, 25))
    assert report["fault_windows"] == [{"kind": "broker_outage", "start": 10.0, "end": 14.0,
                                        "label": "broker_outage at 10.0s (duration_s=4.0)"}]
    assert sum(report["latency_histogram"]["counts"]) == s["latency_ms"]["count"] == s["results"]
    assert report["timeline"]["connected"][10] == [10.0, 0.0]


def test_html_is_self_contained_parses_and_has_one_svg_per_plot(built):
    report, out = built
    page = Page()
    html_text = (out / "report.html").read_text()
    page.feed(html_text)
    page.close()
    assert page.tags.count("svg") == len(report["plots"]) == 6
    assert page.open_svg == 0
    assert page.urls == []
    assert "http" not in html_text.lower()
    assert "<script" not in html_text.lower() and "script" not in page.tags
    assert {"table", "h1", "figure", "polyline", "rect"} <= set(page.tags)


def test_every_string_is_escaped(built):
    _, out = built
    html_text = (out / "report.html").read_text()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html_text  # device id, in SVG titles
    assert "fleet &lt;b&gt;&amp;&lt;/b&gt; &quot;outage&quot;" in html_text
    assert "<b>&</b>" not in html_text
    page = Page()
    page.feed(html_text)
    assert any('<script>alert("x")</script>' in t for t in page.text)  # the text survives, as text


def test_format_summary_is_a_table_with_the_verdict(built):
    report, _ = built
    text = format_summary(report)
    first, *rest = text.splitlines()
    assert first == 'fleet <b>&</b> "outage": FAIL'
    assert any(line.split()[:2] == ["lost", "1"] for line in rest)
    assert any(line.startswith("dev-3") for line in rest)
    assert "bad_input" in text


def test_a_clean_run_passes_without_events_or_timeline(tmp_path):
    records = [rec("solo", s, s * 0.1) for s in range(20)]
    report = build_report({"name": "clean"}, records, [], None, tmp_path, expected={"solo": 20})
    assert report["verdict"] == {"passed": True, "reasons": [], "notes": []}
    assert report["plots"] == ["latency_over_time", "latency_histogram", "throughput", "per_device", "events"]
    page = Page()
    page.feed((tmp_path / "report.html").read_text())
    assert page.tags.count("svg") == 5
    assert format_summary(report).startswith("clean: PASS")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5, unique=True),
       lat=st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False)))
def test_any_device_id_or_latency_gives_valid_json_and_html(tmp_path, ids, lat):
    records = [rec(d, i, i * 0.7, lat) for i, d in enumerate(ids)]
    report = build_report({"name": ids[0]}, records, [{"t": 0.5, "kind": ids[-1]}], None, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    page = Page()
    page.feed((tmp_path / "report.html").read_text())
    assert page.tags.count("svg") == 5 and page.urls == [] and "script" not in page.tags


def test_a_thousand_reconnects_are_drawn_as_per_second_counts(tmp_path):
    records = [rec(f"d{i}", 0, i * 0.01) for i in range(1000)]
    events = [{"t": 5 + (i % 3) + 0.5, "kind": "reconnect", "device": f"d{i}"} for i in range(1000)]
    report = build_report({"name": "many"}, records, events, None, tmp_path)
    html_text = (tmp_path / "report.html").read_text()
    assert report["summary"]["reconnects"] == 1000
    assert "reconnect at 5.5s" not in html_text  # no marker per event
    counts = {sec: sum(1 for e in events if int(e["t"]) == sec) for sec in (5, 6, 7)}
    for sec, n in counts.items():
        assert f"reconnect: {n} in second {sec}" in html_text


def test_allowed_loss_is_a_fleet_wide_fraction():
    records = [rec("a", s) for s in range(100) if s != 50] + [rec("b", s) for s in range(100)]
    tolerated = audit(records, expected={"a": 100, "b": 100}, allowed_loss=0.01)
    assert tolerated["passed"] and tolerated["reasons"] == []
    assert tolerated["notes"][:2] == ["1 of 200 inputs lost (0.50%), within the 1.00% allowed",
                                      "a: 1 of 100 inputs lost"]
    strict = audit(records, expected={"a": 100, "b": 100}, allowed_loss=0.004)
    assert not strict["passed"]
    assert strict["reasons"] == ["1 of 200 inputs lost (0.50%), more than the 0.40% allowed", "a: 1 of 100 inputs lost"]


def test_every_event_with_a_duration_is_a_shaded_fault_window():
    from devices.report import fault_windows

    events = [{"t": 3, "kind": "serial_noise", "duration_s": 2}, {"t": 4, "kind": "reconnect"},
              {"t": 8, "kind": "broker_outage"}, {"t": 9, "kind": "crash", "device": "a"}]
    assert [(w["kind"], w["start"], w["end"]) for w in fault_windows(events, 20.0)] == [
        ("serial_noise", 3.0, 5.0), ("broker_outage", 8.0, 20.0)]
