"""Read a checkpoint's tensors with safetensors' numpy API: single file or sharded index.

Host only; never imports PyTorch. Every error names the tensor or file it is about.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so safetensors can read bf16 checkpoints
import numpy as np

from edge_slm.errors import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Weights:
    """Tensors by name, loaded lazily as float32 numpy arrays.

    `prefixes` are tried in order when a name is looked up, so "embeddings.word_embeddings.weight"
    finds "bert.embeddings.word_embeddings.weight" too.
    """

    def __init__(self, ckpt_dir: str | Path, prefixes: tuple[str, ...] = ("",)) -> None:
        from safetensors import SafetensorError, safe_open

        self.dir = Path(ckpt_dir)
        self.prefixes = prefixes
        self._where: dict[str, Path] = {}
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index}: not a valid safetensors index ({exc})") from exc
            for name, shard in weight_map.items():
                self._where[name] = self.dir / shard
        elif (self.dir / SINGLE).is_file():
            self._where = {}
        else:
            raise ConversionError(f"{self.dir}: no {SINGLE} or {INDEX} (PyTorch .bin checkpoints are not read; "
                                  "re-save with safe_serialization=True)")
        self._files: dict[Path, object] = {}
        self._safe_open = safe_open
        self._error = SafetensorError
        files = set(self._where.values()) or {self.dir / SINGLE}
        for f in sorted(files):
            if not f.is_file():
                raise ConversionError(f"{f}: shard named in {INDEX} is missing")
            try:
                handle = safe_open(str(f), framework="numpy")
            except Exception as exc:  # safetensors raises its own error type or OSError
                raise ConversionError(f"{f}: corrupt safetensors file ({exc})") from exc
            self._files[f] = handle
            if not self._where or f == self.dir / SINGLE:
                for k in handle.keys():
                    self._where.setdefault(k, f)

    def names(self) -> list[str]:
        return sorted(self._where)

    def _resolve(self, name: str) -> str | None:
        for p in self.prefixes:
            if p + name in self._where:
                return p + name
        return None

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as float32; ConversionError naming it when missing or of the wrong shape."""
        full = self._resolve(name)
        if full is None:
            raise ConversionError(
                f"{self.dir}: tensor {name!r} not found (tried prefixes {list(self.prefixes)}); "
                "the checkpoint does not match its config.json"
            )
        try:
            arr = self._files[self._where[full]].get_tensor(full)
        except Exception as exc:
            raise ConversionError(f"{self._where[full]}: tensor {full!r} cannot be read ({exc})") from exc
        if arr.dtype == np.uint16 or str(arr.dtype) == "bfloat16":
            arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        arr = np.asarray(arr, dtype=np.float32)
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ConversionError(
                f"{self.dir}: tensor {full!r} has shape {tuple(arr.shape)}, config.json implies {tuple(shape)}"
            )
        return arr

    def total_parameters(self) -> int:
        n = 0
        for name, f in self._where.items():
            sl = self._files[f].get_slice(name)
            n += int(np.prod(sl.get_shape()))
        return n
