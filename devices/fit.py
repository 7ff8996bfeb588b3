"""`edge-slm fit`: does a model package fit a target device (RAM, storage, ops its runtime loads, latency)?

Reads the .tflite with firmware_bridge.tflite_flatbuffer; never imports TensorFlow or converters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.profiles import MIB, DeviceProfile, known_profiles, load_profile
from edge_slm.errors import ConfigError, ModelError
from edge_slm.package import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE
from edge_slm.table import format_table
from firmware_bridge import tflite_flatbuffer as tfl
from firmware_bridge import tflm_export

SCHEMA_VERSION = 1

# Linux, Python agent (measured here, x86_64, ai-edge-litert 2.3.0; see README "Agent RSS"):
#   the agent process with a small model loaded: 54.5 MiB RSS (python 10.7 + numpy 14.9 + ai_edge_litert
#   import 9.0 + paho, tokenizers, the agent itself);
#   one more Interpreter(model).allocate_tensors() for a 1.2 KB model: +2.9 MiB RSS (op registrations,
#   XNNPACK delegate, interpreter structs), the same in three runs. Counted once per package.
AGENT_BASELINE = int(54.5 * MIB)
INTERPRETER = int(2.9 * MIB)
# tokenizers.Tokenizer.from_file RSS delta, measured here: 9,159-byte tokenizer.json -> 1,868 KiB,
# 466,247 bytes -> 9,704 KiB: about 1.8 MiB + 17 bytes per byte of JSON.
TOKENIZER_BASE = int(1.8 * MIB)
TOKENIZER_PER_BYTE = 17
# TFLM: what the firmware itself needs besides the model (estimate: the TFLM interpreter with a dozen
# kernels builds to roughly 60-150 KB of flash for Cortex-M; 128 KiB assumed), and the arena margin
# edge-slm export-mcu adds by default.
TFLM_CODE = 128 * 1024
TFLM_ARENA_MARGIN = 0.25
# Latency: per-core throughput x cores, the extra cores counted at 75% (assumed: TFLite's thread pool and
# memory bandwidth); ARMv8.2 SDOT does 16 int8 MACs per 128-bit instruction where SMLAL/SMLAL2 do 8 per
# instruction pair step, so int8 throughput doubles on dotprod cores (the profile figure is without it).
PARALLEL_EFFICIENCY = 0.75
DOTPROD_FACTOR = 2.0
# Verdict thresholds: a Linux board shares RAM with the OS and other services.
RAM_WARN = 0.5
STORAGE_WARN = 0.8
LATENCY_WARN_MS = 1000.0

_MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D")
_INT_WEIGHTS = frozenset({"INT8", "UINT8", "INT4", "INT16"})


@dataclass
class FitReport:
    """What fit() found; `verdict` is "fits", "fits with warnings" or "does not fit"."""

    package: str
    name: str
    task: str
    recipe: str
    target: str
    profile: DeviceProfile
    ram: dict[str, int]  # component -> bytes
    ram_available: int
    storage: dict[str, int]
    storage_available: int
    ops: dict[str, int]  # op -> highest version the model uses
    incompatible: list[str]  # ops / versions the runtime cannot load, one line each
    macs: dict[str, dict[str, int]]  # subgraph -> {"int8": n, "float": n}
    latency_ms: dict[str, float]  # subgraph -> estimate
    verdict: str = "fits"
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.verdict != "does not fit"

    @property
    def ram_total(self) -> int:
        return sum(self.ram.values())

    @property
    def storage_total(self) -> int:
        return sum(self.storage.values())


# --- MACs -----------------------------------------------------------------------------------------------


def _elements(t: tfl.Tensor) -> int:
    n = 1
    for d in t.shape:
        n *= max(d, 1)
    return n


def op_macs(graph: tfl.SubGraph, op: tfl.Operator) -> int:
    """Multiply-accumulates one run of OP does, from its tensor shapes (0 for ops without a weight/matmul).

    FULLY_CONNECTED: output elements x K (weights [N, K]). CONV_2D: output elements x kh x kw x Cin
    (filter [Cout, kh, kw, Cin]). DEPTHWISE_CONV_2D: output elements x kh x kw (filter [1, kh, kw, C]).
    BATCH_MATMUL: output elements x the contracted dimension. TRANSPOSE_CONV: input elements x kh x kw x Cout.
    CONV_3D: output elements x kd x kh x kw x Cin (filter [kd, kh, kw, Cin, Cout]).
    """
    if op.name not in _MAC_OPS or not op.outputs or op.outputs[0] < 0:
        return 0
    t = graph.tensors
    out = t[op.outputs[0]]
    ins = [t[i] if i >= 0 else None for i in op.inputs]
    if op.name == "FULLY_CONNECTED" and len(ins) > 1 and ins[1] is not None:
        return _elements(out) * (ins[1].shape[-1] if ins[1].shape else 1)
    if op.name == "CONV_2D" and len(ins) > 1 and ins[1] is not None and len(ins[1].shape) == 4:
        _, kh, kw, cin = ins[1].shape
        return _elements(out) * kh * kw * cin
    if op.name == "DEPTHWISE_CONV_2D" and len(ins) > 1 and ins[1] is not None and len(ins[1].shape) == 4:
        return _elements(out) * ins[1].shape[1] * ins[1].shape[2]
    if op.name == "CONV_3D" and len(ins) > 1 and ins[1] is not None and len(ins[1].shape) == 5:
        kd, kh, kw, cin, _ = ins[1].shape
        return _elements(out) * kd * kh * kw * cin
    if op.name == "TRANSPOSE_CONV" and len(ins) > 2 and ins[1] is not None and ins[2] is not None \
            and len(ins[1].shape) == 4:
        cout, kh, kw, _ = ins[1].shape
        return _elements(ins[2]) * kh * kw * cout
    if op.name == "BATCH_MATMUL" and len(ins) > 1 and ins[0] is not None and len(ins[0].shape) >= 2:
        a = ins[0].shape
        # without adj_x, A is [..., M, K] and the output [..., M, N]; with it, A is [..., K, M]
        k = a[-1] if len(out.shape) >= 2 and a[-2] == out.shape[-2] else a[-2]
        return _elements(out) * k
    return 0


def _is_int8(model: tfl.TfliteModel, graph: tfl.SubGraph, op: tfl.Operator) -> bool:
    """Integer kernels: int8 activations, or int8 weights (dynamic-range ops quantize activations on the fly)."""
    ins = [graph.tensors[i] for i in op.inputs if i >= 0]
    if ins and ins[0].dtype in ("INT8", "UINT8", "INT16"):
        return True
    return any(t.dtype in _INT_WEIGHTS and model.is_constant(t) for t in ins[1:])


def count_macs(model: tfl.TfliteModel) -> dict[str, dict[str, int]]:
    """{subgraph name: {"int8": MACs, "float": MACs}} for one run of each subgraph."""
    out: dict[str, dict[str, int]] = {}
    for i, graph in enumerate(model.subgraphs):
        name = graph.name or f"subgraph{i}"
        if name in out:
            name = f"{name}#{i}"
        counts = {"int8": 0, "float": 0}
        for op in graph.operators:
            n = op_macs(graph, op)
            if n:
                counts["int8" if _is_int8(model, graph, op) else "float"] += n
        out[name] = counts
    return out


def throughput_gmacs(profile: DeviceProfile, int8: bool) -> float:
    """Effective GMAC/s on all of the profile's cores (one on MCUs: TFLM is single-threaded)."""
    per_core = profile.int8_gmacs_per_core if int8 else profile.float32_gmacs_per_core
    if int8 and profile.dotprod:
        per_core *= DOTPROD_FACTOR
    cores = 1 if profile.is_mcu else profile.cores
    return per_core * (1 + PARALLEL_EFFICIENCY * (cores - 1))


def estimate_latency_ms(macs: dict[str, int], profile: DeviceProfile) -> float:
    return (macs["int8"] / throughput_gmacs(profile, True) + macs["float"] / throughput_gmacs(profile, False)) / 1e6


# --- memory ---------------------------------------------------------------------------------------------


def _graph_model(model: tfl.TfliteModel, i: int) -> tfl.TfliteModel:
    """The model seen with subgraph I first: plan_arena and the TFLM overhead plan subgraph 0."""
    subgraphs = (model.subgraphs[i], *model.subgraphs[:i], *model.subgraphs[i + 1 :])
    return dataclasses.replace(model, subgraphs=subgraphs)


def activation_arena(model: tfl.TfliteModel) -> int:
    """Bytes of activations of every subgraph, each planned greedily like TFLite's arena planner (TFLite
    allocates one arena per subgraph, so a decoder's prefill and decode arenas add up)."""
    total = 0
    for i in range(len(model.subgraphs)):
        plan = tflm_export.plan_arena(_graph_model(model, i))
        total += max((b.offset + b.size for b in plan), default=0)
    return total


def tflm_arena(model: tfl.TfliteModel) -> int:
    """The tensor arena TFLM needs (as edge-slm export-mcu sizes it, margin included)."""
    total = 0
    for i in range(len(model.subgraphs)):
        m = _graph_model(model, i)
        plan = tflm_export.plan_arena(m)
        peak = max((b.offset + b.size for b in plan), default=0)
        head = max(peak, tflm_export._planning_scratch(m, len(plan)))  # noqa: SLF001 - same estimate as export-mcu
        total += head + sum(tflm_export._overhead(m).values())  # noqa: SLF001
    return int(total * (1 + TFLM_ARENA_MARGIN) + 15) // 16 * 16


def kv_cache_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of the k/v cache arrays a text-generation package's decode signature takes (the agent keeps
    one copy of each between tokens, besides the interpreter's own input and output tensors)."""
    decode = manifest.get("signatures", {}).get("decode", {})
    total = 0
    for t in decode.get("inputs", []):
        if t.get("name") in ("k_cache", "v_cache"):
            n = 1
            for d in t.get("shape", []):
                n *= max(int(d), 1)
            total += n * {"float32": 4, "float16": 2, "int8": 1, "int16": 2}.get(t.get("dtype", "float32"), 4)
    return total


# --- fit ------------------------------------------------------------------------------------------------


def _read_package(package_dir: Path) -> tuple[bytes, dict[str, Any]]:
    if package_dir.is_file() and package_dir.suffix == ".tflite":
        return package_dir.read_bytes(), {}
    model_path = package_dir / MODEL_FILE
    if not model_path.is_file():
        raise ModelError(f"{package_dir}: no {MODEL_FILE}; pass a package directory written by edge-slm convert")
    manifest: dict[str, Any] = {}
    if (package_dir / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((package_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"{package_dir / MANIFEST_FILE}: not JSON ({exc}); re-convert the package") from exc
    return model_path.read_bytes(), manifest


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fit(package_dir: str | Path, profile: DeviceProfile | str) -> FitReport:
    """Check PACKAGE_DIR (a model package or a .tflite) against PROFILE (a DeviceProfile or its name)."""
    if isinstance(profile, str):
        profile = load_profile(profile)
    package_dir = Path(package_dir)
    data, manifest = _read_package(package_dir)
    model = tfl.parse(data)
    ops = model.op_versions()
    macs = count_macs(model)
    report = FitReport(
        package=str(package_dir), name=str(manifest.get("name", package_dir.stem)), task=str(manifest.get("task", "?")),
        recipe=str(manifest.get("quantization", {}).get("recipe", "?")), target=profile.name, profile=profile,
        ram={}, ram_available=profile.ram_bytes, storage={}, storage_available=profile.storage_bytes, ops=ops,
        incompatible=profile.runtime_ops.problems(ops), macs=macs,
        latency_ms={k: round(estimate_latency_ms(v, profile), 3) for k, v in macs.items()},
    )
    tokenizer = package_dir / TOKENIZER_FILE if package_dir.is_dir() else None
    if profile.is_mcu:
        _fit_mcu(report, model, data, profile)
    else:
        report.ram["python agent (runtime, numpy, MQTT)"] = AGENT_BASELINE
        report.ram["interpreter"] = INTERPRETER
        report.ram["weights (model.tflite, mmapped)"] = len(data)
        report.ram["activation arena"] = activation_arena(model)
        kv = kv_cache_bytes(manifest)
        if kv:
            report.ram["KV cache (k + v, agent copy)"] = kv
        if tokenizer is not None and tokenizer.is_file():
            report.ram["tokenizer"] = TOKENIZER_BASE + TOKENIZER_PER_BYTE * tokenizer.stat().st_size
        report.storage["package"] = _dir_bytes(package_dir)
        report.storage[f"{profile.runtime} {profile.runtime_version}"] = int(profile.runtime_install_mb * 1e6)
    _verdict(report, profile)
    return report


def _fit_mcu(report: FitReport, model: tfl.TfliteModel, data: bytes, profile: DeviceProfile) -> None:
    report.ram["tensor arena (TFLM, +25% margin)"] = tflm_arena(model)
    report.storage["model (flash)"] = len(data)
    report.storage["TFLM + kernels (estimate)"] = TFLM_CODE
    problems = tflm_export._problems(model)  # noqa: SLF001 - the rules export-mcu applies
    unsupported = [p for p in problems if not p.startswith("unsupported ops")]  # ops come from the op table
    report.reasons += [f"TFLite Micro: {p}" for p in unsupported]
    if profile.sram_kb * 1024 < report.ram_total <= report.ram_available:
        report.warnings.append(f"the arena ({_mib(report.ram_total)}) is larger than SRAM ({profile.sram_kb} KiB): "
                               "it must live in PSRAM, which is several times slower")


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def _verdict(report: FitReport, profile: DeviceProfile) -> None:
    ram_kind = "SRAM + PSRAM" if profile.is_mcu else "RAM"
    if report.incompatible:
        report.reasons.insert(0, f"ops {profile.runtime} {profile.runtime_version} cannot load: "
                              + ", ".join(report.incompatible)
                              + ("; re-convert with edge-slm convert --target " + profile.name))
    if report.ram_total > report.ram_available:
        report.reasons.append(f"needs {_mib(report.ram_total)} of {ram_kind}, the device has {_mib(report.ram_available)}")
    elif not profile.is_mcu and report.ram_total > RAM_WARN * report.ram_available:
        report.warnings.append(f"uses {report.ram_total / report.ram_available:.0%} of RAM "
                               f"({_mib(report.ram_total)} of {_mib(report.ram_available)}); the OS needs the rest")
    kind = "flash" if profile.is_mcu else "storage"
    if report.storage_total > report.storage_available:
        report.reasons.append(f"needs {_mib(report.storage_total)} of {kind}, the device has {_mib(report.storage_available)}")
    elif report.storage_total > STORAGE_WARN * report.storage_available:
        report.warnings.append(f"uses {report.storage_total / report.storage_available:.0%} of {kind}")
    slow = {k: v for k, v in report.latency_ms.items() if v > LATENCY_WARN_MS}
    if slow:
        report.warnings.append("estimated latency over 1 s: " + ", ".join(f"{k} {v:.0f} ms" for k, v in slow.items()))
    if profile.throughput_basis != "measured":
        report.notes.append(f"latency is an estimate from {profile.title}'s {profile.throughput_basis} throughput "
                            f"({profile.int8_gmacs_per_core} int8 / {profile.float32_gmacs_per_core} float32 GMAC/s "
                            f"per core{', x2 int8 for dotprod' if profile.dotprod else ''}); run edge-slm bench there")
    if profile.runtime_ops.basis != "measured":
        report.notes.append(f"the {profile.runtime} {profile.runtime_version} op table is a {profile.runtime_ops.basis}: "
                            f"{profile.runtime_ops.method[:160]}")
    report.verdict = "does not fit" if report.reasons else ("fits with warnings" if report.warnings else "fits")


# --- output ---------------------------------------------------------------------------------------------


def to_json(report: FitReport) -> dict[str, Any]:
    p = report.profile
    return {
        "schema_version": SCHEMA_VERSION,
        "package": report.package, "name": report.name, "task": report.task, "recipe": report.recipe,
        "target": report.target, "title": p.title, "runtime": f"{p.runtime} {p.runtime_version}",
        "verdict": report.verdict, "fits": report.fits, "reasons": report.reasons, "warnings": report.warnings,
        "notes": report.notes,
        "ram": {"total": report.ram_total, "available": report.ram_available, "parts": dict(report.ram)},
        "storage": {"total": report.storage_total, "available": report.storage_available, "parts": dict(report.storage)},
        "ops": report.ops, "incompatible": report.incompatible,
        "macs": report.macs, "latency_ms": report.latency_ms,
        "throughput_gmacs": {"int8": round(throughput_gmacs(p, True), 4), "float": round(throughput_gmacs(p, False), 4),
                             "basis": p.throughput_basis},
    }


def format_report(report: FitReport) -> str:
    p = report.profile
    mem_rows = [(k, report.ram[k], _mib(report.ram[k])) for k in report.ram]
    mem_rows.append((f"total / {'SRAM+PSRAM' if p.is_mcu else 'RAM'} {_mib(report.ram_available)}", report.ram_total,
                     f"{_mib(report.ram_total)} ({report.ram_total / max(report.ram_available, 1):.1%})"))
    mem_rows += [(f"{'flash' if p.is_mcu else 'storage'}: {k}", v, _mib(v)) for k, v in report.storage.items()]
    mem_rows.append((f"total / {'flash' if p.is_mcu else 'storage'} {_mib(report.storage_available)}",
                     report.storage_total, f"{_mib(report.storage_total)} "
                     f"({report.storage_total / max(report.storage_available, 1):.1%})"))
    limits = p.runtime_ops.ops
    op_rows = [(op, v, "any" if limits.get(op, 0) is None else (limits.get(op) or "-"),
                "no" if any(line.startswith(f"{op} ") for line in report.incompatible) else "yes")
               for op, v in report.ops.items()]
    mac_rows = [(g, m["int8"], m["float"], f"{report.latency_ms[g]:.3f}") for g, m in report.macs.items()]
    lines = [
        f"{report.name} ({report.task}, {report.recipe}) on {p.name}: {p.title}",
        f"  {p.cores} x {p.core} @ {p.clock_mhz} MHz, {p.os}, {p.runtime} {p.runtime_version}"
        + (f", Python {p.python}" if p.python else ""),
        "",
        format_table(["memory", "bytes", "size"], mem_rows),
        "",
        format_table(["op", "version", f"{p.runtime} max", "loads"], op_rows),
        "",
        format_table(["subgraph", "int8 MACs", "float MACs", "est. ms"], mac_rows),
        "",
        f"verdict: {report.verdict.upper()}",
    ]
    lines += [f"  - {r}" for r in report.reasons] + [f"  warning: {w}" for w in report.warnings]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def profiles_table() -> str:
    rows = []
    for name in known_profiles():
        p = load_profile(name)
        mem = f"{p.sram_kb} KiB SRAM + {p.psram_kb} KiB PSRAM" if p.is_mcu else f"{p.ram_mb} MB"
        store = f"{p.flash_kb} KiB flash" if p.is_mcu else f"{p.storage_mb} MB"
        rows.append((name, p.title, f"{p.cores} x {p.core}", f"{p.clock_mhz:g}", mem, store, p.python or "-",
                     f"{p.runtime} {p.runtime_version}", "yes" if p.dotprod else "no"))
    return format_table(["target", "device", "cpu", "MHz", "memory", "storage", "python", "runtime", "dotprod"], rows)


# --- CLI ------------------------------------------------------------------------------------------------

_EPILOG = """examples:
  edge-slm fit --list                      # the known targets
  edge-slm fit intent_pkg --target pi-3b   # table; exit 0 when it fits, 1 when it does not
  edge-slm fit intent_pkg --target nrf52840 --json
"""


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `fit` to edge-slm's sub-command parsers; the handler returns an exit code."""
    p = subparsers.add_parser(
        "fit", help="does a model package fit a target device (RAM, storage, ops, latency estimate)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description=textwrap.fill(width=100, text="Checks PACKAGE against a device profile: RAM (agent, interpreter, "
        "weights, activation arena planned from tensor lifetimes, KV cache, tokenizer; the TFLM arena on MCUs), "
        "storage or flash, every op and op version against what the target's runtime loads, and MACs per "
        "inference with a latency estimate from the profile's throughput. Exit status 0: fits (perhaps with "
        "warnings); 1: does not fit."))
    p.add_argument("package", nargs="?", help="model package directory (or a .tflite file)")
    p.add_argument("--target", help="device profile name (see --list)")
    p.add_argument("--list", action="store_true", help="print the known targets and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_fit)
    return p


def cmd_fit(args: argparse.Namespace) -> int:
    if args.list:
        if args.json:
            print(json.dumps({n: load_profile(n).to_json() for n in known_profiles()}, indent=2, default=str))
        else:
            print(profiles_table())
        return 0
    if not args.package or not args.target:
        raise ConfigError("edge-slm fit needs PACKAGE and --target NAME (edge-slm fit --list shows the targets)")
    report = fit(args.package, args.target)
    print(json.dumps(to_json(report), indent=2) if args.json else format_report(report))
    return 0 if report.fits else 1
