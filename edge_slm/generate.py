"""text-generation on the device: prefill once, then one decode call per token with the KV cache.

numpy + the TFLite runtime + tokenizers; tokens stream through a callback as they are produced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from edge_slm import runtime
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.sampling import SamplingParams, next_token

TokenCallback = Callable[[dict[str, Any]], None]
MAX_NEW_TOKENS_LIMIT = 4096


class TextGenerator:
    """Runs a package with `prefill` and `decode` signatures (see converters/checkpoint/decoders.py)."""

    def __init__(self, package: ModelPackage, model: runtime.Model, defaults: dict[str, Any] | None = None) -> None:
        self.package = package
        self.model = model
        prep = package.preprocessing
        try:
            self.prefill_len = int(prep["prefill_len"])
            self.max_cache = int(prep["max_cache"])
        except KeyError as exc:
            raise ModelError(f"{package.path}: manifest preprocessing lacks {exc.args[0]!r} for text-generation") from exc
        self.eos_ids = {int(i) for i in prep.get("eos_token_ids", [])}
        self.bos_id = prep.get("bos_token_id")
        self.add_bos = bool(prep.get("add_bos", False)) and self.bos_id is not None
        sigs = model.signature_names()
        if not {"prefill", "decode"} <= set(sigs):
            raise ModelError(f"{package.path}: text-generation needs prefill and decode signatures, found {sigs}")
        self._prefill = model.signature("prefill")
        self._decode = model.signature("decode")
        if package.tokenizer_path is None:
            raise ModelError(f"{package.path}: text-generation needs tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(package.tokenizer_path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.defaults = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "stop": [], "seed": None}
        self.defaults.update(defaults or {})

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = dict(self.defaults)
        for key, value in params.items():
            if key not in p:
                raise InputError("bad_request", f"unknown generation parameter {key!r} (known: {', '.join(p)})")
            p[key] = value
        if not isinstance(p["max_new_tokens"], int) or not 1 <= p["max_new_tokens"] <= MAX_NEW_TOKENS_LIMIT:
            raise InputError("bad_request", f"max_new_tokens must be an integer 1-{MAX_NEW_TOKENS_LIMIT}")
        stop = p["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InputError("bad_request", "stop must be a string or a list of non-empty strings")
        p["stop"] = stop
        if p["seed"] is not None and (not isinstance(p["seed"], int) or isinstance(p["seed"], bool)):
            raise InputError("bad_request", "seed must be an integer")
        for key, typ in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", int)):
            if not isinstance(p[key], typ) or isinstance(p[key], bool):
                raise InputError("bad_request", f"{key} must be a number")
        p["sampling"] = SamplingParams(float(p["temperature"]), int(p["top_k"]), float(p["top_p"])).check()
        return p

    def encode_prompt(self, text: str) -> tuple[list[int], dict[str, int] | None]:
        """Prompt ids (with BOS if the model wants it), left-truncated to fit prefill_len."""
        if not text.strip():
            raise InputError("empty_input", "prompt is empty")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        head = [int(self.bos_id)] if self.add_bos else []
        room = self.prefill_len - len(head)
        truncated = None
        if len(ids) > room:
            # keep the end of the prompt: the most recent text matters most for what comes next
            truncated = {"prompt_tokens": len(ids) + len(head), "kept_last": room, "dropped_first": len(ids) - room}
            ids = ids[-room:]
        return head + ids, truncated

    def __call__(self, text: str, params: dict[str, Any] | None = None, on_token: TokenCallback | None = None) -> dict[str, Any]:
        p = self._params(params or {})
        ids, truncated = self.encode_prompt(text)
        rng = np.random.default_rng(p["seed"])
        padded = np.zeros((1, self.prefill_len), dtype=np.int32)
        padded[0, : len(ids)] = ids
        t0 = time.perf_counter()
        out = self._prefill(input_ids=padded, length=np.array([len(ids)], dtype=np.int32))
        t_prefill = time.perf_counter() - t0
        logits, k_cache, v_cache = out["logits"], out["k_cache"], out["v_cache"]
        pos = len(ids)
        generated: list[int] = []
        text_out = ""
        finish = "length"
        t1 = time.perf_counter()
        while True:
            tok = next_token(logits[0], p["sampling"], rng)
            if tok in self.eos_ids:
                finish = "eos"
                break
            generated.append(tok)
            full = self.tokenizer.decode(generated)
            stop_at = min((i for i in (full.find(s) for s in p["stop"]) if i >= 0), default=-1)
            if stop_at >= 0:
                full = full[:stop_at]
                finish = "stop"
            if not full.endswith("\ufffd") and len(full) > len(text_out):
                delta = full[len(text_out):]
                text_out = full
                if on_token is not None and delta:
                    on_token({"index": len(generated) - 1, "token_id": tok, "text": delta})
            if finish == "stop" or len(generated) >= p["max_new_tokens"]:
                break
            if pos >= self.max_cache:
                finish = "cache_full"
                break
            out = self._decode(token=np.array([[tok]], dtype=np.int32), position=np.array([pos], dtype=np.int32),
                               k_cache=k_cache, v_cache=v_cache)
            logits, k_cache, v_cache = out["logits"], out["k_cache"], out["v_cache"]
            pos += 1
        t_decode = time.perf_counter() - t1
        if finish != "stop":
            text_out = self.tokenizer.decode(generated)
        result: dict[str, Any] = {
            "text": text_out,
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "new_tokens": len(generated),
            "prefill_ms": round(t_prefill * 1000, 3),
            "tokens_per_s": round(len(generated) / t_decode, 2) if t_decode > 0 and generated else None,
        }
        if truncated:
            result["prompt_truncated"] = truncated
        if finish == "cache_full":
            result["message"] = f"stopped at the model's cache length ({self.max_cache} tokens)"
        return result
