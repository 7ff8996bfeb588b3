"""The device path never imports TensorFlow, converters or devices."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import run_cli

CHECK = """
import sys
import edge_slm, edge_slm.agent, edge_slm.cli, edge_slm.runtime, edge_slm.tasks
import edge_slm.kws, edge_slm.sensor_tasks, edge_slm.audio, edge_slm.wav, edge_slm.vad, edge_slm.media_sources
import edge_slm.serial_source, edge_slm.sensors, edge_slm.doctor
edge_slm.cli.build_parser("run")
heavy = [m for m in ("tensorflow", "keras", "converters", "devices", "torch") if m in sys.modules]
print(",".join(heavy))
"""


def test_importing_the_agent_never_imports_tensorflow():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"device path imported: {out.stdout.strip()}"


def test_device_commands_show_help_without_tensorflow():
    for cmd in ("run", "validate", "bench", "doctor"):
        res = run_cli(cmd, "--help")
        assert res.returncode == 0
        assert b"usage: edge-slm " + cmd.encode() in res.stdout


def test_no_command_prints_usage_and_exits_2():
    res = run_cli()
    assert res.returncode == 2
    assert b"demo" in res.stdout and b"convert" in res.stdout


def test_host_commands_are_listed_and_their_help_loads_their_module():
    res = run_cli("--help")
    for cmd in (b"train-kws", b"train-sensor", b"export-mcu", b"fit", b"simulate", b"bundle", b"deploy", b"doctor", b"distill", b"prune"):
        assert cmd in res.stdout
    res = run_cli("export-mcu", "--help")
    assert res.returncode == 0 and b"MicroMutableOpResolver" in res.stdout
