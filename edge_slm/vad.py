"""Voice activity detection: which frames of a stream hold speech (energy vs an adaptive noise floor).

numpy and the standard library only (webrtcvad optionally, when installed); never imports TensorFlow,
converters or devices.

EnergyVAD: each frame's energy in the speech band (150-6000 Hz, so rumble, hum and DC do not count) in
dBFS is compared with the noise floor, the minimum of the frame energies over the last floor_window_s
(minimum statistics: speech has pauses, noise does not, so the minimum follows the noise and not the
speech). A frame is loud when it is threshold_db above the floor and above min_energy_db (so dither in
digital silence is never speech). Speech starts after min_speech_ms of loud frames and lasts until
hangover_ms after the last loud frame. Known limits: when the room gets louder in a step, the new noise
counts as speech until it has filled the floor window (floor_window_s); speech that starts the stream
is found only from its louder syllables on, since there is no floor yet; babble and music are "speech".
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import Any, Protocol

import numpy as np

from edge_slm.audio import to_float
from edge_slm.errors import ConfigError

__all__ = ["EnergyVAD", "VoiceDetector", "WebRtcVAD", "make_vad"]

Segment = tuple[float, float]


class VoiceDetector(Protocol):
    sample_rate: int
    loud: bool  # the last frame given to is_speech() was loud on its own (before onset and hangover)

    def frame_length(self) -> int: ...

    def is_speech(self, frame: np.ndarray) -> bool: ...

    def reset(self) -> None: ...

    def segments(self, samples: np.ndarray) -> list[Segment]: ...


def frame_energy_db(frame: np.ndarray, sample_rate: int = 16000,
                    band_hz: tuple[float, float] = (150.0, 6000.0)) -> float:
    """Power of the frame between band_hz (Hann window, rfft), in dB relative to full scale.

    The band leaves out rumble, hum and DC (which carry no speech but swing a lot from frame to frame)
    and keeps the fricatives; a full-scale sine inside the band reads about -3 dB.
    """
    x = to_float(np.asarray(frame).reshape(-1))
    n = x.size
    if n < 2:
        return -120.0
    spec = np.fft.rfft(x * _hann(n))
    power = spec.real ** 2 + spec.imag ** 2
    freqs = np.arange(power.size) * (sample_rate / n)
    band = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    # Parseval with the window's power: a sine of amplitude A gives A^2 / 2 whatever n is
    total = 2.0 * float(power[band].sum()) / (n * float(np.dot(_hann(n), _hann(n))))
    return 10.0 * math.log10(max(total, 1e-12))


_HANN: dict[int, np.ndarray] = {}


def _hann(n: int) -> np.ndarray:
    w = _HANN.get(n)
    if w is None:
        w = _HANN.setdefault(n, (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32))
    return w


def _segments(vad: VoiceDetector, samples: np.ndarray) -> list[Segment]:
    """Run vad over whole frames of samples; segments go from the first loud frame of an onset to the end
    of the last loud frame before the hangover ran out."""
    x = to_float(np.asarray(samples).reshape(-1))
    n = vad.frame_length()
    rate = float(vad.sample_rate)
    vad.reset()
    out: list[Segment] = []
    start: int | None = None
    last_loud = -1
    run_start = 0
    count = x.size // n
    for i in range(count):
        active = vad.is_speech(x[i * n:(i + 1) * n])
        loud = vad.loud
        if loud and (i == 0 or last_loud != i - 1):
            run_start = i
        if loud:
            last_loud = i
        if active and start is None:
            start = run_start
        elif not active and start is not None:
            out.append((start * n / rate, (last_loud + 1) * n / rate))
            start = None
    if start is not None:
        out.append((start * n / rate, (last_loud + 1) * n / rate))
    vad.reset()
    return out


def _onset_hangover(vad: EnergyVAD | WebRtcVAD) -> bool:
    """Speech starts after onset_frames loud frames in a row and ends hangover_frames after the last one."""
    vad._run = vad._run + 1 if vad.loud else 0
    if vad.loud:
        if vad.active or vad._run >= vad.onset_frames:
            vad.active = True
            vad._hang = vad.hangover_frames
    elif vad.active:
        if vad._hang > 0:
            vad._hang -= 1
        else:
            vad.active = False
    return vad.active


class EnergyVAD:
    """Streaming energy VAD: feed is_speech() consecutive frames of frame_ms; segments() for a whole clip."""

    def __init__(self, sample_rate: int = 16000, frame_ms: float = 20.0, threshold_db: float = 10.0,
                 hangover_ms: float = 300.0, min_speech_ms: float = 60.0, min_energy_db: float = -60.0,
                 floor_window_s: float = 3.0, band_hz: tuple[float, float] = (150.0, 6000.0)) -> None:
        if int(sample_rate) <= 0 or not frame_ms > 0:
            raise ConfigError(f"vad: sample_rate and frame_ms must be positive, got {sample_rate}, {frame_ms}")
        if not threshold_db > 0 or hangover_ms < 0 or min_speech_ms < 0 or not floor_window_s > 0:
            raise ConfigError("vad: threshold_db and floor_window_s must be positive, hangover_ms and "
                              "min_speech_ms >= 0")
        self.sample_rate = int(sample_rate)
        self.frame_ms = float(frame_ms)
        self.threshold_db = float(threshold_db)
        self.min_energy_db = float(min_energy_db)
        self.hangover_frames = int(round(hangover_ms / frame_ms))
        self.onset_frames = max(1, int(round(min_speech_ms / frame_ms)))
        self.floor_frames = max(1, int(round(floor_window_s * 1000.0 / frame_ms)))
        lo, hi = float(band_hz[0]), float(band_hz[1])
        if not 0.0 <= lo < hi:
            raise ConfigError(f"vad: band_hz must be (low, high) with 0 <= low < high, got {band_hz}")
        self.band_hz = (lo, hi)
        self.reset()

    def frame_length(self) -> int:
        return max(1, int(round(self.sample_rate * self.frame_ms / 1000.0)))

    def reset(self) -> None:
        self._history: deque[float] = deque(maxlen=self.floor_frames)
        self._run = 0
        self._hang = 0
        self.active = False
        self.loud = False  # the last frame was above the floor by threshold_db
        self.energy_db = -120.0
        self.floor_db = -120.0

    def is_speech(self, frame: np.ndarray) -> bool:
        """One frame (any length; frame_length() samples expected) -> is the stream in speech now."""
        e = frame_energy_db(frame, self.sample_rate, self.band_hz)
        self._history.append(e)
        self.floor_db = min(self._history)
        self.energy_db = e
        self.loud = e > self.floor_db + self.threshold_db and e > self.min_energy_db
        return _onset_hangover(self)

    def segments(self, samples: np.ndarray) -> list[Segment]:
        """Speech (start_s, end_s) in a whole clip, from a fresh state (the streaming state is reset)."""
        return _segments(self, samples)


class WebRtcVAD:
    """The webrtcvad package behind the same interface (frames of 10, 20 or 30 ms at 8/16/32/48 kHz)."""

    def __init__(self, sample_rate: int = 16000, frame_ms: float = 20.0, aggressiveness: int = 2,
                 hangover_ms: float = 300.0, min_speech_ms: float = 60.0) -> None:
        try:
            import webrtcvad  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ConfigError("vad kind 'webrtc' needs the webrtcvad package: pip install webrtcvad-wheels "
                              "(or webrtcvad, which needs a C compiler); or use kind 'energy'") from exc
        if int(sample_rate) not in (8000, 16000, 32000, 48000) or float(frame_ms) not in (10.0, 20.0, 30.0):
            raise ConfigError(f"vad 'webrtc' works on 10/20/30 ms frames at 8/16/32/48 kHz, got "
                              f"{frame_ms} ms at {sample_rate} Hz")
        if int(aggressiveness) not in (0, 1, 2, 3):
            raise ConfigError(f"vad 'webrtc': aggressiveness must be 0..3, got {aggressiveness}")
        self._vad = webrtcvad.Vad(int(aggressiveness))
        self.sample_rate = int(sample_rate)
        self.frame_ms = float(frame_ms)
        self.hangover_frames = int(round(hangover_ms / frame_ms))
        self.onset_frames = max(1, int(round(min_speech_ms / frame_ms)))
        self.reset()

    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_ms / 1000.0)

    def reset(self) -> None:
        self._run = 0
        self._hang = 0
        self.active = False
        self.loud = False

    def is_speech(self, frame: np.ndarray) -> bool:
        x = to_float(np.asarray(frame).reshape(-1))
        n = self.frame_length()
        x = np.pad(x[:n], (0, max(0, n - x.size)))
        pcm = np.round(np.clip(x, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()
        self.loud = bool(self._vad.is_speech(pcm, self.sample_rate))
        return _onset_hangover(self)

    def segments(self, samples: np.ndarray) -> list[Segment]:
        return _segments(self, samples)


def make_vad(kind: str = "energy", **kw: Any) -> EnergyVAD | WebRtcVAD:
    """"energy" (built in) or "webrtc" (needs the optional webrtcvad package); kw go to the constructor."""
    kinds = {"energy": EnergyVAD, "webrtc": WebRtcVAD}
    if kind not in kinds:
        raise ConfigError(f"unknown vad kind {kind!r}; use 'energy' or 'webrtc'")
    cls = kinds[kind]
    options = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ConfigError(f"vad {kind!r}: unknown option {unknown[0]!r}; options: {', '.join(options)}")
    return cls(**kw)
