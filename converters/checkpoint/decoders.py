"""GPT-2 and LLaMA-family causal decoders as TensorFlow graphs with an explicit KV cache (prefill + decode).

Host only; never imports PyTorch (weights come from safetensors as numpy). Exported as two TFLite signatures.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from converters.checkpoint.loader import Checkpoint
from converters.tf_env import silenced, tf
from edge_slm.errors import ConversionError

RECIPES = ("float32", "float16", "dynamic")
SIGNATURES = ("prefill", "decode")
# Added to masked attention scores. Finite so a row with every key masked (length 0) stays NaN-free;
# large enough that exp() of it underflows to exactly 0 next to any real score.
MASKED = -1e9
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu")
LLAMA_ROPE_TYPES = ("default", "linear", "llama3")

t = tf()


class Decoder(t.Module):
    """A batch-1 causal LM. Subclasses supply embeddings, q/k/v, MLP, norms and the LM head.

    Signatures (inputs -> outputs; S = max_cache, P = prefill_len, L = n_layers):
      prefill(input_ids int32 [1,P], length int32 [1]) -> logits float32 [1,V] at position length-1,
        k_cache/v_cache float32 [L, n_kv_heads, S, head_dim], rows >= length zero.
      decode(token int32 [1,1], position int32 [1], k_cache, v_cache) -> logits [1,V], k_cache, v_cache,
        the token's K/V written at `position`; keys at positions > position are masked.
    A position outside [0, S), or a length outside [1, P], makes a GATHER fail (TF InvalidArgumentError,
    TFLite "gather index out of bounds" at invoke) instead of writing or reading a wrong row: callers
    must check first. param_count counts the exported weights (tied matrices once; GPT-2's wpe
    only up to S rows).
    """

    def __init__(self, *, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int,
                 vocab_size: int, max_cache: int, prefill_len: int) -> None:
        super().__init__()
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.head_dim, self.hidden, self.vocab_size = head_dim, hidden, vocab_size
        self.max_cache, self.prefill_len = max_cache, prefill_len
        self.param_count = 0
        self._w: dict[str, Any] = {}
        S, P = max_cache, prefill_len
        cache = t.TensorSpec([n_layers, n_kv_heads, S, head_dim], t.float32)
        self.prefill = t.function(self._prefill, input_signature=[
            t.TensorSpec([1, P], t.int32, name="input_ids"), t.TensorSpec([1], t.int32, name="length")])
        self.decode = t.function(self._decode, input_signature=[
            t.TensorSpec([1, 1], t.int32, name="token"), t.TensorSpec([1], t.int32, name="position"),
            t.TensorSpec(cache.shape, t.float32, name="k_cache"), t.TensorSpec(cache.shape, t.float32, name="v_cache")])
        self.full_logits = t.function(self._full_logits, input_signature=[
            t.TensorSpec([1, None], t.int32, name="input_ids")])

    @property
    def weight_bytes_float32(self) -> int:
        return 4 * self.param_count

    def _add(self, key: str, arr: np.ndarray, count: bool = True) -> None:
        # Variables (not graph constants) keep a big model's SavedModel under the 2 GB GraphDef limit.
        self._w[key] = t.Variable(arr.astype(np.float32), trainable=False, name=key)
        if count:
            self.param_count += int(arr.size)

    # -- pieces a subclass provides (abstract: tf.Module's metaclass is not ABCMeta, so they raise) ---
    @abstractmethod
    def _embed(self, ids: Any, positions: Any) -> Any:  # [T] ids -> [T, D]
        raise NotImplementedError

    @abstractmethod
    def _qkv(self, i: int, h: Any, positions: Any) -> tuple[Any, Any, Any]:
        """h [T, D] -> q [T, H, hd], k and v [T, Hkv, hd], positional encoding already applied."""
        raise NotImplementedError

    @abstractmethod
    def _attn_out(self, i: int, a: Any) -> Any:
        raise NotImplementedError

    @abstractmethod
    def _mlp(self, i: int, h: Any) -> Any:
        raise NotImplementedError

    @abstractmethod
    def _norm(self, key: str, x: Any) -> Any:
        raise NotImplementedError

    @abstractmethod
    def _head(self, h: Any) -> Any:  # [N, D] -> [N, V]
        raise NotImplementedError

    def _scale(self, i: int) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    # -- shared transformer body -----------------------------------------------------------------
    def _attend(self, i: int, q: Any, k: Any, v: Any, bias: Any) -> Any:
        """q [T, H, hd]; k, v [Hkv, S, hd]; bias [T, S] additive. Returns [T, H*hd].

        Grouped-query attention without repeating K/V: the G query heads sharing a KV head are stacked
        along the row axis, so one BATCH_MATMUL per layer covers them (HF's repeat_kv order: head h uses
        KV head h // G).
        """
        T = t.shape(q)[0]
        G = self.n_heads // self.n_kv_heads
        qg = t.reshape(q, [T, self.n_kv_heads, G, self.head_dim])
        qg = t.reshape(t.transpose(qg, [1, 2, 0, 3]), [self.n_kv_heads, G * T, self.head_dim])
        scores = t.matmul(qg, k, transpose_b=True) * self._scale(i)
        scores = scores + (t.tile(bias, [G, 1]) if G > 1 else bias)
        a = t.matmul(t.nn.softmax(scores, axis=-1), v)  # [Hkv, G*T, hd]
        a = t.transpose(t.reshape(a, [self.n_heads, T, self.head_dim]), [1, 0, 2])
        return t.reshape(a, [T, self.n_heads * self.head_dim])

    def _run(self, ids: Any, positions: Any, bias: Any, kv_hook: Any) -> Any:
        """ids [T]; bias [T, S]; kv_hook(i, k, v) -> (keys, values) [Hkv, S, hd] to attend over."""
        x = self._embed(ids, positions)
        for i in range(self.n_layers):
            q, k, v = self._qkv(i, self._norm(f"l{i}_norm1", x), positions)
            keys, values = kv_hook(i, t.transpose(k, [1, 0, 2]), t.transpose(v, [1, 0, 2]))
            x = x + self._attn_out(i, self._attend(i, q, keys, values, bias))
            x = x + self._mlp(i, self._norm(f"l{i}_norm2", x))
        return self._norm("final_norm", x)

    def _prefill(self, input_ids: Any, length: Any) -> dict[str, Any]:
        P, S = self.prefill_len, self.max_cache
        pos = np.arange(P)
        causal = np.where(pos[None, :] <= pos[:, None], 0.0, MASKED).astype(np.float32)
        keep = t.cast(t.range(P) < length, t.float32)  # [P]: 1 for real tokens, 0 for padding
        bias = t.constant(causal) + (keep[None, :] - 1.0) * -MASKED
        ks: list[Any] = []
        vs: list[Any] = []

        def hook(i: int, k: Any, v: Any) -> tuple[Any, Any]:
            # Padding rows are zeroed so the cache holds exactly what decode's mask will later admit.
            pad = [[0, 0], [0, S - P], [0, 0]]
            ks.append(t.pad(k * keep[None, :, None], pad))
            vs.append(t.pad(v * keep[None, :, None], pad))
            return k, v

        h = self._run(input_ids[0], t.constant(pos, t.int32), bias, hook)
        last = t.gather(h, length - 1)  # [1, D]: only the last real position needs the LM head
        return {"logits": self._head(last), "k_cache": t.stack(ks), "v_cache": t.stack(vs)}

    def _decode(self, token: Any, position: Any, k_cache: Any, v_cache: Any) -> dict[str, Any]:
        S = self.max_cache
        slots = t.range(S)
        # One-hot blend instead of a scatter: MUL/ADD/EQUAL/CAST are TFLite builtins in every runtime.
        onehot = t.reshape(t.cast(t.equal(slots, position), t.float32), [1, S, 1])
        bias = t.reshape((t.cast(slots <= position, t.float32) - 1.0) * -MASKED, [1, S])
        k_in, v_in = t.unstack(k_cache, axis=0), t.unstack(v_cache, axis=0)
        ks: list[Any] = []
        vs: list[Any] = []

        def hook(i: int, k: Any, v: Any) -> tuple[Any, Any]:
            ks.append(k_in[i] * (1.0 - onehot) + k * onehot)
            vs.append(v_in[i] * (1.0 - onehot) + v * onehot)
            return ks[-1], vs[-1]

        h = self._run(token[0], position, bias, hook)
        return {"logits": self._head(h), "k_cache": t.stack(ks), "v_cache": t.stack(vs)}

    def _full_logits(self, input_ids: Any) -> Any:
        T = t.shape(input_ids)[1]
        pos = t.range(T)
        bias = (t.cast(pos[None, :] <= pos[:, None], t.float32) - 1.0) * -MASKED
        h = self._run(input_ids[0], pos, bias, lambda i, k, v: (k, v))
        return self._head(h)[None]


def _linear(x: Any, w: Any, b: Any = None, out_in: bool = True) -> Any:
    """x [N, in]. out_in: w is (out, in) like nn.Linear (maps straight onto FULLY_CONNECTED)."""
    y = t.matmul(x, w, transpose_b=out_in)
    return y if b is None else y + b


class GPT2Decoder(Decoder):
    """GPT-2: learned positions, LayerNorm, fused c_attn (HF Conv1D weights are (in, out)), tied head."""

    def __init__(self, ckpt: Checkpoint, max_cache: int, prefill_len: int) -> None:
        D = int(ckpt.cfg("n_embd", required=True))
        H = int(ckpt.cfg("n_head", required=True))
        L = int(ckpt.cfg("n_layer", required=True))
        V = int(ckpt.cfg("vocab_size", required=True))
        n_pos = int(ckpt.cfg("n_positions", required=True))
        _check_lengths(ckpt, "n_positions", n_pos, max_cache, prefill_len)
        if D % H:
            raise ConversionError(f"{ckpt.path / 'config.json'}: n_embd {D} is not divisible by n_head {H}")
        act = ckpt.cfg("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise ConversionError(f"{ckpt.path / 'config.json'}: activation_function {act!r} is not supported "
                                  f"(supported: {', '.join(GPT2_ACTIVATIONS)})")
        super().__init__(n_layers=L, n_heads=H, n_kv_heads=H, head_dim=D // H, hidden=D, vocab_size=V,
                         max_cache=max_cache, prefill_len=prefill_len)
        self.act = act
        self.eps = float(ckpt.cfg("layer_norm_epsilon", 1e-5))
        self.scale_weights = bool(ckpt.cfg("scale_attn_weights", True))
        self.scale_by_layer = bool(ckpt.cfg("scale_attn_by_inverse_layer_idx", False))
        inner = int(ckpt.cfg("n_inner") or 4 * D)
        w = ckpt.weights
        self._add("wte", w.get("wte.weight", (V, D)))
        # Only the rows a position < max_cache can reach; a later position fails the GATHER loudly.
        self._add("wpe", w.get("wpe.weight", (n_pos, D))[:max_cache])
        for i in range(L):
            p = f"h.{i}."
            for key, name in (("norm1", "ln_1"), ("norm2", "ln_2")):
                self._add(f"l{i}_{key}_w", w.get(p + name + ".weight", (D,)))
                self._add(f"l{i}_{key}_b", w.get(p + name + ".bias", (D,)))
            for key, name, shape in (("qkv", "attn.c_attn", (D, 3 * D)), ("o", "attn.c_proj", (D, D)),
                                     ("fc", "mlp.c_fc", (D, inner)), ("proj", "mlp.c_proj", (inner, D))):
                self._add(f"l{i}_{key}_w", w.get(p + name + ".weight", shape))
                self._add(f"l{i}_{key}_b", w.get(p + name + ".bias", (shape[1],)))
        self._add("final_norm_w", w.get("ln_f.weight", (D,)))
        self._add("final_norm_b", w.get("ln_f.bias", (D,)))
        if not ckpt.cfg("tie_word_embeddings", True):
            self._add("lm_head", w.get("lm_head.weight", (V, D)))

    def _scale(self, i: int) -> float:
        s = 1.0 / math.sqrt(self.head_dim) if self.scale_weights else 1.0
        return s / (i + 1) if self.scale_by_layer else s

    def _embed(self, ids: Any, positions: Any) -> Any:
        return t.gather(self._w["wte"], ids) + t.gather(self._w["wpe"], positions)

    def _norm(self, key: str, x: Any) -> Any:
        mean = t.reduce_mean(x, axis=-1, keepdims=True)
        var = t.reduce_mean(t.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * t.math.rsqrt(var + self.eps) * self._w[key + "_w"] + self._w[key + "_b"]

    def _qkv(self, i: int, h: Any, positions: Any) -> tuple[Any, Any, Any]:
        qkv = _linear(h, self._w[f"l{i}_qkv_w"], self._w[f"l{i}_qkv_b"], out_in=False)
        qkv = t.reshape(qkv, [-1, 3 * self.n_heads, self.head_dim])
        return tuple(t.split(qkv, 3, axis=1))  # type: ignore[return-value]

    def _attn_out(self, i: int, a: Any) -> Any:
        return _linear(a, self._w[f"l{i}_o_w"], self._w[f"l{i}_o_b"], out_in=False)

    def _mlp(self, i: int, h: Any) -> Any:
        u = _linear(h, self._w[f"l{i}_fc_w"], self._w[f"l{i}_fc_b"], out_in=False)
        if self.act == "relu":
            u = t.nn.relu(u)
        else:  # gelu_new / gelu_pytorch_tanh / gelu_fast are the tanh approximation
            u = t.nn.gelu(u, approximate=self.act != "gelu")
        return _linear(u, self._w[f"l{i}_proj_w"], self._w[f"l{i}_proj_b"], out_in=False)

    def _head(self, h: Any) -> Any:
        return _linear(h, self._w.get("lm_head", self._w["wte"]))


class LlamaDecoder(Decoder):
    """LLaMA family (TinyLlama, SmolLM, Qwen2-style biases): RMSNorm, RoPE, GQA, SwiGLU."""

    def __init__(self, ckpt: Checkpoint, max_cache: int, prefill_len: int) -> None:
        cfg_path = ckpt.path / "config.json"
        D = int(ckpt.cfg("hidden_size", required=True))
        H = int(ckpt.cfg("num_attention_heads", required=True))
        Hkv = int(ckpt.cfg("num_key_value_heads") or H)
        L = int(ckpt.cfg("num_hidden_layers", required=True))
        inter = int(ckpt.cfg("intermediate_size", required=True))
        V = int(ckpt.cfg("vocab_size", required=True))
        hd = int(ckpt.cfg("head_dim") or D // H)
        n_pos = int(ckpt.cfg("max_position_embeddings", 2048))  # LlamaConfig's default
        _check_lengths(ckpt, "max_position_embeddings", n_pos, max_cache, prefill_len)
        if H % Hkv:
            raise ConversionError(f"{cfg_path}: num_attention_heads {H} is not a multiple of num_key_value_heads {Hkv}")
        if hd % 2:
            raise ConversionError(f"{cfg_path}: head_dim {hd} must be even for rotary embeddings")
        act = ckpt.cfg("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConversionError(f"{cfg_path}: hidden_act {act!r} is not supported (LLaMA MLP needs silu)")
        if ckpt.cfg("use_sliding_window", False):
            raise ConversionError(f"{cfg_path}: use_sliding_window is true; sliding-window attention is not supported")
        super().__init__(n_layers=L, n_heads=H, n_kv_heads=Hkv, head_dim=hd, hidden=D, vocab_size=V,
                         max_cache=max_cache, prefill_len=prefill_len)
        self.eps = float(ckpt.cfg("rms_norm_eps", 1e-6))
        inv_freq = rope_inv_freq(ckpt, hd)
        angles = np.arange(max_cache, dtype=np.float64)[:, None] * inv_freq[None, :].astype(np.float64)
        # Tables of exactly max_cache rows: the GATHER of a position >= max_cache fails instead of guessing.
        self._cos = t.constant(np.cos(angles).astype(np.float32))
        self._sin = t.constant(np.sin(angles).astype(np.float32))

        w = ckpt.weights
        self._add("embed", w.get("embed_tokens.weight", (V, D)))
        all_bias = bool(ckpt.cfg("attention_bias", False))
        mlp_bias = bool(ckpt.cfg("mlp_bias", False))
        for i in range(L):
            p = f"layers.{i}."
            self._add(f"l{i}_norm1_w", w.get(p + "input_layernorm.weight", (D,)))
            self._add(f"l{i}_norm2_w", w.get(p + "post_attention_layernorm.weight", (D,)))
            # q, k, v fused into one FULLY_CONNECTED (and gate, up into another): fewer ops per token.
            projs = (("q", H * hd), ("k", Hkv * hd), ("v", Hkv * hd))
            mats = [w.get(f"{p}self_attn.{n}_proj.weight", (o, D)) for n, o in projs]
            self._add(f"l{i}_qkv_w", np.concatenate(mats, axis=0), count=False)
            self.param_count += sum(m.size for m in mats)
            # attention_bias means q/k/v/o all have one; Qwen2-style checkpoints carry q/k/v biases only.
            if all_bias or any(w.has(f"{p}self_attn.{n}_proj.bias") for n, _ in projs):
                biases = [w.get(f"{p}self_attn.{n}_proj.bias", (o,)) for n, o in projs]
                self._add(f"l{i}_qkv_b", np.concatenate(biases))
            self._add(f"l{i}_o_w", w.get(p + "self_attn.o_proj.weight", (D, H * hd)))
            if all_bias or w.has(p + "self_attn.o_proj.bias"):
                self._add(f"l{i}_o_b", w.get(p + "self_attn.o_proj.bias", (D,)))
            gate_up = [w.get(f"{p}mlp.{n}_proj.weight", (inter, D)) for n in ("gate", "up")]
            self._add(f"l{i}_gate_up_w", np.concatenate(gate_up, axis=0), count=False)
            self.param_count += sum(m.size for m in gate_up)
            self._add(f"l{i}_down_w", w.get(p + "mlp.down_proj.weight", (D, inter)))
            if mlp_bias:
                self._add(f"l{i}_gate_up_b", np.concatenate([w.get(f"{p}mlp.{n}_proj.bias", (inter,))
                                                             for n in ("gate", "up")]))
                self._add(f"l{i}_down_b", w.get(p + "mlp.down_proj.bias", (D,)))
        self._add("final_norm_w", w.get("norm.weight", (D,)))
        if not ckpt.cfg("tie_word_embeddings", False):  # LlamaConfig's default is untied
            self._add("lm_head", w.get("lm_head.weight", (V, D)))

    def _embed(self, ids: Any, positions: Any) -> Any:
        return t.gather(self._w["embed"], ids)

    def _norm(self, key: str, x: Any) -> Any:
        ms = t.reduce_mean(t.square(x), axis=-1, keepdims=True)
        return x * t.math.rsqrt(ms + self.eps) * self._w[key + "_w"]

    def _qkv(self, i: int, h: Any, positions: Any) -> tuple[Any, Any, Any]:
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = _linear(h, self._w[f"l{i}_qkv_w"], self._w.get(f"l{i}_qkv_b"))
        qkv = t.reshape(qkv, [-1, H + 2 * Hkv, hd])
        qk, v = t.split(qkv, [H + Hkv, Hkv], axis=1)
        # HF's rotate_half convention: the two halves of each head are the (real, imaginary) pairs.
        cos = t.gather(self._cos, positions)[:, None, :]
        sin = t.gather(self._sin, positions)[:, None, :]
        x1, x2 = t.split(qk, 2, axis=-1)
        qk = t.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        q, k = t.split(qk, [H, Hkv], axis=1)
        return q, k, v

    def _attn_out(self, i: int, a: Any) -> Any:
        return _linear(a, self._w[f"l{i}_o_w"], self._w.get(f"l{i}_o_b"))

    def _mlp(self, i: int, h: Any) -> Any:
        gu = _linear(h, self._w[f"l{i}_gate_up_w"], self._w.get(f"l{i}_gate_up_b"))
        gate, up = t.split(gu, 2, axis=-1)
        return _linear(t.nn.silu(gate) * up, self._w[f"l{i}_down_w"], self._w.get(f"l{i}_down_b"))

    def _head(self, h: Any) -> Any:
        return _linear(h, self._w.get("lm_head", self._w["embed"]))


def rope_inv_freq(ckpt: Checkpoint, head_dim: int) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2] as transformers computes them (default, linear, llama3).

    transformers 5 writes "rope_parameters" (with rope_theta inside); older configs have "rope_scaling"
    plus a top-level "rope_theta". Both are read.
    """
    cfg_path = ckpt.path / "config.json"
    params = ckpt.cfg("rope_parameters") or ckpt.cfg("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{cfg_path}: per-layer-type rope_parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in LLAMA_ROPE_TYPES:
        raise ConversionError(f"{cfg_path}: rope_type {kind!r} is not supported "
                              f"(supported: {', '.join(LLAMA_ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", ckpt.cfg("partial_rotary_factor") or 1.0)) != 1.0:
        raise ConversionError(f"{cfg_path}: partial_rotary_factor != 1 is not supported for LLaMA")
    base = float(params.get("rope_theta", ckpt.cfg("rope_theta", 10000.0)))
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if kind == "default":
        return inv
    try:
        factor = float(params["factor"])
        if kind == "linear":
            return inv / factor
        # llama3 (Llama 3.1/3.2): mirrors transformers' _compute_llama3_parameters.
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params.get("original_max_position_embeddings")
                        or ckpt.cfg("original_max_position_embeddings")
                        or ckpt.cfg("max_position_embeddings", required=True))
    except KeyError as exc:
        raise ConversionError(f"{cfg_path}: rope_type {kind!r} needs key {exc.args[0]!r}") from exc
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)


def _check_lengths(ckpt: Checkpoint, key: str, n_pos: int, max_cache: int, prefill_len: int) -> None:
    if not 1 <= prefill_len <= max_cache:
        raise ConversionError(f"prefill_len {prefill_len} must be between 1 and max_cache {max_cache}")
    if max_cache > n_pos:
        raise ConversionError(f"max_cache {max_cache} exceeds the model's {key} {n_pos} "
                              f"({ckpt.path / 'config.json'}); choose max_cache <= {n_pos}")


def build_decoder(ckpt: Checkpoint, max_cache: int, prefill_len: int) -> Decoder:
    """The decoder for a causal-LM checkpoint; ConversionError naming the key or tensor that is wrong."""
    if ckpt.head != "causal-lm":
        raise ConversionError(f"{ckpt.path}: head {ckpt.head!r} is not a causal LM")
    if ckpt.arch == "gpt2":
        return GPT2Decoder(ckpt, int(max_cache), int(prefill_len))
    if ckpt.arch == "llama":
        return LlamaDecoder(ckpt, int(max_cache), int(prefill_len))
    raise ConversionError(f"{ckpt.path}: {ckpt.arch} is not a decoder architecture (GPT-2 or LLaMA)")


def export_saved_model(dec: Decoder, out_dir: Path) -> Path:
    """SavedModel with exactly the prefill and decode signatures (full_logits is left out: its
    variable length is for host-side parity only)."""
    out_dir = Path(out_dir)
    root = t.Module()
    root.weights = list(dec._w.values())  # noqa: SLF001 - the variables the signatures capture
    sigs = {"prefill": dec.prefill.get_concrete_function(), "decode": dec.decode.get_concrete_function()}
    try:
        with silenced():
            t.saved_model.save(root, str(out_dir), signatures=sigs)
    except Exception as exc:
        raise ConversionError(f"{out_dir}: could not write the decoder SavedModel ({exc})") from exc
    return out_dir


def convert_decoder_tflite(saved_model_dir: Path, recipe: str, per_channel_dense: bool = True) -> bytes:
    """TFLite bytes with the prefill and decode signatures; builtin ops only (no Flex).

    per_channel_dense=False quantizes Dense weights per tensor, so FULLY_CONNECTED stays at a version
    tflite-runtime 2.13/2.14 can load (per-channel dynamic range is v12).
    """
    if recipe not in RECIPES:
        raise ConversionError(f"unknown decoder recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    try:
        with silenced():
            # from_saved_model, never from_concrete_functions: the latter was measured to produce
            # silently broken models here.
            conv = t.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=list(SIGNATURES))
            conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS]
            if not per_channel_dense:
                conv._experimental_disable_per_channel_quantization_for_dense_layers = True  # noqa: SLF001
            if recipe in ("float16", "dynamic"):
                conv.optimizations = [t.lite.Optimize.DEFAULT]
            if recipe == "float16":
                conv.target_spec.supported_types = [t.float16]
            return bytes(conv.convert())
    except Exception as exc:
        msg = [line for line in str(exc).strip().splitlines() if line.strip()]
        reason = next((line for line in msg if "error" in line.lower()), msg[0] if msg else type(exc).__name__)
        raise ConversionError(f"decoder recipe {recipe} failed to convert: {reason.strip()[:300]}") from exc
