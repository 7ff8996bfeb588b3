"""Fleet-simulation report: audit results per device (lost, duplicates, gaps) and write report.json + report.html.

Host side, standard library only (inline SVG plots, no matplotlib); must never import TensorFlow or converters.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_slm.table import format_table

SCHEMA_VERSION = 1
OPEN_ENDED_FAULTS = ("broker_outage",)  # without duration_s these last until the end of the run
PLOTS = ("latency_over_time", "latency_histogram", "throughput", "per_device", "events")


@dataclass
class SimRecord:
    """One result (or error record) the simulator's collector received.

    ``sent_at``/``received_at`` are wall-clock seconds (time.time()); ``latency_ms`` is end to end
    (input produced -> result received), None when unknown.
    """

    device_id: str
    seq: int
    pipeline: str
    sent_at: float | None
    received_at: float
    latency_ms: float | None
    error: str | None = None


# --------------------------------------------------------------------------------------------------
# audit
# --------------------------------------------------------------------------------------------------
def _ranges(missing: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(missing):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def audit(records: Sequence[SimRecord], expected: dict[str, int] | None = None, *,
          crash_restarts: dict[str, int] | None = None,
          allowed_gaps: dict[str, list[tuple[int, int]]] | None = None,
          allow_duplicates: bool = False, allowed_loss: float = 0.0) -> dict:
    """Check every device's seq stream; returns {"devices": {id: {...}}, "totals", "passed", "reasons", "notes"}.

    Per device: ``count`` records, ``unique`` seqs, ``duplicates`` (records whose seq was already
    seen) and ``duplicate_seqs``, ``gaps`` (inclusive [first, last] ranges of seqs missing between
    the lowest and highest seq seen) and ``missing_seqs``, ``errors`` and ``errors_by_code``.

    Gaps are not always loss: the agent reserves seq blocks, so after a crash its seq jumps forward
    without any input being lost ("a gap after a crash, never a repeat"). A device restarted k times
    (``crash_restarts``) may have up to k gaps; ``allowed_gaps`` names ranges that are fine outright.
    Other gaps are ``unexplained_gaps``: they fail the audit, unless ``expected`` shows that device lost
    inputs (the gaps are then that loss, judged below). The real loss figure needs the number of
    inputs each device was given (``expected``): ``lost = expected - unique`` (never negative; more
    unique seqs than inputs is reported as ``extra``). Any loss fails, unless ``allowed_loss`` (a
    fraction of all expected inputs, fleet-wide) tolerates it. Duplicates fail unless ``allow_duplicates``.
    What was tolerated is listed in ``notes``.
    """
    crash_restarts = crash_restarts or {}
    allowed_gaps = allowed_gaps or {}
    by_dev: dict[str, list[SimRecord]] = defaultdict(list)
    for r in records:
        by_dev[r.device_id].append(r)
    devices: dict[str, dict] = {}
    reasons: list[str] = []
    notes: list[str] = []
    loss_lines: list[str] = []
    for dev in sorted(set(by_dev) | set(expected or {})):
        recs = by_dev.get(dev, [])
        counts = Counter(r.seq for r in recs)
        seqs = sorted(counts)
        dup_seqs = sorted(s for s, c in counts.items() if c > 1)
        gaps: list[list[int]] = []
        if seqs:
            present = set(seqs)
            gaps = _ranges(s for s in range(seqs[0], seqs[-1] + 1) if s not in present) \
                if seqs[-1] - seqs[0] + 1 != len(seqs) else []
        ok_ranges = allowed_gaps.get(dev, [])
        not_listed = [g for g in gaps if not any(a <= g[0] and g[1] <= b for a, b in ok_ranges)]
        unexplained = max(0, len(not_listed) - int(crash_restarts.get(dev, 0)))
        errs = Counter(r.error for r in recs if r.error)
        d = {
            "count": len(recs),
            "unique": len(seqs),
            "first_seq": seqs[0] if seqs else None,
            "last_seq": seqs[-1] if seqs else None,
            "duplicates": sum(c - 1 for c in counts.values()),
            "duplicate_seqs": dup_seqs[:100],
            "gaps": gaps[:100],
            "gap_count": len(gaps),
            "missing_seqs": sum(b - a + 1 for a, b in gaps),
            "crash_restarts": int(crash_restarts.get(dev, 0)),
            "unexplained_gaps": unexplained,
            "errors": sum(errs.values()),
            "errors_by_code": dict(sorted(errs.items())),
            "expected": None,
            "lost": None,
            "extra": None,
        }
        if expected is not None:
            exp = int(expected.get(dev, 0))
            d["expected"] = exp
            d["lost"] = max(0, exp - len(seqs))
            d["extra"] = max(0, len(seqs) - exp)
            if d["lost"]:
                loss_lines.append(f"{dev}: {d['lost']} of {exp} inputs lost")
        if d["duplicates"]:
            (notes if allow_duplicates else reasons).append(
                f"{dev}: {d['duplicates']} duplicate results (seq {_short(dup_seqs)})")
        if len(not_listed) > unexplained:
            notes.append(f"{dev}: {len(not_listed) - unexplained} seq jumps after {d['crash_restarts']} restarts")
        if unexplained and d["lost"]:
            notes.append(f"{dev}: {unexplained} seq gaps beyond {d['crash_restarts']} restarts, counted as loss")
        elif unexplained:
            reasons.append(f"{dev}: {unexplained} seq gaps not explained by {d['crash_restarts']} restarts "
                           f"({_short(f'{a}-{b}' if a != b else str(a) for a, b in not_listed)})")
        devices[dev] = d
    errs_total: Counter = Counter()
    for d in devices.values():
        errs_total.update(d["errors_by_code"])
    totals = {
        "devices": len(devices),
        "results": sum(d["count"] for d in devices.values()),
        "unique": sum(d["unique"] for d in devices.values()),
        "duplicates": sum(d["duplicates"] for d in devices.values()),
        "gaps": sum(d["gap_count"] for d in devices.values()),
        "missing_seqs": sum(d["missing_seqs"] for d in devices.values()),
        "unexplained_gaps": sum(d["unexplained_gaps"] for d in devices.values()),
        "errors": sum(errs_total.values()),
        "errors_by_code": dict(sorted(errs_total.items())),
        "expected": sum(d["expected"] for d in devices.values()) if expected is not None else None,
        "lost": sum(d["lost"] for d in devices.values()) if expected is not None else None,
        "extra": sum(d["extra"] for d in devices.values()) if expected is not None else None,
    }
    if loss_lines:
        frac = totals["lost"] / max(1, totals["expected"])
        fleet = f"{totals['lost']} of {totals['expected']} inputs lost ({100 * frac:.2f}%)"
        if frac > allowed_loss:
            head = [f"{fleet}, more than the {100 * allowed_loss:.2f}% allowed"] if allowed_loss > 0 else []
            reasons = head + loss_lines + reasons
        else:
            notes = [f"{fleet}, within the {100 * allowed_loss:.2f}% allowed"] + loss_lines + notes
    return {"devices": devices, "totals": totals, "passed": not reasons, "reasons": reasons, "notes": notes}


def _short(items: Iterable[object], n: int = 5) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", … {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------
# statistics and series
# --------------------------------------------------------------------------------------------------
def _percentile(sorted_vals: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo))


def _latency(r: SimRecord) -> float | None:
    if r.latency_ms is not None:
        return float(r.latency_ms)
    if r.sent_at is not None:
        return (r.received_at - r.sent_at) * 1000.0
    return None


def latency_stats(values: Iterable[float]) -> dict:
    v = sorted(float(x) for x in values if x is not None and math.isfinite(x))
    return {"count": len(v), "mean": (sum(v) / len(v)) if v else None, "p50": _percentile(v, 50),
            "p95": _percentile(v, 95), "p99": _percentile(v, 99), "max": v[-1] if v else None}


def _normalize_timeline(timeline: dict | None) -> dict[str, list[list[float]]]:
    """Accept {"t": [...], name: [...]} (columns) or {name: [[t, v], ...]}; return {name: [[t, v], ...]}."""
    if not timeline:
        return {}
    out: dict[str, list[list[float]]] = {}
    ts = timeline.get("t")
    for name, vals in timeline.items():
        if name == "t" or not isinstance(vals, (list, tuple)):
            continue
        if ts is not None and len(vals) == len(ts) and not (vals and isinstance(vals[0], (list, tuple))):
            pts = [[float(t), float(v)] for t, v in zip(ts, vals) if v is not None]
        else:
            pts = [[float(p[0]), float(p[1])] for p in vals if isinstance(p, (list, tuple)) and len(p) == 2
                   and p[1] is not None]
        out[str(name)] = pts
    return out


def fault_windows(events: Sequence[dict], end: float) -> list[dict]:
    """Time windows of injected faults: every event with duration_s (a broker_outage without one runs to end)."""
    out = []
    for e in events:
        kind = str(e.get("kind", ""))
        dur = e.get("duration_s")
        if not dur and kind not in OPEN_ENDED_FAULTS:
            continue  # a point event (reconnect, crash, setting change) is a marker, not a window
        t0 = float(e.get("t", 0.0))
        t1 = t0 + float(dur) if dur else end
        out.append({"kind": kind, "start": t0, "end": t1, "label": _event_label(e)})
    return out


def _event_label(e: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "kind"))
    return f"{e.get('kind', '?')} at {float(e.get('t', 0)):.1f}s" + (f" ({extra})" if extra else "")


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def build_report(scenario: dict, records: list[SimRecord], events: list[dict], timeline: dict | None,
                 out_dir: Path, *, expected: dict[str, int] | None = None,
                 crash_restarts: dict[str, int] | None = None,
                 allowed_gaps: dict[str, list[tuple[int, int]]] | None = None,
                 allow_duplicates: bool = False, allowed_loss: float = 0.0, started_at: float | None = None,
                 duration_s: float | None = None) -> dict:
    """Audit the records, write out_dir/report.json and out_dir/report.html, return the JSON dict.

    events: {"t": seconds since start, "kind": "broker_outage"|"latency"|"loss"|"crash"|"restart"|
    "reconnect"|..., "device": optional, "duration_s": optional, ...}. timeline: optional series the
    simulator sampled, as {"t": [s, ...], "connected": [...], ...} or {"connected": [[t, v], ...]}.
    Time zero is ``started_at`` (wall clock), else scenario["started_at"], else the earliest record.
    ``crash_restarts`` defaults to the number of "restart" events per device.
    """
    if hasattr(scenario, "__dataclass_fields__"):  # a Scenario object is welcome too
        scenario = asdict(scenario)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = sorted((dict(e) for e in events), key=lambda e: float(e.get("t", 0.0)))
    if crash_restarts is None:
        crash_restarts = dict(Counter(str(e["device"]) for e in events
                                      if e.get("kind") == "restart" and e.get("device") is not None))
    result = audit(records, expected, crash_restarts=crash_restarts, allowed_gaps=allowed_gaps,
                   allow_duplicates=allow_duplicates, allowed_loss=allowed_loss)
    t0 = started_at if started_at is not None else scenario.get("started_at")
    if t0 is None:
        stamps = [r.received_at for r in records] + [r.sent_at for r in records if r.sent_at is not None]
        t0 = min(stamps) if stamps else 0.0
    t0 = float(t0)
    tl = _normalize_timeline(timeline)
    last = max([r.received_at - t0 for r in records] + [float(e.get("t", 0)) for e in events]
               + [p[0] for s in tl.values() for p in s] + [0.0])
    duration = float(duration_s if duration_s is not None else scenario.get("duration_s") or math.ceil(last))
    nsec = max(1, int(math.ceil(max(duration, last))))

    buckets: list[list[float]] = [[] for _ in range(nsec + 1)]
    counts = [0] * (nsec + 1)
    lat_all: list[float] = []
    for r in records:
        i = min(nsec, max(0, int(r.received_at - t0)))
        counts[i] += 1
        lat = _latency(r)
        if lat is not None and math.isfinite(lat):
            buckets[i].append(lat)
            lat_all.append(lat)
    series = {"t": list(range(nsec + 1)), "results_per_s": counts, "latency_p50_ms": [], "latency_p99_ms": []}
    for b in buckets:
        b.sort()
        series["latency_p50_ms"].append(_percentile(b, 50))
        series["latency_p99_ms"].append(_percentile(b, 99))

    kinds = Counter(str(e.get("kind", "?")) for e in events)
    windows = fault_windows(events, float(nsec))
    totals = result["totals"]
    summary = {
        "devices": totals["devices"],
        "results": totals["results"],
        "expected": totals["expected"],
        "lost": totals["lost"],
        "duplicates": totals["duplicates"],
        "gaps": totals["gaps"],
        "unexplained_gaps": totals["unexplained_gaps"],
        "latency_ms": latency_stats(lat_all),
        "reconnects": kinds.get("reconnect", 0),
        "crashes": kinds.get("crash", 0),
        "outages": kinds.get("broker_outage", 0),
        "errors": totals["errors"],
        "errors_by_code": totals["errors_by_code"],
        "duration_s": duration,
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario,
        "started_at": t0,
        "verdict": {"passed": result["passed"], "reasons": result["reasons"], "notes": result["notes"]},
        "summary": summary,
        "audit": result["devices"],
        "events": events,
        "event_counts": dict(sorted(kinds.items())),
        "fault_windows": windows,
        "series": series,
        "timeline": tl,
        "latency_histogram": _log_histogram(lat_all),
        "plots": list(PLOTS) + (["timeline"] if any(tl.values()) else []),
    }
    report = json.loads(json.dumps(report, default=_json_default, allow_nan=False))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


def _json_default(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)  # type: ignore[arg-type]
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return str(o)


def _log_histogram(values: Sequence[float], per_decade: int = 5) -> dict:
    """Counts in log-spaced bins (edges in ms); values <= 0 land in the first bin."""
    pos = [v for v in values if v > 0]
    if not values:
        return {"edges": [], "counts": []}
    lo = math.floor(math.log10(min(pos))) if pos else 0
    hi = math.ceil(math.log10(max(pos))) if pos else 1
    hi = max(hi, lo + 1)
    edges = [10 ** (lo + i / per_decade) for i in range((hi - lo) * per_decade + 1)]
    counts = [0] * (len(edges) - 1)
    for v in values:
        if v <= edges[0]:
            i = 0
        else:
            i = min(len(counts) - 1, int((math.log10(v) - lo) * per_decade))
            while i > 0 and v <= edges[i]:
                i -= 1
            while i < len(counts) - 1 and v > edges[i + 1]:
                i += 1
        counts[i] += 1
    return {"edges": edges, "counts": counts}


# --------------------------------------------------------------------------------------------------
# terminal summary
# --------------------------------------------------------------------------------------------------
def _fmt(v: object, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_summary(report: dict) -> str:
    """The report's verdict and summary as plain-text tables for the terminal."""
    s = report["summary"]
    lat = s["latency_ms"]
    v = report["verdict"]
    rows = [
        ("devices", s["devices"]), ("results", s["results"]), ("expected", _fmt(s["expected"])),
        ("lost", _fmt(s["lost"])), ("duplicates", s["duplicates"]), ("seq gaps", s["gaps"]),
        ("unexplained gaps", s["unexplained_gaps"]),
        ("latency p50 ms", _fmt(lat["p50"])), ("latency p95 ms", _fmt(lat["p95"])),
        ("latency p99 ms", _fmt(lat["p99"])), ("latency max ms", _fmt(lat["max"])),
        ("reconnects", s["reconnects"]), ("crashes", s["crashes"]), ("broker outages", s["outages"]),
        ("errors", s["errors"]), ("duration s", _fmt(s["duration_s"])),
    ]
    name = report.get("scenario", {}).get("name", "scenario")
    out = [f"{name}: {'PASS' if v['passed'] else 'FAIL'}", format_table(["metric", "value"], rows)]
    if s["errors_by_code"]:
        out += ["", format_table(["error code", "count"], sorted(s["errors_by_code"].items()))]
    bad = [(dev, d) for dev, d in report["audit"].items()
           if d["lost"] or d["duplicates"] or d["unexplained_gaps"]]
    if bad:
        bad.sort(key=lambda x: -((x[1]["lost"] or 0) + x[1]["duplicates"] + x[1]["unexplained_gaps"]))
        out += ["", format_table(["device", "results", "lost", "duplicates", "gaps", "restarts"], [
            (dev, d["count"], _fmt(d["lost"]), d["duplicates"], d["gap_count"], d["crash_restarts"])
            for dev, d in bad[:20]])]
        if len(bad) > 20:
            out.append(f"... {len(bad) - 20} more devices with problems (see report.json)")
    for title, lines in (("reasons", v["reasons"]), ("notes", v.get("notes", []))):
        if lines:
            out += ["", f"{title}:"] + [f"  - {r}" for r in lines[:20]]
            if len(lines) > 20:
                out.append(f"  ... {len(lines) - 20} more")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# SVG plotting: a compact helper, enough for axes, ticks, lines, bars, markers and shaded windows
# --------------------------------------------------------------------------------------------------
def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    if raw < 1e-300:  # denormal ranges: one tick at each end is all a reader needs
        return [lo, hi]
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}" if abs(v) < 0.01 else f"{v:,.0f}"
    return f"{v:g}"


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
FAULT_COLORS = {"broker_outage": "#d62728", "latency": "#ff7f0e", "loss": "#9467bd", "jitter": "#bcbd22",
                "partition": "#8c564b"}


class Chart:
    """One SVG chart: data coordinates mapped into a plot area with axes, ticks and labels."""

    def __init__(self, title: str, x_range: tuple[float, float], y_range: tuple[float, float], *,
                 xlabel: str = "", ylabel: str = "", log_x: bool = False, width: int = 760,
                 height: int = 260) -> None:
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.w, self.h, self.log_x = width, height, log_x
        self.ml, self.mr, self.mt, self.mb = 64, 16, 28, 42
        x0, x1 = x_range
        if log_x:
            x0, x1 = math.log10(max(x0, 1e-9)), math.log10(max(x1, 1e-9))
        if x1 <= x0:
            x1 = x0 + 1
        y0, y1 = y_range
        if y1 <= y0:
            y1 = y0 + 1
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        self.parts: list[str] = []
        self.legend: list[tuple[str, str]] = []

    def px(self, x: float) -> float:
        if self.log_x:
            x = math.log10(max(x, 1e-9))
        return self.ml + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.ml - self.mr)

    def py(self, y: float) -> float:
        y = min(max(y, self.y0), self.y1)
        return self.h - self.mb - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.mt - self.mb)

    def shade(self, x0: float, x1: float, color: str, label: str = "") -> None:
        a, b = max(self.px(x0), self.ml), min(self.px(x1), self.w - self.mr)
        if b <= a:
            b = a + 1
        self.parts.append(f'<rect x="{a:.1f}" y="{self.mt}" width="{b - a:.1f}" height="{self.h - self.mt - self.mb}"'
                          f' fill="{_e(color)}" fill-opacity="0.15"><title>{_e(label)}</title></rect>')

    def line(self, xs: Sequence[float], ys: Sequence[float | None], color: str, label: str = "") -> None:
        segs: list[list[str]] = [[]]
        for x, y in zip(xs, ys):
            if y is None:
                if segs[-1]:
                    segs.append([])
                continue
            segs[-1].append(f"{self.px(x):.1f},{self.py(y):.1f}")
        for s in segs:
            if len(s) == 1:
                cx, cy = s[0].split(",")
                self.parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{_e(color)}"/>')
            elif s:
                self.parts.append(f'<polyline fill="none" stroke="{_e(color)}" stroke-width="1.5" '
                                  f'points="{" ".join(s)}"/>')
        if label:
            self.legend.append((label, color))

    def bars(self, lefts: Sequence[float], rights: Sequence[float], heights: Sequence[float], color: str,
             label: str = "", titles: Sequence[str] | None = None) -> None:
        base = self.py(self.y0)
        for i, (a, b, v) in enumerate(zip(lefts, rights, heights)):
            if not v:
                continue
            xa, xb = self.px(a), self.px(b)
            top = self.py(v)
            tip = f"<title>{_e(titles[i])}</title>" if titles else ""
            self.parts.append(f'<rect x="{xa:.1f}" y="{top:.1f}" width="{max(0.8, xb - xa - 0.5):.1f}" '
                              f'height="{max(0.0, base - top):.1f}" fill="{_e(color)}">{tip}</rect>')
        if label:
            self.legend.append((label, color))

    def marker(self, x: float, y: float, color: str, title: str = "") -> None:
        self.parts.append(f'<rect x="{self.px(x) - 1:.1f}" y="{self.py(y) - 6:.1f}" width="2" height="12" '
                          f'fill="{_e(color)}"><title>{_e(title)}</title></rect>')

    def text(self, x: float, y: float, s: str, anchor: str = "start") -> None:
        self.parts.append(f'<text x="{self.px(x):.1f}" y="{self.py(y) + 4:.1f}" font-size="11" '
                          f'text-anchor="{_e(anchor)}">{_e(s)}</text>')

    def render(self, y_ticks: list[tuple[float, str]] | None = None) -> str:
        w, h, ml, mr, mt, mb = self.w, self.h, self.ml, self.mr, self.mt, self.mb
        out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
               f'role="img" aria-label="{_e(self.title)}" font-family="sans-serif">',
               f'<text x="{ml}" y="16" font-size="13" font-weight="bold">{_e(self.title)}</text>']
        out += self.parts
        out.append(f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="#333"/>')
        out.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="#333"/>')
        if self.log_x:
            xt = [10 ** e for e in range(math.floor(self.x0), math.ceil(self.x1) + 1)]
        else:
            xt = _nice_ticks(self.x0, self.x1, 8)
        for t in xt:
            x = self.px(t)
            if ml - 0.5 <= x <= w - mr + 0.5:
                out.append(f'<line x1="{x:.1f}" y1="{h - mb}" x2="{x:.1f}" y2="{h - mb + 4}" stroke="#333"/>'
                           f'<text x="{x:.1f}" y="{h - mb + 16}" font-size="10" text-anchor="middle">'
                           f'{_e(_tick_label(t))}</text>')
        for t, lab in (y_ticks if y_ticks is not None else [(t, _tick_label(t)) for t in
                                                            _nice_ticks(self.y0, self.y1, 5)]):
            y = self.py(t)
            out.append(f'<line x1="{ml - 4}" y1="{y:.1f}" x2="{w - mr}" y2="{y:.1f}" stroke="#ddd"/>'
                       f'<text x="{ml - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{_e(lab)}</text>')
        if self.xlabel:
            out.append(f'<text x="{(ml + w - mr) / 2:.0f}" y="{h - 6}" font-size="11" text-anchor="middle">'
                       f'{_e(self.xlabel)}</text>')
        if self.ylabel:
            out.append(f'<text x="12" y="{(mt + h - mb) / 2:.0f}" font-size="11" text-anchor="middle" '
                       f'transform="rotate(-90 12 {(mt + h - mb) / 2:.0f})">{_e(self.ylabel)}</text>')
        lx = w - mr
        for label, color in reversed(self.legend):
            tw = 7 * len(label) + 18
            lx -= tw
            out.append(f'<rect x="{lx:.0f}" y="7" width="10" height="10" fill="{_e(color)}"/>'
                       f'<text x="{lx + 13:.0f}" y="16" font-size="11">{_e(label)}</text>')
        out.append("</svg>")
        return "\n".join(out)


def _shade_faults(chart: Chart, windows: Sequence[dict]) -> None:
    for wdw in windows:
        chart.shade(wdw["start"], wdw["end"], FAULT_COLORS.get(wdw["kind"], "#7f7f7f"), wdw["label"])


def _plot_latency_over_time(rep: dict) -> str:
    s = rep["series"]
    vals = [v for v in s["latency_p50_ms"] + s["latency_p99_ms"] if v is not None]
    c = Chart("Latency over time (per-second p50 / p99; shaded: injected faults)", (0, max(1, s["t"][-1])),
              (0, max(vals) * 1.05 if vals else 1), xlabel="seconds since start", ylabel="latency ms")
    _shade_faults(c, rep["fault_windows"])
    c.line(s["t"], s["latency_p50_ms"], PALETTE[0], "p50")
    c.line(s["t"], s["latency_p99_ms"], PALETTE[1], "p99")
    return c.render()


def _plot_latency_histogram(rep: dict) -> str:
    hist = rep["latency_histogram"]
    edges, counts = hist["edges"], hist["counts"]
    if not counts:
        c = Chart("Latency histogram (no latencies recorded)", (1, 10), (0, 1), log_x=True, xlabel="latency ms")
        return c.render()
    c = Chart("Latency histogram (log bins)", (edges[0], edges[-1]), (0, max(counts) * 1.05), log_x=True,
              xlabel="latency ms", ylabel="results")
    c.bars(edges[:-1], edges[1:], counts, PALETTE[0],
           titles=[f"{a:.3g}-{b:.3g} ms: {n}" for a, b, n in zip(edges[:-1], edges[1:], counts)])
    lat = rep["summary"]["latency_ms"]
    for key, color in (("p50", PALETTE[2]), ("p99", PALETTE[1])):
        if lat.get(key):
            x = lat[key]
            c.parts.append(f'<line x1="{c.px(x):.1f}" y1="{c.mt}" x2="{c.px(x):.1f}" y2="{c.h - c.mb}" '
                           f'stroke="{color}" stroke-dasharray="4 3"><title>{_e(key)} = {x:.1f} ms</title></line>')
            c.legend.append((f"{key} {x:.0f} ms", color))
    return c.render()


def _plot_throughput(rep: dict) -> str:
    s = rep["series"]
    c = Chart("Throughput (results/s; shaded: injected faults)", (0, max(1, s["t"][-1] + 1)),
              (0, max(s["results_per_s"] + [1]) * 1.05), xlabel="seconds since start", ylabel="results/s")
    c.bars(s["t"], [t + 1 for t in s["t"]], s["results_per_s"], PALETTE[0], "results/s",
           titles=[f"{t}s: {n} results" for t, n in zip(s["t"], s["results_per_s"])])
    _shade_faults(c, rep["fault_windows"])  # over the bars: they would hide it
    return c.render()


def _plot_timeline(rep: dict) -> str:
    """The series the simulator sampled (connected devices, inflight, ...), on one shared axis."""
    tl = {k: v for k, v in sorted(rep["timeline"].items()) if v}
    peak = max((p[1] for pts in tl.values() for p in pts), default=1.0)
    c = Chart("Simulator timeline (shaded: injected faults)", (0, max(1, rep["series"]["t"][-1] + 1)),
              (min(0.0, min((p[1] for pts in tl.values() for p in pts), default=0.0)), peak * 1.05),
              xlabel="seconds since start")
    _shade_faults(c, rep["fault_windows"])
    for i, (name, pts) in enumerate(tl.items()):
        c.line([p[0] for p in pts], [p[1] for p in pts], PALETTE[i % len(PALETTE)], name)
    return c.render()


def _plot_per_device(rep: dict) -> str:
    """A strip of cells, one per device: colour says ok / duplicates / gaps / lost; hover for numbers."""
    devs = list(rep["audit"].items())
    n = max(1, len(devs))
    cols = min(n, 50)
    rows = math.ceil(n / cols)
    cell = max(8, min(28, 720 // cols))
    w = 64 + cols * cell + 16
    h = 40 + rows * cell + 30
    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
           f'aria-label="per-device audit" font-family="sans-serif">',
           '<text x="64" y="16" font-size="13" font-weight="bold">Per device: lost / duplicates / gaps '
           '(one cell per device, hover for details)</text>']
    for i, (dev, d) in enumerate(devs):
        x, y = 64 + (i % cols) * cell, 28 + (i // cols) * cell
        if d["lost"]:
            color = "#d62728"
        elif d["duplicates"]:
            color = "#ff7f0e"
        elif d["unexplained_gaps"]:
            color = "#9467bd"
        elif d["gap_count"]:
            color = "#bcbd22"
        else:
            color = "#2ca02c"
        tip = (f"{dev}: {d['count']} results, lost {_fmt(d['lost'])}, duplicates {d['duplicates']}, "
               f"gaps {d['gap_count']} ({d['unexplained_gaps']} unexplained), restarts {d['crash_restarts']}, "
               f"errors {d['errors']}")
        out.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{color}">'
                   f'<title>{_e(tip)}</title></rect>')
    ly = 28 + rows * cell + 16
    lx = 64
    for label, color in (("ok", "#2ca02c"), ("lost", "#d62728"), ("duplicates", "#ff7f0e"),
                         ("unexplained gap", "#9467bd"), ("crash gap", "#bcbd22")):
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 13}" y="{ly}" font-size="11">{_e(label)}</text>')
        lx += 7 * len(label) + 30
    out.append("</svg>")
    return "\n".join(out)


def _plot_events(rep: dict, max_markers: int = 200) -> str:
    """One row per event kind: ticks at each event, bars for events with a duration. A kind with more
    than max_markers point events (a thousand devices reconnecting) is drawn as per-second counts."""
    events = rep["events"]
    kinds = sorted({str(e.get("kind", "?")) for e in events}) or ["(no events)"]
    end = max(1, rep["series"]["t"][-1] + 1)
    c = Chart("Events over time (reconnects, crashes, faults)", (0, end), (-0.5, len(kinds) - 0.5),
              xlabel="seconds since start", height=max(140, 60 + 26 * len(kinds)))
    c.ml = max(c.ml, 12 + 7 * max(len(k) for k in kinds))
    row = {k: i for i, k in enumerate(reversed(kinds))}
    points: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        k = str(e.get("kind", "?"))
        t = float(e.get("t", 0))
        color = FAULT_COLORS.get(k, PALETTE[row[k] % len(PALETTE)])
        if e.get("duration_s"):
            a, b = c.px(t), c.px(t + float(e["duration_s"]))
            c.parts.append(f'<rect x="{a:.1f}" y="{c.py(row[k]) - 7:.1f}" width="{max(1.0, b - a):.1f}" '
                           f'height="14" fill="{color}" fill-opacity="0.5"><title>{_e(_event_label(e))}</title></rect>')
        else:
            points[k].append(e)
    for k, evs in points.items():
        color = FAULT_COLORS.get(k, PALETTE[row[k] % len(PALETTE)])
        if len(evs) <= max_markers:
            for e in evs:
                c.marker(float(e.get("t", 0)), row[k], color, _event_label(e))
            continue
        per_s = Counter(int(float(e.get("t", 0))) for e in evs)
        peak = max(per_s.values())
        base = c.py(row[k]) + 8
        for sec, n in sorted(per_s.items()):
            hgt = 2 + 14 * n / peak
            a, b = c.px(sec), c.px(sec + 1)
            c.parts.append(f'<rect x="{a:.1f}" y="{base - hgt:.1f}" width="{max(1.0, b - a - 0.5):.1f}" '
                           f'height="{hgt:.1f}" fill="{color}"><title>{_e(k)}: {n} in second {sec}</title></rect>')
    counts = rep["event_counts"]
    return c.render(y_ticks=[(row[k], f"{k} ({counts.get(k, 0)})") for k in kinds])


def _html_list(lines: Sequence[str], limit: int = 200) -> str:
    if not lines:
        return ""
    items = "".join(f"<li>{_e(r)}</li>" for r in lines[:limit])
    if len(lines) > limit:
        items += f"<li>… {len(lines) - limit} more (see report.json)</li>"
    return f"<ul>{items}</ul>"


def render_html(report: dict) -> str:
    """The self-contained HTML page (inline CSS and SVG, no scripts, no external resources)."""
    s = report["summary"]
    v = report["verdict"]
    lat = s["latency_ms"]
    name = report["scenario"].get("name", "scenario") if isinstance(report["scenario"], dict) else "scenario"
    verdict = "PASS" if v["passed"] else "FAIL"
    rows = [("devices", s["devices"]), ("results", s["results"]), ("expected inputs", _fmt(s["expected"])),
            ("lost", _fmt(s["lost"])), ("duplicates", s["duplicates"]), ("seq gaps (unexplained)",
            f"{s['gaps']} ({s['unexplained_gaps']})"), ("latency p50 / p95 / p99 / max ms",
            " / ".join(_fmt(lat[k]) for k in ("p50", "p95", "p99", "max"))), ("reconnects", s["reconnects"]),
            ("crashes", s["crashes"]), ("broker outages", s["outages"]), ("errors", s["errors"]),
            ("duration s", _fmt(s["duration_s"]))]
    table = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(val)}</td></tr>" for k, val in rows)
    errs = "".join(f"<tr><td>{_e(k)}</td><td>{_e(n)}</td></tr>" for k, n in s["errors_by_code"].items())
    reasons, notes = _html_list(v["reasons"]), _html_list(v.get("notes", []))
    scen = _e(json.dumps(report["scenario"], indent=1, sort_keys=True, default=str))
    plots = {"latency_over_time": _plot_latency_over_time, "latency_histogram": _plot_latency_histogram,
             "throughput": _plot_throughput, "per_device": _plot_per_device, "events": _plot_events,
             "timeline": _plot_timeline}
    svgs = "\n".join(f'<figure id="{_e(p)}">{plots[p](report)}</figure>' for p in report["plots"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(name)}: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 820px; }}
h1 .pass {{ color: #2ca02c; }} h1 .fail {{ color: #d62728; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
td {{ font-variant-numeric: tabular-nums; }}
figure {{ margin: 1em 0; }} pre {{ background: #f6f6f6; padding: 0.6em; overflow-x: auto; }}
</style></head><body>
<h1>{_e(name)}: <span class="{verdict.lower()}">{verdict}</span></h1>
{reasons or "<p>No lost inputs, no duplicates, no unexplained seq gaps.</p>"}
{f"<h3>Tolerated</h3>{notes}" if notes else ""}
<h2>Summary</h2>
<table>{table}</table>
{f"<h3>Errors by code</h3><table><tr><th>code</th><th>count</th></tr>{errs}</table>" if errs else ""}
<h2>Plots</h2>
{svgs}
<h2>Scenario</h2>
<pre>{scen}</pre>
</body></html>
"""
