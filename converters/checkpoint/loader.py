"""Open a checkpoint directory: config.json, safetensors weights, tokenizer.json, and which head.

Host only. Supports the Hugging Face layout and the sentence-transformers layout (modules.json,
1_Pooling/config.json, weights in the root or in 0_Transformer/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.checkpoint.weights import Weights
from edge_slm.errors import ConversionError

# model_type -> the builder that reads it; Qwen2 and Mistral-style configs are LLaMA with biases/GQA.
ARCHITECTURES = {"bert": "bert", "distilbert": "distilbert", "gpt2": "gpt2", "llama": "llama", "qwen2": "llama"}
# model_type -> prefixes the bare model's weights may carry in a checkpoint with a head.
PREFIXES = {
    "bert": ("", "bert."),
    "distilbert": ("", "distilbert."),
    "gpt2": ("", "transformer."),
    "llama": ("", "model."),
}
HEADS = ("classification", "embedding", "causal-lm")
SUPPORTED = "BERT (incl. MiniLM, TinyBERT configs), DistilBERT, GPT-2, LLaMA (incl. TinyLlama, SmolLM), Qwen2"


@dataclass
class Checkpoint:
    path: Path  # directory holding config.json and the weights
    config: dict[str, Any]
    arch: str  # bert | distilbert | gpt2 | llama
    head: str  # classification | embedding | causal-lm
    weights: Weights
    tokenizer_path: Path | None
    labels: list[str] = field(default_factory=list)
    pooling: dict[str, Any] = field(default_factory=dict)  # sentence-transformers pooling config
    normalize: bool = True

    def cfg(self, key: str, default: Any = None, required: bool = False) -> Any:
        if key in self.config:
            return self.config[key]
        if required:
            raise ConversionError(f"{self.path / 'config.json'}: missing key {key!r} needed for {self.arch}")
        return default


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{p}: cannot read JSON ({exc})") from exc


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "modules.json").is_file())


def open_checkpoint(path: str | Path, head: str | None = None) -> Checkpoint:
    """Inspect a checkpoint dir; head None picks: classification if its weights exist, causal-lm for
    decoders, embedding for encoders (always for a sentence-transformers layout)."""
    root = Path(path)
    if not root.is_dir():
        raise ConversionError(f"checkpoint directory not found: {root}")
    model_dir = root
    pooling: dict[str, Any] = {}
    normalize = True
    sentence = (root / "modules.json").is_file()
    if sentence:
        modules = _read_json(root / "modules.json")
        types = {m.get("type", ""): m for m in modules if isinstance(m, dict)}
        tr = next((m for t, m in types.items() if t.endswith("Transformer")), None)
        if tr is not None and tr.get("path"):
            model_dir = root / tr["path"]
        pool = next((m for t, m in types.items() if t.endswith("Pooling")), None)
        if pool is not None and (root / pool["path"] / "config.json").is_file():
            pooling = _read_json(root / pool["path"] / "config.json")
        normalize = any(t.endswith("Normalize") for t in types)
        if not (model_dir / "config.json").is_file():
            model_dir = root
    if not (model_dir / "config.json").is_file():
        raise ConversionError(f"{root}: no config.json; expected a Hugging Face checkpoint directory")
    config = _read_json(model_dir / "config.json")
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise ConversionError(
            f"{model_dir / 'config.json'}: model_type {model_type!r} is not supported; supported: {SUPPORTED}"
        )
    weights = Weights(model_dir, PREFIXES[arch])
    tokenizer = next((p / "tokenizer.json" for p in (model_dir, root) if (p / "tokenizer.json").is_file()), None)
    if head is None:
        if sentence:
            head = "embedding"
        elif arch in ("gpt2", "llama"):
            head = "causal-lm"
        elif weights.has("classifier.weight"):
            head = "classification"
        else:
            head = "embedding"
    if head not in HEADS:
        raise ConversionError(f"head {head!r}: choose one of {', '.join(HEADS)}")
    if head == "causal-lm" and arch not in ("gpt2", "llama"):
        raise ConversionError(f"{arch} is an encoder; causal-lm needs GPT-2 or LLaMA")
    if head != "causal-lm" and arch in ("gpt2", "llama"):
        raise ConversionError(f"{arch} is a decoder; only the causal-lm head is supported for it")
    if head == "classification" and not weights.has("classifier.weight"):
        raise ConversionError(f"{model_dir}: no classifier.weight; this checkpoint has no classification head "
                              "(use --head embedding)")
    labels: list[str] = []
    if head == "classification":
        id2label = config.get("id2label") or {}
        n = int(config.get("num_labels") or len(id2label) or weights.get("classifier.weight").shape[0])
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    return Checkpoint(model_dir, config, arch, head, weights, tokenizer, labels, pooling, normalize)
