"""Signed model updates on the device: verify, unpack safely, check, swap atomically, commit or roll back.

Device side: standard library, cryptography and edge_slm only; never TensorFlow, converters or devices.

Store layout (everything under one root, one filesystem, so every swap is a rename):
    versions/<version>-<sha12>/   an unpacked, verified model package per installed version
    current -> versions/...       relative symlink the agent loads; replaced atomically, never edited
    previous -> versions/...      what a rollback goes back to
    trial.json                    present while a new version is on trial; says how to undo it
    .tmp-*, versions/.tmp-*       half-written work; recover() deletes it
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import tarfile
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_slm.errors import EdgeSlmError, ModelError, UpdateError
from edge_slm.package import MANIFEST_FILE, ModelPackage
from edge_slm.signing import canonical, load_public_key

try:  # POSIX only; without it two processes must not share a store
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_TRIAL_S = 300.0
MAX_WRAPPER_BYTES = 64 * 1024
MAX_UNPACKED_BYTES = 8 << 30
MAX_MEMBERS = 10_000

# Crash points, in the order they happen. A SimulatedCrash raised right after any of them must leave
# `current` loadable and recover() must end at the old or the new version, never in between.
INSTALL_STEPS = ("install:staged", "install:renamed", "install:trial_written", "install:previous_linked",
                 "install:current_tmp_linked", "install:current_replaced", "install:done")
COMMIT_STEPS = ("commit:trial_removed", "commit:done")
REVERT_STEPS = ("revert:current_tmp_linked", "revert:current_replaced", "revert:previous_linked",
                "revert:trial_removed", "revert:done")
ROLLBACK_STEPS = ("rollback:current_tmp_linked", "rollback:current_replaced", "rollback:previous_removed",
                  "rollback:done")
STEPS = INSTALL_STEPS + COMMIT_STEPS + REVERT_STEPS + ROLLBACK_STEPS

# Identifies this process in trial.json as "<pid>-<random>": a trial whose owner pid no longer runs (or
# is our own pid under another token, i.e. an earlier boot) was left by a process that died before
# committing, so recover() reverts it at once; a live owner's trial is left to its deadline.
_PROCESS_TOKEN = f"{os.getpid()}-{uuid.uuid4().hex}"

_VERSION_RE = re.compile(r"^\d{1,9}(?:\.\d{1,9}){0,4}$")
_LINK_RE = re.compile(r"^versions/[^/.][^/]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SimulatedCrash(BaseException):
    """Raised at a crash point in tests. Not an Exception, so no cleanup runs, as after a power cut."""


# --- versions and the signed manifest ----------------------------------------------------------------
def parse_version(version: str) -> tuple[int, ...]:
    """'1.2.10' -> (1, 2, 10); numbers only, so '1.2.10' sorts after '1.2.9'."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise UpdateError("bad_manifest", f"version {version!r} must be numbers separated by dots, like 1.2.10")
    return tuple(int(x) for x in version.split("."))


def is_newer(candidate: str, installed: str | None) -> bool:
    if installed is None:
        return True
    try:
        old = parse_version(installed)
    except UpdateError:
        # The installed package came from a trusted install; an odd version must not block updates forever.
        log.warning("installed version %r is not numeric; any signed update counts as newer", installed)
        return True
    new = parse_version(candidate)
    width = max(len(new), len(old))
    return new + (0,) * (width - len(new)) > old + (0,) * (width - len(old))


def _parse_time(value: Any, key: str) -> datetime:
    if not isinstance(value, str):
        raise UpdateError("bad_manifest", f"manifest {key!r} must be an ISO 8601 time string")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UpdateError("bad_manifest", f"manifest {key!r}: {value!r} is not an ISO 8601 time") from exc
    if t.tzinfo is None:
        raise UpdateError("bad_manifest", f"manifest {key!r}: {value!r} needs a time zone, e.g. 2025-01-01T00:00:00+00:00")
    return t


@dataclass(frozen=True)
class UpdateManifest:
    """What a signed update promises: which package (name, version, archive sha256 and size), for which
    device, until when, and optionally a golden input the new model must answer (with a label)."""

    name: str
    version: str
    sha256: str
    size: int
    expires: str
    created: str
    device: str = "*"
    golden_input: str | None = None
    golden_label: str | None = None

    _KEYS = frozenset({"schema_version", "name", "version", "sha256", "size", "expires", "created",
                       "device", "golden"})

    @property
    def expires_at(self) -> datetime:
        return _parse_time(self.expires, "expires")

    @classmethod
    def from_dict(cls, data: Any) -> UpdateManifest:
        """Validate a parsed manifest (schema 1); UpdateError('bad_manifest') names the bad key."""
        if not isinstance(data, dict):
            raise UpdateError("bad_manifest", "update manifest must be a JSON object")
        unknown = sorted(set(data) - cls._KEYS)
        if unknown:
            raise UpdateError("bad_manifest", f"update manifest has unknown key {unknown[0]!r}; this edge-slm "
                              f"reads schema_version {SCHEMA_VERSION}, upgrade it on the device")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UpdateError("bad_manifest", f"update manifest schema_version {data.get('schema_version')!r} is "
                              f"not supported (this edge-slm reads {SCHEMA_VERSION})")
        for key in ("name", "version", "sha256", "expires", "created"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise UpdateError("bad_manifest", f"update manifest key {key!r} must be a non-empty string")
        parse_version(data["version"])
        if not _HEX64.match(data["sha256"]):
            raise UpdateError("bad_manifest", "update manifest 'sha256' must be 64 lowercase hex digits")
        size = data.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_UNPACKED_BYTES:
            raise UpdateError("bad_manifest", "update manifest 'size' must be the archive size in bytes (> 0)")
        _parse_time(data["expires"], "expires")
        device = data.get("device", "*")
        if not isinstance(device, str) or not device:
            raise UpdateError("bad_manifest", "update manifest 'device' must be a device id or \"*\"")
        golden = data.get("golden")
        golden_input = golden_label = None
        if golden is not None:
            if not isinstance(golden, dict) or not isinstance(golden.get("input"), str) or not golden["input"].strip() \
                    or set(golden) - {"input", "label"} or not isinstance(golden.get("label", ""), str):
                raise UpdateError("bad_manifest", 'update manifest "golden" must be {"input": TEXT, "label": LABEL?}')
            golden_input, golden_label = golden["input"], golden.get("label")
        return cls(data["name"], data["version"], data["sha256"], size, data["expires"], data["created"],
                   device, golden_input, golden_label)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "name": self.name, "version": self.version,
                             "sha256": self.sha256, "size": self.size, "expires": self.expires,
                             "created": self.created, "device": self.device}
        if self.golden_input is not None:
            d["golden"] = {"input": self.golden_input}
            if self.golden_label is not None:
                d["golden"]["label"] = self.golden_label
        return d

    @classmethod
    def create(cls, name: str, version: str, archive: bytes, *, device: str = "*",
               expires_in: timedelta = timedelta(days=7), golden_input: str | None = None,
               golden_label: str | None = None, now: datetime | None = None) -> UpdateManifest:
        """The manifest for an archive made by signing.pack_package (host side, before signing)."""
        now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        m = cls(name, version, hashlib.sha256(archive).hexdigest(), len(archive),
                (now + expires_in).isoformat(), now.isoformat(), device, golden_input, golden_label)
        return cls.from_dict(m.to_dict())


def verify_update(wrapper: bytes | str | dict[str, Any], public_key: Ed25519PublicKey | str | bytes | os.PathLike[str],
                  installed_version: str | None, device_id: str, now: datetime | None = None) -> UpdateManifest:
    """Check a signed update before anything else is touched: signature first, then schema, device,
    expiry and version. UpdateError codes: bad_signature, bad_manifest, wrong_device, expired, not_newer."""
    key = load_public_key(public_key)
    if isinstance(wrapper, (bytes, str)):
        if len(wrapper) > MAX_WRAPPER_BYTES:
            raise UpdateError("bad_manifest", f"signed update is over {MAX_WRAPPER_BYTES} bytes")
        try:
            wrapper = json.loads(wrapper)
        except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 in bytes too
            raise UpdateError("bad_manifest", f"signed update is not JSON: {exc}") from exc
    if not isinstance(wrapper, dict):
        raise UpdateError("bad_manifest", 'signed update must be {"manifest": {...}, "signature": "..."}')
    signature = wrapper.get("signature")
    if not signature or not isinstance(signature, str):
        raise UpdateError("bad_signature", "update is not signed; sign it with `edge-slm sign PKG --key update_key.pem`")
    manifest = wrapper.get("manifest")
    if not isinstance(manifest, dict):
        raise UpdateError("bad_manifest", 'signed update has no "manifest" object')
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UpdateError("bad_signature", f"signature is not base64 of an Ed25519 signature: {exc}") from exc
    try:
        signed = canonical(manifest)
    except (ValueError, TypeError, RecursionError) as exc:
        raise UpdateError("bad_manifest", f"manifest cannot be put in canonical form: {exc}") from exc
    try:
        key.verify(raw, signed)
    except InvalidSignature as exc:
        raise UpdateError("bad_signature", "signature does not match the manifest: it was changed after signing "
                          "or signed with another key; check the device's update public key") from exc
    # Only now is the content trusted enough to be interpreted.
    m = UpdateManifest.from_dict(manifest)
    if m.device not in ("*", device_id):
        raise UpdateError("wrong_device", f"update is for device {m.device!r}, this is {device_id!r}; "
                          "sign it with --device for this device")
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    if now >= m.expires_at:
        raise UpdateError("expired", f"update expired at {m.expires}; sign it again with a later --expires")
    if not is_newer(m.version, installed_version):
        raise UpdateError("not_newer", f"update version {m.version} is not newer than the installed "
                          f"{installed_version}; sign it with a higher --version")
    return m


# --- archives ----------------------------------------------------------------------------------------
def check_archive(manifest: UpdateManifest, archive: bytes) -> None:
    """Size first (cheap, says 'truncated' for a cut transfer), then sha256."""
    if len(archive) < manifest.size:
        raise UpdateError("truncated", f"received {len(archive)} of {manifest.size} archive bytes; the transfer was "
                          "cut short, publish the update again")
    if len(archive) > manifest.size:
        raise UpdateError("size_mismatch", f"archive is {len(archive)} bytes, the signed manifest says {manifest.size}")
    actual = hashlib.sha256(archive).hexdigest()
    if actual != manifest.sha256:
        raise UpdateError("hash_mismatch", f"archive sha256 {actual[:12]}… does not match the signed "
                          f"{manifest.sha256[:12]}…; it was changed in transit, publish it again")


def unpack_archive(archive: bytes, dest: Path) -> Path:
    """Extract a .tar.gz into the empty directory dest, refusing absolute paths, '..', links and special
    files; returns the package directory (dest, or its single top-level directory)."""
    total = members = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                members += 1
                parts = _safe_parts(member)
                if not parts:
                    continue
                target = dest.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                total += member.size
                if total > MAX_UNPACKED_BYTES or members > MAX_MEMBERS:
                    raise UpdateError("unsafe_archive", "archive unpacks to more than "
                                      f"{MAX_UNPACKED_BYTES >> 30} GiB or {MAX_MEMBERS} files")
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                # O_EXCL: a member that appears twice must not overwrite the first one silently.
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except UpdateError:
        raise
    except (FileExistsError, NotADirectoryError) as exc:
        raise UpdateError("unsafe_archive", f"archive member clashes with another: {exc.filename}") from exc
    except EOFError as exc:
        raise UpdateError("truncated", f"archive ends early ({exc}); it was cut short before signing, rebuild it") from exc
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error) as exc:
        code = "truncated" if "unexpected end" in str(exc) else "bad_archive"
        raise UpdateError(code, f"archive is not a readable .tar.gz ({exc}); rebuild it with `edge-slm sign`") from exc
    except OSError as exc:
        code = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
        raise UpdateError(code, f"cannot unpack the update: {exc.strerror or exc}; free space under {dest.parent}") from exc
    if (dest / MANIFEST_FILE).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST_FILE).is_file():
        return entries[0]
    raise UpdateError("bad_package", f"archive holds no {MANIFEST_FILE}; pack a package directory made by edge-slm convert")


def _safe_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    name = member.name
    path = PurePosixPath(name)
    if not name or "\x00" in name or "\\" in name or path.is_absolute() or ".." in path.parts \
            or (path.parts and ":" in path.parts[0]):
        raise UpdateError("unsafe_archive", f"archive member {name!r} would land outside the package; refused")
    if member.issym() or member.islnk():
        raise UpdateError("unsafe_archive", f"archive member {name!r} is a link; packages hold only files")
    if not (member.isfile() or member.isdir()):
        raise UpdateError("unsafe_archive", f"archive member {name!r} is not a regular file or directory")
    return tuple(p for p in path.parts if p != ".")


# --- the store ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """A version on trial: current points at target until commit(); reverting restores both links."""

    target: str
    current_before: str
    previous_before: str | None
    version: str
    started: float
    deadline: float
    owner: str

    @property
    def abandoned(self) -> bool:
        """The process that started it is gone (crashed or restarted before committing)."""
        if self.owner == _PROCESS_TOKEN:
            return False
        pid = self.owner.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            return True  # unreadable, or an earlier process that had our pid (pids repeat across boots)
        return not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists but is not ours to signal; a pid reused after reboot waits for the deadline
    return True


@dataclass(frozen=True)
class Recovery:
    """What recover() found and did."""

    version: str | None
    reverted_from: str | None
    removed: tuple[str, ...]
    repaired: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _dir_name(version: str, sha: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:64]
    if not safe or safe.startswith("."):  # a leading dot would look like temp work to recover()
        safe = "v" + safe
    return f"{safe}-{sha[:12]}"


class ModelStore:
    """Versioned model packages under root with an atomically swapped `current` symlink.

    One store per root per process (a file lock keeps other processes out on POSIX). Every public
    method leaves `current` pointing at a complete package, whatever step a crash interrupts.
    """

    def __init__(self, root: str | os.PathLike[str], *, crash_at: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if crash_at is not None and crash_at not in STEPS:
            raise ValueError(f"crash_at {crash_at!r} is not one of STEPS")
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.crash_at = crash_at
        self.clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    # -- locking and crash points
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store (re-entrant in this thread; a flock on root/.lock against other processes)."""
        with self._lock:
            if self._depth == 0 and fcntl is not None:
                self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    def _step(self, name: str) -> None:
        if self.crash_at == name:
            raise SimulatedCrash(name)

    # -- reading
    def _link(self, name: str) -> str | None:
        """The link's target ('versions/<dir>') if it is one of ours and the directory exists."""
        p = self.root / name
        if not p.is_symlink():
            if p.exists():
                raise ModelError(f"{p} is not a symlink; the model store manages it, move it away")
            return None
        target = os.readlink(p)
        if not _LINK_RE.match(target) or not (self.root / target).is_dir():
            return None
        return target

    def _open(self, link_target: str | None, verify: bool = True) -> ModelPackage | None:
        if link_target is None:
            return None
        try:
            return ModelPackage.open(self.root / link_target, verify=verify)
        except ModelError as exc:
            log.error("model store: %s is not loadable: %s", link_target, exc)
            return None

    def current_package(self) -> ModelPackage:
        """The package `current` points at, opened and verified (sha256 and schema)."""
        target = self._link("current")
        if target is None:
            raise ModelError(f"no model installed in {self.root}; install one with ModelStore.install(PKG_DIR)")
        return ModelPackage.open(self.root / target)

    def previous_package(self) -> ModelPackage | None:
        return self._open(self._link("previous"))

    def installed_version(self) -> str | None:
        pkg = self._open(self._link("current"), verify=False)
        return pkg.version if pkg else None

    def trial(self) -> Trial | None:
        """The pending trial, or None. A trial.json that cannot be read counts as a dead trial."""
        p = self.root / "trial.json"
        if not p.exists():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            return Trial(str(d["target"]), str(d["current_before"]),
                         None if d["previous_before"] is None else str(d["previous_before"]), str(d["version"]),
                         float(d["started"]), float(d["deadline"]), str(d["owner"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("model store: unreadable %s (%s); treating it as an abandoned trial", p, exc)
            return Trial("", "", None, "", 0.0, 0.0, "")

    # -- writing helpers (caller holds the lock)
    def _swap_link(self, name: str, target: str, phase: str) -> None:
        """name -> target atomically: temp symlink, fsync dir, rename over name, fsync dir."""
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        os.symlink(target, tmp)
        _fsync_dir(self.root)
        if name == "current":
            self._step(f"{phase}:current_tmp_linked")
        os.replace(tmp, self.root / name)
        if name == "current":
            self._step(f"{phase}:current_replaced")
        _fsync_dir(self.root)

    def _remove(self, name: str) -> None:
        p = self.root / name
        if p.is_symlink() or p.is_file():
            p.unlink()
            _fsync_dir(self.root)

    def _write_trial(self, trial: Trial) -> None:
        tmp = self.root / f".tmp-trial-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(trial), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "trial.json")
        _fsync_dir(self.root)

    def _discard(self, path: Path) -> None:
        # Rename first so a half-deleted directory never sits under a version's name.
        trash = self.versions / f".tmp-trash-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_temp(self) -> list[str]:
        removed = []
        for d in (self.root, self.versions):
            for p in d.glob(".tmp-*"):
                removed.append(str(p.relative_to(self.root)))
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        return removed

    def _prune(self) -> list[str]:
        """Delete version directories nothing points at (crashed installs, reverted or superseded versions)."""
        keep = {self._link("current"), self._link("previous")}
        t = self.trial()
        if t is not None:
            keep.add(t.target)
        removed = []
        for p in self.versions.iterdir():
            if not p.name.startswith(".tmp-") and f"versions/{p.name}" not in keep:
                removed.append(f"versions/{p.name}")
                if p.is_dir() and not p.is_symlink():
                    self._discard(p)
                else:
                    p.unlink(missing_ok=True)
        if removed:
            _fsync_dir(self.versions)
        return removed

    # -- install, commit, rollback
    def install(self, source: str | os.PathLike[str] | bytes, manifest: UpdateManifest | None = None, *,
                trial_s: float = DEFAULT_TRIAL_S,
                check: Callable[[ModelPackage], None] | None = None) -> ModelPackage:
        """Stage a package (a directory, or .tar.gz bytes unpacked safely), run check on it, then make it
        current. With a current model already installed the new one is on trial: commit() keeps it,
        rollback() or an expired trial_s (check_trial/recover) goes back. Returns the new package."""
        with self.locked():
            self.check_trial()  # a trial past its window, or left by a dead process, is undone first
            if self.trial() is not None:
                raise UpdateError("trial_pending", "another update is on trial; commit() or rollback() it first")
            self._clean_temp()
            staging = self.versions / f".tmp-stage-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                src = source if isinstance(source, bytes) else Path(source)
                if isinstance(src, Path) and src.is_file() and src.name.endswith((".tar.gz", ".tgz")):
                    src = src.read_bytes()
                if isinstance(src, bytes):
                    pkg_dir = unpack_archive(src, staging)
                elif src.is_dir():
                    pkg_dir = staging / "pkg"
                    shutil.copytree(src, pkg_dir)
                else:
                    raise ModelError(f"model package not found: {src} (expected a package directory or .tar.gz)")
                try:
                    pkg = ModelPackage.open(pkg_dir)
                except ModelError as exc:
                    raise UpdateError("bad_package", f"the update's package is not valid: {exc}") from exc
                if manifest is not None and (pkg.name, pkg.version) != (manifest.name, manifest.version):
                    raise UpdateError("bad_package", f"signed manifest says {manifest.name} {manifest.version} but the "
                                      f"package holds {pkg.name} {pkg.version}; sign the package again")
                if check is not None:
                    check(pkg)
                final = self.versions / _dir_name(pkg.version, manifest.sha256 if manifest else pkg.sha256)
                target = f"versions/{final.name}"
                current = self._link("current")
                if target == current:
                    raise UpdateError("not_newer", f"{pkg.name} {pkg.version} is already the current model")
                _fsync_tree(pkg_dir)
                self._step("install:staged")
                if final.exists() and target == self._link("previous"):
                    pass  # the same package is already there, complete: reuse it
                else:
                    if final.exists():
                        self._discard(final)  # left over from a crashed install
                    os.replace(pkg_dir, final)
                    _fsync_dir(self.versions)
            except Exception:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(staging, ignore_errors=True)
            self._step("install:renamed")
            if current is None:
                # Nothing to go back to, so no trial: the first install is committed at once.
                self._swap_link("current", target, "install")
                self._step("install:done")
                return ModelPackage.open(final)
            now = self.clock()
            self._write_trial(Trial(target, current, self._link("previous"), pkg.version, now, now + trial_s,
                                    _PROCESS_TOKEN))
            self._step("install:trial_written")
            self._swap_link("previous", current, "install")
            self._step("install:previous_linked")
            self._swap_link("current", target, "install")
            self._step("install:done")
            log.info("model update %s %s installed; on trial for %.0f s", pkg.name, pkg.version, trial_s)
            return ModelPackage.open(final)

    def commit(self) -> bool:
        """Keep the version on trial; False if nothing was on trial."""
        with self.locked():
            t = self.trial()
            if t is None or t.target != self._link("current"):
                return False
            self._remove("trial.json")
            self._step("commit:trial_removed")
            self._prune()
            self._step("commit:done")
            log.info("model update %s committed", t.version)
            return True

    def rollback(self) -> ModelPackage:
        """Go back to the previous version: undo the trial if one is pending, else switch to `previous`
        and forget the version rolled back from. UpdateError('no_previous') if there is none."""
        with self.locked():
            t = self.trial()
            if t is not None:
                self._revert(t)
                return self.current_package()
            previous = self._link("previous")
            if self._open(previous) is None:
                raise UpdateError("no_previous", f"nothing to roll back to in {self.root}; install a model instead")
            self._swap_link("current", previous, "rollback")
            self._remove("previous")
            self._step("rollback:previous_removed")
            self._prune()
            self._step("rollback:done")
            return self.current_package()

    def _revert(self, t: Trial) -> None:
        """Restore current and previous to what they were before the trial, then drop the trial's version."""
        if t.target:
            back, back_previous = t.current_before, t.previous_before
        else:  # unreadable trial.json: the previous link is the best guess at what came before
            back, back_previous = self._link("previous"), None
        if back and self._open(back) is not None:
            if self._link("current") != back:
                self._swap_link("current", back, "revert")
        else:
            log.error("model store: the version before the trial (%s) is gone; keeping %s", back, self._link("current"))
        if back_previous and back_previous != self._link("current") and self._open(back_previous, verify=False):
            if self._link("previous") != back_previous:
                self._swap_link("previous", back_previous, "revert")
        else:
            self._remove("previous")
        self._step("revert:previous_linked")
        self._remove("trial.json")
        self._step("revert:trial_removed")
        self._prune()
        self._step("revert:done")
        log.warning("model update %s reverted; back to %s", t.version or "?", self.installed_version())

    def check_trial(self, now: float | None = None) -> bool:
        """Revert the version on trial if its window has passed or its process is gone; True if reverted."""
        with self.locked():
            t = self.trial()
            if t is None:
                return False
            now = self.clock() if now is None else now
            if not t.abandoned and now < t.deadline and t.target == self._link("current"):
                return False
            self._revert(t)
            return True

    def recover(self, now: float | None = None) -> Recovery:
        """Run at start-up: delete half-written temp work, revert a trial whose window passed or whose
        process died, repair a broken `current`, delete versions nothing points at."""
        with self.locked():
            removed = self._clean_temp()
            t = self.trial()
            reverted = self.check_trial(now) if t is not None else False
            repaired = False
            if self._open(self._link("current")) is None:
                repaired = self._repair_current()
            previous = self._link("previous")
            if (self.root / "previous").is_symlink() and (previous is None or previous == self._link("current")):
                self._remove("previous")  # dangling, or the same as current: nothing to go back to
            if self._link("current") is not None:
                # Without a current model nothing on disk is provably unused; keep it for a person to look at.
                removed += self._prune()
            return Recovery(self.installed_version(), (t.version or "?") if reverted and t else None,
                            tuple(removed), repaired)

    def _repair_current(self) -> bool:
        """current is missing or broken (damage from outside: our own steps never cause it). Point it at
        previous, else at the highest loadable version."""
        names = [p.name for p in self.versions.iterdir() if not p.name.startswith(".")]

        def order(name: str) -> tuple[int, ...]:
            try:
                return parse_version(name.rsplit("-", 1)[0])
            except UpdateError:
                return ()

        candidates = [self._link("previous")] + [f"versions/{n}" for n in sorted(names, key=order, reverse=True)]
        for target in candidates:
            if target and self._open(target) is not None:
                log.error("model store: current is missing or broken; switching to %s", target)
                self._swap_link("current", target, "repair")
                return True
        log.error("model store: no loadable model under %s", self.versions)
        return False


# --- apply one update ---------------------------------------------------------------------------------
def default_golden(manifest: UpdateManifest) -> Callable[[ModelPackage], None]:
    """Load the model as the agent would and answer the manifest's golden input (or "hello")."""
    def check(pkg: ModelPackage) -> None:
        # Imported here: numpy and the TFLite runtime are only needed once an update is being checked.
        from edge_slm.tasks import load_task

        out = load_task(pkg)(manifest.golden_input or "hello")
        if manifest.golden_label is not None and out.get("label") != manifest.golden_label:
            raise UpdateError("golden_failed", f"golden input gave label {out.get('label')!r}, expected "
                              f"{manifest.golden_label!r}")
    return check


def apply_update(store: ModelStore, wrapper: bytes | str | dict[str, Any], archive_bytes: bytes,
                 public_key: Ed25519PublicKey | str | bytes | os.PathLike[str], device_id: str,
                 golden: Callable[[ModelPackage], None] | None = None, trial_s: float = DEFAULT_TRIAL_S,
                 now: datetime | None = None) -> ModelPackage:
    """Verify, check size and hash, unpack, open, run the golden check, install on trial; UpdateError
    with a stable code otherwise, and then nothing of the update is left on disk."""
    with store.locked():
        m = verify_update(wrapper, public_key, store.installed_version(), device_id, now)
        check_archive(m, archive_bytes)
        check = golden or default_golden(m)

        def run_golden(pkg: ModelPackage) -> None:
            try:
                check(pkg)
            except UpdateError as exc:
                if exc.code == "golden_failed":
                    raise
                raise UpdateError("golden_failed", f"the new model failed its golden check: {exc}") from exc
            except Exception as exc:  # whatever a broken model raises, the update is refused, not the agent
                raise UpdateError("golden_failed", f"the new model failed its golden check: "
                                  f"{type(exc).__name__}: {exc}; the current model stays") from exc

        return store.install(archive_bytes, m, trial_s=trial_s, check=run_golden)


# --- the MQTT side, transport-free -----------------------------------------------------------------
CHUNK_MAGIC = b"ESU1"
CHUNK_SIZE = 256 * 1024
MAX_ID_BYTES = 64
MAX_COMMAND_BYTES = 1 << 20
_HEADER = struct.Struct(">II")


def encode_chunk(transfer_id: str, index: int, count: int, data: bytes) -> bytes:
    """b"ESU1" | u8 len(id) | id (UTF-8) | u32 index | u32 count (big-endian) | data."""
    tid = transfer_id.encode("utf-8")
    if not 0 < len(tid) <= MAX_ID_BYTES:
        raise ValueError(f"transfer id must be 1..{MAX_ID_BYTES} UTF-8 bytes")
    return CHUNK_MAGIC + bytes([len(tid)]) + tid + _HEADER.pack(index, count) + data


def decode_chunk(payload: bytes) -> tuple[str, int, int, bytes]:
    """(transfer id, index, count, data); UpdateError('bad_chunk') for anything else."""
    if len(payload) < 5 + _HEADER.size or payload[:4] != CHUNK_MAGIC:
        raise UpdateError("bad_chunk", "not an update chunk (no ESU1 header)")
    n = payload[4]
    end = 5 + n + _HEADER.size
    if n == 0 or len(payload) < end:
        raise UpdateError("bad_chunk", "update chunk header is cut short")
    try:
        tid = payload[5 : 5 + n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UpdateError("bad_chunk", "update chunk id is not UTF-8") from exc
    index, count = _HEADER.unpack_from(payload, 5 + n)
    if count == 0 or index >= count:
        raise UpdateError("bad_chunk", f"update chunk {index} of {count} is out of range")
    return tid, index, count, payload[end:]


def split_chunks(transfer_id: str, archive: bytes, chunk_size: int = CHUNK_SIZE) -> list[bytes]:
    count = max(1, -(-len(archive) // chunk_size))
    return [encode_chunk(transfer_id, i, count, archive[i * chunk_size : (i + 1) * chunk_size]) for i in range(count)]


@dataclass
class _Transfer:
    count: int
    chunks: dict[int, bytes]
    size: int = 0


class UpdateReceiver:
    """Glue for the agent's cmd/model/update topics: buffer chunks from on_blob, apply on on_command.

    on_command always returns a reply dict ({"schema_version", "id", "ok", "code", "message",
    "version"}) and never raises; it blocks while the golden check runs, so call it off paho's thread.
    """

    def __init__(self, store: ModelStore, public_key: Ed25519PublicKey | str | bytes | os.PathLike[str],
                 device_id: str, golden: Callable[[ModelPackage], None] | None = None,
                 trial_s: float = DEFAULT_TRIAL_S, max_bytes: int = 512 << 20, max_transfers: int = 4) -> None:
        self.store = store
        self.public_key = load_public_key(public_key)
        self.device_id = device_id
        self.golden = golden
        self.trial_s = trial_s
        # Chunks arrive before their (signed) command, so they are unauthenticated: bound what they hold.
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self._transfers: OrderedDict[str, _Transfer] = OrderedDict()
        self._lock = threading.Lock()

    def on_blob(self, payload: bytes) -> None:
        """Keep one chunk; bad chunks are logged and dropped (the command then reports what is missing)."""
        try:
            tid, index, count, data = decode_chunk(bytes(payload))
        except UpdateError as exc:
            log.warning("dropping update chunk: %s", exc)
            return
        with self._lock:
            t = self._transfers.get(tid)
            if t is None or t.count != count:
                t = self._transfers[tid] = _Transfer(count, {})
            self._transfers.move_to_end(tid)
            # +64 per chunk: empty chunks must cost something too, or a flood of them grows without bound
            t.size += len(data) + 64 - (len(t.chunks[index]) + 64 if index in t.chunks else 0)
            t.chunks[index] = data
            while len(self._transfers) > self.max_transfers or sum(x.size for x in self._transfers.values()) > self.max_bytes:
                dropped, _ = self._transfers.popitem(last=False)
                log.warning("dropping buffered update %s: over %d transfers or %d bytes", dropped,
                            self.max_transfers, self.max_bytes)
                if dropped == tid:
                    break

    def on_command(self, payload: bytes) -> dict[str, Any]:
        reply: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "id": None, "ok": False, "code": "internal_error",
                                 "message": "", "version": None}
        try:
            cmd = _parse_command(payload)
            reply["id"] = cmd["id"]
            with self._lock:
                transfer = self._transfers.pop(str(cmd["id"]), None)
            # Refuse a bad signature, device, expiry or version before looking at the chunks.
            verify_update(cmd["update"], self.public_key, self.store.installed_version(), self.device_id)
            archive = _assemble(transfer, cmd["chunks"], str(cmd["id"]))
            pkg = apply_update(self.store, cmd["update"], archive, self.public_key, self.device_id,
                               self.golden, self.trial_s)
            reply.update(ok=True, code="applied", trial_s=self.trial_s,
                         message=f"{pkg.name} {pkg.version} installed and on trial; it is reverted unless "
                         f"committed within {self.trial_s:g} s")
        except UpdateError as exc:
            reply.update(code=exc.code, message=str(exc))
        except EdgeSlmError as exc:
            reply.update(code=getattr(exc, "code", "failed"), message=str(exc))
        except Exception as exc:  # a bug here must become a reply, not stop the agent
            log.exception("model update command failed")
            reply.update(code="internal_error", message=f"{type(exc).__name__}: {exc}")
        try:
            reply["version"] = self.store.installed_version()
        except EdgeSlmError:
            pass
        return reply


def _parse_command(payload: bytes) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray)):
        raise UpdateError("bad_request", "command payload must be bytes")
    if len(payload) > MAX_COMMAND_BYTES:
        raise UpdateError("too_large", f"command is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UpdateError("bad_encoding", "command payload is not UTF-8 JSON") from exc
    except (ValueError, RecursionError) as exc:
        raise UpdateError("bad_json", f"command payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise UpdateError("bad_request", 'command must be {"id": ID, "update": {...}, "chunks": N}')
    cid = obj.get("id")
    if not isinstance(cid, (str, int)) or isinstance(cid, bool) or isinstance(cid, str) and not cid:
        raise UpdateError("bad_request", '"id" must be a non-empty string or an integer')
    try:
        id_bytes = str(cid).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UpdateError("bad_request", '"id" is not valid Unicode') from exc
    if len(id_bytes) > MAX_ID_BYTES:
        raise UpdateError("bad_request", f'"id" is longer than {MAX_ID_BYTES} bytes')
    result = {"id": cid, "update": obj.get("update"), "chunks": obj.get("chunks")}
    if not isinstance(result["update"], dict):
        raise UpdateError("bad_request", '"update" must be the signed update object {"manifest", "signature"}')
    chunks = result["chunks"]
    if not isinstance(chunks, int) or isinstance(chunks, bool) or not 0 < chunks <= (MAX_UNPACKED_BYTES // CHUNK_SIZE):
        raise UpdateError("bad_request", '"chunks" must be the number of blob chunks sent (>= 1)')
    return result


def _assemble(transfer: _Transfer | None, count: int, tid: str) -> bytes:
    if transfer is None:
        raise UpdateError("truncated", f"no archive chunks arrived for update {tid!r}; publish the update again")
    if transfer.count != count:
        raise UpdateError("truncated", f"chunks of update {tid!r} say {transfer.count} in all, the command says {count}")
    missing = [i for i in range(count) if i not in transfer.chunks]
    if missing:
        raise UpdateError("truncated", f"received {count - len(missing)} of {count} chunks for update {tid!r}; "
                          "publish the update again")
    return b"".join(transfer.chunks[i] for i in range(count))
