"""Convert a transformer checkpoint directory: encoders through the recipe search, decoders with a KV cache.

Host only. Evaluation and calibration data are text files tokenized with the checkpoint's own
tokenizer.json through edge_slm.text, exactly as the device will.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters.checkpoint.loader import Checkpoint, open_checkpoint
from converters.convert import (
    ConversionResult,
    build_manifest,
    check_common,
    load_target,
    search_recipes,
)
from converters.source_model import source_from_keras
from converters.text_data import load_texts
from converters.tf_env import silenced
from edge_slm.errors import ConversionError
from edge_slm.package import LABELS_FILE, TOKENIZER_FILE, write_package
from edge_slm.text import TextEncoder


def checkpoint_sha256(ckpt: Checkpoint) -> str:
    """sha256 over config.json and the weight files, in name order."""
    h = hashlib.sha256()
    for f in sorted(ckpt.path.iterdir()):
        if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json")):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def convert_checkpoint(
    model: str | Path,
    out: str | Path,
    *,
    calib: str | Path | None,
    eval_data: str | Path,
    quantize: str = "auto",
    min_agreement: float = 0.99,
    min_cosine: float = 0.99,
    name: str | None = None,
    version: str = "1.0.0",
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
    head: str | None = None,
    max_length: int | None = None,
    prefill_len: int = 64,
    max_cache: int = 256,
    min_lm_agreement: float = 0.95,
    target: str | None = None,
) -> ConversionResult:
    profile = load_target(target)
    ckpt = open_checkpoint(model, head)
    if ckpt.tokenizer_path is None:
        raise ConversionError(f"{model}: no tokenizer.json; the device needs it (save the tokenizer with the model)")
    say(f"{ckpt.arch} checkpoint, {ckpt.weights.total_parameters() / 1e6:.1f}M parameters, head {ckpt.head}")
    if ckpt.head == "causal-lm":
        from converters.convert_decoder import convert_decoder

        return convert_decoder(ckpt, Path(model), Path(out), eval_data=eval_data, quantize=quantize,
                               min_agreement=min_lm_agreement, name=name, version=version, progress=progress,
                               say=say, prefill_len=prefill_len, max_cache=max_cache, target=profile)
    check_common(quantize, None, calib, None)
    from converters.checkpoint.encoders import build_encoder

    # default: 128 tokens, or the model's own limit when that is shorter
    max_length = max_length or min(128, int(ckpt.cfg("max_position_embeddings", 128)))
    with silenced():
        keras_model = build_encoder(ckpt, max_length)
    src = source_from_keras(keras_model, ckpt.path, "checkpoint", sha256=checkpoint_sha256(ckpt))
    encoder = TextEncoder.from_file(ckpt.tokenizer_path, max_length)

    def arrays(path: str | Path, what: str) -> tuple[list[Any], Any]:
        texts, labels = load_texts(path, ckpt.labels or None)
        ids, mask = encoder.encode_batch_with_mask(texts)
        by_name = {"input_ids": ids, "attention_mask": mask}
        return [by_name[n] for n in src.input_names], labels

    ev, ev_labels = arrays(eval_data, "eval")
    calib_arrays = arrays(calib, "calibration")[0] if calib is not None else None
    task = "text-classification" if ckpt.head == "classification" else "embedding"
    attempts, baseline, chosen, reason = search_recipes(
        src, calib_arrays, ev, ev_labels, quantize, min_agreement, min_cosine, progress, say, task, profile)
    prep: dict[str, Any] = {"max_length": max_length, "architecture": ckpt.arch}
    if task == "embedding":
        prep["pooling"] = {k: v for k, v in ckpt.pooling.items() if k.startswith("pooling_mode") and v} or {"pooling_mode_mean_tokens": True}
        prep["normalize"] = ckpt.normalize
    manifest = build_manifest(src=src, chosen=chosen, baseline=baseline, attempts=attempts, reason=reason,
                              quantize=quantize, task=task, name=name or Path(model).name, version=version,
                              source_path=Path(model), labels=ckpt.labels, preprocessing=prep,
                              eval_examples=len(ev[0]), target=profile)
    extra = {TOKENIZER_FILE: ckpt.tokenizer_path.read_bytes()}
    if ckpt.labels:
        extra[LABELS_FILE] = ("\n".join(ckpt.labels) + "\n").encode()
    package = write_package(out, chosen.model_bytes, manifest, extra)
    return ConversionResult(package, chosen.recipe, reason, attempts, baseline)
