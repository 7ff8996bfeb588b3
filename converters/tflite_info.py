"""Read a .tflite flatbuffer's operator codes (name and version) and which ops compute in float.

Host only: uses TensorFlow's generated schema reader.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_slm import runtime

_QUANT_GLUE = {"QUANTIZE", "DEQUANTIZE"}


def op_versions(model_bytes: bytes) -> dict[str, int]:
    """{op name: highest version used}, e.g. {"FULLY_CONNECTED": 12}; what a runtime must support."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}
    model = schema.Model.GetRootAsModel(bytearray(model_bytes), 0)
    out: dict[str, int] = {}
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{code.CustomCode().decode()}"
        out[name] = max(out.get(name, 0), code.Version())
    return dict(sorted(out.items()))


def float_ops(model_bytes: bytes) -> list[str]:
    """Ops whose first input is float32: what stayed float after quantization."""
    model = runtime.load(content=model_bytes)
    interp = model._interp  # noqa: SLF001 - tensor-level details are only on the interpreter
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interp.get_tensor_details()}
    found: set[str] = set()
    for op in interp._get_ops_details():  # noqa: SLF001
        if op["op_name"] in _QUANT_GLUE or not len(op["inputs"]):
            continue
        first = int(op["inputs"][0])
        if first >= 0 and dtypes.get(first) == np.float32:
            found.add(op["op_name"])
    return sorted(found)


def describe(model_bytes: bytes) -> dict[str, Any]:
    return {"ops": op_versions(model_bytes), "float_ops": float_ops(model_bytes)}
