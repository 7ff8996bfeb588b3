"""Deployment bundles: one bundle.tar.gz per target with the model, config, pinned requirements, wheel, unit, scripts.

Host side (`edge-slm bundle`); uses edge_slm and devices.profiles. Never imports TensorFlow or converters.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edge_slm import __version__
from edge_slm.config import load_agent_config
from edge_slm.errors import ConfigError, EdgeSlmError, ModelError
from edge_slm.package import ModelPackage

log = logging.getLogger(__name__)

BUNDLE_SCHEMA = 1
TEMPLATES = Path(__file__).resolve().parent / "templates"
CHECKOUT = Path(__file__).resolve().parents[1]
# Where install.sh puts things on the device (with --prefix DIR they move under DIR).
APP_DIR = "/opt/edge-slm"
ETC_DIR = "/etc/edge-slm"
STATE_DIR = "/var/lib/edge-slm"
MCU_RUNTIMES = ("tflite-micro",)
# pyproject's device dependencies that the target's runtime line replaces
_RUNTIME_PACKAGES = ("ai-edge-litert", "tflite-runtime", "numpy")


class BundleError(EdgeSlmError):
    """A bundle cannot be made, is corrupt or unsafe, or cannot be deployed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class BundleInfo:
    """What is in a bundle: the manifest (bundle.json) plus where it is and each file's sha256."""

    path: Path
    release: str
    target: str
    manifest: dict[str, Any]
    files: dict[str, str]  # name inside the release dir -> sha256
    size_bytes: int
    warnings: tuple[str, ...] = ()

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("models", []))


# --- requirements --------------------------------------------------------------------------------
def _base_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """(dependencies, optional extras) from this checkout's pyproject.toml, else the installed metadata."""
    pyproject = CHECKOUT / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        return list(data["dependencies"]), {k: list(v) for k, v in data.get("optional-dependencies", {}).items()}
    from importlib.metadata import requires

    deps, extras = [], {"serial": [], "audio": []}
    for req in requires("edge-slm") or []:
        m = re.search(r"extra\s*==\s*['\"](\w+)['\"]", req)
        if m:
            extras.setdefault(m.group(1), []).append(req.split(";")[0].strip())
        else:
            deps.append(req)
    return deps, extras


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def requirements_for(profile: Any, sources: Iterable[str] = ()) -> list[str]:
    """Pinned requirement lines for a target: its runtime (exact version), numpy bounds it needs, the rest
    of edge-slm's device dependencies from pyproject, and pyserial/sounddevice when the sources need them."""
    deps, extras = _base_requirements()
    lines: list[str] = []
    runtime, version = profile.runtime, profile.runtime_version
    numpy = next((d for d in deps if _req_name(d) == "numpy"), "numpy>=1.23").split(";")[0].strip()
    if runtime == "tflite-runtime":
        # tflite-runtime wheels were built against numpy 1.x and crash on import with numpy 2
        lines.append(f"{numpy},<2")
        lines.append(f"tflite-runtime=={version}")
    elif runtime == "ai-edge-litert":
        lines.append(numpy)
        lines.append(f"ai-edge-litert=={version}")
    else:
        raise BundleError(f"target {profile.name}: runtime {runtime!r} is not one a bundle can install")
    for d in deps:
        if _req_name(d) not in _RUNTIME_PACKAGES:
            lines.append(d.replace("'", '"'))
    schemes = {s.split(":", 1)[0] for s in sources}
    for scheme, extra in (("serial", "serial"), ("microphone", "audio")):
        if scheme in schemes:
            lines.extend(extras.get(extra, []))
    return lines


# --- agent config --------------------------------------------------------------------------------
def _toml_str(s: str) -> str:
    # JSON escapes match TOML basic strings except DEL, which TOML forbids raw
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise BundleError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for a parsed agent config: scalars, tables, arrays of tables (nested tables inline in those)."""
    out: list[str] = []

    def table(d: dict[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        for k, v in scalars.items():
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                out.append(f"\n[{'.'.join(_toml_key(p) for p in [*path, k])}]")
                table(v, [*path, k])
        for k, v in d.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for item in v:
                    out.append(f"\n[[{'.'.join(_toml_key(p) for p in [*path, k])}]]")
                    for ik, iv in item.items():
                        out.append(f"{_toml_key(ik)} = {_toml_value(iv)}")

    table(data, [])
    return "\n".join(out).lstrip("\n") + "\n"


# --- the bundle ----------------------------------------------------------------------------------
def _load_profile(target: str) -> Any:
    from devices.profiles import load_profile

    return load_profile(target)


def _fit_check(package: ModelPackage, profile: Any) -> tuple[list[str], list[str]]:
    """(reasons it cannot run, warnings) from devices.fit for this package on the target."""
    try:
        from devices.fit import fit
    except ImportError:  # pragma: no cover - fit lives in this repository; kept optional for slim installs
        return [], []
    report = fit(package.path, profile)
    reasons = [f"{package.name}: {r}" for r in report.reasons]
    warnings = [f"{package.name} on {profile.name}: {w}" for w in report.warnings]
    return reasons, warnings


def build_wheel(dest: Path, source: Path = CHECKOUT) -> Path:
    """`pip wheel --no-deps` of the edge-slm checkout, from a copy so the shared tree gets no build/ dir."""
    if not (source / "pyproject.toml").is_file():
        raise BundleError(f"no edge-slm checkout at {source} to build a wheel from; use --no-wheel "
                          "(the device then installs edge-slm from its package index)")
    with tempfile.TemporaryDirectory(prefix="edge-slm-src-") as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "tests",
                                        ".pytest_cache", "benchmarks", "examples", ".ruff_cache")
        shutil.copytree(source, src, ignore=ignore)
        out = Path(tmp) / "wheel"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
        wheels = sorted(out.glob("edge_slm-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise BundleError(f"building the edge-slm wheel failed: {proc.stderr.strip()[-500:]}; "
                              "pip install wheel setuptools, or pass --no-wheel")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], dest / wheels[0].name))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rewrite_config(agent_toml: Path, staging: Path, model_dirs: dict[str, str]) -> tuple[dict, list[str]]:
    """The agent config with model/state/credential paths moved to where install.sh puts them.

    model_dirs: resolved package path on this machine -> directory name under models/.
    Returns (raw config dict as written, names of files copied into config/).
    """
    cfg = load_agent_config(agent_toml)
    raw = tomllib.loads(agent_toml.read_text(encoding="utf-8"))
    copied: list[str] = []
    for raw_p, p in zip(raw["pipelines"], cfg.pipelines):
        raw_p["model"] = f"{APP_DIR}/current/models/{model_dirs[str(Path(p.model).resolve())]}"
    raw["state_dir"] = STATE_DIR

    def carry(path: str) -> str:
        src = Path(path)
        if not src.is_file():
            raise ConfigError(f"{agent_toml}: {src} is named in the config but does not exist; the bundle must carry it")
        (staging / "config").mkdir(exist_ok=True)
        shutil.copy2(src, staging / "config" / src.name)
        copied.append(src.name)
        return f"{ETC_DIR}/files/{src.name}"

    mqtt = raw.get("mqtt", {})
    for key in ("ca_file", "cert_file", "key_file"):
        if getattr(cfg.mqtt, key):
            mqtt[key] = carry(getattr(cfg.mqtt, key))
    if cfg.update_public_key:
        raw["update_public_key"] = carry(cfg.update_public_key)
    return raw, copied


def make_bundle(package_dir: str | os.PathLike[str], agent_toml: str | os.PathLike[str], target: str,
                out_path: str | os.PathLike[str], *, wheel: bool = True, created: datetime | None = None,
                force: bool = False) -> BundleInfo:
    """Write bundle.tar.gz for one target: verified model package(s), the agent config pointing at the install
    location, requirements pinned for the target, the edge-slm wheel (unless wheel=False), the systemd unit,
    install.sh/uninstall.sh, SHA256SUMS over every file and bundle.json.

    Raises ConfigError for an unknown target or a bad config, ModelError for a bad package, BundleError for
    a microcontroller target (those take `edge-slm export-mcu`) or a package devices.fit says the target cannot
    run (ops its runtime cannot load, not enough RAM or storage) unless force=True, which only warns.
    """
    profile = _load_profile(target)
    if profile.runtime in MCU_RUNTIMES or not profile.python:
        raise BundleError(f"{target} is a microcontroller ({profile.arch}, {profile.runtime}): it runs no Python "
                          f"agent; make firmware with: edge-slm export-mcu PKG -o firmware/model")
    package = ModelPackage.open(package_dir)  # checks schema and sha256
    agent_toml = Path(agent_toml)
    cfg = load_agent_config(agent_toml)
    out_path = Path(out_path)
    created = (created or datetime.now(timezone.utc)).replace(microsecond=0)

    # every pipeline's package: the one given, plus any other the config names
    packages: dict[str, ModelPackage] = {str(package.path.resolve()): package}
    for p in cfg.pipelines:
        key = str(Path(p.model).resolve())
        if key not in packages:
            try:
                packages[key] = ModelPackage.open(p.model)
            except ModelError as exc:
                raise ModelError(f"{agent_toml}: pipeline {p.name!r}: {exc}") from exc
    used = {str(Path(p.model).resolve()) for p in cfg.pipelines}
    if str(package.path.resolve()) not in used:
        shas = {packages[k].sha256 for k in used}
        if package.sha256 not in shas:
            raise ConfigError(f"{agent_toml}: no pipeline uses {package.path} (model = ... names "
                              f"{', '.join(sorted(used))}); point a pipeline's model at the package")
    warnings: list[str] = []
    if tuple(int(x) for x in profile.python.split(".")[:2]) < (3, 10):
        warnings.append(f"{profile.name} ships Python {profile.python} but edge-slm needs 3.10 or newer: install a "
                        "newer python3 on the device and pass --python to install.sh (edge-slm deploy --python), "
                        "or use deploy/docker/Dockerfile.jetson")
    for pkg in packages.values():
        reasons, fit_warnings = _fit_check(pkg, profile)
        warnings.extend(fit_warnings)
        if reasons and not force:
            raise BundleError(f"{pkg.name} cannot run on {target}: " + "; ".join(reasons)
                              + " (edge-slm fit says so; --force bundles it anyway)")
        warnings.extend(f"--force: {r}" for r in reasons)
    for w in warnings:
        log.warning("%s", w)

    release = f"{package.name}-{package.version}-{created.strftime('%Y%m%dT%H%M%SZ')}"
    release = re.sub(r"[^A-Za-z0-9._+-]", "_", release)
    with tempfile.TemporaryDirectory(prefix="edge-slm-bundle-") as tmp:
        staging = Path(tmp) / release
        staging.mkdir()
        model_dirs: dict[str, str] = {}
        models_meta = []
        for key, pkg in packages.items():
            name = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{pkg.name}-{pkg.version}-{pkg.sha256[:8]}")
            model_dirs[key] = name
            dest = staging / "models" / name
            if dest.exists():  # the same model under two paths: one copy
                continue
            shutil.copytree(pkg.path, dest, ignore=shutil.ignore_patterns(".*", "__pycache__"))
            models_meta.append({"dir": f"models/{name}", **pkg.identity(), "task": pkg.task})
        raw, copied = _rewrite_config(agent_toml, staging, model_dirs)
        text = dump_toml(raw)
        (staging / "agent.toml").write_text(text, encoding="utf-8")
        from edge_slm.config import agent_config_from_dict

        agent_config_from_dict(tomllib.loads(text), "agent.toml in the bundle")  # what we wrote still loads
        reqs = requirements_for(profile, [p.source for p in cfg.pipelines])
        (staging / "requirements.txt").write_text(
            f"# edge-slm {__version__} on {profile.name} ({profile.arch}, Python {profile.python}, "
            f"{profile.runtime} {profile.runtime_version})\n" + "\n".join(reqs) + "\n", encoding="utf-8")
        wheel_name = None
        if wheel:
            wheel_name = build_wheel(staging / "wheels").name
        for name in ("install.sh", "uninstall.sh", "rollback.sh", "edge-slm.service"):
            shutil.copy2(TEMPLATES / name, staging / name)
            if name.endswith(".sh"):
                (staging / name).chmod(0o755)
        (staging / "RELEASE").write_text(release + "\n", encoding="utf-8")
        (staging / "VERSION").write_text(__version__ + "\n", encoding="utf-8")
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        manifest = {
            "schema_version": BUNDLE_SCHEMA,
            "release": release,
            "target": profile.name,
            "arch": profile.arch,
            "python": profile.python,
            "os": getattr(profile, "os", ""),
            "runtime": {"name": profile.runtime, "version": profile.runtime_version},
            "edge_slm": __version__,
            "created": created.isoformat().replace("+00:00", "Z"),
            "models": models_meta,
            "config_files": copied,
            "wheel": f"wheels/{wheel_name}" if wheel_name else None,
            "requirements": reqs,
            "warnings": warnings,
            "files": files,
        }
        (staging / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        sums = {name: _sha256(staging / name) for name in [*files, "bundle.json"]}
        (staging / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())), encoding="utf-8")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out_path.with_name(f".{out_path.name}.partial")
        with tarfile.open(tmp_out, "w:gz") as tar:
            for path in sorted(staging.rglob("*")):
                ti = tar.gettarinfo(str(path), arcname=f"{release}/{path.relative_to(staging)}")
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                ti.mtime = int(created.timestamp())
                if ti.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)
        os.replace(tmp_out, out_path)
    return BundleInfo(out_path, release, profile.name, manifest, sums, out_path.stat().st_size, tuple(warnings))


# --- CLI -----------------------------------------------------------------------------------------
BUNDLE_EPILOG = """examples:
  edge-slm bundle intents_pkg agent.toml --target pi-4b -o intents-pi4.tar.gz
  edge-slm bundle intents_pkg agent.toml --target jetson-jp5 -o jetson.tar.gz --no-wheel

The package is checked against the target first (edge-slm fit): a model whose ops the target's runtime
cannot load, or that needs more RAM or storage than it has, is refused (--force only warns).

The bundle holds: models/<name>/ (the verified package), agent.toml (model path rewritten to
/opt/edge-slm/current/models/<name>, state in /var/lib/edge-slm), requirements.txt pinned for the
target's runtime, wheels/edge_slm-*.whl, edge-slm.service, install.sh, uninstall.sh, bundle.json and
SHA256SUMS. Ship it with `edge-slm deploy`, or copy it and run: tar xzf B.tar.gz && sudo sh */install.sh
Microcontroller targets (esp32-s3, nrf52840) take `edge-slm export-mcu` instead.
"""


def cmd_bundle(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    info = make_bundle(args.package, args.config, args.target, args.output, wheel=not args.no_wheel,
                       force=args.force)
    for w in info.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {info.path} ({info.size_bytes / 1024:.0f} KiB, {len(info.files)} files) for {info.target}: "
          f"release {info.release} in {time.monotonic() - t0:.1f}s")
    print(f"deploy it with: edge-slm deploy {info.path} ssh://pi@HOST/")
    return 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("bundle", help="pack a model package + agent config into a deployable bundle.tar.gz",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BUNDLE_EPILOG,
                              description="Make a self-contained, checksummed deployment bundle for one target.")
    p.add_argument("package", help="model package directory (made by edge-slm convert)")
    p.add_argument("config", metavar="AGENT.toml", help="agent config whose pipelines use the package")
    p.add_argument("--target", required=True, help="device profile: pi-4b, pi-5, jetson-orin-nano, host, ...")
    p.add_argument("-o", "--output", default="bundle.tar.gz", help="where to write the bundle (default: %(default)s)")
    p.add_argument("--no-wheel", action="store_true",
                   help="do not build and include the edge-slm wheel (the device installs edge-slm from its index)")
    p.add_argument("--force", action="store_true",
                   help="bundle even when edge-slm fit says the target cannot run the model (warns instead)")
    p.set_defaults(func=cmd_bundle)


