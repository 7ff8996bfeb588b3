"""Build a Keras 3 encoder (BERT, DistilBERT) from a checkpoint's safetensors, with its head.

Host only: gets Keras through converters.tf_env; never imports PyTorch or transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from converters.checkpoint.loader import Checkpoint
from converters.checkpoint.weights import Weights
from converters.tf_env import tf
from edge_slm.errors import ConversionError

# Added to the scores of padding keys. Finite in float16 too, and exp(-1e4 + s) is exactly 0 in
# float32, so every row with one real token matches transformers' finfo.min bit for bit.
MASK_BIAS = -1e4
GELU_EXACT = ("gelu",)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ACTIVATIONS = GELU_EXACT + GELU_TANH + ("relu",)
# sentence-transformers' pooling modes in the order it concatenates them; others are refused.
POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_tokens",
                 "pooling_mode_mean_sqrt_len_tokens")
UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class Dims:
    """One architecture's sizes, read from config.json under that architecture's key names."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    activation: str
    activation_key: str
    eps: float
    max_positions: int
    vocab: int
    type_vocab: int  # 0 when the architecture has no token-type embeddings (DistilBERT)


def _dims(ckpt: Checkpoint) -> Dims:
    if ckpt.arch == "bert":
        pos_type = ckpt.cfg("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ConversionError(f"{ckpt.path / 'config.json'}: position_embedding_type {pos_type!r} is not "
                                  "supported; only 'absolute'")
        dims = Dims(int(ckpt.cfg("hidden_size", required=True)), int(ckpt.cfg("num_hidden_layers", required=True)),
                    int(ckpt.cfg("num_attention_heads", required=True)),
                    int(ckpt.cfg("intermediate_size", required=True)), str(ckpt.cfg("hidden_act", "gelu")),
                    "hidden_act", float(ckpt.cfg("layer_norm_eps", 1e-12)),
                    int(ckpt.cfg("max_position_embeddings", required=True)), int(ckpt.cfg("vocab_size", required=True)),
                    int(ckpt.cfg("type_vocab_size", 2)))
    elif ckpt.arch == "distilbert":
        # DistilBERT's LayerNorms are built with eps=1e-12 in code; config.json does not carry it.
        dims = Dims(int(ckpt.cfg("dim", required=True)), int(ckpt.cfg("n_layers", required=True)),
                    int(ckpt.cfg("n_heads", required=True)), int(ckpt.cfg("hidden_dim", required=True)),
                    str(ckpt.cfg("activation", "gelu")), "activation", 1e-12,
                    int(ckpt.cfg("max_position_embeddings", required=True)), int(ckpt.cfg("vocab_size", required=True)),
                    0)
    else:
        raise ConversionError(f"{ckpt.arch} is not an encoder; build_encoder takes BERT or DistilBERT")
    if dims.activation not in ACTIVATIONS:
        raise ConversionError(f"{ckpt.path / 'config.json'}: {dims.activation_key} {dims.activation!r} is not "
                              f"supported; supported: {', '.join(ACTIVATIONS)}")
    if dims.hidden % dims.heads:
        raise ConversionError(f"{ckpt.path / 'config.json'}: hidden size {dims.hidden} is not divisible by "
                              f"{dims.heads} attention heads")
    return dims


def _block_names(arch: str, i: int) -> dict[str, str]:
    """Tensor name prefixes of encoder block i, by role."""
    if arch == "bert":
        p = f"encoder.layer.{i}."
        return {"q": p + "attention.self.query", "k": p + "attention.self.key", "v": p + "attention.self.value",
                "o": p + "attention.output.dense", "ln1": p + "attention.output.LayerNorm",
                "ff1": p + "intermediate.dense", "ff2": p + "output.dense", "ln2": p + "output.LayerNorm"}
    p = f"transformer.layer.{i}."
    return {"q": p + "attention.q_lin", "k": p + "attention.k_lin", "v": p + "attention.v_lin",
            "o": p + "attention.out_lin", "ln1": p + "sa_layer_norm",
            "ff1": p + "ffn.lin1", "ff2": p + "ffn.lin2", "ln2": p + "output_layer_norm"}


def _layer_name(tensor: str) -> str:
    return tensor.replace(".", "_")


def _dense(w: Weights, name: str, n_in: int, n_out: int, scale: float = 1.0, layer_name: str | None = None) -> Any:
    """A Dense holding HF Linear `name` (weight is (out, in), so it is transposed)."""
    keras = tf().keras
    kernel = w.get(name + ".weight", (n_out, n_in)).T * scale
    bias = w.get(name + ".bias", (n_out,)) * scale
    layer = keras.layers.Dense(n_out, name=layer_name or _layer_name(name))
    layer.build((None, n_in))
    layer.set_weights([kernel, bias])
    return layer


def _layer_norm(w: Weights, name: str, n: int, eps: float) -> Any:
    keras = tf().keras
    # Checkpoints ported from TF 1 name the LayerNorm parameters gamma/beta.
    gamma, beta = ("weight", "bias") if w.has(name + ".weight") or not w.has(name + ".gamma") else ("gamma", "beta")
    layer = keras.layers.LayerNormalization(epsilon=eps, name=_layer_name(name))
    layer.build((None, n))
    layer.set_weights([w.get(f"{name}.{gamma}", (n,)), w.get(f"{name}.{beta}", (n,))])
    return layer


def _embedding(w: Weights, name: str, rows: int, n: int) -> Any:
    keras = tf().keras
    layer = keras.layers.Embedding(rows, n, name=_layer_name(name))
    layer.build((None,))
    layer.set_weights([w.get(name, (rows, n))])
    return layer


def _activate(x: Any, name: str) -> Any:
    ops = tf().keras.ops
    if name in GELU_EXACT:
        return ops.gelu(x, approximate=False)
    if name in GELU_TANH:
        return ops.gelu(x, approximate=True)
    return ops.relu(x)


def _attention(x: Any, bias: Any, w: Weights, names: dict[str, str], dims: Dims, length: int) -> Any:
    """Multi-head self-attention with reshape/transpose/matmul only (no Einsum, which TFLite handles badly)."""
    ops = tf().keras.ops
    h, d = dims.heads, dims.hidden // dims.heads
    # 1/sqrt(d) is folded into the query weights: no extra multiply at run time.
    q = _dense(w, names["q"], dims.hidden, dims.hidden, scale=1.0 / math.sqrt(d))(x)
    k = _dense(w, names["k"], dims.hidden, dims.hidden)(x)
    v = _dense(w, names["v"], dims.hidden, dims.hidden)(x)
    q = ops.transpose(ops.reshape(q, (-1, length, h, d)), (0, 2, 1, 3))  # (B, h, L, d)
    k = ops.transpose(ops.reshape(k, (-1, length, h, d)), (0, 2, 3, 1))  # (B, h, d, L)
    v = ops.transpose(ops.reshape(v, (-1, length, h, d)), (0, 2, 1, 3))  # (B, h, L, d)
    probs = ops.softmax(ops.matmul(q, k) + bias, axis=-1)
    ctx = ops.reshape(ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3)), (-1, length, dims.hidden))
    return _dense(w, names["o"], dims.hidden, dims.hidden)(ctx)


def _block(x: Any, bias: Any, w: Weights, names: dict[str, str], dims: Dims, length: int) -> Any:
    """One post-LayerNorm transformer block, as both BERT and DistilBERT have it."""
    x = _layer_norm(w, names["ln1"], dims.hidden, dims.eps)(x + _attention(x, bias, w, names, dims, length))
    f = _activate(_dense(w, names["ff1"], dims.hidden, dims.ffn)(x), dims.activation)
    f = _dense(w, names["ff2"], dims.ffn, dims.hidden)(f)
    return _layer_norm(w, names["ln2"], dims.hidden, dims.eps)(x + f)


def _pool(ckpt: Checkpoint, hidden: Any, mask: Any) -> Any:
    """sentence-transformers pooling over real tokens (mean when no pooling config), then L2 normalize."""
    keras = tf().keras
    ops = keras.ops
    cfg = ckpt.pooling or {"pooling_mode_mean_tokens": True}
    for key in UNSUPPORTED_POOLING:
        if cfg.get(key):
            raise ConversionError(f"{ckpt.path}: pooling config {key} is not supported; supported: "
                                  f"{', '.join(POOLING_MODES)}")
    m = ops.expand_dims(mask, -1)  # (B, L, 1) float
    parts = []
    for key in POOLING_MODES:
        if not cfg.get(key):
            continue
        if key == "pooling_mode_cls_token":
            parts.append(hidden[:, 0, :])
        elif key == "pooling_mode_max_tokens":
            # Same padding value sentence-transformers writes before its max.
            parts.append(ops.max(hidden * m + (1.0 - m) * -1e9, axis=1))
        else:
            total = ops.sum(hidden * m, axis=1)
            count = ops.maximum(ops.sum(m, axis=1), 1e-9)
            parts.append(total / (count if key == "pooling_mode_mean_tokens" else ops.sqrt(count)))
    if not parts:
        raise ConversionError(f"{ckpt.path}: pooling config sets none of {', '.join(POOLING_MODES)}")
    out = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
    if ckpt.normalize:
        # torch.nn.functional.normalize: x / max(||x||, 1e-12).
        out = out / ops.sqrt(ops.maximum(ops.sum(ops.square(out), axis=-1, keepdims=True), 1e-24))
    return keras.layers.Identity(name="embedding")(out)


def _classify(ckpt: Checkpoint, hidden: Any, dims: Dims) -> Any:
    """BERT: pooler (dense + tanh on [CLS]) then classifier; DistilBERT: pre_classifier + ReLU then classifier."""
    ops = tf().keras.ops
    w = ckpt.weights
    n_labels = len(ckpt.labels) or w.get("classifier.weight").shape[0]
    first = hidden[:, 0, :]
    if ckpt.arch == "bert":
        x = ops.tanh(_dense(w, "pooler.dense", dims.hidden, dims.hidden)(first))
    else:
        x = ops.relu(_dense(w, "pre_classifier", dims.hidden, dims.hidden)(first))
    return _dense(w, "classifier", dims.hidden, n_labels, layer_name="logits")(x)


def build_encoder(ckpt: Checkpoint, max_length: int) -> Any:
    """Keras functional model: input_ids, attention_mask int32 (B, max_length) -> logits or embedding.

    attention_mask is 1 for a token, 0 for padding. Output "logits" (B, n_labels) for the classification
    head, "embedding" (B, hidden) for the embedding head.
    """
    keras = tf().keras
    ops = keras.ops
    dims = _dims(ckpt)
    key = "max_position_embeddings"
    if not 1 <= max_length <= dims.max_positions:
        raise ConversionError(f"max_length {max_length} must be between 1 and {key} = {dims.max_positions} "
                              f"in {ckpt.path / 'config.json'}")
    if ckpt.head not in ("classification", "embedding"):
        raise ConversionError(f"{ckpt.arch} is an encoder; head {ckpt.head!r} needs a decoder")
    w = ckpt.weights
    ids = keras.Input(shape=(max_length,), dtype="int32", name="input_ids")
    mask = keras.Input(shape=(max_length,), dtype="int32", name="attention_mask")

    # Position and token-type ids are built from the input so the tables stay Keras weights; with a fixed
    # batch the converter folds both lookups into one constant.
    positions = ops.zeros_like(ids) + ops.arange(max_length, dtype="int32")
    x = _embedding(w, "embeddings.word_embeddings.weight", dims.vocab, dims.hidden)(ids)
    if dims.type_vocab:
        x = x + _embedding(w, "embeddings.token_type_embeddings.weight", dims.type_vocab, dims.hidden)(
            ops.zeros_like(ids))
    x = x + _embedding(w, "embeddings.position_embeddings.weight", dims.max_positions, dims.hidden)(positions)
    x = _layer_norm(w, "embeddings.LayerNorm", dims.hidden, dims.eps)(x)

    maskf = ops.cast(mask, "float32")
    bias = ops.reshape((1.0 - maskf) * MASK_BIAS, (-1, 1, 1, max_length))  # broadcast over heads and queries
    for i in range(dims.layers):
        x = _block(x, bias, w, _block_names(ckpt.arch, i), dims, max_length)

    out = _classify(ckpt, x, dims) if ckpt.head == "classification" else _pool(ckpt, x, maskf)
    return keras.Model([ids, mask], out, name=f"{ckpt.arch}_{ckpt.head}")
