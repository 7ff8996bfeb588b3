"""Size / latency / accuracy report over model candidates (teacher, student, pruned, each quantization recipe).

Host only (TensorFlow via converters.tf_env for params and conversion); measures through edge_slm.runtime.
Writes report.json, report.md and a hand-written tradeoff.svg (no matplotlib).

Latency is measured side by side in one run: the candidates' interpreters are loaded together and
invoked in interleaved rounds (one invoke each per round), so machine load affects all of them alike;
the report gives the median (p50) and p90 per candidate, with the machine's CPU and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.errors import ConfigError, ConversionError

EXAMPLE = """example:
  python -m converters.size_report --report out/ --calib calib.npz --eval eval.npz --teacher teacher \\
      --candidate teacher=teacher.keras --candidate student=student.keras --candidate pruned=pruned.keras \\
      --recipes float32,dynamic,int8 --max-kib 100 --min-accuracy 0.9
then convert the chosen one with the command the report prints (edge-slm convert ...).
"""


@dataclass
class Candidate:
    """One model to compare. TFLITE: converted bytes (or a .tflite path); None converts KERAS_PATH with RECIPE."""

    name: str
    keras_path: str | Path | None = None
    recipe: str = "float32"
    tflite: bytes | str | Path | None = None
    params: int | None = None


def candidates_from_conversion(name: str, keras_path: str | Path, result: Any) -> list[Candidate]:
    """One candidate per converted attempt of a convert_model ConversionResult (recipes that converted)."""
    out = []
    for a in getattr(result, "attempts", []) or []:
        if a.model_bytes and not a.error:
            out.append(Candidate(f"{name}/{a.recipe}", keras_path, a.recipe, a.model_bytes))
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()]}


def _tflite_bytes(c: Candidate, calib: np.ndarray | None) -> tuple[bytes, int | None]:
    params = c.params
    if c.tflite is not None:
        data = c.tflite if isinstance(c.tflite, bytes) else Path(c.tflite).read_bytes()
        if params is None and c.keras_path is not None:
            params = _params(c.keras_path)
        return data, params
    if c.keras_path is None:
        raise ConfigError(f"candidate {c.name}: give a .keras path or converted TFLite bytes")
    from converters import recipes
    from converters.source_model import source_from_keras
    from converters.tf_env import silenced, tf

    p = Path(c.keras_path)
    if not p.is_file():
        raise ConfigError(f"candidate {c.name}: model file not found: {p}")
    model = tf().keras.models.load_model(p, compile=False)
    with silenced():
        data = recipes.convert(source_from_keras(model, p), c.recipe, None if calib is None else [calib])
    return data, params if params is not None else _count(model)


def _count(model: Any) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


def _params(path: str | Path) -> int | None:
    from converters.tf_env import tf

    try:
        return _count(tf().keras.models.load_model(Path(path), compile=False))
    except Exception:  # a report row without a param count is still useful
        return None


def _predict(m: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(m.run(x[i:i + 1])[0]).reshape(1, -1) for i in range(len(x))])


def measure(models: dict[str, bytes], sample: np.ndarray, runs: int = 200, warmup: int = 10,
            threads: int = 1) -> dict[str, dict[str, float]]:
    """Interleaved side-by-side latency of each TFLite model on one input: {name: {p50_ms, p90_ms, runs}}."""
    from edge_slm import runtime

    loaded = {n: runtime.load(content=b, threads=threads) for n, b in models.items()}
    x = sample[:1]
    for m in loaded.values():
        for _ in range(warmup):
            m.run(x)
    times: dict[str, list[float]] = {n: [] for n in loaded}
    for _ in range(runs):
        for n, m in loaded.items():
            t0 = time.perf_counter()
            m.run(x)
            times[n].append((time.perf_counter() - t0) * 1000.0)
    return {n: {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "runs": runs}
            for n, t in times.items()}


def pareto(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Names of rows not dominated in (smaller size, higher accuracy); sorted by size."""
    pts = [r for r in rows if r.get("accuracy") is not None]
    front = []
    for r in pts:
        dominated = any(o is not r and o["size_bytes"] <= r["size_bytes"] and o["accuracy"] >= r["accuracy"]
                        and (o["size_bytes"] < r["size_bytes"] or o["accuracy"] > r["accuracy"]) for o in pts)
        if not dominated:
            front.append(r)
    return [r["name"] for r in sorted(front, key=lambda r: (r["size_bytes"], -r["accuracy"]))]


def choose(rows: Sequence[dict[str, Any]], max_kib: float | None = None,
           min_accuracy: float | None = None) -> dict[str, Any] | None:
    """The best row under the constraints: with --max-kib the most accurate that fits (then smaller, faster);
    with only --min-accuracy the smallest that reaches it (then more accurate, faster). None if none fits."""
    ok = [r for r in rows if (max_kib is None or r["size_bytes"] / 1024 <= max_kib)
          and (min_accuracy is None or (r.get("accuracy") is not None and r["accuracy"] >= min_accuracy))]
    if not ok:
        return None
    if max_kib is not None or min_accuracy is None:
        return min(ok, key=lambda r: (-(r.get("accuracy") or 0.0), r["size_bytes"], r["latency_ms_p50"]))
    return min(ok, key=lambda r: (r["size_bytes"], -(r.get("accuracy") or 0.0), r["latency_ms_p50"]))


def convert_command(row: dict[str, Any], calib: str = "calib.npz", eval_path: str = "eval.npz") -> str | None:
    if not row.get("keras_path"):
        return None
    name = row["name"].replace("/", "-")
    return (f"edge-slm convert {row['keras_path']} -o {name}-pkg --quantize {row['recipe']} "
            f"--calib {calib} --eval {eval_path}")


def build_report(candidates: Sequence[Candidate], *, calib: np.ndarray | None, eval_data: tuple | None,
                 teacher: str | None = None, runs: int = 200, threads: int = 1, max_kib: float | None = None,
                 min_accuracy: float | None = None, calib_path: str = "calib.npz",
                 eval_path: str = "eval.npz") -> dict[str, Any]:
    """Convert (where needed), evaluate and time every candidate; returns the report dict."""
    from edge_slm import runtime

    if not candidates:
        raise ConfigError("no candidates to compare")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidate names must be unique: {names}")
    if teacher is not None and teacher not in names:
        raise ConfigError(f"--teacher {teacher!r} is not a candidate ({', '.join(names)})")
    blobs: dict[str, bytes] = {}
    rows = []
    for c in candidates:
        data, params = _tflite_bytes(c, calib)
        blobs[c.name] = data
        acc = None
        if eval_data is not None and eval_data[1] is not None:
            try:
                pred = np.argmax(_predict(runtime.load(content=data, threads=threads), np.asarray(eval_data[0])), -1)
            except Exception as exc:
                raise ConversionError(f"candidate {c.name}: the TFLite model does not run ({exc})") from exc
            acc = float(np.mean(pred == np.asarray(eval_data[1])))
        rows.append({"name": c.name, "keras_path": None if c.keras_path is None else str(c.keras_path),
                     "recipe": c.recipe, "params": params, "size_bytes": len(data),
                     "size_kib": round(len(data) / 1024, 1), "accuracy": acc})
    sample = np.asarray(eval_data[0] if eval_data is not None else calib)
    lat = measure(blobs, sample, runs=runs, threads=threads)
    t_acc = next((r["accuracy"] for r in rows if r["name"] == teacher), None) if teacher else None
    for r in rows:
        r["latency_ms_p50"] = round(lat[r["name"]]["p50_ms"], 4)
        r["latency_ms_p90"] = round(lat[r["name"]]["p90_ms"], 4)
        r["accuracy_vs_teacher"] = (None if t_acc is None or r["accuracy"] is None
                                    else round(r["accuracy"] - t_acc, 4))
    front = pareto(rows)
    for r in rows:
        r["pareto"] = r["name"] in front
    chosen = choose(rows, max_kib, min_accuracy)
    return {"machine": machine_info(), "latency_runs": runs, "threads": threads, "teacher": teacher,
            "constraint": {"max_kib": max_kib, "min_accuracy": min_accuracy},
            "candidates": rows, "pareto": front, "chosen": None if chosen is None else chosen["name"],
            "convert_command": None if chosen is None else convert_command(chosen, calib_path, eval_path)}


HEADERS = ["model", "recipe", "params", "TFLite KiB", "p50 ms", "accuracy", "vs teacher", "pareto"]


def _cells(r: dict[str, Any]) -> list[object]:
    acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    vs = "-" if r["accuracy_vs_teacher"] is None else f"{r['accuracy_vs_teacher'] * 100:+.1f} pt"
    return [r["name"], r["recipe"], r["params"] if r["params"] is not None else "-", f"{r['size_kib']:.1f}",
            f"{r['latency_ms_p50']:.3f}", acc, vs, "*" if r["pareto"] else ""]


def format_table(report: dict[str, Any]) -> str:
    """The report as a terminal table, then the machine line and the chosen candidate's convert command."""
    from edge_slm.table import format_table as table

    m = report["machine"]
    lines = [table(HEADERS, [_cells(r) for r in report["candidates"]]),
             f"latency: median of {report['latency_runs']} interleaved invokes, {report['threads']} thread(s); "
             f"{m['cpu']}, {m['cores']} cores, load {m['load_average']}"]
    lines.append(_chosen_line(report))
    return "\n".join(lines)


def _chosen_line(report: dict[str, Any]) -> str:
    c = report["constraint"]
    cons = ", ".join(f"{k} {v}" for k, v in (("max KiB", c["max_kib"]), ("min accuracy", c["min_accuracy"]))
                     if v is not None) or "no constraint"
    if report["chosen"] is None:
        return f"no candidate meets {cons}; relax --max-kib / --min-accuracy"
    cmd = report["convert_command"] or "(no .keras file for this candidate)"
    return f"chosen under {cons}: {report['chosen']}\n  {cmd}"


def format_markdown(report: dict[str, Any]) -> str:
    head = "| " + " | ".join(HEADERS + ["keras"]) + " |"
    sep = "|" + "|".join("---" for _ in range(len(HEADERS) + 1)) + "|"
    body = ["| " + " | ".join(str(v) for v in _cells(r) + [r["keras_path"] or "-"]) + " |"
            for r in report["candidates"]]
    m = report["machine"]
    return "\n".join(["# Size / latency / accuracy", "", head, sep, *body, "",
                      f"Latency: median of {report['latency_runs']} interleaved invokes per model in one run, "
                      f"{report['threads']} thread(s), {m['cpu']}, {m['cores']} cores, load {m['load_average']}.",
                      "", _chosen_line(report).replace("\n  ", "\n\n    "), "", "![tradeoff](tradeoff.svg)", ""])


def render_svg(report: dict[str, Any]) -> str:
    """Two panels: accuracy vs TFLite KiB (marker area ~ latency, Pareto front drawn) and accuracy vs latency."""
    from devices.report import PALETTE, Chart, _e

    rows = [r for r in report["candidates"] if r["accuracy"] is not None]
    if not rows:
        rows = report["candidates"]
    accs = [r["accuracy"] or 0.0 for r in rows]
    y0, y1 = min(accs), max(accs)
    pad = max(0.02, (y1 - y0) * 0.15)
    y_range = (max(0.0, y0 - pad), min(1.0, y1 + pad) if y1 + pad > y0 else y0 + 0.05)
    kib = [r["size_bytes"] / 1024 for r in rows]
    lat = [r["latency_ms_p50"] for r in rows]
    lmax = max(lat) or 1.0
    panels = []
    for key, xs, xlabel, title in (("size", kib, "TFLite size (KiB)", "accuracy vs size (marker area ~ latency)"),
                                   ("latency", lat, "latency p50 (ms)", "accuracy vs latency")):
        span = max(xs) - min(xs) or max(xs) or 1.0
        chart = Chart(title, (max(0.0, min(xs) - 0.15 * span), max(xs) + 0.25 * span), y_range,
                      xlabel=xlabel, ylabel="held-out accuracy", height=320)
        if key == "size":
            front = [r for name in report["pareto"] for r in rows if r["name"] == name]
            pts = " ".join(f"{chart.px(r['size_bytes'] / 1024):.1f},{chart.py(r['accuracy']):.1f}" for r in front)
            chart.parts.append(f'<polyline class="pareto" fill="none" stroke="#2ca02c" stroke-width="1.5" '
                               f'stroke-dasharray="4 3" points="{pts}"><title>Pareto front</title></polyline>')
            chart.legend.append(("Pareto front", "#2ca02c"))
        placed: list[tuple[float, float, float]] = []
        for i, (r, x) in enumerate(zip(rows, xs)):
            color = PALETTE[i % len(PALETTE)]
            radius = 3 + 7 * (r["latency_ms_p50"] / lmax) ** 0.5 if key == "size" else 4
            tip = (f"{r['name']}: {r['size_kib']} KiB, {r['latency_ms_p50']:.3f} ms, "
                   f"accuracy {r['accuracy'] if r['accuracy'] is not None else '-'}")
            chart.parts.append(f'<circle class="point" data-name="{_e(r["name"])}" cx="{chart.px(x):.1f}" '
                               f'cy="{chart.py(r["accuracy"] or 0.0):.1f}" r="{radius:.1f}" fill="{color}" '
                               f'fill-opacity="0.8" stroke="#333"><title>{_e(tip)}</title></circle>')
            lx, ly = chart.px(x) + radius + 2, chart.py(r["accuracy"] or 0.0) - 3
            width = 6 * len(r["name"])
            while any(abs(ly - py) < 11 and lx < px + pw and px < lx + width for px, py, pw in placed):
                ly += 11  # stack labels of nearby points instead of overprinting them
            placed.append((lx, ly, width))
            chart.parts.append(f'<text class="label" x="{lx:.1f}" y="{ly:.1f}" font-size="10">{_e(r["name"])}</text>')
        panels.append(chart.render())
    inner = "\n".join(f'<g class="panel" transform="translate(0,{i * 330})">{p}</g>' for i, p in enumerate(panels))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="760" height="{330 * len(panels)}" '
            f'viewBox="0 0 760 {330 * len(panels)}">\n{inner}\n</svg>\n')


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_markdown(report))
    (out / "tradeoff.svg").write_text(render_svg(report))
    return out


def _parse_candidate(spec: str, recipes: list[str]) -> list[Candidate]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--candidate {spec!r}: write NAME=PATH.keras (or NAME=PATH.tflite)")
    if path.endswith(".tflite"):
        return [Candidate(name, None, "as-given", Path(path))]
    if len(recipes) == 1:
        return [Candidate(name, path, recipes[0])]
    return [Candidate(f"{name}/{r}", path, r) for r in recipes]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--report", required=True, metavar="DIR", help="write report.json, report.md, tradeoff.svg here")
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=PATH",
                   help="a .keras (converted with each --recipes) or .tflite model; repeat")
    p.add_argument("--recipes", default="dynamic", help="comma-separated recipes for .keras candidates "
                   "(float32, dynamic, int8, float16, int8-float-attention)")
    p.add_argument("--calib", help="calibration .npz (key x) for int8 recipes")
    p.add_argument("--eval", required=True, help="held-out .npz with x and y")
    p.add_argument("--teacher", help="candidate name to compare accuracy against")
    p.add_argument("--max-kib", type=float, help="size constraint for the chosen model")
    p.add_argument("--min-accuracy", type=float, help="accuracy constraint for the chosen model")
    p.add_argument("--runs", type=int, default=200, help="timed invokes per model (default 200)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m converters.size_report", description=__doc__.splitlines()[0],
                                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    cands = [c for spec in args.candidate for c in _parse_candidate(spec, recipes)]
    ev = np.load(args.eval)
    calib = np.load(args.calib)["x"] if args.calib else None
    teacher = args.teacher
    if teacher and teacher not in [c.name for c in cands] and len(recipes) > 1:
        teacher = f"{teacher}/{recipes[0]}"
    rep = build_report(cands, calib=calib, eval_data=(ev["x"], ev["y"] if "y" in ev else None), teacher=teacher,
                       runs=args.runs, max_kib=args.max_kib, min_accuracy=args.min_accuracy,
                       calib_path=args.calib or "calib.npz", eval_path=args.eval)
    write_report(rep, args.report)
    print(format_table(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
