"""Convert a causal LM checkpoint (GPT-2, LLaMA) into a text-generation package with a KV cache.

Host only. Validation runs the TFLite prefill/decode signatures teacher-forced over held-out text and
compares next-token choices and perplexity with the float TensorFlow model.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters.checkpoint.decoders import (
    Decoder,
    build_decoder,
    convert_decoder_tflite,
    export_saved_model,
)
from converters.checkpoint.loader import Checkpoint
from converters.convert import (
    Attempt,
    ConversionResult,
    GateError,
    per_channel_dense,
    target_json,
    target_problems,
)
from converters.convert_checkpoint import checkpoint_sha256
from converters.text_data import load_texts
from converters.tf_env import silenced
from converters.tflite_info import op_versions
from edge_slm import runtime
from edge_slm.errors import ConversionError
from edge_slm.package import TOKENIZER_FILE, write_package

AUTO_ORDER = ("dynamic", "float16")
DESCRIPTIONS = {
    "dynamic": "dynamic-range: int8 weights, activations quantized on the fly",
    "float16": "float16 weights, float32 compute",
    "float32": "no quantization",
}
MAX_EVAL_TOKENS = 1024


def _ids_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def eval_windows(ckpt: Checkpoint, texts: list[str], add_bos: bool, bos: int | None, window: int,
                 eos: int | None = None) -> list[np.ndarray]:
    """One token sequence per held-out line ([BOS] text [EOS], cut to `window`), as the model was
    trained on documents; at most MAX_EVAL_TOKENS tokens in all."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt.tokenizer_path))
    tok.no_truncation()
    tok.no_padding()
    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if eos is not None else []
    wins: list[np.ndarray] = []
    total = 0
    for text in texts:
        ids = (head + tok.encode(text, add_special_tokens=False).ids + tail)[:window]
        if len(ids) >= 2:
            wins.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
        if total >= MAX_EVAL_TOKENS:
            break
    if not wins:
        raise ConversionError("the eval text is too short: need lines of at least 2 tokens")
    return wins


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def tflite_teacher_forced(model: runtime.Model, ids: np.ndarray, prefill_len: int) -> tuple[np.ndarray, float, float]:
    """Logits for positions p0-1 .. T-2 (predicting tokens p0 .. T-1), prefill ms, median decode ms."""
    prefill, decode = model.signature("prefill"), model.signature("decode")
    p0 = min(prefill_len, max(1, len(ids) // 2))
    padded = np.zeros((1, prefill_len), dtype=np.int32)
    padded[0, :p0] = ids[:p0]
    t0 = time.perf_counter()
    out = prefill(input_ids=padded, length=np.array([p0], dtype=np.int32))
    t_prefill = (time.perf_counter() - t0) * 1000
    logits = [out["logits"][0]]
    k, v = out["k_cache"], out["v_cache"]
    times = []
    for pos in range(p0, len(ids) - 1):
        t1 = time.perf_counter()
        out = decode(token=np.array([[ids[pos]]], dtype=np.int32), position=np.array([pos], dtype=np.int32),
                     k_cache=k, v_cache=v)
        times.append((time.perf_counter() - t1) * 1000)
        logits.append(out["logits"][0])
        k, v = out["k_cache"], out["v_cache"]
    return np.stack(logits), t_prefill, float(np.median(times)) if times else 0.0


def _evaluate(dec: Decoder, model_bytes: bytes, windows: list[np.ndarray], tick: Callable[[], None] | None) -> dict[str, Any]:
    with silenced():
        model = runtime.load(content=model_bytes, threads=1)
    agree = total = 0
    nll_f: list[float] = []
    nll_q: list[float] = []
    cos: list[float] = []
    max_err = 0.0
    prefill_ms, decode_ms = [], []
    for ids in windows:
        p0 = min(dec.prefill_len, max(1, len(ids) // 2))
        ref = dec.full_logits(ids[None, :]).numpy()[0][p0 - 1 : len(ids) - 1].astype(np.float64)
        got, t_p, t_d = tflite_teacher_forced(model, ids, dec.prefill_len)
        got = got.astype(np.float64)
        target = ids[p0:]
        agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
        total += len(target)
        nll_f += list(-_log_softmax(ref)[np.arange(len(target)), target])
        nll_q += list(-_log_softmax(got)[np.arange(len(target)), target])
        cos += list(np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-30))
        max_err = max(max_err, float(np.max(np.abs(ref - got))))
        prefill_ms.append(t_p)
        if t_d:
            decode_ms.append(t_d)
        if tick:
            tick()
    finite = bool(np.all(np.isfinite(nll_q)))
    return {
        "n": total,
        "finite": finite,
        "top1_agreement": round(agree / total, 6) if finite else 0.0,
        "perplexity_float": round(float(np.exp(np.mean(nll_f))), 4),
        "perplexity_quantized": round(float(np.exp(np.mean(nll_q))), 4) if finite else None,
        "cosine_mean": round(float(np.mean(cos)), 6),
        "max_abs_error": round(max_err, 6),
        "prefill_ms": round(float(np.median(prefill_ms)), 3),
        "decode_ms": round(float(np.median(decode_ms)), 3) if decode_ms else None,
    }


def convert_decoder(
    ckpt: Checkpoint,
    model_path: Path,
    out: Path,
    *,
    eval_data: str | Path,
    quantize: str = "auto",
    min_agreement: float = 0.95,
    name: str | None = None,
    version: str = "1.0.0",
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
    prefill_len: int = 64,
    max_cache: int = 256,
    target: Any = None,
) -> ConversionResult:
    """TARGET (a devices.profiles.DeviceProfile): recipes whose ops or op versions its runtime cannot load
    are reported as failed attempts (the decoder's converter flags are not changed for it)."""
    if quantize in ("int8", "int8-float-attention"):
        raise ConversionError(
            f"--quantize {quantize} is not offered for decoders: full-integer int8 collapsed small transformers here "
            "and ran 2-3x slower than float on x86; use auto, dynamic, float16 or float32")
    wanted = AUTO_ORDER if quantize == "auto" else (quantize,)
    if not 1 <= prefill_len <= max_cache:
        raise ConversionError(f"--prefill-len {prefill_len} must be between 1 and --max-cache {max_cache}")
    texts, _ = load_texts(eval_data)
    bos = ckpt.cfg("bos_token_id")
    add_bos = ckpt.arch == "llama" and bos is not None
    eos = _ids_list(ckpt.cfg("eos_token_id"))
    say(f"building the decoder (prefill {prefill_len} tokens, cache {max_cache})")
    dec = build_decoder(ckpt, max_cache, prefill_len)
    windows = eval_windows(ckpt, texts, add_bos, bos, min(max_cache, prefill_len + 64), eos[0] if eos else None)
    bar = None
    if progress:
        from converters.convert import _tqdm_progress

        bar = _tqdm_progress(True)
    attempts: list[Attempt] = []
    with tempfile.TemporaryDirectory(prefix="edge-slm-dec-") as tmp:
        saved = export_saved_model(dec, Path(tmp) / "saved")
        for recipe in ("float32", *[r for r in wanted if r != "float32"]):
            say(f"trying {recipe}: {DESCRIPTIONS[recipe]}")
            a = Attempt(recipe)
            try:
                a.model_bytes = convert_decoder_tflite(saved, recipe, per_channel_dense(target))
            except ConversionError as exc:
                a.error = str(exc)
                attempts.append(a)
                continue
            a.size_bytes = len(a.model_bytes)
            problems = target_problems(target, recipe, a.model_bytes) if recipe != "float32" or quantize == "float32" else []
            if problems:
                a.error = f"recipe {recipe} for {target.name}: {'; '.join(problems)}"
                attempts.append(a)
                say(f"  {recipe}: {a.error}")
                continue
            tick = bar(len(windows), f"validating {recipe}") if bar else None
            a.report = _evaluate(dec, a.model_bytes, windows, tick)
            a.latency_ms = a.report["decode_ms"] or 0.0
            value = a.report["top1_agreement"]
            a.gate = {"metric": "next_token_top1_agreement", "min": min_agreement, "value": value,
                      "passed": bool(a.report["finite"]) and value >= min_agreement}
            attempts.append(a)
            say(f"  {recipe}: {a.size_bytes / 1e6:.1f} MB, agreement {value}, perplexity "
                f"{a.report['perplexity_quantized']} (float {a.report['perplexity_float']})")
    baseline = attempts[0]
    if baseline.error:
        raise ConversionError(f"the float decoder does not convert to TFLite: {baseline.error}")
    tried = attempts if quantize == "float32" else attempts[1:]
    passing = [a for a in tried if a.passed]
    if not passing:
        raise GateError(f"no recipe met the gate (next-token agreement >= {min_agreement}); nothing was written. "
                        "Try --quantize float16 or a lower --min-lm-agreement", tried, baseline)
    chosen = min(passing, key=lambda a: a.size_bytes)
    reason = (f"{chosen.recipe} is the smallest recipe that passed the gate" if quantize == "auto"
              else f"{chosen.recipe} was asked for and passed the gate")
    with silenced():
        probe = runtime.load(content=chosen.model_bytes)
    sigs = {}
    for sig_name in ("prefill", "decode"):
        r = probe.signature(sig_name)
        sigs[sig_name] = {
            "inputs": [{"name": k, **{kk: vv for kk, vv in t.to_json().items() if kk != "name"}} for k, t in r.inputs.items()],
            "outputs": [{"name": k, **{kk: vv for kk, vv in t.to_json().items() if kk != "name"}} for k, t in r.outputs.items()],
        }
    manifest = {
        "schema_version": 1,
        "name": name or model_path.name,
        "version": version,
        "task": "text-generation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "sha256": "0" * 64,
        "source": {"path": model_path.name, "format": "checkpoint", "sha256": checkpoint_sha256(ckpt),
                   "architecture": ckpt.arch},
        "quantization": {"recipe": chosen.recipe, "requested": quantize, "description": DESCRIPTIONS[chosen.recipe],
                         "float_ops": [], "reason": reason},
        "inputs": sigs["prefill"]["inputs"],
        "outputs": sigs["prefill"]["outputs"],
        "signatures": sigs,
        "preprocessing": {
            "prefill_len": prefill_len, "max_cache": max_cache, "eos_token_ids": eos,
            "bos_token_id": bos, "add_bos": add_bos, "n_layers": dec.n_layers, "n_kv_heads": dec.n_kv_heads,
            "head_dim": dec.head_dim, "vocab_size": dec.vocab_size, "parameters": dec.param_count,
        },
        "labels": [],
        "validation": {
            "eval_tokens": chosen.report["n"],
            "gate": chosen.gate,
            "float": {"size_bytes": baseline.size_bytes, "perplexity": baseline.report["perplexity_float"],
                      "decode_ms": baseline.report["decode_ms"]},
            "quantized": chosen.report | {"size_bytes": chosen.size_bytes},
            "tried": [a.to_json() for a in tried],
        },
        "min_runtime": {"ops": op_versions(chosen.model_bytes)},
        **({"target": target_json(target)} if target is not None else {}),
    }
    package = write_package(out, chosen.model_bytes, manifest, {TOKENIZER_FILE: ckpt.tokenizer_path.read_bytes()})
    return ConversionResult(package, chosen.recipe, reason, tried, baseline)
