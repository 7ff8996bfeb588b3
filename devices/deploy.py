"""Verify a deployment bundle without extracting it, then install it into dir://PATH or over ssh://user@host/PATH.

Host side (`edge-slm deploy`); OpenSSH through subprocesses, edge_slm and devices.bundle; never TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from devices.bundle import BundleError, BundleInfo

Progress = Callable[[int, int], None]


# --- verification --------------------------------------------------------------------------------
def _member_problem(m: tarfile.TarInfo, top: str) -> str | None:
    name = m.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in parts:
        return "climbs out with '..'"
    if not parts or parts[0] != top:
        return f"is outside the bundle's directory {top}/"
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        return "is a device or fifo"
    if m.issym() or m.islnk():
        target = m.linkname
        if target.startswith("/"):
            return f"is a link to the absolute path {target}"
        base = posixpath.dirname(name) if m.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == ".." or resolved.startswith("../") or PurePosixPath(resolved).parts[:1] != (top,):
            return f"is a link pointing outside the bundle ({target})"
    elif not (m.isfile() or m.isdir()):
        return "is not a regular file or directory"
    return None


def verify_bundle(path: str | os.PathLike[str]) -> BundleInfo:
    """Check a bundle.tar.gz without writing anything: safe member names and types, every file in SHA256SUMS
    and matching it, bundle.json present. Raises BundleError naming the offending member or file."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle not found: {path} (make one with edge-slm bundle)")
    try:
        tar = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: not a gzip'd tar archive ({exc}); was the copy cut short?") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BundleError(f"{path}: the archive is truncated or corrupt ({exc}); copy it again") from exc
        if not members:
            raise BundleError(f"{path}: empty archive")
        top = PurePosixPath(members[0].name).parts[0] if PurePosixPath(members[0].name).parts else ""
        for m in members:
            problem = _member_problem(m, top)
            if problem:
                raise BundleError(f"{path}: refusing unsafe member {m.name!r}: it {problem}; nothing was extracted")
        by_name = {m.name: m for m in members}

        def read(name: str) -> bytes:
            m = by_name.get(f"{top}/{name}")
            if m is None or not m.isfile():
                raise BundleError(f"{path}: no {name}; is this a bundle made by edge-slm bundle?")
            f = tar.extractfile(m)
            assert f is not None
            return f.read()

        sums: dict[str, str] = {}
        for line in read("SHA256SUMS").decode("utf-8", "replace").splitlines():
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64:
                raise BundleError(f"{path}: SHA256SUMS has a malformed line {line!r}")
            sums[name] = digest
        files = {m.name[len(top) + 1:]: m for m in members if m.isfile()}
        for name in sorted(set(files) - set(sums) - {"SHA256SUMS"}):
            raise BundleError(f"{path}: {name} is not listed in SHA256SUMS; the bundle was altered after it was made")
        for name in sorted(set(sums) - set(files)):
            raise BundleError(f"{path}: {name} is listed in SHA256SUMS but missing from the archive")
        for name, m in sorted(files.items()):
            if name == "SHA256SUMS":
                continue
            h = hashlib.sha256()
            f = tar.extractfile(m)
            assert f is not None
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
            if h.hexdigest() != sums[name]:
                raise BundleError(f"{path}: checksum mismatch for {name} (sha256 {h.hexdigest()[:12]}…, expected "
                                  f"{sums[name][:12]}…); the bundle is corrupt or was tampered with: make or copy it again")
        try:
            manifest = json.loads(read("bundle.json"))
        except json.JSONDecodeError as exc:
            raise BundleError(f"{path}: bundle.json is not valid JSON ({exc})") from exc
    if manifest.get("release") != top:
        raise BundleError(f"{path}: bundle.json names release {manifest.get('release')!r} but the archive holds {top}/")
    return BundleInfo(path, top, manifest.get("target", ""), manifest, sums, path.stat().st_size,
                      tuple(manifest.get("warnings", [])))


def extract_bundle(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> tuple[BundleInfo, Path]:
    """verify_bundle, then extract into dest; returns the info and the release directory."""
    info = verify_bundle(path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(info.path, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members were checked above
            tar.extractall(dest)
    return info, dest / info.release


# --- destinations --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Destination:
    """dir://PATH or ssh://user@host[:port]/PATH; PATH is the install prefix on that machine ('/' = system)."""

    scheme: str
    path: str
    host: str = ""
    user: str = ""
    port: int | None = None

    @property
    def prefix(self) -> str:
        return "" if self.path in ("", "/") else self.path.rstrip("/")


def parse_destination(dest: str) -> Destination:
    parts = urlsplit(dest)
    if parts.scheme == "dir":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise BundleError(f"destination {dest!r}: dir:// needs a path, e.g. dir:///srv/edge-slm-root")
        return Destination("dir", str(Path(path).expanduser().resolve()))
    if parts.scheme == "ssh":
        if not parts.hostname:
            raise BundleError(f"destination {dest!r}: ssh:// needs a host, e.g. ssh://pi@raspberrypi.local/")
        try:
            port = parts.port
        except ValueError as exc:
            raise BundleError(f"destination {dest!r}: bad port") from exc
        path = unquote(parts.path) or "/"
        if not path.startswith("/"):
            path = "/" + path
        return Destination("ssh", path, parts.hostname, unquote(parts.username or ""), port)
    raise BundleError(f"destination {dest!r}: use dir://PATH or ssh://user@host[:port]/PATH")


@dataclasses.dataclass(frozen=True)
class DeployResult:
    release: str
    destination: str
    prefix: str
    commands: list[str]
    output: str
    dry_run: bool = False


def _install_args(prefix: str, python: str | None, no_venv: bool, extra: Sequence[str]) -> list[str]:
    args = ["--prefix", prefix or "/"]
    if python:
        args += ["--python", python]
    if no_venv:
        args.append("--no-venv")
    return args + list(extra)


def _deploy_dir(info: BundleInfo, dest: Destination, install: list[str], dry_run: bool,
                progress: Progress | None) -> DeployResult:
    app = Path(dest.prefix or "/") / "opt" / "edge-slm"
    cmd_desc = [f"extract {info.path} into {app}/.incoming-*", f"sh install.sh {shlex.join(install)}"]
    if dry_run:
        return DeployResult(info.release, f"dir://{dest.path}", dest.prefix, cmd_desc, "", True)
    app.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=app))
    try:
        if progress:
            progress(0, info.size_bytes)
        _, rel = extract_bundle(info.path, staging)
        if progress:
            progress(info.size_bytes, info.size_bytes)
        proc = subprocess.run(["sh", str(rel / "install.sh"), *install], capture_output=True, text=True, timeout=1800)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if proc.returncode != 0:
        raise BundleError(f"install.sh failed on dir://{dest.path}: {_last_line(proc.stderr or proc.stdout)}")
    return DeployResult(info.release, f"dir://{dest.path}", dest.prefix, cmd_desc, proc.stdout + proc.stderr)


def ssh_base(dest: Destination, identity: str | None = None, known_hosts: str | None = None,
             accept_new_host: bool = False, connect_timeout: float = 15) -> list[str]:
    """The ssh command line (no remote command): BatchMode so it never prompts, strict host keys."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(connect_timeout)}",
           "-o", f"StrictHostKeyChecking={'accept-new' if accept_new_host else 'yes'}"]
    if known_hosts:
        cmd += ["-o", f"UserKnownHostsFile={known_hosts}"]
    if identity:
        cmd += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    if dest.port:
        cmd += ["-p", str(dest.port)]
    cmd.append(f"{dest.user}@{dest.host}" if dest.user else dest.host)
    return cmd


def _deploy_ssh(info: BundleInfo, dest: Destination, install: list[str], dry_run: bool, progress: Progress | None,
                identity: str | None, known_hosts: str | None, accept_new_host: bool) -> DeployResult:
    app = f"{dest.prefix}/opt/edge-slm"
    # the far side re-checks every checksum (install.sh runs sha256sum -c) before touching anything
    # a system install ('/') by a non-root login goes through sudo -n (never prompts: BatchMode)
    sudo = "" if dest.prefix else 'S=""; [ "$(id -u)" = 0 ] || S="sudo -n"; '
    run = "" if not sudo else "$S "
    remote = (
        f"set -e; umask 022; {sudo}"
        f"{run}mkdir -p {shlex.quote(app)}; "
        f"d=$({run}mktemp -d {shlex.quote(app)}/.incoming-XXXXXX); "
        f"trap '{run}rm -rf \"$d\"' EXIT; "
        f"{run}tar -xzf - -C \"$d\"; "
        f"{run}sh \"$d\"/{shlex.quote(info.release)}/install.sh {shlex.join(install)}"
    )
    base = ssh_base(dest, identity, known_hosts, accept_new_host)
    cmd = [*base, "sh -c " + shlex.quote(remote)]  # the login shell may be fish or zsh; the script is POSIX sh
    url = f"ssh://{dest.user + '@' if dest.user else ''}{dest.host}{':' + str(dest.port) if dest.port else ''}{dest.path}"
    if dry_run:
        return DeployResult(info.release, url, dest.prefix, [shlex.join(cmd) + f" < {info.path}"], "", True)
    if shutil.which("ssh") is None:
        raise BundleError("ssh is not installed on this machine: apt-get install openssh-client")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    sent = 0
    assert proc.stdin is not None
    try:
        with open(info.path, "rb") as f:
            for block in iter(lambda: f.read(64 * 1024), b""):
                proc.stdin.write(block)
                sent += len(block)
                if progress:
                    progress(sent, info.size_bytes)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ssh exited (auth failed, host key, disk full); its stderr says why
    rc = proc.wait(timeout=1800)
    for t in readers:
        t.join(10)
    out = chunks.get("out", b"").decode("utf-8", "replace")
    err = chunks.get("err", b"").decode("utf-8", "replace")
    if rc != 0:
        hint = ""
        if rc == 255:
            hint = (" (ssh could not connect or log in: check the host, --identity, and that the host key is in "
                    "known_hosts — ssh once by hand, or pass --accept-new-host)")
        raise BundleError(f"deploy to {url} failed: {_last_line(err or out)}{hint}")
    return DeployResult(info.release, url, dest.prefix, [shlex.join(cmd)], out + err)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def deploy(bundle: str | os.PathLike[str], destination: str, *, identity: str | None = None,
           known_hosts: str | None = None, accept_new_host: bool = False, dry_run: bool = False,
           python: str | None = None, no_venv: bool = False, install_args: Sequence[str] = (),
           progress: Progress | None = None) -> DeployResult:
    """Verify BUNDLE here, then install it at DESTINATION (dir://PATH or ssh://user@host[:port]/PATH).

    PATH is the install prefix on that machine: '/' installs system-wide (root, systemd unit enabled and
    started); any other directory installs under it as that user. install.sh verifies the checksums again
    on the far side, keeps the previous release and switches `current` atomically.
    """
    info = verify_bundle(bundle)
    dest = parse_destination(destination)
    install = _install_args(dest.prefix, python, no_venv, install_args)
    if dest.scheme == "dir":
        return _deploy_dir(info, dest, install, dry_run, progress)
    return _deploy_ssh(info, dest, install, dry_run, progress, identity, known_hosts, accept_new_host)


# --- CLI -----------------------------------------------------------------------------------------
DEPLOY_EPILOG = """examples:
  edge-slm deploy bundle.tar.gz ssh://pi@raspberrypi.local/          system install (as root, or via passwordless sudo)
  edge-slm deploy bundle.tar.gz ssh://root@10.0.0.7:2222/ --identity ~/.ssh/edge_ed25519
  edge-slm deploy bundle.tar.gz ssh://pi@pi4/home/pi/edge-root        install under a prefix, no root needed
  edge-slm deploy bundle.tar.gz dir:///mnt/staging --no-venv --python python3
  edge-slm deploy bundle.tar.gz ssh://pi@pi4/ --dry-run               print what would run

PATH in the destination is the install prefix: '/' puts the release in /opt/edge-slm/releases/<release>,
the config in /etc/edge-slm/agent.toml and starts the systemd unit edge-slm.service; any other PATH puts
the same tree under PATH. The bundle is verified here and again on the device (sha256sum -c) before
anything is installed; the previous release stays in releases/ and `previous` points at it.
ssh runs with BatchMode=yes (no password prompts): use a key (--identity) and a known host key
(--known-hosts, or --accept-new-host the first time).
"""


def cmd_deploy(args: argparse.Namespace) -> int:
    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            end = "\n" if done == total else "\r"
            print(f"copying {done / 1024:.0f}/{total / 1024:.0f} KiB ({100 * done // max(total, 1)}%)",
                  end=end, file=sys.stderr, flush=True)

    result = deploy(args.bundle, args.destination, identity=args.identity, known_hosts=args.known_hosts,
                    accept_new_host=args.accept_new_host, dry_run=args.dry_run, python=args.python,
                    no_venv=args.no_venv, progress=progress)
    if result.dry_run:
        print(f"would install release {result.release} at {result.destination}:")
        for c in result.commands:
            print(f"  {c}")
        return 0
    print(result.output.rstrip())
    print(f"deployed release {result.release} to {result.destination}")
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("deploy", help="verify a bundle and install it on a device over ssh (or into a directory)",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEPLOY_EPILOG,
                              description="Install a bundle made by `edge-slm bundle` on a device.")
    p.add_argument("bundle", help="bundle.tar.gz made by edge-slm bundle")
    p.add_argument("destination", metavar="DEST", help="ssh://user@host[:port]/PREFIX or dir://PREFIX")
    p.add_argument("--identity", "-i", help="ssh private key file")
    p.add_argument("--known-hosts", help="known_hosts file to check the device's host key against")
    p.add_argument("--accept-new-host", action="store_true", help="trust a host key seen for the first time")
    p.add_argument("--python", help="interpreter on the device for the agent (default: python3)")
    p.add_argument("--no-venv", action="store_true", help="use --python as is instead of making a virtualenv")
    p.add_argument("--dry-run", action="store_true", help="verify the bundle and print what would run")
    p.set_defaults(func=cmd_deploy)
