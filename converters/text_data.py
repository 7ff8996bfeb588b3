"""Read evaluation/calibration text for checkpoint conversion: .txt/.tsv lines or .jsonl records.

Host only (no TensorFlow needed). A line is `text` or `text<TAB>label`; a JSON line is
{"text": ..., "label": ...}; labels are names from the label set or integer indices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_slm.errors import ConversionError


def load_texts(path: str | Path, label_names: list[str] | None = None) -> tuple[list[str], np.ndarray | None]:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"text file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{p}: not UTF-8 text") from exc
    texts: list[str] = []
    raw_labels: list[object] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConversionError(f"{p}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ConversionError(f'{p}:{n}: each line needs a "text" string')
            texts.append(obj["text"])
            raw_labels.append(obj.get("label"))
        else:
            text, _, label = line.partition("\t")
            texts.append(text)
            raw_labels.append(label if label else None)
    if not texts:
        raise ConversionError(f"{p}: no text in it")
    present = [lab for lab in raw_labels if lab is not None]
    if not present:
        return texts, None
    if len(present) != len(texts):
        raise ConversionError(f"{p}: some lines have a label and some do not; label all or none")
    labels = np.zeros(len(texts), dtype=np.int64)
    for i, lab in enumerate(raw_labels):
        if isinstance(lab, int) or (isinstance(lab, str) and lab.strip().lstrip("-").isdigit()):
            idx = int(lab)
        elif label_names and str(lab) in label_names:
            idx = label_names.index(str(lab))
        else:
            known = f" (labels: {', '.join(label_names)})" if label_names else ""
            raise ConversionError(f"{p}: label {lab!r} on example {i + 1} is not in the label set{known}")
        if label_names and not 0 <= idx < len(label_names):
            raise ConversionError(f"{p}: label index {idx} on example {i + 1} is outside 0..{len(label_names) - 1}")
        labels[i] = idx
    return texts, labels
