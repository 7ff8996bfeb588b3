"""Audio sources for a pipeline: wav://PATH (a file or a folder of them) and microphone://[DEVICE].

numpy and the standard library; sounddevice only when a microphone is asked for (optional extra
`edge-slm[audio]`). Never imports TensorFlow, converters or devices.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.errors import ConfigError, EdgeSlmError, InputError
from edge_slm.sources import Deliver, RawInput, parse_options
from edge_slm.streams import AudioBlock, StreamEnd

log = logging.getLogger(__name__)


class WavSource:
    """Reads WAV files in blocks and hands them to the pipeline; ends after the last file.

    Each file is its own stream (a task's state resets between files) and ends with a StreamEnd so
    a detection in the file's tail is not lost. A file that is not audio becomes an error record.
    """

    finite = True
    OPTIONS = {"block_ms": float, "realtime": bool}

    def __init__(self, spec: str, sample_rate: int | None = None) -> None:
        path, opts = parse_options(spec, self.OPTIONS)
        self.path = Path(path).expanduser()
        self.block_ms = opts.get("block_ms", 100.0)
        self.realtime = opts.get("realtime", False)
        self.sample_rate = sample_rate
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in (".wav", ".wave") and p.is_file())
            if not self.files:
                raise ConfigError(f"source {spec!r}: no .wav files in {self.path}")
        elif self.path.is_file():
            self.files = [self.path]
            with open(self.path, "rb") as f:
                head = f.read(12)
            if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise ConfigError(f"source {spec!r}: {self.path.name} is not a WAV file; convert it first, "
                                  f"e.g. sox {self.path.name} -r 16000 -c 1 {self.path.stem}.wav")
        else:
            raise ConfigError(f"source {spec!r}: {self.path} does not exist")

    def start(self, deliver: Deliver, on_end: Callable[[], None]) -> None:
        self.thread = threading.Thread(target=self._pump, args=(deliver, on_end), name="source-wav", daemon=True)
        self.thread.start()

    def _pump(self, deliver: Deliver, on_end: Callable[[], None]) -> None:
        from edge_slm.wav import read_wav

        try:
            for path in self.files:
                if self._stop.is_set():
                    return
                name = path.name
                try:
                    audio = read_wav(path, target_rate=self.sample_rate)
                except InputError as exc:
                    deliver(RawInput(b"", f"wav:{name}", input_id=name, data=exc))
                    continue
                step = max(1, int(round(audio.sample_rate * self.block_ms / 1000.0)))
                started = time.monotonic()
                for i in range(0, len(audio.samples), step):
                    if self._stop.is_set():
                        return
                    t0 = i / audio.sample_rate
                    if self.realtime:
                        delay = started + t0 - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    block = AudioBlock(audio.samples[i:i + step], audio.sample_rate, t0=t0, stream=name)
                    deliver(RawInput(b"", f"wav:{name}", input_id=f"{name}@{t0:.3f}", data=block))
                deliver(RawInput(b"", f"wav:{name}", input_id=f"{name}@end", data=StreamEnd(name)))
        finally:
            on_end()

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> str:
        return f"wav://{self.path}"


class MicrophoneSource:
    """Captures mono audio with sounddevice (PortAudio) and hands it over in blocks.

    The audio callback never waits: blocks go through a bounded queue, and blocks the pipeline
    cannot take in time are counted as dropped rather than stalling the capture.
    """

    finite = False
    OPTIONS = {"rate": int, "block_ms": float, "channels": int, "queue": int}

    def __init__(self, spec: str, sample_rate: int | None = None) -> None:
        device, opts = parse_options(spec, self.OPTIONS)
        self.device: int | str | None = (int(device) if device.isdigit() else device) or None
        self.rate = opts.get("rate", sample_rate or 16000)
        self.block_ms = opts.get("block_ms", 100.0)
        self.channels = opts.get("channels", 1)
        self._queue: queue.Queue = queue.Queue(maxsize=opts.get("queue", 50))
        self.dropped_blocks = 0
        self._samples = 0
        self._stop = threading.Event()
        self._stream: Any = None
        self.thread: threading.Thread | None = None
        self.stream_id = f"mic:{device or 'default'}"
        try:
            import sounddevice  # noqa: F401 - checked at config time so the error comes before serving
        except (ImportError, OSError) as exc:  # OSError: the PortAudio library itself is missing
            raise ConfigError(
                "source microphone:// needs the sounddevice package and PortAudio: "
                "pip install 'edge-slm[audio]' and, on Debian or Raspberry Pi OS, sudo apt-get install libportaudio2 "
                f"({exc})") from exc

    def on_audio(self, indata: np.ndarray, frames: int, status: Any = None) -> None:
        """The PortAudio callback: [frames, channels] float32 -> one mono block on the queue."""
        if status:
            log.warning("microphone: %s", status)
        mono = indata.mean(axis=1) if indata.ndim == 2 else indata.reshape(-1)
        block = AudioBlock(mono.copy(), self.rate, t0=self._samples / self.rate, stream=self.stream_id)
        self._samples += frames
        try:
            self._queue.put_nowait(block)
        except queue.Full:
            self.dropped_blocks += 1

    def start(self, deliver: Deliver, on_end: Callable[[], None]) -> None:
        import sounddevice as sd

        def callback(indata, frames, time_info, status) -> None:  # noqa: ANN001
            self.on_audio(indata, frames, status)

        try:
            self._stream = sd.InputStream(samplerate=self.rate, channels=self.channels, dtype="float32",
                                          blocksize=int(self.rate * self.block_ms / 1000), device=self.device,
                                          callback=callback)
            self._stream.start()
        except Exception as exc:  # PortAudioError, ValueError for a bad device
            raise EdgeSlmError(f"microphone {self.device or 'default'}: cannot open it at {self.rate} Hz: {exc}; "
                               "list devices with: python -m sounddevice") from exc
        self.thread = threading.Thread(target=self._pump, args=(deliver,), name="source-mic", daemon=True)
        self.thread.start()

    def _pump(self, deliver: Deliver) -> None:
        while not self._stop.is_set():
            try:
                block = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            deliver(RawInput(b"", self.stream_id, input_id=f"mic@{block.t0:.3f}", data=block))

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()

    def describe(self) -> str:
        return f"microphone://{self.device or ''} at {self.rate} Hz"
