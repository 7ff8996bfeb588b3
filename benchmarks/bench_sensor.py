"""Sensor model benchmark: per-window latency (features + invoke) and windows/s, float32 vs int8, for the
vibration anomaly autoencoder and the fault classifier side by side.

Host script. Trains both models on simulated machines (converters.sensor_models), converts each to a
full-int8 package and a float32 package from the same Keras model, then times the device code path
(edge_slm.sensors features + edge_slm.runtime invoke, and the whole streaming task) on held-out
windows. Variants run interleaved round by round, so drift on the machine hits all of them alike.

    .venv/bin/python benchmarks/bench_sensor.py [--windows 400] [--rounds 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, which puts the repo root on sys.path

import numpy as np  # noqa: E402
from _common import loadavg, machine, say  # noqa: E402

from edge_slm import runtime  # noqa: E402
from edge_slm.package import ModelPackage  # noqa: E402
from edge_slm.sensor_tasks import SensorAnomalyDetector, SensorClassifier  # noqa: E402
from edge_slm.streams import SensorBlock  # noqa: E402
from edge_slm.table import format_table  # noqa: E402


def build_packages(work: Path, machines: int, normal_only: int, seed: int) -> tuple[dict[str, Path], Any]:
    """int8 packages from training, float32 packages converted from the same Keras models."""
    from converters import sensor_models
    from converters.convert import convert_model
    from converters.datasets import vibration

    say(f"simulating {machines} machines (+{normal_only} healthy) and training both models")
    data = sensor_models.prepare_data(vibration.make_dataset(machines, 4.0, seed=seed, normal_only=normal_only), seed=seed)
    ae = sensor_models.train_anomaly(data, work / "anomaly-int8", seed=seed, keras_out=work / "ae.keras", say=say)
    clf = sensor_models.train_classifier(data, work / "faults-int8", seed=seed, keras_out=work / "clf.keras", say=say)
    paths = {"anomaly int8": ae.path, "faults int8": clf.path}
    x_test = data.x("test")
    np.savez(work / "eval.npz", x=x_test, y=data.y("test"))
    np.savez(work / "eval_ae.npz", x=x_test)
    for name, pkg, keras_path, ev in (("anomaly", ae, work / "ae.keras", "eval_ae.npz"),
                                      ("faults", clf, work / "clf.keras", "eval.npz")):
        say(f"converting the {name} model to float32")
        res = convert_model(keras_path, work / f"{name}-float32", eval_data=work / ev, quantize="float32", task=pkg.task,
                            name=pkg.name, labels=pkg.labels or None, preprocessing=pkg.preprocessing, progress=False)
        paths[f"{name} float32"] = res.package.path
    return paths, data


def make_task(path: Path, threads: int) -> Any:
    pkg = ModelPackage.open(path)
    model = runtime.load(pkg.model_path, threads=threads)
    return (SensorAnomalyDetector if pkg.task == "sensor-anomaly" else SensorClassifier)(pkg, model)


def time_windows(task: Any, windows: np.ndarray) -> dict[str, list[float]]:
    """Per window: features ms, invoke ms (one at a time, as the device runs them)."""
    feats, invoke = [], []
    for w in windows:
        t0 = time.perf_counter()
        x = task.features(w)
        t1 = time.perf_counter()
        task.model.run(x[None, :])
        t2 = time.perf_counter()
        feats.append((t1 - t0) * 1e3)
        invoke.append((t2 - t1) * 1e3)
    return {"features": feats, "invoke": invoke, "total": [a + b for a, b in zip(feats, invoke)]}


def time_stream(task: Any, samples: np.ndarray, rate: float, channels: tuple[str, ...], block: int) -> tuple[int, float]:
    """The whole streaming task (windowing, checks, features, invoke, output dict): windows and seconds."""
    task.reset()
    n = 0
    t0 = time.perf_counter()
    for a in range(0, len(samples), block):
        n += len(task.feed(SensorBlock(samples[a:a + block], rate, channels, t0=a / rate)))
    return n, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=400, help="held-out windows timed per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads")
    ap.add_argument("--block", type=int, default=256, help="samples per block in the streaming measurement")
    ap.add_argument("--machines", type=int, default=30)
    ap.add_argument("--normal-only", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    mach = machine(packages=("numpy", "ai-edge-litert"))
    with tempfile.TemporaryDirectory() as tmp:
        paths, data = build_packages(Path(tmp), args.machines, args.normal_only, args.seed)
        variants = ["anomaly float32", "anomaly int8", "faults float32", "faults int8"]
        tasks = {v: make_task(paths[v], args.threads) for v in variants}
        sizes = {v: paths[v].joinpath("model.tflite").stat().st_size for v in variants}
        from converters.datasets import vibration

        test_ids = set(data.machine_ids("test"))
        recs = [r for r in vibration.make_dataset(args.machines, 4.0, seed=args.seed) if r.machine.machine_id in test_ids]
        any_task = tasks[variants[0]]
        windows = []
        for r in recs:
            for k in range(0, len(r.samples) - any_task.window + 1, any_task.hop):
                windows.append(r.samples[k:k + any_task.window])
        rng = np.random.default_rng(0)
        windows = np.stack(windows)[rng.permutation(len(windows))[: args.windows]]
        stream = np.concatenate([r.samples for r in recs[:6]])
        per: dict[str, dict[str, list[float]]] = {v: {"features": [], "invoke": [], "total": []} for v in variants}
        streamed: dict[str, list[float]] = {v: [] for v in variants}
        for t in tasks.values():  # warm-up: first invokes allocate
            time_windows(t, windows[:10])
        for rnd in range(args.rounds):
            say(f"round {rnd + 1}/{args.rounds}")
            for v in variants:
                for k, vals in time_windows(tasks[v], windows).items():
                    per[v][k] += vals
                n, secs = time_stream(tasks[v], stream, recs[0].sample_rate, recs[0].channels, args.block)
                streamed[v].append(n / secs)
        mach["loadavg_end"] = loadavg()

    rows, out = [], {"machine": mach, "windows": int(len(windows)), "rounds": args.rounds, "threads": args.threads,
                     "window_samples": any_task.window, "hop": any_task.hop, "results": {}}
    for v in variants:
        p = {k: (float(np.percentile(vals, 50)), float(np.percentile(vals, 95))) for k, vals in per[v].items()}
        wps = 1e3 / float(np.mean(per[v]["total"]))
        stream_wps = float(np.median(streamed[v]))
        out["results"][v] = {"size_bytes": sizes[v], "features_ms_p50": p["features"][0], "invoke_ms_p50": p["invoke"][0],
                             "invoke_ms_p95": p["invoke"][1], "total_ms_p50": p["total"][0], "total_ms_p95": p["total"][1],
                             "windows_per_s": wps, "stream_windows_per_s": stream_wps}
        rows.append([v, f"{sizes[v] / 1024:.1f}", f"{p['features'][0]:.3f}", f"{p['invoke'][0]:.4f}",
                     f"{p['invoke'][1]:.4f}", f"{p['total'][0]:.3f}", f"{p['total'][1]:.3f}", f"{wps:.0f}",
                     f"{stream_wps:.0f}"])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['machine']}, python {mach['python']}, "
          f"numpy {mach['numpy']}, ai-edge-litert {mach['ai-edge-litert']}")
    print(f"load average: start {mach['loadavg_start']}, end {mach['loadavg_end']}")
    print(f"{len(windows)} held-out windows of {any_task.window} samples x {len(any_task.channels)} channels "
          f"at {any_task.sample_rate:g} Hz, {args.rounds} rounds, {args.threads} thread(s); "
          f"stream: blocks of {args.block} samples, hop {any_task.hop}")
    print(format_table(["model", "KiB", "features ms p50", "invoke ms p50", "invoke ms p95", "total ms p50",
                        "total ms p95", "windows/s", "stream windows/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
