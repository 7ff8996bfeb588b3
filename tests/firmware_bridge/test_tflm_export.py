"""TFLM export on real trained models: the C array compiles and round-trips, the resolver lists exactly the
model's ops, the arena estimate is bounded and (with the tflite-micro wheel) holds under the real TFLM."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm import runtime
from edge_slm.errors import ModelError
from edge_slm.package import write_package
from firmware_bridge import tflite_flatbuffer as tfl
from firmware_bridge import tflm_export as te
from firmware_bridge.tflm_export import McuExportError, export_mcu, format_report, to_json

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LABELS = ["slow", "medium", "fast"]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is required in CI to compile the exported C++")
        pytest.skip(f"{tool} is not installed; the exported C++ is not compiled here")
    return path


def _package(dest: Path, model_bytes: bytes, name: str) -> Path:
    """A package around converter output, for recipes convert_model's gate would not let through (hybrid)."""
    m = runtime.load(content=model_bytes)

    def spec(t) -> dict:  # noqa: ANN001
        return {"name": t.name, "dtype": np.dtype(t.dtype).name, "shape": [int(d) for d in t.shape],
                "scale": t.scale, "zero_point": t.zero_point}

    manifest = {"name": name, "version": "1.0.0", "task": "sensor-classification",
                "created": datetime.now(timezone.utc).isoformat(), "labels": LABELS[:3],
                "inputs": [spec(t) for t in m.inputs], "outputs": [spec(t) for t in m.outputs]}
    return write_package(dest, model_bytes, manifest).path


@dataclass
class Models:
    sensor_pkg: Path  # Conv1D sensor classifier from conftest, through convert_model --quantize int8
    sensor_eval: np.ndarray
    conv_pkg: Path  # Conv2D + DepthwiseConv2D + Dense, full int8
    float_pkg: Path  # the same, float32
    hybrid_pkg: Path  # the same, dynamic-range (int8 weights, float activations)
    float16: Path  # .tflite with float16 weights
    topk: Path  # .tflite with TOPK_V2
    flex: Path  # .tflite with a Flex op
    dynamic: Path  # .tflite with a -1 sequence dimension


@pytest.fixture(scope="module")
def models(sensor_model, tmp_path_factory) -> Models:  # noqa: ANN001
    from converters import recipes
    from converters.convert import convert_model
    from converters.source_model import source_from_keras
    from converters.tf_env import silenced, tf

    work = tmp_path_factory.mktemp("tflm_models")
    result = convert_model(sensor_model.keras_path, work / "sensor_pkg", calib=sensor_model.calib,
                           eval_data=sensor_model.eval, quantize="int8", task="sensor-classification",
                           labels=LABELS, name="vibration", progress=False)
    keras = tf().keras
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 12, 12, 1)).astype(np.float32)
    y = (x[:, :6].mean(axis=(1, 2, 3)) > x[:, 6:].mean(axis=(1, 2, 3))).astype(np.int32)
    inp = keras.Input((12, 12, 1), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    h = keras.layers.DepthwiseConv2D(3, activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    src = source_from_keras(model, work / "conv.keras")
    conv = {r: recipes.convert(src, r, [x[:100]]) for r in ("int8", "float32", "dynamic", "float16")}
    t = tf()

    @t.function(input_signature=[t.TensorSpec([1, 8], t.float32)])
    def topk(v):  # noqa: ANN001, ANN202
        return t.math.top_k(v * 2.0, k=3)[0]

    @t.function(input_signature=[t.TensorSpec([1, 3, 3], t.float32)])
    def det(v):  # noqa: ANN001, ANN202
        return t.linalg.det(v + 1.0)

    @t.function(input_signature=[t.TensorSpec([1, None, 4], t.float32)])
    def dyn(v):  # noqa: ANN001, ANN202
        return t.nn.relu(v * 3.0)

    with silenced():
        bad = {"topk": t.lite.TFLiteConverter.from_concrete_functions([topk.get_concrete_function()], topk).convert(),
               "dynamic": t.lite.TFLiteConverter.from_concrete_functions([dyn.get_concrete_function()], dyn).convert()}
        c = t.lite.TFLiteConverter.from_concrete_functions([det.get_concrete_function()], det)
        c.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS, t.lite.OpsSet.SELECT_TF_OPS]
        bad["flex"] = c.convert()
    for name, data in [*bad.items(), ("float16", conv["float16"])]:
        (work / f"{name}.tflite").write_bytes(data)
    return Models(
        sensor_pkg=result.package.path,
        sensor_eval=np.load(sensor_model.eval)["x"][:40],
        conv_pkg=_package(work / "conv_pkg", conv["int8"], "tiny-conv"),
        float_pkg=_package(work / "float_pkg", conv["float32"], "tiny-conv-float"),
        hybrid_pkg=_package(work / "hybrid_pkg", conv["dynamic"], "tiny-conv-dynamic"),
        float16=work / "float16.tflite", topk=work / "topk.tflite", flex=work / "flex.tflite",
        dynamic=work / "dynamic.tflite",
    )


@pytest.fixture(scope="module")
def sensor_export(models, tmp_path_factory) -> te.McuExport:  # noqa: ANN001
    return export_mcu(models.sensor_pkg, tmp_path_factory.mktemp("sensor_mcu"))


# --- the C array ------------------------------------------------------------------------------------------

MAIN_CC = r"""
#include <cstdint>
#include <cstdio>
#include "NAME_model_data.h"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  if (reinterpret_cast<std::uintptr_t>(g_NAME_model_data) % 16 != 0) {
    std::fprintf(stderr, "model data at %p is not 16-byte aligned\n", (const void*)g_NAME_model_data);
    return 3;
  }
  std::FILE* f = std::fopen(argv[1], "wb");
  if (!f) return 4;
  std::size_t n = std::fwrite(g_NAME_model_data, 1, g_NAME_model_data_len, f);
  std::fclose(f);
  return n == g_NAME_model_data_len ? 0 : 5;
}
"""


def _compile_and_dump(export: te.McuExport, work: Path) -> bytes:
    """Compile the exported array with a main that writes it back out; return the bytes it wrote."""
    gxx = _need("g++")
    out_dir = export.files["model_data_cc"].parent
    main = work / "main.cc"
    main.write_text(MAIN_CC.replace("NAME", export.name))
    obj = work / "model_data.o"
    subprocess.run([gxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", "-I", str(out_dir), "-o", str(obj),
                    str(export.files["model_data_cc"])], check=True, capture_output=True)
    prog = work / "dump"
    subprocess.run([gxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(out_dir), "-o", str(prog),
                    str(main), str(obj)], check=True, capture_output=True)
    # The array's own alignment, not the luck of the link: its symbol must sit in a section aligned to >= 16.
    readelf = shutil.which("readelf")
    if readelf:
        sections = subprocess.run([readelf, "-S", "-W", str(obj)], check=True, capture_output=True, text=True).stdout
        rodata = [line for line in sections.splitlines() if ".rodata" in line]
        assert rodata, sections
        assert max(int(line.split()[-1]) for line in rodata) >= 16, rodata
    dumped = work / "dumped.tflite"
    subprocess.run([str(prog), str(dumped)], check=True, capture_output=True)
    return dumped.read_bytes()


def test_c_array_compiles_and_holds_the_model_byte_for_byte(sensor_export, models, tmp_path) -> None:  # noqa: ANN001
    dumped = _compile_and_dump(sensor_export, tmp_path)
    original = (models.sensor_pkg / "model.tflite").read_bytes()
    assert dumped == original
    assert sensor_export.model_size == len(original)
    text = sensor_export.files["model_data_cc"].read_text()
    assert "alignas(16) const unsigned char g_vibration_model_data[]" in text
    assert f"const unsigned int g_vibration_model_data_len = {len(original)};" in text


# --- the op resolver --------------------------------------------------------------------------------------

def _resolver_ops(header: Path) -> list[str]:
    calls = re.findall(r"resolver\.(Add\w+)\(\)", header.read_text())
    by_method = {m: op for op, m in te.TFLM_OPS.items()}
    return [by_method[c] for c in calls]


@pytest.mark.parametrize("pkg", ["sensor_pkg", "conv_pkg", "float_pkg"])
def test_op_resolver_registers_exactly_the_models_ops(models, pkg, tmp_path) -> None:  # noqa: ANN001
    from converters.tflite_info import op_versions

    export = export_mcu(getattr(models, pkg), tmp_path / "out")
    wanted = op_versions((getattr(models, pkg) / "model.tflite").read_bytes())
    ops = _resolver_ops(export.files["op_resolver_h"])
    assert sorted(ops) == sorted(wanted)  # each op once, none missing, none extra
    assert f"OpCount = {len(wanted)};" in export.files["op_resolver_h"].read_text()
    assert {o.name: o.version for o in export.ops} == wanted


# TFLM's headers do not build here, so the generated resolver header is compiled against this stand-in
# with the real class template's shape: it checks the C++ is valid and which Add* calls run, in order.
STAND_IN = r"""
#pragma once
#include <cstdio>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
namespace tflite {
template <unsigned int tOpCount>
class MicroMutableOpResolver {
 public:
  unsigned int count = 0;
  TfLiteStatus Record(const char* name) {
    if (count >= tOpCount) return kTfLiteError;
    std::printf("%s\n", name);
    ++count;
    return kTfLiteOk;
  }
METHODS};
}  // namespace tflite
"""


def test_op_resolver_header_compiles_and_calls_each_method_once(sensor_export, tmp_path) -> None:  # noqa: ANN001
    gxx = _need("g++")
    inc = tmp_path / "include" / "tensorflow" / "lite" / "micro"
    inc.mkdir(parents=True)
    methods = "".join(f"  TfLiteStatus {m}() {{ return Record(\"{m}\"); }}\n" for m in te.TFLM_OPS.values())
    (inc / "micro_mutable_op_resolver.h").write_text(STAND_IN.replace("METHODS", methods))
    camel = "Vibration"
    main = tmp_path / "main.cc"
    main.write_text(f'#include "vibration_op_resolver.h"\nint main() {{\n  {camel}OpResolver resolver;\n'
                    f"  return Register{camel}Ops(resolver) == kTfLiteOk && resolver.count == k{camel}OpCount ? 0 : 1;\n}}\n")
    prog = tmp_path / "resolver"
    subprocess.run([gxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(tmp_path / "include"), "-I",
                    str(sensor_export.files["op_resolver_h"].parent), "-o", str(prog), str(main)], check=True,
                   capture_output=True)
    run = subprocess.run([str(prog)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert run.stdout.split() == [o.resolver_call.removesuffix("()") for o in sensor_export.ops]
    # A resolver one op too small is a compile error, not a runtime surprise on the board.
    small = tmp_path / "small.cc"
    small.write_text('#include "vibration_op_resolver.h"\nint main() {\n'
                     f"  tflite::MicroMutableOpResolver<k{camel}OpCount - 1> r;\n  return Register{camel}Ops(r);\n}}\n")
    bad = subprocess.run([gxx, "-std=c++17", "-I", str(tmp_path / "include"), "-I",
                          str(sensor_export.files["op_resolver_h"].parent), "-o", str(tmp_path / "small"), str(small)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "resolver too small" in bad.stderr


# --- model info and the arena -----------------------------------------------------------------------------

def test_model_info_header_gives_the_runtimes_quantization(sensor_export, models, tmp_path) -> None:  # noqa: ANN001
    gcc = _need("gcc")
    m = runtime.load(models.sensor_pkg / "model.tflite")
    prog_c = tmp_path / "info.c"
    prog_c.write_text(
        '#include <stdio.h>\n#include "vibration_model_info.h"\n'
        "static const int in_shape[] = VIBRATION_INPUT0_SHAPE;\nstatic const char* labels[] = VIBRATION_LABELS;\n"
        'int main(void) {\n  printf("%d %d %.9g %d %.9g %d %d %s\\n", VIBRATION_ARENA_SIZE, VIBRATION_MODEL_SIZE,\n'
        "         (double)VIBRATION_INPUT0_SCALE, VIBRATION_INPUT0_ZERO_POINT, (double)VIBRATION_OUTPUT0_SCALE,\n"
        "         VIBRATION_OUTPUT0_ZERO_POINT, VIBRATION_LABEL_COUNT, labels[2]);\n"
        '  for (int i = 0; i < VIBRATION_INPUT0_DIMS; ++i) printf("%d ", in_shape[i]);\n  return 0;\n}\n')
    prog = tmp_path / "info"
    subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(sensor_export.files["model_info_h"].parent),
                    "-o", str(prog), str(prog_c)], check=True, capture_output=True)
    first, shape = subprocess.run([str(prog)], check=True, capture_output=True, text=True).stdout.splitlines()
    arena, size, in_scale, in_zp, out_scale, out_zp, n_labels, label = first.split()
    assert int(arena) == sensor_export.arena_size and int(size) == sensor_export.model_size
    assert float(in_scale) == pytest.approx(m.inputs[0].scale, rel=1e-6) and int(in_zp) == m.inputs[0].zero_point
    assert float(out_scale) == pytest.approx(m.outputs[0].scale, rel=1e-6) and int(out_zp) == m.outputs[0].zero_point
    assert [int(d) for d in shape.split()] == list(m.inputs[0].shape)
    assert (int(n_labels), label) == (3, "fast")
    info = json.loads(sensor_export.files["model_info_json"].read_text())
    assert info["arena"]["size"] == sensor_export.arena_size and info["labels"] == LABELS
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["zero_point"] == m.inputs[0].zero_point


@pytest.mark.parametrize("pkg", ["sensor_pkg", "conv_pkg", "float_pkg"])
def test_arena_plan_is_valid_and_between_largest_tensor_and_naive_sum(models, pkg, tmp_path) -> None:  # noqa: ANN001
    export = export_mcu(getattr(models, pkg), tmp_path / "out")
    plan = export.plan
    tensors = [b for b in plan if b.tensor >= 0]
    assert tensors and export.largest_tensor == max(b.size for b in tensors)
    assert export.largest_tensor <= export.activation_peak <= export.naive_sum == sum(b.size for b in plan)
    assert export.activation_peak < export.naive_sum  # a chain of layers always lets buffers be reused
    assert export.activation_peak <= export.arena_estimate < export.arena_size
    assert export.arena_size % 16 == 0
    for b in plan:
        assert b.offset % 16 == 0 and b.size % 16 == 0 and b.first <= b.last
    for a in plan:  # no two buffers alive at the same time share bytes
        for b in plan:
            if a is not b and a.first <= b.last and b.first <= a.last:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    model = tfl.parse((getattr(models, pkg) / "model.tflite").read_bytes())
    graph = model.subgraphs[0]
    planned = {b.tensor for b in tensors}
    scratch = [b for b in plan if b.tensor < 0]
    # MEAN on int8 asks TFLM for an int32 sum per output element: planned like a tensor, for its op only.
    assert [b.name.split()[0] for b in scratch] == (["MEAN"] if pkg == "sensor_pkg" else [])
    assert all(b.first == b.last for b in scratch)
    for i in (*graph.inputs, *graph.outputs):
        assert i in planned
    for t in graph.tensors:
        assert (t.index in planned) != model.is_constant(t)


def test_greedy_plan_puts_big_buffers_first_and_reuses_dead_space() -> None:
    """A hand-built chain a -> b -> c -> d, sizes rounded up to 16: c takes a's bytes once a is dead, and d
    goes right after c because b is dead by then."""
    sizes = {"a": 100, "b": 40, "c": 90, "d": 8}
    names = list(sizes)
    tensors = tuple(tfl.Tensor(i, n, "INT8", (sizes[n],), None, 0, False, None) for i, n in enumerate(names))
    ops = tuple(tfl.Operator(k, 0, "RELU", 1, None, (k,), (k + 1,), ()) for k in range(3))
    graph = tfl.SubGraph("main", tensors, (0,), (3,), ops)
    model = tfl.TfliteModel(3, "", (tfl.OperatorCode("RELU", 19, 1, None),), (graph,), (0,))
    plan = {b.name: b for b in te.plan_arena(model)}
    assert {n: b.size for n, b in plan.items()} == {"a": 112, "b": 48, "c": 96, "d": 16}
    assert {n: (b.first, b.last) for n, b in plan.items()} == {"a": (0, 0), "b": (0, 1), "c": (1, 2), "d": (2, 2)}
    assert plan["a"].offset == 0 and plan["c"].offset == 0  # c reuses a's bytes: a is dead after op 0
    assert plan["b"].offset == 112 and plan["d"].offset == 96
    assert max(b.offset + b.size for b in plan.values()) == 160


# --- refusals ---------------------------------------------------------------------------------------------

def test_hybrid_dynamic_range_model_is_refused_naming_the_op(models, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(McuExportError, match=r"hybrid.*FULLY_CONNECTED.*--quantize int8") as err:
        export_mcu(models.hybrid_pkg, tmp_path / "out")
    assert isinstance(err.value, ModelError)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize(("model", "pattern"), [
    ("topk", r"unsupported ops: TOPK_V2 \(no TFLM kernel\)"),
    ("flex", r"CUSTOM:FlexMatrixDeterminant \(a TensorFlow \(SELECT_TF_OPS/Flex\) op"),
    ("float16", r"FLOAT16 tensors .* used by DEQUANTIZE"),
    ("dynamic", r"dynamic shapes \(-1 beyond the batch dimension\)"),
])
def test_models_tflm_cannot_run_are_refused_with_the_reason(models, model, pattern, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(McuExportError, match=pattern):
        export_mcu(getattr(models, model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float_model_exports_with_a_warning(models, tmp_path) -> None:  # noqa: ANN001
    export = export_mcu(models.float_pkg, tmp_path / "out", name="Tiny Conv (float)")
    assert export.name == "tiny_conv_float"
    assert "CONV_2D" in export.float_ops and "FULLY_CONNECTED" in export.float_ops
    assert any("float32" in w for w in export.warnings)
    assert "warning: ops computing in float32" in format_report(export)
    assert export.inputs[0]["dtype"] == "float32" and export.inputs[0]["scale"] is None


def test_corrupt_package_model_is_a_model_error(tmp_path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="TFL3"):
        export_mcu(bad, tmp_path / "out")


# --- report, JSON, CLI ------------------------------------------------------------------------------------

def test_report_and_json_carry_the_same_numbers(sensor_export) -> None:  # noqa: ANN001
    data = json.loads(json.dumps(to_json(sensor_export)))
    assert data["arena"]["size"] == sensor_export.arena_size
    assert data["arena"]["naive_sum"] == sensor_export.naive_sum
    assert [o["name"] for o in data["ops"]] == [o.name for o in sensor_export.ops]
    report = format_report(sensor_export)
    for o in sensor_export.ops:
        assert o.name in report and o.resolver_call in report
    assert str(sensor_export.arena_size) in report and str(sensor_export.naive_sum) in report
    assert "greedy plan" in report


def test_cli_subcommand_prints_report_or_json(models, tmp_path, capsys) -> None:  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="edge-slm")
    te.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-mcu", str(models.conv_pkg), "-o", str(tmp_path / "a"), "--name", "kws"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "AddConv2D()" in out and "arena size" in out and (tmp_path / "a" / "kws_model_data.cc").is_file()
    args = parser.parse_args(["export-mcu", str(models.conv_pkg), "-o", str(tmp_path / "b"), "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "tiny_conv" and data["arena"]["size"] > data["arena"]["activation_peak"]
    help_text = te.add_cli(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "example:" in help_text and "--arena-margin" in help_text


# --- under the real TFLM ----------------------------------------------------------------------------------

TFLM_RUN = r"""
import json, os, sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime

model = open(sys.argv[1], "rb").read()
xs = np.load(sys.argv[2])
arena = int(sys.argv[3])

def fits(n):
    # Each try in a forked child: this wheel's interpreter segfaults on some too-small arenas (int8 models)
    # instead of returning an error, so a crash counts as "does not fit".
    pid = os.fork()
    if pid == 0:
        try:
            runtime.Interpreter.from_bytes(model, arena_size=n)
            os._exit(0)
        except Exception:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

if not fits(arena):
    print(json.dumps({"ok": False}))
    sys.exit(0)
interp = runtime.Interpreter.from_bytes(model, arena_size=arena)
outs = []
for x in xs:
    interp.set_input(x, 0)
    interp.invoke()
    outs.append(interp.get_output(0).tolist())
lo, hi = 0, arena  # smallest arena TFLM accepts, to 16 bytes
while hi - lo > 16:
    mid = (lo + hi) // 2
    if fits(mid):
        hi = mid
    else:
        lo = mid
print(json.dumps({"ok": True, "outputs": outs, "min_arena": hi}))
"""


def _tflm_python() -> str:
    """An interpreter with the tflite-micro wheel: this one, or $EDGE_SLM_TFLM_PYTHON (a separate venv)."""
    if importlib.util.find_spec("tflite_micro") is not None:
        return sys.executable
    other = os.environ.get("EDGE_SLM_TFLM_PYTHON")
    if other and subprocess.run([other, "-c", "import tflite_micro"], capture_output=True).returncode == 0:
        return other
    if IN_CI:
        pytest.fail("tflite-micro is required in CI (pip install tflite-micro) to run exports under the real TFLM")
    pytest.skip("tflite-micro not installed (pip install tflite-micro, or set EDGE_SLM_TFLM_PYTHON to a python "
                "that has it); the arena estimate is not checked against the real TFLM here")


def _run_tflm(python: str, model: Path, xs: np.ndarray, arena: int, work: Path) -> dict:
    script, inputs = work / "tflm_run.py", work / "inputs.npy"
    script.write_text(TFLM_RUN)
    np.save(inputs, xs)
    run = subprocess.run([python, str(script), str(model), str(inputs), str(arena)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _quantize(m: runtime.Model, x: np.ndarray) -> np.ndarray:
    t = m.inputs[0]
    if np.dtype(t.dtype) == np.float32:
        return x.astype(np.float32)
    return np.clip(np.round(x / t.scale + t.zero_point), -128, 127).astype(np.int8)


@pytest.mark.parametrize("pkg", ["sensor_pkg", "conv_pkg", "float_pkg"])
def test_export_runs_under_real_tflm_with_the_estimated_arena(models, pkg, tmp_path) -> None:  # noqa: ANN001
    """The exported bytes (read back from the compiled C array) run under TFLM in the estimated arena, give
    ai-edge-litert's outputs to 1 LSB, and the estimate is at or above the smallest arena TFLM accepts."""
    python = _tflm_python()
    export = export_mcu(getattr(models, pkg), tmp_path / "out")
    model_file = tmp_path / "from_c_array.tflite"
    model_file.write_bytes(_compile_and_dump(export, tmp_path))
    lite = runtime.load(model_file)
    shape = tuple(lite.inputs[0].shape)
    if pkg == "sensor_pkg":
        xs = models.sensor_eval[:, None]
    else:
        xs = np.random.default_rng(5).normal(size=(40, 1, *shape[1:])).astype(np.float32)
    raw = np.stack([_quantize(lite, x) for x in xs])
    interp = lite._interp  # noqa: SLF001 - raw int8 in/out to compare kernels, not the dequantized floats
    expected = []
    for x in raw:
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        expected.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    result = _run_tflm(python, model_file, raw, export.arena_size, tmp_path)
    assert result["ok"], f"TFLM refused the estimated arena of {export.arena_size} bytes"
    got = np.asarray(result["outputs"]).reshape(np.shape(expected))
    if got.dtype.kind == "f":
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-5)
    else:
        assert np.abs(got.astype(int) - np.asarray(expected).astype(int)).max() <= 1
    # The estimate covers what TFLM needs, without the margin, and is not wildly above it.
    assert result["min_arena"] <= export.arena_estimate <= 1.25 * result["min_arena"], result["min_arena"]
    # The activations alone would not do: TFLM's own structs are a real part of the arena.
    assert not _run_tflm(python, model_file, raw[:1], export.activation_peak, tmp_path)["ok"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=2, max_size=14), st.data())
def test_greedy_plan_never_overlaps_live_buffers(sizes, data) -> None:  # noqa: ANN001
    """Random graphs (a chain plus skip connections): no two buffers alive at once share bytes, and the peak
    lies between the most bytes alive at any one op and the naive sum."""
    n = len(sizes)
    tensors = tuple(tfl.Tensor(i, f"t{i}", "INT8", (s,), None, 0, False, None) for i, s in enumerate(sizes))
    ops = []
    for k in range(n - 1):
        extra = data.draw(st.lists(st.integers(0, k), max_size=2))
        ops.append(tfl.Operator(k, 0, "ADD", 1, None, (k, *extra), (k + 1,), ()))
    graph = tfl.SubGraph("main", tensors, (0,), (n - 1,), tuple(ops))
    model = tfl.TfliteModel(3, "", (tfl.OperatorCode("ADD", 0, 1, None),), (graph,), (0,))
    plan = te.plan_arena(model)
    assert sorted(b.tensor for b in plan) == list(range(n))
    peak = max(b.offset + b.size for b in plan)
    for a in plan:
        assert a.offset % 16 == 0
        for b in plan:
            if a is not b and a.first <= b.last and b.first <= a.last:
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
    live_max = max(sum(b.size for b in plan if b.first <= k <= b.last) for k in range(n - 1))
    assert live_max <= peak <= sum(b.size for b in plan)
