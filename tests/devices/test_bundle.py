"""Deployment bundles: contents, checksums, the rewritten config, per-target requirements and refusals."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.bundle import BundleError, add_cli, dump_toml, make_bundle, requirements_for
from devices.profiles import load_profile
from edge_slm.config import agent_config_from_dict, load_agent_config
from edge_slm.errors import ConfigError, ModelError
from tests.conftest import write_agent_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def agent_toml(text_model, tmp_path_factory) -> Path:  # noqa: ANN001
    d = tmp_path_factory.mktemp("bundle_cfg")
    return write_agent_toml(d / "agent.toml", "bundle-dev", "mqtt://broker.local:1883", text_model.package,
                            d / "state")


@pytest.fixture(scope="module")
def host_bundle(text_model, agent_toml, tmp_path_factory):  # noqa: ANN001, ANN201
    out = tmp_path_factory.mktemp("bundle") / "bundle.tar.gz"
    return make_bundle(text_model.package, agent_toml, "host", out)


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_bundle_holds_the_verified_package_and_every_file_is_checksummed(host_bundle, text_model):  # noqa: ANN001
    files = read_members(host_bundle.path)
    top = host_bundle.release
    assert all(name.startswith(top + "/") for name in files)
    rel = {name[len(top) + 1:]: data for name, data in files.items()}
    for needed in ("agent.toml", "requirements.txt", "edge-slm.service", "install.sh", "uninstall.sh",
                   "bundle.json", "SHA256SUMS", "RELEASE"):
        assert needed in rel, needed
    model_dir = host_bundle.models[0]["dir"]
    assert rel[f"{model_dir}/model.tflite"] == (text_model.package / "model.tflite").read_bytes()
    sums = dict(reversed(line.split("  ", 1)) for line in rel["SHA256SUMS"].decode().splitlines())
    assert set(sums) == set(rel) - {"SHA256SUMS"}, "SHA256SUMS covers every other file"
    for name, digest in sums.items():
        assert hashlib.sha256(rel[name]).hexdigest() == digest, name
    manifest = json.loads(rel["bundle.json"])
    assert manifest["target"] == "host" and manifest["runtime"] == {"name": "ai-edge-litert", "version": "2.3.0"}
    assert manifest["models"][0]["sha256"] == json.loads((text_model.package / "manifest.json").read_text())["sha256"]
    assert set(manifest["files"]) == set(rel) - {"SHA256SUMS", "bundle.json"}


def test_bundled_config_points_at_the_install_location_and_still_loads(host_bundle, agent_toml):  # noqa: ANN001
    rel = {n.split("/", 1)[1]: d for n, d in read_members(host_bundle.path).items()}
    raw = tomllib.loads(rel["agent.toml"].decode())
    model_dir = host_bundle.models[0]["dir"]
    assert raw["pipelines"][0]["model"] == f"/opt/edge-slm/current/{model_dir}"
    assert raw["state_dir"] == "/var/lib/edge-slm"
    cfg = agent_config_from_dict(raw)
    original = load_agent_config(agent_toml)
    assert cfg.device_id == original.device_id == "bundle-dev"
    assert cfg.mqtt.broker == original.mqtt.broker and cfg.mqtt.connect_timeout_s == 3.0
    assert cfg.pipelines[0].sinks == original.pipelines[0].sinks


def test_bundle_carries_a_wheel_of_this_checkout_with_the_device_package(host_bundle):  # noqa: ANN001
    rel = {n.split("/", 1)[1]: d for n, d in read_members(host_bundle.path).items()}
    wheels = [n for n in rel if n.startswith("wheels/") and n.endswith(".whl")]
    assert len(wheels) == 1 and host_bundle.manifest["wheel"] == wheels[0]
    import io

    names = zipfile.ZipFile(io.BytesIO(rel[wheels[0]])).namelist()
    assert "edge_slm/cli.py" in names and "edge_slm/agent.py" in names


def test_unit_runs_the_agent_with_hardening(host_bundle):  # noqa: ANN001
    unit = read_members(host_bundle.path)[f"{host_bundle.release}/edge-slm.service"].decode()
    assert "ExecStart=@APP@/current/bin/edge-slm run @ETC@/agent.toml" in unit
    for line in ("Restart=on-failure", "User=@USER@", "StateDirectory=edge-slm", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadWritePaths=@STATE@ @ETC@"):
        assert line in unit.splitlines(), line


def test_requirements_are_pinned_per_target(host_bundle):  # noqa: ANN001
    reqs = read_members(host_bundle.path)[f"{host_bundle.release}/requirements.txt"].decode().splitlines()
    assert "ai-edge-litert==2.3.0" in reqs
    assert any(r.startswith("paho-mqtt") for r in reqs) and any(r.startswith("tokenizers") for r in reqs)
    assert not any(r.startswith(("pyserial", "sounddevice", "tensorflow")) for r in reqs)

    pi3 = requirements_for(load_profile("pi-3b"))
    assert "tflite-runtime==2.14.0" in pi3 and "numpy>=1.23,<2" in pi3
    assert not any(r.startswith("ai-edge-litert") for r in pi3)
    jp5 = requirements_for(load_profile("jetson-jp5"), ["serial:///dev/ttyUSB0?baud=115200"])
    assert "tflite-runtime==2.13.0" in jp5 and any(r.startswith("pyserial") for r in jp5)
    orin = requirements_for(load_profile("jetson-orin-nano"), ["microphone://default"])
    assert "ai-edge-litert==2.3.0" in orin and any(r.startswith("sounddevice") for r in orin)


def test_a_model_the_targets_runtime_cannot_load_is_refused_unless_forced(text_model, agent_toml, tmp_path):  # noqa: ANN001
    # the session's text model is dynamic-range: FULLY_CONNECTED v12, which tflite-runtime 2.14 cannot load
    with pytest.raises(BundleError, match=r"cannot run on pi-3b.*FULLY_CONNECTED.*--force"):
        make_bundle(text_model.package, agent_toml, "pi-3b", tmp_path / "pi3.tar.gz", wheel=False)
    assert not (tmp_path / "pi3.tar.gz").exists()
    info = make_bundle(text_model.package, agent_toml, "pi-3b", tmp_path / "pi3.tar.gz", wheel=False, force=True)
    assert any("FULLY_CONNECTED" in w for w in info.warnings) and info.manifest["warnings"] == list(info.warnings)


def test_bundle_without_wheel_for_a_32bit_pi(text_model, agent_toml, tmp_path):  # noqa: ANN001
    info = make_bundle(text_model.package, agent_toml, "pi-3b", tmp_path / "pi3.tar.gz", wheel=False, force=True)
    rel = {n.split("/", 1)[1]: d for n, d in read_members(info.path).items()}
    assert not any(n.startswith("wheels/") for n in rel) and info.manifest["wheel"] is None
    assert "tflite-runtime==2.14.0" in rel["requirements.txt"].decode().splitlines()
    assert info.manifest["arch"] == "armv7l"


def test_jetpack5_python_is_too_old_and_the_bundle_says_so(text_model, agent_toml, tmp_path):  # noqa: ANN001
    info = make_bundle(text_model.package, agent_toml, "jetson-jp5", tmp_path / "jp5.tar.gz", wheel=False, force=True)
    assert any("3.10" in w and "--python" in w for w in info.warnings)


def test_microcontroller_targets_are_refused_with_the_command_to_use(text_model, agent_toml, tmp_path):  # noqa: ANN001
    for mcu in ("esp32-s3", "nrf52840"):
        with pytest.raises(BundleError, match="export-mcu"):
            make_bundle(text_model.package, agent_toml, mcu, tmp_path / "mcu.tar.gz", wheel=False)
    assert not (tmp_path / "mcu.tar.gz").exists()


def test_unknown_target_lists_the_known_ones(text_model, agent_toml, tmp_path):  # noqa: ANN001
    with pytest.raises(ConfigError, match="pi-4b") as exc:
        make_bundle(text_model.package, agent_toml, "pi-6", tmp_path / "b.tar.gz", wheel=False)
    assert "pi-6" in str(exc.value)


def test_corrupt_package_is_refused(package_copy, agent_toml, tmp_path):  # noqa: ANN001
    model = package_copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        make_bundle(package_copy, agent_toml, "host", tmp_path / "b.tar.gz", wheel=False)
    assert not (tmp_path / "b.tar.gz").exists()


def test_config_whose_pipelines_do_not_use_the_package_is_refused(text_model, package_copy, tmp_path):  # noqa: ANN001
    other = tmp_path / "other.toml"
    write_agent_toml(other, "d", "mqtt://h:1883", text_model.package, tmp_path / "s")
    # package_copy has the same model bytes, so it is accepted as the same model
    info = make_bundle(package_copy, other, "host", tmp_path / "same.tar.gz", wheel=False)
    assert len(info.models) == 1
    bad = tmp_path / "bad.toml"
    write_agent_toml(bad, "d", "mqtt://h:1883", tmp_path / "missing-pkg", tmp_path / "s")
    with pytest.raises(ModelError, match="missing-pkg"):
        make_bundle(text_model.package, bad, "host", tmp_path / "bad.tar.gz", wheel=False)


def test_credentials_named_in_the_config_travel_in_the_bundle(text_model, tmp_path):  # noqa: ANN001
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot checked at bundle time\n-----END CERTIFICATE-----\n")
    cfg = write_agent_toml(tmp_path / "agent.toml", "tls-dev", "mqtts://broker:8883", text_model.package,
                           tmp_path / "state")
    cfg.write_text(cfg.read_text().replace('connect_timeout_s = 3.0', 'connect_timeout_s = 3.0\nca_file = "ca.pem"'))
    info = make_bundle(text_model.package, cfg, "pi-5", tmp_path / "tls.tar.gz", wheel=False)
    rel = {n.split("/", 1)[1]: d for n, d in read_members(info.path).items()}
    assert rel["config/ca.pem"] == ca.read_bytes()
    assert tomllib.loads(rel["agent.toml"].decode())["mqtt"]["ca_file"] == "/etc/edge-slm/files/ca.pem"


def test_bundle_cli_help_teaches_and_command_writes_a_bundle(text_model, agent_toml, tmp_path, capsys):  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="edge-slm")
    add_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["bundle", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--target" in help_text and "export-mcu" in help_text
    args = parser.parse_args(["bundle", str(text_model.package), str(agent_toml), "--target", "pi-4b",
                              "-o", str(tmp_path / "cli.tar.gz"), "--no-wheel"])
    assert args.func(args) == 0
    assert "pi-4b" in capsys.readouterr().out and (tmp_path / "cli.tar.gz").is_file()


_keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                max_size=8)
_scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), _keys,
                     st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=60, deadline=None)
@given(top=st.dictionaries(_keys, _scalars, max_size=4),
       table=st.dictionaries(_keys, _scalars, max_size=4),
       items=st.lists(st.dictionaries(_keys, st.one_of(_scalars, st.dictionaries(_keys, _scalars, max_size=2)),
                                      max_size=3), min_size=1, max_size=3))
def test_dump_toml_round_trips(top, table, items):  # noqa: ANN001
    data = {**{f"t_{k}": v for k, v in top.items()}, "mqtt": table, "pipelines": items}
    assert tomllib.loads(dump_toml(data)) == data


# --- Dockerfiles: parsed and checked against a real bundle (docker itself is not needed) -------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


@pytest.mark.parametrize("name,base", [("Dockerfile.arm64", "python:3.11-slim-bookworm"),
                                       ("Dockerfile.jetson", "nvcr.io/nvidia/l4t-jetpack:r36")])
def test_dockerfiles_install_a_bundle_and_run_the_agent(host_bundle, tmp_path, name, base):  # noqa: ANN001
    path = Path(__file__).resolve().parents[2] / "deploy" / "docker" / name
    ins = dockerfile_instructions(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) == 1
    image = froms[0].replace("${BASE_IMAGE}", args.get("BASE_IMAGE", "")).replace("${L4T_IMAGE}", args.get("L4T_IMAGE", ""))
    assert image.startswith(base), image
    cmd = json.loads([a for k, a in ins if k == "CMD"][-1])
    assert cmd == ["/opt/edge-slm/current/bin/edge-slm", "run", "/etc/edge-slm/agent.toml"]
    assert [a for k, a in ins if k == "USER"] == ["edge-slm"]

    with tarfile.open(host_bundle.path, "r:gz") as t:
        t.extractall(tmp_path, filter="data")
    ctx = tmp_path / host_bundle.release
    for k, a in ins:
        if k == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                assert (ctx / src).exists(), f"{name}: COPY {src} is not in a bundle"
    install_usage = (ctx / "install.sh").read_text()
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert "sh /tmp/bundle/install.sh" in runs
    for opt in ("--python", "--no-venv"):
        assert opt in runs and f"{opt})" in install_usage, f"install.sh does not take {opt}"
    # the command the image runs is the one install.sh puts in place (exercised for real in test_deploy)
    assert "current/bin/edge-slm" in install_usage
