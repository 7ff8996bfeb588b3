"""Keyword-spotting benchmark: per-window latency (features + invoke, p50/p95) and the real-time factor of
streaming a 60 s recording, float32 vs int8 package of the same trained model, side by side.

Host script (trains with TensorFlow when no packages are given). Variants run interleaved round by round,
so drift on a shared machine hits both alike.

    .venv/bin/python benchmarks/bench_kws.py [--workdir DIR] [--int8 PKG --float PKG] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, which puts the repo root on sys.path

import numpy as np  # noqa: E402
from _common import loadavg, machine, say  # noqa: E402

from edge_slm import runtime  # noqa: E402
from edge_slm.audio import resample  # noqa: E402
from edge_slm.kws import KeywordSpotter  # noqa: E402
from edge_slm.package import ModelPackage  # noqa: E402
from edge_slm.streams import AudioBlock  # noqa: E402
from edge_slm.table import format_table  # noqa: E402


def build_packages(work: Path) -> tuple[Path, Path]:
    """Train once, convert the same model to int8 and float32 packages."""
    from converters.convert import convert_model
    from converters.kws import build_keyword_package

    say(f"training a keyword model in {work} (a few minutes) ...")
    res = build_keyword_package(work / "kws-int8", work_dir=work / "train", say=say)
    pkg = ModelPackage.open(res.package)
    convert_model(res.keras_model, work / "kws-float32", calib=res.calib, eval_data=res.eval_data,
                  quantize="float32", task="keyword-spotting", labels=res.labels, preprocessing=pkg.preprocessing,
                  name="keywords-float32", progress=False)
    return res.package, work / "kws-float32"


def recording(work: Path, seconds: float) -> tuple[np.ndarray, int]:
    """The recording (held-out voices) and how many commands it holds."""
    from converters.datasets.keywords import make_recording

    rec = make_recording(work / "speech", duration_s=seconds, seed=11)
    return rec.samples, len(rec.commands)


def window_latency(task: KeywordSpotter, audio: np.ndarray, n: int) -> dict[str, float]:
    """Time features of one clip + one model call, n times over different 1 s windows."""
    clip = task.clip_samples
    starts = np.linspace(0, len(audio) - clip, n).astype(int)
    feats_ms, invoke_ms = [], []
    for s in starts:
        t0 = time.perf_counter()
        f = task.front_end.features(audio[s:s + clip])
        t1 = time.perf_counter()
        task._posteriors(f)  # noqa: SLF001 - the model call alone
        t2 = time.perf_counter()
        feats_ms.append((t1 - t0) * 1e3)
        invoke_ms.append((t2 - t1) * 1e3)
    total = np.add(feats_ms, invoke_ms)
    return {"features_p50": float(np.percentile(feats_ms, 50)), "invoke_p50": float(np.percentile(invoke_ms, 50)),
            "window_p50": float(np.percentile(total, 50)), "window_p95": float(np.percentile(total, 95))}


def stream_rtf(task: KeywordSpotter, audio: np.ndarray, rate: int, block_ms: float) -> tuple[float, int]:
    step = int(rate * block_ms / 1000)
    task.reset()
    found = 0
    t0 = time.perf_counter()
    for i in range(0, len(audio), step):
        found += len(task.feed(AudioBlock(audio[i:i + step], rate, t0=i / rate, stream="bench")))
    found += len(task.flush())
    return (time.perf_counter() - t0) / (len(audio) / rate), found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "edge-slm-bench-kws"),
                    help="packages and speech cache (reused by the next run)")
    ap.add_argument("--int8", help="an int8 keyword package (default: train one in --workdir)")
    ap.add_argument("--float", dest="float_pkg", help="the float32 package of the same model")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the streamed recording")
    ap.add_argument("--windows", type=int, default=300, help="windows timed per round for the latency")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="interpreter threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    info = machine(packages=("numpy", "ai-edge-litert"), host=("platform",))
    if args.int8 and args.float_pkg:
        int8_dir, float_dir = Path(args.int8), Path(args.float_pkg)
    elif (work / "kws-int8").is_dir() and (work / "kws-float32").is_dir():
        int8_dir, float_dir = work / "kws-int8", work / "kws-float32"
    else:
        int8_dir, float_dir = build_packages(work)
    audio, n_commands = recording(work, args.seconds)
    variants = {}
    for name, d in (("float32", float_dir), ("int8", int8_dir)):
        pkg = ModelPackage.open(d)
        variants[name] = (pkg, KeywordSpotter(pkg, runtime.load(pkg.model_path, threads=args.threads)))
    audio_44k = resample(audio, 16000, 44100)
    results: dict[str, dict[str, list[float]]] = {n: {} for n in variants}
    found: dict[str, int] = {}
    for r in range(args.rounds):
        say(f"round {r + 1}/{args.rounds}")
        for name, (_, task) in variants.items():
            for k, v in window_latency(task, audio, args.windows).items():
                results[name].setdefault(k, []).append(v)
            for label, (x, rate, block) in {"rtf_16k_100ms": (audio, 16000, 100), "rtf_16k_10ms": (audio, 16000, 10),
                                            "rtf_44k1_100ms": (audio_44k, 44100, 100)}.items():
                rtf, n = stream_rtf(task, x, rate, block)
                results[name].setdefault(label, []).append(rtf)
                found[f"{name}/{label}"] = n
    rows = []
    for name, (pkg, _task) in variants.items():
        med = {k: float(np.median(v)) for k, v in results[name].items()}
        v = pkg.manifest["validation"]
        # held-out-voice accuracy: the kws number, else convert_model's own on the same eval set
        acc = v.get("heldout_voice_accuracy", {}).get("int8", v["quantized"].get("accuracy_quantized", "-"))
        rows.append([name, round(pkg.model_path.stat().st_size / 1024, 1), f"{med['features_p50']:.3f}",
                     f"{med['invoke_p50']:.3f}", f"{med['window_p50']:.3f}", f"{med['window_p95']:.3f}",
                     f"{med['rtf_16k_100ms']:.4f}", f"{med['rtf_16k_10ms']:.4f}", f"{med['rtf_44k1_100ms']:.4f}",
                     found[f"{name}/rtf_16k_100ms"], acc])
    info["loadavg_end"] = loadavg()
    if args.json:
        print(json.dumps({"machine": info, "settings": variants["int8"][1].settings(), "rows": rows,
                          "raw": results}, indent=2))
        return 0
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_end']}, Python {info['python']}, "
          f"numpy {info['numpy']}, ai-edge-litert {info['ai-edge-litert']}, threads {args.threads}")
    s = variants["int8"][1].settings()
    print(f"stream: {args.seconds:g} s espeak-ng recording with {n_commands} commands, stride {s['stride_ms']:g} ms, smoothing "
          f"{s['smoothing_ms']:g} ms; medians of {args.rounds} interleaved rounds, {args.windows} windows each\n")
    print(format_table(["model", "KiB", "features ms p50", "invoke ms p50", "window ms p50", "window ms p95",
                        "RTF 16k/100ms", "RTF 16k/10ms", "RTF 44.1k/100ms", "detections", "held-out acc"], rows))
    print("\nRTF = processing time / audio time while streaming (features every hop, a model call every stride; "
          "44.1k includes resampling).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
