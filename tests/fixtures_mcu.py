"""Fixtures for the mcu work (trained models, compiled programs); loaded from conftest.py via pytest_plugins."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

BRIDGE_C = Path(__file__).resolve().parents[1] / "firmware_bridge" / "c"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, why: str) -> str:
    """Path of a system tool; skip without it (fail under CI=true)."""
    path = shutil.which(name)
    if path is None:
        if _in_ci():
            pytest.fail(f"{name} is required in CI: {why}")
        pytest.skip(f"{name} is not installed: {why}")
    return path


def compile_c(out: Path, *sources: Path, extra: tuple[str, ...] = ()) -> Path:
    gcc = require_tool("gcc", "the firmware C code is compiled with it")
    cmd = [gcc, *CFLAGS, *extra, "-o", str(out), *map(str, sources), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return out


@pytest.fixture(scope="session")
def virtual_mcu_binary(tmp_path_factory) -> Path:  # noqa: ANN001
    """firmware_bridge/c/virtual_mcu.c built with the system gcc (C99, warnings are errors)."""
    out = tmp_path_factory.mktemp("virtual_mcu") / "virtual_mcu"
    return compile_c(
        out, BRIDGE_C / "virtual_mcu.c", BRIDGE_C / "edge_slm_device.c", BRIDGE_C / "edge_slm_frame.c"
    )


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:  # noqa: ANN001
    """A few seconds of real espeak-ng speech, 16-bit mono WAV at espeak's 22050 Hz."""
    espeak = require_tool("espeak-ng", "the audio path is tested with real synthesized speech")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "turn on the kitchen light. the motor sounds rough today."
    subprocess.run([espeak, "-v", "en-us", "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


def read_wav_int16(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy(), w.getframerate()


class VirtualMcu:
    """One run of the virtual MCU on a pty it creates and symlinks at `link` (like /dev/ttyACM0)."""

    def __init__(self, binary: Path, link: Path, *args: str) -> None:
        self.binary = binary
        self.link = link
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.boot_id = 0

    def start(self, timeout: float = 10.0) -> VirtualMcu:
        self.proc = subprocess.Popen(
            [str(self.binary), "--pty", str(self.link), *self.args],
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        ready = self.wait_line("ready", timeout)
        self.boot_id = int(ready.split("boot_id=")[1])
        return self

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, marker: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"virtual MCU printed no {marker!r} line within {timeout} s") from None
            if marker in line:
                return line

    def report(self, timeout: float = 60.0) -> dict:
        """The report line: sent, dropped, corrupted, lost, last_seq and the set of lost seqs."""
        line = self.wait_line("report", timeout)
        fields = dict(kv.split("=", 1) for kv in line.split("report ", 1)[1].split())
        out: dict = {k: int(v) for k, v in fields.items() if k != "lost_seqs"}
        out["lost_seqs"] = {int(x) for x in fields["lost_seqs"].split(",") if x}
        return out

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """Unplug without warning: SIGKILL, the pty vanishes, and so does its device node (as udev
        removes /dev/ttyACM0), so a reopen cannot land on some other program's recycled pty."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.link.unlink(missing_ok=True)

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode if self.proc is not None else 0


@pytest.fixture
def virtual_mcu(virtual_mcu_binary, tmp_path):  # noqa: ANN001, ANN201
    """Factory: virtual_mcu(*args) starts one on tmp_path/ttyVMCU; all are stopped at teardown."""
    started: list[VirtualMcu] = []

    def start(*args: str, link: Path | None = None) -> VirtualMcu:
        mcu = VirtualMcu(virtual_mcu_binary, link or tmp_path / "ttyVMCU", *args).start()
        started.append(mcu)
        return mcu

    yield start
    for mcu in started:
        mcu.stop()
