"""Read-only parser for the few tables of a .tflite flatbuffer that MCU export needs (ops, tensors, buffers).

Must never import TensorFlow, flatbuffers or anything outside the standard library: it runs where no converter is.

Why hand-written: TensorFlow's generated reader (tensorflow.lite.python.schema_py_generated) needs TensorFlow
installed, and the generated code for the `flatbuffers` runtime package would be a 10,000-line file we do not
need. A flatbuffer is simple to walk (root offset, vtables of u16 field offsets, u32-length vectors), and
tflite's schema.fbs field order has been append-only since schema v3, so the slots below are stable.
Slot numbers follow tensorflow/compiler/mlir/lite/schema/schema.fbs (a union field takes two slots:
its type byte, then its value).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from edge_slm.errors import ModelError

# tflite::BuiltinOperator, value = index (schema.fbs, TF 2.21: 0..209, contiguous).
BUILTIN_OPS: tuple[str, ...] = (
    'ADD', 'AVERAGE_POOL_2D', 'CONCATENATION', 'CONV_2D', 'DEPTHWISE_CONV_2D', 'DEPTH_TO_SPACE', 'DEQUANTIZE',
    'EMBEDDING_LOOKUP', 'FLOOR', 'FULLY_CONNECTED', 'HASHTABLE_LOOKUP', 'L2_NORMALIZATION', 'L2_POOL_2D',
    'LOCAL_RESPONSE_NORMALIZATION', 'LOGISTIC', 'LSH_PROJECTION', 'LSTM', 'MAX_POOL_2D', 'MUL', 'RELU',
    'RELU_N1_TO_1', 'RELU6', 'RESHAPE', 'RESIZE_BILINEAR', 'RNN', 'SOFTMAX', 'SPACE_TO_DEPTH', 'SVDF', 'TANH',
    'CONCAT_EMBEDDINGS', 'SKIP_GRAM', 'CALL', 'CUSTOM', 'EMBEDDING_LOOKUP_SPARSE', 'PAD',
    'UNIDIRECTIONAL_SEQUENCE_RNN', 'GATHER', 'BATCH_TO_SPACE_ND', 'SPACE_TO_BATCH_ND', 'TRANSPOSE', 'MEAN', 'SUB',
    'DIV', 'SQUEEZE', 'UNIDIRECTIONAL_SEQUENCE_LSTM', 'STRIDED_SLICE', 'BIDIRECTIONAL_SEQUENCE_RNN', 'EXP',
    'TOPK_V2', 'SPLIT', 'LOG_SOFTMAX', 'DELEGATE', 'BIDIRECTIONAL_SEQUENCE_LSTM', 'CAST', 'PRELU', 'MAXIMUM',
    'ARG_MAX', 'MINIMUM', 'LESS', 'NEG', 'PADV2', 'GREATER', 'GREATER_EQUAL', 'LESS_EQUAL', 'SELECT', 'SLICE', 'SIN',
    'TRANSPOSE_CONV', 'SPARSE_TO_DENSE', 'TILE', 'EXPAND_DIMS', 'EQUAL', 'NOT_EQUAL', 'LOG', 'SUM', 'SQRT', 'RSQRT',
    'SHAPE', 'POW', 'ARG_MIN', 'FAKE_QUANT', 'REDUCE_PROD', 'REDUCE_MAX', 'PACK', 'LOGICAL_OR', 'ONE_HOT',
    'LOGICAL_AND', 'LOGICAL_NOT', 'UNPACK', 'REDUCE_MIN', 'FLOOR_DIV', 'REDUCE_ANY', 'SQUARE', 'ZEROS_LIKE', 'FILL',
    'FLOOR_MOD', 'RANGE', 'RESIZE_NEAREST_NEIGHBOR', 'LEAKY_RELU', 'SQUARED_DIFFERENCE', 'MIRROR_PAD', 'ABS',
    'SPLIT_V', 'UNIQUE', 'CEIL', 'REVERSE_V2', 'ADD_N', 'GATHER_ND', 'COS', 'WHERE', 'RANK', 'ELU',
    'REVERSE_SEQUENCE', 'MATRIX_DIAG', 'QUANTIZE', 'MATRIX_SET_DIAG', 'ROUND', 'HARD_SWISH', 'IF', 'WHILE',
    'NON_MAX_SUPPRESSION_V4', 'NON_MAX_SUPPRESSION_V5', 'SCATTER_ND', 'SELECT_V2', 'DENSIFY', 'SEGMENT_SUM',
    'BATCH_MATMUL', 'PLACEHOLDER_FOR_GREATER_OP_CODES', 'CUMSUM', 'CALL_ONCE', 'BROADCAST_TO', 'RFFT2D', 'CONV_3D',
    'IMAG', 'REAL', 'COMPLEX_ABS', 'HASHTABLE', 'HASHTABLE_FIND', 'HASHTABLE_IMPORT', 'HASHTABLE_SIZE', 'REDUCE_ALL',
    'CONV_3D_TRANSPOSE', 'VAR_HANDLE', 'READ_VARIABLE', 'ASSIGN_VARIABLE', 'BROADCAST_ARGS',
    'RANDOM_STANDARD_NORMAL', 'BUCKETIZE', 'RANDOM_UNIFORM', 'MULTINOMIAL', 'GELU', 'DYNAMIC_UPDATE_SLICE',
    'RELU_0_TO_1', 'UNSORTED_SEGMENT_PROD', 'UNSORTED_SEGMENT_MAX', 'UNSORTED_SEGMENT_SUM', 'ATAN2',
    'UNSORTED_SEGMENT_MIN', 'SIGN', 'BITCAST', 'BITWISE_XOR', 'RIGHT_SHIFT', 'STABLEHLO_LOGISTIC', 'STABLEHLO_ADD',
    'STABLEHLO_DIVIDE', 'STABLEHLO_MULTIPLY', 'STABLEHLO_MAXIMUM', 'STABLEHLO_RESHAPE', 'STABLEHLO_CLAMP',
    'STABLEHLO_CONCATENATE', 'STABLEHLO_BROADCAST_IN_DIM', 'STABLEHLO_CONVOLUTION', 'STABLEHLO_SLICE',
    'STABLEHLO_CUSTOM_CALL', 'STABLEHLO_REDUCE', 'STABLEHLO_ABS', 'STABLEHLO_AND', 'STABLEHLO_COSINE',
    'STABLEHLO_EXPONENTIAL', 'STABLEHLO_FLOOR', 'STABLEHLO_LOG', 'STABLEHLO_MINIMUM', 'STABLEHLO_NEGATE',
    'STABLEHLO_OR', 'STABLEHLO_POWER', 'STABLEHLO_REMAINDER', 'STABLEHLO_RSQRT', 'STABLEHLO_SELECT',
    'STABLEHLO_SUBTRACT', 'STABLEHLO_TANH', 'STABLEHLO_SCATTER', 'STABLEHLO_COMPARE', 'STABLEHLO_CONVERT',
    'STABLEHLO_DYNAMIC_SLICE', 'STABLEHLO_DYNAMIC_UPDATE_SLICE', 'STABLEHLO_PAD', 'STABLEHLO_IOTA',
    'STABLEHLO_DOT_GENERAL', 'STABLEHLO_REDUCE_WINDOW', 'STABLEHLO_SORT', 'STABLEHLO_WHILE', 'STABLEHLO_GATHER',
    'STABLEHLO_TRANSPOSE', 'DILATE', 'STABLEHLO_RNG_BIT_GENERATOR', 'REDUCE_WINDOW', 'STABLEHLO_COMPOSITE',
    'STABLEHLO_SHIFT_LEFT', 'STABLEHLO_CBRT', 'STABLEHLO_CASE',
)

# tflite::TensorType, value = index, with each type's width in bits (0: no fixed size).
TENSOR_TYPES: tuple[tuple[str, int], ...] = (
    ("FLOAT32", 32), ("FLOAT16", 16), ("INT32", 32), ("UINT8", 8), ("INT64", 64), ("STRING", 0), ("BOOL", 8),
    ("INT16", 16), ("COMPLEX64", 64), ("INT8", 8), ("FLOAT64", 64), ("COMPLEX128", 128), ("UINT64", 64),
    ("RESOURCE", 0), ("VARIANT", 0), ("UINT32", 32), ("UINT16", 16), ("INT4", 4), ("BFLOAT16", 16), ("INT2", 2),
    ("UINT4", 4),
)

_FILE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of one tensor: real = scale * (q - zero_point), per tensor or per channel."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    quantized_dimension: int = 0


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...] | None
    buffer: int
    is_variable: bool
    quantization: Quantization | None

    @property
    def bits(self) -> int:
        return _type_bits(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data as the shape says (sub-byte types packed); 0 when the type has no size."""
        n = 1
        for d in self.shape:
            n *= max(d, 0)
        return (n * self.bits + 7) // 8


@dataclass(frozen=True)
class OperatorCode:
    name: str  # BuiltinOperator name, or "CUSTOM"
    builtin_code: int
    version: int
    custom_code: str | None


@dataclass(frozen=True)
class Operator:
    index: int
    opcode_index: int
    name: str
    version: int
    custom_code: str | None
    inputs: tuple[int, ...]  # -1 marks an omitted optional input
    outputs: tuple[int, ...]
    intermediates: tuple[int, ...]


@dataclass(frozen=True)
class SubGraph:
    name: str
    tensors: tuple[Tensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    operators: tuple[Operator, ...]  # in execution order


@dataclass(frozen=True)
class TfliteModel:
    version: int
    description: str
    operator_codes: tuple[OperatorCode, ...]
    subgraphs: tuple[SubGraph, ...]
    buffer_sizes: tuple[int, ...] = field(repr=False)  # bytes of constant data per buffer (0: none)

    def is_constant(self, tensor: Tensor) -> bool:
        """True when the tensor's data is in the file (weights, biases, shapes), so it needs no arena space."""
        return 0 < tensor.buffer < len(self.buffer_sizes) and self.buffer_sizes[tensor.buffer] > 0

    def op_versions(self) -> dict[str, int]:
        """{op name: highest version}, custom ops as "CUSTOM:<name>"; same as converters.tflite_info.op_versions."""
        out: dict[str, int] = {}
        for code in self.operator_codes:
            name = f"CUSTOM:{code.custom_code}" if code.name == "CUSTOM" else code.name
            out[name] = max(out.get(name, 0), code.version)
        return dict(sorted(out.items()))


def _type_bits(dtype: str) -> int:
    return next((bits for name, bits in TENSOR_TYPES if name == dtype), 0)


class _Reader:
    """Bounds-checked access to one flatbuffer; every read raises ModelError instead of reading past the end."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.size = len(buf)

    def _check(self, pos: int, n: int) -> None:
        if pos < 0 or pos + n > self.size:
            raise ModelError(f"corrupt .tflite: read of {n} bytes at offset {pos} is outside the {self.size}-byte file")

    def u8(self, pos: int) -> int:
        self._check(pos, 1)
        return self.buf[pos]

    def i8(self, pos: int) -> int:
        self._check(pos, 1)
        return struct.unpack_from("<b", self.buf, pos)[0]

    def u16(self, pos: int) -> int:
        self._check(pos, 2)
        return struct.unpack_from("<H", self.buf, pos)[0]

    def i32(self, pos: int) -> int:
        self._check(pos, 4)
        return struct.unpack_from("<i", self.buf, pos)[0]

    def u32(self, pos: int) -> int:
        self._check(pos, 4)
        return struct.unpack_from("<I", self.buf, pos)[0]

    def u64(self, pos: int) -> int:
        self._check(pos, 8)
        return struct.unpack_from("<Q", self.buf, pos)[0]

    def field(self, table: int, slot: int) -> int:
        """Absolute position of a table's field, or 0 when the field is absent (its default applies)."""
        vtable = table - self.i32(table)
        vsize = self.u16(vtable)
        entry = 4 + 2 * slot
        if entry + 2 > vsize:
            return 0
        off = self.u16(vtable + entry)
        return table + off if off else 0

    def deref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def table(self, table: int, slot: int) -> int:
        pos = self.field(table, slot)
        return self.deref(pos) if pos else 0

    def vector(self, table: int, slot: int, width: int) -> tuple[int, int]:
        """(start of the elements, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, slot)
        if not pos:
            return 0, 0
        vec = self.deref(pos)
        n = self.u32(vec)
        self._check(vec + 4, n * width)
        return vec + 4, n

    def scalars(self, table: int, slot: int, fmt: str) -> tuple:
        start, n = self.vector(table, slot, struct.calcsize(fmt))
        return struct.unpack_from(f"<{n}{fmt}", self.buf, start) if n else ()

    def tables(self, table: int, slot: int) -> list[int]:
        start, n = self.vector(table, slot, 4)
        return [self.deref(start + 4 * i) for i in range(n)]

    def string(self, table: int, slot: int) -> str | None:
        pos = self.field(table, slot)
        if not pos:
            return None
        s = self.deref(pos)
        n = self.u32(s)
        self._check(s + 4, n)
        return self.buf[s + 4 : s + 4 + n].decode("utf-8", errors="replace")


def parse(model_bytes: bytes) -> TfliteModel:
    """Parse the tables MCU export needs. Raises ModelError when the bytes are not a .tflite flatbuffer."""
    buf = bytes(model_bytes)
    if len(buf) < 8 or buf[4:8] != _FILE_IDENTIFIER:
        raise ModelError(
            f"not a .tflite model: file identifier is {buf[4:8]!r}, expected {_FILE_IDENTIFIER!r}; "
            "pass the model.tflite written by edge-slm convert"
        )
    r = _Reader(buf)
    model = r.deref(0)
    # Model: 0 version, 1 operator_codes, 2 subgraphs, 3 description, 4 buffers.
    version_pos = r.field(model, 0)
    codes = tuple(_operator_code(r, t) for t in r.tables(model, 1))
    buffer_sizes = tuple(_buffer_size(r, t) for t in r.tables(model, 4))
    subgraphs = tuple(_subgraph(r, t, codes) for t in r.tables(model, 2))
    return TfliteModel(
        version=r.u32(version_pos) if version_pos else 0,
        description=r.string(model, 3) or "",
        operator_codes=codes,
        subgraphs=subgraphs,
        buffer_sizes=buffer_sizes,
    )


def _operator_code(r: _Reader, t: int) -> OperatorCode:
    # OperatorCode: 0 deprecated_builtin_code (int8), 1 custom_code, 2 version (default 1), 3 builtin_code (int32).
    # Codes above 127 only fit builtin_code; old files only set the deprecated one: the larger is the real one.
    dep = r.field(t, 0)
    new = r.field(t, 3)
    code = max(r.i8(dep) if dep else 0, r.i32(new) if new else 0)
    ver = r.field(t, 2)
    name = BUILTIN_OPS[code] if 0 <= code < len(BUILTIN_OPS) else f"BUILTIN_{code}"
    return OperatorCode(name, code, r.i32(ver) if ver else 1, r.string(t, 1))


def _buffer_size(r: _Reader, t: int) -> int:
    # Buffer: 0 data [ubyte], 1 offset (u64), 2 size (u64); offset/size locate data stored after a >2 GB flatbuffer.
    _, n = r.vector(t, 0, 1)
    if n:
        return n
    size = r.field(t, 2)
    return r.u64(size) if size else 0


def _subgraph(r: _Reader, t: int, codes: tuple[OperatorCode, ...]) -> SubGraph:
    # SubGraph: 0 tensors, 1 inputs, 2 outputs, 3 operators, 4 name.
    tensors = tuple(_tensor(r, i, x) for i, x in enumerate(r.tables(t, 0)))
    ops = []
    for i, x in enumerate(r.tables(t, 3)):
        # Operator: 0 opcode_index, 1 inputs, 2 outputs, 3-4 builtin_options (union), 5 custom_options,
        # 6 custom_options_format, 7 mutating_variable_inputs, 8 intermediates.
        pos = r.field(x, 0)
        idx = r.u32(pos) if pos else 0
        if idx >= len(codes):
            raise ModelError(f"corrupt .tflite: operator {i} uses opcode {idx} of {len(codes)}")
        code = codes[idx]
        ops.append(Operator(i, idx, code.name, code.version, code.custom_code, r.scalars(x, 1, "i"),
                            r.scalars(x, 2, "i"), r.scalars(x, 8, "i")))
    return SubGraph(r.string(t, 4) or "", tensors, r.scalars(t, 1, "i"), r.scalars(t, 2, "i"), tuple(ops))


def _tensor(r: _Reader, index: int, t: int) -> Tensor:
    # Tensor: 0 shape, 1 type (int8 enum), 2 buffer (u32), 3 name, 4 quantization, 5 is_variable,
    # 6 sparsity, 7 shape_signature.
    typ = r.field(t, 1)
    code = r.u8(typ) if typ else 0
    dtype = TENSOR_TYPES[code][0] if code < len(TENSOR_TYPES) else f"TYPE_{code}"
    buf = r.field(t, 2)
    var = r.field(t, 5)
    sig_pos = r.field(t, 7)
    return Tensor(
        index=index,
        name=r.string(t, 3) or "",
        dtype=dtype,
        shape=r.scalars(t, 0, "i"),
        shape_signature=r.scalars(t, 7, "i") if sig_pos else None,
        buffer=r.u32(buf) if buf else 0,
        is_variable=bool(r.u8(var)) if var else False,
        quantization=_quantization(r, r.table(t, 4)),
    )


def _quantization(r: _Reader, q: int) -> Quantization | None:
    # QuantizationParameters: 0 min, 1 max, 2 scale [float], 3 zero_point [long], 4-5 details (union),
    # 6 quantized_dimension.
    if not q:
        return None
    scale = r.scalars(q, 2, "f")
    if not scale:
        return None
    dim = r.field(q, 6)
    return Quantization(tuple(float(s) for s in scale), tuple(int(z) for z in r.scalars(q, 3, "q")),
                        r.i32(dim) if dim else 0)
