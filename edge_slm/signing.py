"""Ed25519 keys, canonical JSON signatures and deterministic package archives for model updates.

Shared by the host (signs) and the device (verifies); imports only the standard library and cryptography.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_slm.errors import ConfigError, ModelError

PRIVATE_KEY_FILE = "update_key.pem"
PUBLIC_KEY_FILE = "update_key.pub"


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def load_public_key(path_or_pem: str | os.PathLike[str] | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """The update public key from a PEM file, PEM text/bytes, or an already loaded key."""
    if isinstance(path_or_pem, Ed25519PublicKey):
        return path_or_pem
    pem, where = _pem_or_file(path_or_pem, "public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: not a PEM public key ({exc}); use the update_key.pub written by "
                          "`edge-slm keygen`") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: is a {type(key).__name__}, updates are signed with Ed25519; "
                          "use the update_key.pub written by `edge-slm keygen`")
    return key


def load_private_key(path: str | os.PathLike[str] | bytes) -> Ed25519PrivateKey:
    """The signing key from the unencrypted PKCS#8 PEM file `edge-slm keygen` writes (or PEM bytes)."""
    pem, where = _pem_or_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: not an unencrypted PEM private key ({exc}); use the update_key.pem "
                          "written by `edge-slm keygen`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{where}: is a {type(key).__name__}, updates are signed with Ed25519; "
                          "make a key with `edge-slm keygen -o DIR`")
    return key


def _pem_or_file(value: str | os.PathLike[str] | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(value, bytes):
        return value, f"{what} bytes"
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode("ascii", "replace"), f"{what} text"
    p = Path(value)
    try:
        return p.read_bytes(), str(p)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror or exc}; "
                          "make a key pair with `edge-slm keygen -o DIR`") from exc


def canonical(manifest: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no spaces, ASCII only, no NaN.

    Raises ValueError/TypeError for what JSON cannot represent canonically.
    """
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sign_manifest(manifest: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """{"manifest": manifest, "signature": base64(Ed25519(canonical(manifest)))}."""
    signature = private_key.sign(canonical(manifest))
    return {"manifest": manifest, "signature": base64.b64encode(signature).decode("ascii")}


def pack_package(pkg_dir: str | os.PathLike[str], overrides: dict[str, bytes] | None = None,
                 root: str | None = None) -> bytes:
    """The package directory as a .tar.gz whose bytes depend only on the files' names and contents.

    Members are sorted, with mtime 0, mode 0644/0755 and no owner, so the same package always hashes
    the same. They sit at the archive root, or under root/ (name it like the archive, NAME.tar.gz ->
    NAME/, and ModelPackage.open can read the archive directly). overrides replaces a file's content
    (sign --version rewrites manifest.json this way without touching the package on disk).
    """
    if root is not None and (not root or "/" in root or root in (".", "..")):
        raise ValueError(f"archive root {root!r} must be a plain directory name")
    src = Path(pkg_dir)
    if not src.is_dir():
        raise ModelError(f"model package not found: {src} (expected a directory made by edge-slm convert)")
    overrides = dict(overrides or {})
    entries: list[tuple[str, Path]] = [(root, src)] if root else []
    for path in sorted(src.rglob("*"), key=lambda p: p.relative_to(src).as_posix()):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink():
            # The device refuses links in an archive; refuse them here too, with a clearer message.
            raise ModelError(f"{path}: is a symbolic link; copy the real file into the package")
        entries.append((f"{root}/{rel}" if root else rel, path))
    buf = io.BytesIO()
    # gzip's header carries a timestamp and file name; fix both so the archive is reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel, path in entries:
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                elif path.is_file():
                    data = overrides.pop(rel.removeprefix(f"{root}/") if root else rel, None)
                    if data is None:
                        data = path.read_bytes()
                    info.mode = 0o644
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    raise ModelError(f"{path}: is not a regular file; a model package holds only files")
    if overrides:
        raise ModelError(f"{src}: cannot replace {', '.join(sorted(overrides))}: not in the package")
    return buf.getvalue()
