"""The model package: a directory (model.tflite, manifest.json, tokenizer.json, labels.txt) and its checks.

Read on the device, written by converters; imports only the standard library, numpy and edge_slm.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_slm.errors import ModelError

SCHEMA_VERSION = 1
TASKS = (
    "text-classification",
    "embedding",
    "text-generation",
    "keyword-spotting",
    "sensor-anomaly",
    "sensor-classification",
)
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.txt"

# key -> expected python type(s); required keys of manifest schema 1.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "version": str,
    "task": str,
    "created": str,
    "sha256": str,
    "inputs": list,
    "outputs": list,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "source": dict,
    "quantization": dict,
    "preprocessing": dict,
    "labels": list,
    "validation": dict,
    "min_runtime": dict,
    "size_bytes": int,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def validate_manifest(data: Any, where: str = MANIFEST_FILE) -> dict[str, Any]:
    """Check a parsed manifest against schema 1; raise ModelError naming the first bad key."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelError(
            f"{where}: schema_version {version!r} is not supported (this edge-slm reads {SCHEMA_VERSION}); "
            "re-convert the model or upgrade edge-slm"
        )
    for key, typ in _REQUIRED.items():
        if key not in data:
            raise ModelError(f"{where}: missing key {key!r}")
        if not isinstance(data[key], typ) or isinstance(data[key], bool) and typ is int:
            raise ModelError(f"{where}: key {key!r} must be {_type_name(typ)}, got {type(data[key]).__name__}")
    for key, typ in _OPTIONAL.items():
        if key in data and not isinstance(data[key], typ):
            raise ModelError(f"{where}: key {key!r} must be {_type_name(typ)}, got {type(data[key]).__name__}")
    if data["task"] not in TASKS:
        raise ModelError(f"{where}: task {data['task']!r} is not one of {', '.join(TASKS)}")
    for section in ("inputs", "outputs"):
        for i, t in enumerate(data[section]):
            if not isinstance(t, dict) or not {"name", "dtype", "shape"} <= set(t):
                raise ModelError(f"{where}: {section}[{i}] needs name, dtype and shape")
            if not isinstance(t["shape"], list) or not all(isinstance(d, int) for d in t["shape"]):
                raise ModelError(f"{where}: {section}[{i}].shape must be a list of integers")
    if "labels" in data and not all(isinstance(x, str) for x in data["labels"]):
        raise ModelError(f"{where}: key 'labels' must be a list of strings")
    sha = data["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelError(f"{where}: key 'sha256' must be 64 lowercase hex digits")
    return data


def _type_name(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer"}.get(typ.__name__, typ.__name__)


@dataclass(frozen=True)
class ModelPackage:
    """A verified model package on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None

    @property
    def labels(self) -> list[str]:
        if self.manifest.get("labels"):
            return list(self.manifest["labels"])
        p = self.path / LABELS_FILE
        if p.is_file():
            return [line for line in p.read_text(encoding="utf-8").splitlines() if line]
        return []

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.manifest.get("preprocessing", {}))

    def identity(self) -> dict[str, str]:
        """The model block every result carries."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> ModelPackage:
        """Open a package directory (or .tar.gz, unpacked next to it); verify sha256 and schema."""
        p = Path(path)
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            p = _unpack(p)
        if not p.is_dir():
            raise ModelError(f"model package not found: {p} (expected a directory made by edge-slm convert)")
        mpath = p / MANIFEST_FILE
        if not mpath.is_file():
            raise ModelError(f"{p}: no {MANIFEST_FILE}; is this a model package made by edge-slm convert?")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{mpath}: not valid JSON ({exc})") from exc
        validate_manifest(data, str(mpath))
        model = p / MODEL_FILE
        if not model.is_file():
            raise ModelError(f"{p}: no {MODEL_FILE}")
        if verify:
            actual = sha256_file(model)
            if actual != data["sha256"]:
                raise ModelError(
                    f"{model}: sha256 {actual[:12]}… does not match the manifest's {data['sha256'][:12]}…; "
                    "the package is corrupt or was edited; re-copy or re-convert it"
                )
        return cls(p, data)


def _unpack(archive: Path) -> Path:
    dest = archive.with_name(archive.name.removesuffix(".tar.gz").removesuffix(".tgz"))
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name.startswith("/") or ".." in Path(member.name).parts or not (member.isfile() or member.isdir()):
                raise ModelError(f"{archive}: refusing unsafe archive member {member.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest.parent, filter="data")
        else:  # pragma: no cover - Python 3.11.2 (Pi OS bookworm) and older 3.10 lack filter=
            tar.extractall(dest.parent)
    return dest


def write_package(
    dest: str | os.PathLike[str],
    model_bytes: bytes,
    manifest: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> ModelPackage:
    """Write a package atomically: everything goes to a temp dir next to dest, then one rename.

    The manifest's sha256 and size are computed here; a half-written package is never left behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["sha256"] = hashlib.sha256(model_bytes).hexdigest()
    manifest["size_bytes"] = len(model_bytes)
    validate_manifest(manifest, "manifest being written")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelPackage.open(dest)
