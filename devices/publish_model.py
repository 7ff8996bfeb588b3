"""`edge-slm keygen`, `sign` and `publish-model`: make signed model updates and push them to a device.

Host side; needs edge_slm, cryptography and paho-mqtt, never TensorFlow.

Wire format of publish-model (the device side is edge_slm.updates.UpdateReceiver):
1. The package directory is packed as a deterministic .tar.gz (edge_slm.signing.pack_package) and
   sent to `<prefix>/<device>/cmd/model/update/blob` as binary QoS 1 messages, not retained, in chunks
   of at most 256 KiB. Each message is `b"ESU1" | u8 len(id) | id (UTF-8) | u32 index | u32 count |
   data` (big-endian), where id is the command's correlation id; a small package is one chunk.
2. Once the broker has acknowledged every chunk, the signed update goes to
   `<prefix>/<device>/cmd/model/update` (QoS 1, JSON):
   {"id": ID, "update": {"manifest": {...}, "signature": BASE64}, "chunks": COUNT}.
3. The device answers on `<prefix>/<device>/cmd/model/update/reply` (JSON):
   {"schema_version": 1, "id": ID, "ok": BOOL, "code": "applied" | ERROR_CODE, "message": TEXT,
   "version": VERSION_NOW_INSTALLED}. publish-model waits for the reply with its id, up to --timeout.
Chunks before command relies on the broker delivering one publisher's messages to a subscriber in the
order it acknowledged them (mosquitto does); if chunks are missing the device replies "truncated".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from edge_slm.errors import BrokerError, ConfigError, EdgeSlmError, UpdateError
from edge_slm.package import MANIFEST_FILE, ModelPackage
from edge_slm.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    generate_keypair,
    load_private_key,
    pack_package,
    sign_manifest,
)
from edge_slm.updates import UpdateManifest, parse_version, split_chunks

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '30m', '12h', '7d', '2w' -> timedelta."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ConfigError(f"--expires {text!r} must look like 30m, 12h, 7d or 2w")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def build_update(package: str | os.PathLike[str], private_key: Any, *, device: str = "*",
                 version: str | None = None, expires: str = "7d", golden_input: str | None = None,
                 golden_label: str | None = None, root: str | None = None) -> tuple[dict[str, Any], bytes]:
    """(signed wrapper, archive bytes) for a package; version overrides the one in its manifest.json,
    root puts the files under one directory in the archive (see signing.pack_package)."""
    pkg = ModelPackage.open(package)
    overrides: dict[str, bytes] = {}
    if version is not None and version != pkg.version:
        manifest = json.loads((pkg.path / MANIFEST_FILE).read_text(encoding="utf-8"))
        manifest["version"] = version
        overrides[MANIFEST_FILE] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    version = version or pkg.version
    try:
        parse_version(version)
    except UpdateError as exc:
        raise ConfigError(f"{pkg.path}: version {version!r} must be numbers like 1.2.0 so the device can tell "
                          "newer from older; pass --version") from exc
    archive = pack_package(pkg.path, overrides, root)
    m = UpdateManifest.create(pkg.name, version, archive, device=device, expires_in=parse_duration(expires),
                              golden_input=golden_input, golden_label=golden_label)
    return sign_manifest(m.to_dict(), private_key), archive


# --- keygen ------------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    if not args.force and (private_path.exists() or public_path.exists()):
        raise EdgeSlmError(f"{private_path} already exists; devices trust its public key, so it is kept. "
                           "Pass --force to replace it (devices then need the new update_key.pub)")
    private_pem, public_pem = generate_keypair()
    private_path.unlink(missing_ok=True)
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    print(f"wrote {private_path} (secret, mode 0600: keep it on the build host)")
    print(f"wrote {public_path} (copy it to each device; the agent accepts only updates it verifies)")
    return 0


# --- sign --------------------------------------------------------------------------------------------
def cmd_sign(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    out = Path(args.output)
    stem = out.name.removesuffix(".json")
    archive_path = out.with_name(stem + ".tar.gz")
    # Files under STEM/ inside STEM.tar.gz: `edge-slm run`/ModelPackage.open can use the archive as is.
    wrapper, archive = build_update(args.package, key, device=args.device, version=args.version,
                                    expires=args.expires, golden_input=args.golden, golden_label=args.golden_label,
                                    root=stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    archive_path.write_bytes(archive)
    out.write_text(json.dumps(wrapper, indent=2) + "\n", encoding="utf-8")
    m = wrapper["manifest"]
    if args.json:
        print(json.dumps({"update": str(out), "archive": str(archive_path), "manifest": m}, indent=2))
        return 0
    from edge_slm.table import format_table

    print(format_table(["", "signed update"], [
        ["model", f"{m['name']} {m['version']}"], ["device", m["device"]], ["expires", m["expires"]],
        ["archive", f"{archive_path} ({m['size']} bytes, sha256 {m['sha256'][:16]}…)"], ["update", str(out)]]))
    return 0


# --- publish-model -----------------------------------------------------------------------------------
def publish_update(broker: str, device: str, wrapper: dict[str, Any], archive: bytes, *, prefix: str = "edge-slm",
                   timeout: float = 120.0, username: str = "", password: str = "",
                   progress: bool = False) -> dict[str, Any]:
    """Send the archive chunks, then the signed command; return the device's reply (EdgeSlmError on timeout)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_slm.mqtt import Topics, parse_broker_url

    if not device or any(c in device for c in "/+#"):
        raise ConfigError(f"device id {device!r} must be non-empty and contain no / + #")
    base = f"{Topics(prefix, device).root}/cmd/model/update"
    cid = uuid.uuid4().hex[:16]
    chunks = split_chunks(cid, archive)
    addr = parse_broker_url(broker)
    subscribed, got = threading.Event(), threading.Event()
    reply: dict[str, Any] = {}

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-slm-publish-{cid}", protocol=paho.MQTTv311)
    client.max_queued_messages_set(0)
    if username:
        client.username_pw_set(username, password or None)
    if addr.tls:
        client.tls_set()

    def on_connect(c, u, f, rc, p) -> None:  # noqa: ANN001
        if not rc.is_failure:
            c.subscribe(f"{base}/reply", qos=1)

    def on_message(c, u, msg) -> None:  # noqa: ANN001
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("id") == cid:
            reply.update(data)
            got.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(addr.host, addr.port)
    except OSError as exc:
        raise BrokerError(f"cannot reach broker {addr.url}: {exc.strerror or exc}; pass --broker mqtt://HOST:PORT") from exc
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise BrokerError(f"broker {addr.url} did not accept the connection/subscription within 10 s; "
                              "check --broker, --username and --password")
        deadline = time.monotonic() + timeout
        # Every chunk must be acknowledged before the command goes out, so the broker has them first.
        for i, chunk in enumerate(chunks, 1):
            info = client.publish(f"{base}/blob", chunk, qos=1)
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise BrokerError(f"broker {addr.url} did not acknowledge chunk {i} of {len(chunks)} in time")
            if progress:
                print(f"\rsent {i}/{len(chunks)} chunks", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        command = json.dumps({"id": cid, "update": wrapper, "chunks": len(chunks)}).encode("utf-8")
        client.publish(base, command, qos=1).wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not got.wait(max(0.1, deadline - time.monotonic())):
            raise EdgeSlmError(f"no reply from device {device!r} on {base}/reply within {timeout:g} s; is its agent "
                               "running with model updates enabled? (raise --timeout for big models)")
        return reply
    finally:
        client.disconnect()
        client.loop_stop()


def cmd_publish_model(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    wrapper, archive = build_update(args.package, key, device=args.device, version=args.version,
                                    expires=args.expires, golden_input=args.golden, golden_label=args.golden_label)
    m = wrapper["manifest"]
    reply = publish_update(args.broker, args.device, wrapper, archive, prefix=args.prefix, timeout=args.timeout,
                           username=args.username or "", password=args.password or "",
                           progress=not args.json and len(archive) > 256 * 1024)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply.get("ok"):
        print(f"{args.device}: {m['name']} {m['version']} applied and on trial ({reply.get('message', '')})")
    else:
        print(f"edge-slm publish-model: {args.device} refused {m['name']} {m['version']}: "
              f"{reply.get('code')}: {reply.get('message')}", file=sys.stderr)
    return 0 if reply.get("ok") else 1
