"""Export a model package for TensorFlow Lite Micro: C array, op resolver, model info and an arena-size estimate.

Must never import TensorFlow or converters: it reads the .tflite with firmware_bridge.tflite_flatbuffer.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_slm.errors import ModelError
from edge_slm.package import ModelPackage, sha256_file
from edge_slm.table import format_table
from firmware_bridge import tflite_flatbuffer as tfl

SCHEMA_VERSION = 1
ALIGNMENT = 16  # TFLM's MicroArenaBufferAlignment() and the alignment it checks on the model data

# Builtin op -> MicroMutableOpResolver method. Mirrors tflite-micro's
# tensorflow/lite/micro/micro_mutable_op_resolver.h (the TFLMRegistration version, 2024-2025), cross-checked
# against the Register_* kernels in the tflite-micro 0.dev20261023182759 wheel's _runtime.so.
# TFLM's resolver matches ops by builtin code only (FindOp ignores the version); what a kernel cannot run
# shows up as a tensor type it rejects, which _problems() checks instead.
TFLM_OPS: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "ELU": "AddElu", "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic", "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul", "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable", "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound",
    "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv", "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack", "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
# Custom ops TFLM ships kernels for (same header: AddCustom calls).
TFLM_CUSTOM_OPS: dict[str, str] = {
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess",
    "CIRCULAR_BUFFER": "AddCircularBuffer",
}
# Tensor types some TFLM kernel reads or writes (tensorflow/lite/micro/kernels/*.cc); FLOAT16, FLOAT64,
# STRING, COMPLEX*, BFLOAT16 and friends have no kernels.
TFLM_TYPES = frozenset({"FLOAT32", "INT8", "UINT8", "INT16", "INT32", "INT64", "BOOL", "INT4", "RESOURCE"})
_WEIGHT_TYPES = frozenset({"INT8", "UINT8", "INT4", "INT16"})

# What TFLM keeps in the arena besides activations, in bytes, for a 64-bit host build (a 32-bit Cortex-M
# build needs less: pointers are 4 bytes, so these over-estimate it). Struct sizes from tflite-micro's
# micro_allocator.cc / micro_allocation_info.h / greedy_memory_planner.cc, checked against the tflite-micro
# 0.dev20261023182759 wheel's RecordingMicroAllocator (Interpreter.print_allocations) and the smallest arena
# its interpreter accepts, on 14 small conv/dense/pool/mean models (estimate 1.5-10% above that minimum):
#   tail (persistent, allocated from the end of the arena):
#     TfLiteEvalTensor, 24 per tensor of the subgraph ("TfLiteEvalTensor data");
#     NodeAndRegistration, 64 per operator;
#     kernel OpData ("Persistent buffer data"), measured 68-96 per operator, plus 8 per output channel of
#       int8/int16 conv and fully-connected ops (per-channel output multiplier and shift, int32 each);
#     parsed builtin options (TfLiteConvParams, ...), up to 32 per operator;
#     a persistent TfLiteTensor (64) per model input/output, with its quantization (2 x 16, + 8 per channel);
#     fixed interpreter/allocator/subgraph bookkeeping, measured 500-560: 512;
#     variable tensors (kept for the interpreter's life).
#   head (reused): the activation plan, but while AllocateTensors runs the same space first holds one
#     AllocationInfo (32) per tensor, the greedy planner's per-buffer arrays (40 per planned buffer) and a
#     few temporary TfLiteTensors for kernel Prepare (192): small models need more for that than for their
#     activations, so the head is the larger of the two.
EVAL_TENSOR = 24
NODE_AND_REGISTRATION = 64
OP_DATA = 96
BUILTIN_PARAMS = 32
PER_CHANNEL = 8
IO_TENSOR = 64
IO_QUANT = 2 * 16
FIXED = 512
ALLOCATION_INFO = 32
PLANNER_PER_BUFFER = 40
PREPARE_TEMPS = 192
_PER_CHANNEL_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})


class McuExportError(ModelError):
    """The model cannot run under TensorFlow Lite Micro as it is; the message lists why and what to do."""


@dataclass(frozen=True)
class PlannedBuffer:
    """One activation tensor in the arena plan: bytes (aligned), live from op `first` to op `last`, at `offset`."""

    tensor: int
    name: str
    size: int
    first: int
    last: int
    offset: int


@dataclass(frozen=True)
class OpUse:
    name: str
    version: int
    count: int
    resolver_call: str  # e.g. "AddFullyConnected()"


@dataclass
class McuExport:
    """What export_mcu wrote and what it measured."""

    name: str
    source: str
    sha256: str
    model_size: int
    files: dict[str, Path]
    ops: list[OpUse]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    tensor_count: int
    plan: list[PlannedBuffer]
    activation_peak: int  # greedy plan: bytes of arena the activations need at once
    naive_sum: int  # every planned buffer (activations, kernel scratch) in its own slot: no reuse
    largest_tensor: int
    overhead: dict[str, int]  # TFLM's persistent structs (arena tail), by kind
    planning_scratch: int  # what AllocateTensors borrows from the head before activations use it
    arena_estimate: int  # max(activation_peak, planning_scratch) + overhead
    arena_margin: float
    arena_size: int  # estimate x (1 + margin), rounded up to 16: what to allocate on the MCU
    float_ops: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def c_identifier(name: str) -> str:
    """A lowercase C identifier from a package name: "Sensor-Model v2" -> "sensor_model_v2"."""
    ident = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or "model"
    return f"m_{ident}" if ident[0].isdigit() else ident


def export_mcu(
    package_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    arena_margin: float = 0.25,
) -> McuExport:
    """Check PACKAGE_DIR's model runs under TFLM and write the C sources and model info into OUT_DIR.

    PACKAGE_DIR is a model package (or a bare .tflite file). Raises McuExportError listing every op or
    tensor TFLM cannot run; nothing is written then.
    """
    src = Path(package_dir)
    if src.is_file() and src.suffix == ".tflite":
        model_path, labels, default_name, sha = src, [], src.stem, sha256_file(src)
    else:
        pkg = ModelPackage.open(src)
        model_path, labels, default_name, sha = pkg.model_path, pkg.labels, pkg.name, pkg.sha256
    if arena_margin < 0:
        raise McuExportError(f"arena_margin must be >= 0, got {arena_margin}")
    data = model_path.read_bytes()
    model = tfl.parse(data)
    problems = _problems(model)
    if problems:
        raise McuExportError(f"{model_path} cannot run under TensorFlow Lite Micro: " + "; ".join(problems))
    ident = c_identifier(name or default_name)
    graph = model.subgraphs[0]
    plan = plan_arena(model)
    peak = max((b.offset + b.size for b in plan), default=0)
    overhead = _overhead(model)
    scratch = _planning_scratch(model, len(plan))
    tensors = [b for b in plan if b.tensor >= 0]
    estimate = max(peak, scratch) + sum(overhead.values())
    arena = _align(math.ceil(estimate * (1.0 + arena_margin)))
    export = McuExport(
        name=ident,
        source=str(model_path),
        sha256=sha,
        model_size=len(data),
        files={},
        ops=_op_uses(model),
        inputs=[_io(graph.tensors[i]) for i in graph.inputs],
        outputs=[_io(graph.tensors[i]) for i in graph.outputs],
        tensor_count=len(graph.tensors),
        plan=plan,
        activation_peak=peak,
        naive_sum=sum(b.size for b in plan),
        largest_tensor=max((b.size for b in tensors), default=0),
        overhead=overhead,
        planning_scratch=scratch,
        arena_estimate=estimate,
        arena_margin=arena_margin,
        arena_size=arena,
        float_ops=_float_ops(model),
    )
    if export.float_ops:
        export.warnings.append(
            f"ops computing in float32: {', '.join(export.float_ops)}; they run on TFLM's reference float kernels, "
            "slow on an MCU without an FPU; full int8 conversion is smaller and faster"
        )
    export.files = _write(export, data, labels, Path(out_dir))
    return export


# --- checks ---------------------------------------------------------------------------------------------


def _op_label(op: tfl.Operator) -> str:
    return f"CUSTOM:{op.custom_code}" if op.name == "CUSTOM" else op.name


def _problems(model: tfl.TfliteModel) -> list[str]:
    """Every reason TFLM would refuse the model, one string each, naming ops and tensors."""
    out: list[str] = []
    if len(model.subgraphs) != 1:
        out.append(f"{len(model.subgraphs)} subgraphs (control flow such as IF/WHILE); this exporter plans one: "
                   "unroll the loop or branch in the model before converting")
    if not model.subgraphs:
        return out
    graph = model.subgraphs[0]
    missing: dict[str, str] = {}
    for op in graph.operators:
        label = _op_label(op)
        if op.name == "CUSTOM":
            if op.custom_code in TFLM_CUSTOM_OPS:
                continue
            if (op.custom_code or "").startswith("Flex"):
                missing[label] = "a TensorFlow (SELECT_TF_OPS/Flex) op; TFLM has no Flex delegate"
            else:
                missing[label] = "a custom op with no TFLM kernel"
        elif op.name not in TFLM_OPS:
            missing[label] = "no TFLM kernel"
    if missing:
        out.append("unsupported ops: " + ", ".join(f"{k} ({v})" for k, v in sorted(missing.items()))
                   + "; change the model to use ops firmware_bridge.tflm_export.TFLM_OPS lists")
    bad_types: dict[str, set[str]] = {}
    for op in graph.operators:
        for t in _op_tensors(graph, op):
            if t.dtype not in TFLM_TYPES:
                bad_types.setdefault(t.dtype, set()).add(_op_label(op))
    for dtype, ops in sorted(bad_types.items()):
        out.append(f"{dtype} tensors (no TFLM kernel reads them) used by {', '.join(sorted(ops))}; "
                   "re-convert with edge-slm convert --quantize int8 (or float32)")
    hybrid = sorted({_op_label(op) for op in graph.operators if _is_hybrid(model, graph, op)})
    if hybrid:
        out.append(
            f"hybrid (dynamic-range) ops with int8 weights and float activations: {', '.join(hybrid)}; "
            "TFLM has no hybrid kernels; re-convert with edge-slm convert --quantize int8"
        )
    dynamic = sorted({t.name for t in graph.tensors if not model.is_constant(t) and _is_dynamic(t)})
    if dynamic:
        shown = ", ".join(dynamic[:5]) + (f" and {len(dynamic) - 5} more" if len(dynamic) > 5 else "")
        out.append(f"dynamic shapes (-1 beyond the batch dimension) in {shown}; fix every input size when converting")
    return out


def _op_tensors(graph: tfl.SubGraph, op: tfl.Operator) -> list[tfl.Tensor]:
    return [graph.tensors[i] for i in (*op.inputs, *op.outputs, *op.intermediates) if 0 <= i < len(graph.tensors)]


def _is_hybrid(model: tfl.TfliteModel, graph: tfl.SubGraph, op: tfl.Operator) -> bool:
    ins = [graph.tensors[i] for i in op.inputs if i >= 0]
    float_act = any(t.dtype == "FLOAT32" and not model.is_constant(t) for t in ins)
    int_weight = any(t.dtype in _WEIGHT_TYPES and model.is_constant(t) for t in ins)
    return float_act and int_weight and op.name != "DEQUANTIZE"


def _is_dynamic(t: tfl.Tensor) -> bool:
    return t.shape_signature is not None and any(d < 0 for d in t.shape_signature[1:])


def _float_ops(model: tfl.TfliteModel) -> list[str]:
    """Ops whose first input is a float32 activation (QUANTIZE/DEQUANTIZE at the edges do not count)."""
    graph = model.subgraphs[0]
    found = set()
    for op in graph.operators:
        if op.name in ("QUANTIZE", "DEQUANTIZE") or not op.inputs or op.inputs[0] < 0:
            continue
        if graph.tensors[op.inputs[0]].dtype == "FLOAT32":
            found.add(_op_label(op))
    return sorted(found)


# --- arena plan -----------------------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def plan_arena(model: tfl.TfliteModel) -> list[PlannedBuffer]:
    """Place every activation tensor of subgraph 0, and the kernels' scratch buffers, like TFLM's
    GreedyMemoryPlanner (tensorflow/lite/micro/memory_planner/greedy_memory_planner.cc).

    Lifetimes follow TFLM's AllocationInfoBuilder: graph inputs live from op 0, graph outputs to the last op,
    an op's outputs are created at that op and its inputs are used until it; a scratch buffer lives during its
    op. Buffers are placed largest first (equal sizes: the later buffer first, as TFLM's reverse sort leaves
    them) at the lowest offset that overlaps no placed buffer alive at the same time; sizes are rounded up to
    16. Constant tensors (data in the file) and variables (persistent) are not planned. On the 14 models
    this was checked on, the peak equals the "head" TFLM's RecordingMicroAllocator reports, to the byte.
    """
    graph = model.subgraphs[0]
    n_ops = len(graph.operators)
    first: dict[int, int] = {}
    last: dict[int, int] = {}

    def planned(i: int) -> bool:
        if i < 0:
            return False
        t = graph.tensors[i]
        return not model.is_constant(t) and not t.is_variable and t.nbytes > 0

    for i in graph.inputs:
        if planned(i):
            first[i] = 0
            last[i] = max(last.get(i, 0), 0)
    for k, op in enumerate(graph.operators):
        for i in (*op.outputs, *op.intermediates):
            if planned(i):
                first.setdefault(i, k)
                last[i] = max(last.get(i, k), k)
        for i in op.inputs:
            if planned(i):
                first.setdefault(i, k)
                last[i] = max(last.get(i, k), k)
    for i in graph.outputs:
        if planned(i):
            first.setdefault(i, max(n_ops - 1, 0))
            last[i] = max(n_ops - 1, 0)
    # (sort id, tensor index or -1, name, size, first, last); TFLM numbers scratch buffers after the tensors.
    requests = [(i, i, graph.tensors[i].name, _align(graph.tensors[i].nbytes), first[i], last[i]) for i in first]
    for k, op in enumerate(graph.operators):
        size = _kernel_scratch(graph, op)
        if size:
            requests.append((len(graph.tensors) + k, -1, f"{_op_label(op)} #{k} scratch", _align(size), k, k))
    placed: list[PlannedBuffer] = []
    for _, tensor, name, size, lo, hi in sorted(requests, key=lambda r: (-r[3], -r[0])):
        live = sorted((b for b in placed if b.first <= hi and lo <= b.last), key=lambda b: b.offset)
        offset = 0
        for b in live:
            if offset + size <= b.offset:
                break
            offset = max(offset, b.offset + b.size)
        placed.append(PlannedBuffer(tensor, name, size, lo, hi, offset))
    return sorted(placed, key=lambda b: (b.first, b.tensor < 0, b.tensor))


def _kernel_scratch(graph: tfl.SubGraph, op: tfl.Operator) -> int:
    """Scratch bytes TFLM's reference kernel asks for in Prepare (RequestScratchBufferInArena), where known.

    MEAN/SUM on int8/int16: an int32 running sum per output element plus the resolved-axis and index arrays
    (measured: 4 x outputs + 32). TRANSPOSE_CONV on int8/int16: an int32/int64 accumulator per output element.
    CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED with INT4 weights: the unpacked int8 filter. Optimized kernel
    libraries (CMSIS-NN, ESP-NN) ask for more; the margin is for them.
    """
    if not op.outputs or op.outputs[0] < 0 or not op.inputs or op.inputs[0] < 0:
        return 0
    inp, out = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    elements = out.nbytes * 8 // max(out.bits, 1)
    if op.name in ("MEAN", "SUM") and inp.dtype in ("INT8", "INT16"):
        return 4 * elements + 32
    if op.name == "TRANSPOSE_CONV" and out.dtype in ("INT8", "INT16"):
        return (4 if out.dtype == "INT8" else 8) * elements
    if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op.inputs) > 1 and op.inputs[1] >= 0:
        weights = graph.tensors[op.inputs[1]]
        if weights.dtype == "INT4":
            return weights.nbytes * 2
    return 0


def _overhead(model: tfl.TfliteModel) -> dict[str, int]:
    """TFLM's persistent structs (the arena's tail), by kind; see the constants above."""
    graph = model.subgraphs[0]
    n_ops = len(graph.operators)
    channels = 0
    for op in graph.operators:
        if op.name in _PER_CHANNEL_OPS and op.outputs and op.outputs[0] >= 0:
            out = graph.tensors[op.outputs[0]]
            if out.dtype in ("INT8", "INT16"):
                channels += out.shape[-1] if out.shape else 1
    io = 0
    for i in (*graph.inputs, *graph.outputs):
        q = graph.tensors[i].quantization
        io += IO_TENSOR + (IO_QUANT + PER_CHANNEL * len(q.scale) if q else 0)
    return {
        "eval_tensors": EVAL_TENSOR * len(graph.tensors),
        "node_and_registration": NODE_AND_REGISTRATION * n_ops,
        "kernel_op_data": OP_DATA * n_ops + PER_CHANNEL * channels,
        "builtin_params": BUILTIN_PARAMS * n_ops,
        "io_tensors": io,
        "variables": sum(_align(t.nbytes) for t in graph.tensors if t.is_variable),
        "fixed": FIXED,
    }


def _planning_scratch(model: tfl.TfliteModel, n_planned: int) -> int:
    """Bytes AllocateTensors borrows from the head before the activations move in."""
    return ALLOCATION_INFO * len(model.subgraphs[0].tensors) + PLANNER_PER_BUFFER * n_planned + PREPARE_TEMPS


def _op_uses(model: tfl.TfliteModel) -> list[OpUse]:
    counts: dict[str, int] = {}
    versions: dict[str, int] = {}
    for op in model.subgraphs[0].operators:
        label = _op_label(op)
        counts[label] = counts.get(label, 0) + 1
        versions[label] = max(versions.get(label, 0), op.version)
    out = []
    for label in sorted(counts):
        method = TFLM_CUSTOM_OPS[label.split(":", 1)[1]] if label.startswith("CUSTOM:") else TFLM_OPS[label]
        out.append(OpUse(label, versions[label], counts[label], f"{method}()"))
    return out


def _io(t: tfl.Tensor) -> dict[str, Any]:
    q = t.quantization
    return {
        "name": t.name,
        "dtype": t.dtype.lower(),
        "shape": list(t.shape),
        "bytes": t.nbytes,
        "scale": q.scale[0] if q and len(q.scale) == 1 else (list(q.scale) if q else None),
        "zero_point": q.zero_point[0] if q and len(q.zero_point) == 1 else (list(q.zero_point) if q else None),
    }


# --- files ----------------------------------------------------------------------------------------------

_C_TYPES = {"float32": "float", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "int32": "int32_t",
            "int64": "int64_t", "bool": "bool"}


def _write(export: McuExport, data: bytes, labels: list[str], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    n = export.name
    guard = n.upper()
    stamp = f"// Generated by edge-slm export-mcu from {Path(export.source).name} (sha256 {export.sha256}). Do not edit.\n"
    files = {
        "model_data_h": out / f"{n}_model_data.h",
        "model_data_cc": out / f"{n}_model_data.cc",
        "op_resolver_h": out / f"{n}_op_resolver.h",
        "model_info_h": out / f"{n}_model_info.h",
        "model_info_json": out / f"{n}_model_info.json",
    }
    files["model_data_h"].write_text(
        f"{stamp}#ifndef {guard}_MODEL_DATA_H_\n#define {guard}_MODEL_DATA_H_\n\n"
        f"// The .tflite flatbuffer, {len(data)} bytes, {ALIGNMENT}-byte aligned as TFLM requires.\n"
        f"extern const unsigned char g_{n}_model_data[];\nextern const unsigned int g_{n}_model_data_len;\n\n"
        f"#endif  // {guard}_MODEL_DATA_H_\n", encoding="utf-8")
    rows = []
    for k in range(0, len(data), 12):
        rows.append("    " + ", ".join(f"0x{b:02x}" for b in data[k : k + 12]) + ",")
    files["model_data_cc"].write_text(
        f'{stamp}#include "{files["model_data_h"].name}"\n\n'
        f"alignas({ALIGNMENT}) const unsigned char g_{n}_model_data[] = {{\n" + "\n".join(rows) + "\n};\n"
        f"const unsigned int g_{n}_model_data_len = {len(data)};\n", encoding="utf-8")
    calls = "\n".join(f"  if ((status = resolver.{op.resolver_call}) != kTfLiteOk) return status;  // {op.name} "
                      f"v{op.version} x{op.count}" for op in export.ops)
    camel = "".join(p.capitalize() for p in n.split("_"))
    files["op_resolver_h"].write_text(
        f"{stamp}#ifndef {guard}_OP_RESOLVER_H_\n#define {guard}_OP_RESOLVER_H_\n\n"
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
        f"// Exactly the {len(export.ops)} ops {n} uses; registering fewer fails AllocateTensors, more costs flash.\n"
        f"constexpr unsigned int k{camel}OpCount = {len(export.ops)};\n"
        f"using {camel}OpResolver = tflite::MicroMutableOpResolver<k{camel}OpCount>;\n\n"
        f"template <unsigned int tOpCount>\n"
        f"TfLiteStatus Register{camel}Ops(tflite::MicroMutableOpResolver<tOpCount>& resolver) {{\n"
        f'  static_assert(tOpCount >= k{camel}OpCount, "resolver too small for {n}");\n'
        f"  TfLiteStatus status = kTfLiteOk;\n{calls}\n  return status;\n}}\n\n"
        f"#endif  // {guard}_OP_RESOLVER_H_\n", encoding="utf-8")
    files["model_info_h"].write_text(_info_header(export, labels, stamp, guard), encoding="utf-8")
    files["model_info_json"].write_text(json.dumps({**to_json(export), "labels": labels}, indent=2) + "\n",
                                        encoding="utf-8")
    return files


def _c_float(x: float) -> str:
    return f"{x!r}f" if "e" in repr(x) or "." in repr(x) else f"{x!r}.0f"


def _info_header(export: McuExport, labels: list[str], stamp: str, guard: str) -> str:
    lines = [stamp.rstrip("\n"), f"#ifndef {guard}_MODEL_INFO_H_", f"#define {guard}_MODEL_INFO_H_", "",
             "// Tensor arena to give tflite::MicroInterpreter (declare it alignas(16)):",
             f"// activations {export.activation_peak} B (greedy plan; {export.naive_sum} B without reuse)",
             f"// + TFLM runtime structs {sum(export.overhead.values())} B = estimate {export.arena_estimate} B,",
             f"// x{1 + export.arena_margin:.2f} margin. Optimized kernels (CMSIS-NN, ESP-NN) may ask for more scratch:",
             "// check with tflite::RecordingMicroInterpreter on the target.",
             f"#define {guard}_ARENA_SIZE {export.arena_size}", f"#define {guard}_MODEL_SIZE {export.model_size}",
             f"#define {guard}_INPUT_COUNT {len(export.inputs)}", f"#define {guard}_OUTPUT_COUNT {len(export.outputs)}",
             ""]
    for kind, items in (("INPUT", export.inputs), ("OUTPUT", export.outputs)):
        for k, t in enumerate(items):
            p = f"{guard}_{kind}{k}"
            lines.append(f"// {kind.lower()} {k}: {t['name']} {t['dtype']} {t['shape']}"
                         + (", real = scale * (q - zero_point)" if t["scale"] is not None else ""))
            lines.append(f"#define {p}_BYTES {t['bytes']}")
            lines.append(f"#define {p}_DIMS {len(t['shape'])}")
            lines.append(f"#define {p}_SHAPE {{{', '.join(str(d) for d in t['shape'])}}}")
            if isinstance(t["scale"], float):
                lines.append(f"#define {p}_SCALE {_c_float(t['scale'])}")
                lines.append(f"#define {p}_ZERO_POINT {t['zero_point']}")
            lines.append("")
    if labels:
        quoted = ", ".join(json.dumps(label) for label in labels)
        lines += [f"#define {guard}_LABEL_COUNT {len(labels)}", f"#define {guard}_LABELS {{{quoted}}}", ""]
    lines.append(f"#endif  // {guard}_MODEL_INFO_H_")
    return "\n".join(lines) + "\n"


# --- report ---------------------------------------------------------------------------------------------


def to_json(export: McuExport) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": export.name,
        "source": export.source,
        "sha256": export.sha256,
        "model_size": export.model_size,
        "files": {k: str(v) for k, v in export.files.items()},
        "ops": [{"name": o.name, "version": o.version, "count": o.count, "resolver_call": o.resolver_call}
                for o in export.ops],
        "inputs": export.inputs,
        "outputs": export.outputs,
        "tensor_count": export.tensor_count,
        "arena": {
            "size": export.arena_size,
            "estimate": export.arena_estimate,
            "margin": export.arena_margin,
            "activation_peak": export.activation_peak,
            "naive_sum": export.naive_sum,
            "largest_tensor": export.largest_tensor,
            "overhead": dict(export.overhead),
            "planning_scratch": export.planning_scratch,
            "alignment": ALIGNMENT,
        },
        "plan": [{"tensor": b.tensor, "name": b.name, "size": b.size, "first_op": b.first, "last_op": b.last,
                  "offset": b.offset} for b in export.plan],
        "float_ops": export.float_ops,
        "warnings": export.warnings,
    }


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def format_report(export: McuExport) -> str:
    ops = format_table(["op", "version", "count", "resolver call"],
                       [(o.name, o.version, o.count, o.resolver_call) for o in export.ops])
    io = format_table(["", "name", "dtype", "shape", "scale", "zero point"],
                      [(kind, t["name"], t["dtype"], "x".join(str(d) for d in t["shape"]),
                        "-" if t["scale"] is None else (f"{t['scale']:.6g}" if isinstance(t["scale"], float)
                                                        else f"{len(t['scale'])} channels"),
                        "-" if t["zero_point"] is None else t["zero_point"])
                       for kind, items in (("in", export.inputs), ("out", export.outputs)) for t in items])
    saving = 1 - export.activation_peak / export.naive_sum if export.naive_sum else 0.0
    head = max(export.activation_peak, export.planning_scratch)
    arena = format_table(["arena", "bytes", "KiB"], [
        ("largest activation tensor", export.largest_tensor, _kib(export.largest_tensor)),
        ("activations, no reuse (naive sum)", export.naive_sum, _kib(export.naive_sum)),
        (f"activations, greedy plan ({saving:.0%} saved)", export.activation_peak, _kib(export.activation_peak)),
        ("AllocateTensors scratch (same space)", export.planning_scratch, _kib(export.planning_scratch)),
        ("head: larger of the two", head, _kib(head)),
        *((f"  + {k.replace('_', ' ')}", v, _kib(v)) for k, v in export.overhead.items()),
        ("estimate", export.arena_estimate, _kib(export.arena_estimate)),
        (f"arena size (+{export.arena_margin:.0%} margin)", export.arena_size, _kib(export.arena_size)),
    ])
    lines = [f"{export.name}: {export.model_size} B model ({_kib(export.model_size)} KiB flash), "
             f"{len(export.ops)} op types, {export.tensor_count} tensors", "", ops, "", io, "", arena, ""]
    lines += [f"warning: {w}" for w in export.warnings]
    lines += ["files:"] + [f"  {p}" for p in export.files.values()]
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------------

_EPILOG = """example:
  edge-slm export-mcu sensor_pkg -o firmware/model --name vibration
  # writes vibration_model_data.{h,cc}, vibration_op_resolver.h, vibration_model_info.{h,json}
  # then on the MCU:
  #   alignas(16) static uint8_t arena[VIBRATION_ARENA_SIZE];
  #   VibrationOpResolver resolver; RegisterVibrationOps(resolver);
  #   tflite::MicroInterpreter interp(tflite::GetModel(g_vibration_model_data), resolver, arena, sizeof arena);
"""


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `export-mcu` to edge-slm's sub-command parsers; the handler returns an exit code."""
    p = subparsers.add_parser(
        "export-mcu", help="export a package for TensorFlow Lite Micro: C array, op resolver, arena size",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description=textwrap.fill(width=100, text="Checks the package's model runs under TensorFlow Lite Micro (builtin ops TFLM has, int8 or "
        "float32, no hybrid ops, fixed shapes), then writes the model as an aligned C array, a header "
        "registering exactly its ops with MicroMutableOpResolver, and the arena size and input/output "
        "quantization (scale, zero point) as C macros and JSON. The arena size is an estimate: a greedy "
        "plan of the activations like TFLM's, plus TFLM's runtime structs, plus --arena-margin."))
    p.add_argument("package", help="model package directory (or a .tflite file)")
    p.add_argument("-o", "--output", required=True, help="directory to write the C/C++ files into")
    p.add_argument("--name", help="C identifier prefix (default: the package name)")
    p.add_argument("--arena-margin", type=float, default=0.25, help="safety margin on the arena estimate "
                   "(default: %(default)s = +25%%)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export_mcu)
    return p


def cmd_export_mcu(args: argparse.Namespace) -> int:
    export = export_mcu(args.package, args.output, name=args.name, arena_margin=args.arena_margin)
    print(json.dumps(to_json(export), indent=2) if args.json else format_report(export))
    return 0
