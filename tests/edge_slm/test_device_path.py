"""The device path never imports TensorFlow, converters or devices."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import run_cli

CHECK = """
import sys
import edge_slm, edge_slm.agent, edge_slm.cli, edge_slm.runtime, edge_slm.tasks
edge_slm.cli.build_parser()
heavy = [m for m in ("tensorflow", "keras", "converters", "devices", "torch") if m in sys.modules]
print(",".join(heavy))
"""


def test_importing_the_agent_never_imports_tensorflow():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"device path imported: {out.stdout.strip()}"


def test_device_commands_show_help_without_tensorflow():
    for cmd in ("run", "validate", "bench"):
        res = run_cli(cmd, "--help")
        assert res.returncode == 0
        assert b"usage: edge-slm " + cmd.encode() in res.stdout


def test_no_command_prints_usage_and_exits_2():
    res = run_cli()
    assert res.returncode == 2
    assert b"demo" in res.stdout and b"convert" in res.stdout
