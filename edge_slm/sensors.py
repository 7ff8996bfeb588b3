"""Sensor windowing and features: the one implementation training (converters) and the device share.

numpy and the standard library only; never imports TensorFlow, converters or devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from edge_slm.errors import InputError, ModelError
from edge_slm.streams import SensorBlock

FEATURES_KIND = "vibration-v1"  # bump when the feature computation changes; packages name the one they need


@dataclass(frozen=True)
class Window:
    """One analysis window: samples float32 [window, channels] in the model's channel order."""

    samples: np.ndarray
    t_start: float
    t_end: float


def _fmt_t(t: float) -> str:
    return f"{t:.4f} s"


class SensorWindower:
    """Cut a stream of SensorBlocks into windows of `window` samples every `hop` samples.

    Any split of the same samples into blocks gives the same windows. A window that holds a missing
    sample (NaN) or a clipped one (|x| at full_scale) becomes an InputError in its place; so do a
    block with the wrong sample rate or channels, and a jump in block time (t0) larger than
    gap_tolerance seconds (default 1.5 sample periods), after which windowing restarts at the new time.
    """

    def __init__(self, window: int, hop: int, channels: Sequence[str], sample_rate: float | None = None, *,
                 full_scale: float | Sequence[float] | None = None, gap_tolerance: float | None = None,
                 units: Sequence[str] | None = None) -> None:
        if int(window) < 1 or int(hop) < 1:
            raise ValueError(f"window and hop must be >= 1 sample, got window={window} hop={hop}")
        if not channels:
            raise ValueError("channels must name at least one channel")
        self.window = int(window)
        self.hop = int(hop)
        self.channels = tuple(channels)
        self.sample_rate = float(sample_rate) if sample_rate else None
        # one full scale per channel (a 6-axis IMU: +-4 g accel, +-2000 deg/s gyro) or one for all
        self.full_scale = None if full_scale is None else np.broadcast_to(
            np.asarray(full_scale, np.float64), (len(self.channels),)).copy()
        self.gap_tolerance = gap_tolerance
        self.units = tuple(units) if units else None
        self._si_factors = None if self.units is None else np.array(
            [SI_TO_UNIT.get(u, np.nan) for u in self.units], np.float32)
        self.reset()

    def reset(self) -> None:
        """Forget buffered samples and the stream time; the next block starts a new segment."""
        self._rate: float | None = self.sample_rate
        self._origin: float | None = None  # stream time of segment sample 0
        self._count = 0  # samples received in this segment
        self._pos = 0  # segment index of the next window's first sample
        self._buf = np.zeros((0, len(self.channels)), np.float32)
        self._buf_start = 0  # segment index of self._buf[0]
        self._emitted = 0  # windows (or window errors) produced in this segment

    def _select(self, block: SensorBlock) -> np.ndarray:
        names = list(block.channels)
        missing = [c for c in self.channels if c not in names]
        if missing:
            raise InputError(
                "channel_mismatch",
                f"sensor block has channels {', '.join(names)} but the model needs {', '.join(self.channels)} "
                f"(missing {', '.join(missing)}); name the block's channels as the model's manifest does",
            )
        idx = [names.index(c) for c in self.channels]
        data = block.samples[:, idx] if idx != list(range(len(names))) else block.samples
        if getattr(block, "units", "") == "si" and self._si_factors is not None:
            if np.isnan(self._si_factors).any():
                odd = [f"{c} ({u})" for c, u in zip(self.channels, self.units) if u not in SI_TO_UNIT]
                raise InputError("unit_mismatch", f"the sensor sends SI units but the model's channels {', '.join(odd)} "
                                                  f"are in units this agent cannot convert to (known: {', '.join(SI_TO_UNIT)})")
            data = data * self._si_factors
        return data

    def feed(self, block: SensorBlock) -> list[Window | InputError]:
        """Buffer BLOCK and return every window (or per-window error) it completes, in time order."""
        out: list[Window | InputError] = []
        if self._rate is None:
            self._rate = block.sample_rate
        elif not math.isclose(block.sample_rate, self._rate, rel_tol=1e-6):
            what = "the model was trained at" if self.sample_rate else "the stream started at"
            out.append(InputError(
                "sample_rate_mismatch",
                f"sensor block at {block.sample_rate:g} Hz but {what} {self._rate:g} Hz; "
                "resample the sensor data or configure the sensor's output data rate",
            ))
            return out
        try:
            data = self._select(block)
        except InputError as exc:
            return [exc]
        rate = self._rate
        if self._origin is None:
            self._origin = float(block.t0) if block.t0 is not None else 0.0
        elif block.t0 is not None:
            expected = self._origin + self._count / rate
            tol = self.gap_tolerance if self.gap_tolerance is not None else 1.5 / rate
            jump = float(block.t0) - expected
            if abs(jump) > tol:
                dropped = self._count - max(self._pos, self._buf_start)
                kind = "jumped forward" if jump > 0 else "went back"
                out.append(InputError(
                    "time_gap",
                    f"stream time {kind} from {_fmt_t(expected)} to {_fmt_t(float(block.t0))} "
                    f"({jump:+.4f} s, about {abs(jump) * rate:.0f} samples): samples are missing; "
                    f"{max(dropped, 0)} buffered sample(s) were dropped and windows restart at {_fmt_t(float(block.t0))}",
                ))
                self.reset()
                self._rate = rate
                self._origin = float(block.t0)
        self._buf = np.concatenate([self._buf, data.astype(np.float32, copy=False)], axis=0)
        self._count += len(data)
        while self._pos + self.window <= self._count:
            off = self._pos - self._buf_start
            samples = self._buf[off:off + self.window]
            out.append(self._check(samples, self._pos))
            self._emitted += 1
            self._pos += self.hop
        drop = min(self._pos - self._buf_start, len(self._buf))
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out

    def _check(self, samples: np.ndarray, pos: int) -> Window | InputError:
        rate = float(self._rate or 1.0)
        t_start = float(self._origin or 0.0) + pos / rate
        t_end = t_start + self.window / rate
        bad = np.isnan(samples)
        if bad.any():
            per = bad.sum(axis=0)
            rows = np.flatnonzero(bad.any(axis=1))
            detail = ", ".join(f"{c}: {int(n)}" for c, n in zip(self.channels, per) if n)
            return InputError(
                "missing_samples",
                f"{int(per.sum())} missing sample(s) in channel(s) {detail} between "
                f"{_fmt_t(t_start + rows[0] / rate)} and {_fmt_t(t_start + rows[-1] / rate)} "
                f"(window {t_start:.4f}-{t_end:.4f} s); the window was not analysed: check the sensor link",
            )
        if self.full_scale is not None:
            clipped = (np.abs(samples) >= 0.9999 * self.full_scale).sum(axis=0)
            if clipped.max() >= 2:
                detail = ", ".join(f"{c}: {int(n)} at +-{fs:g}" for c, n, fs in zip(self.channels, clipped, self.full_scale)
                                   if n)
                return InputError(
                    "sensor_saturated",
                    f"samples at the sensor's full scale in channel(s) {detail} "
                    f"(window {t_start:.4f}-{t_end:.4f} s); the window was not analysed: raise the sensor's "
                    "measurement range or check the mounting",
                )
        return Window(samples.copy(), t_start, t_end)

    def flush(self) -> list[Window | InputError]:
        """The stream ended: say so if it never filled one window, then start over."""
        out: list[Window | InputError] = []
        if self._emitted == 0 and self._count > 0:
            out.append(InputError(
                "stream_too_short",
                f"the stream ended after {self._count} sample(s), fewer than one window of {self.window}; "
                "nothing was analysed: send at least one full window",
            ))
        self.reset()
        return out


# SI value * factor = value in the model's unit (what the serial bridge sends -> what a model was trained on)
SI_TO_UNIT = {"m/s^2": 1.0, "rad/s": 1.0, "g": 1.0 / 9.80665, "deg/s": 180.0 / math.pi, "1": 1.0}

_FEATURE_KEYS: dict[str, type | tuple[type, ...]] = {
    "units": (list, type(None)),
    "kind": str, "sample_rate": (int, float), "window": int, "channels": list, "bands": int, "f_min": (int, float),
    "envelope_bands": int, "envelope_f_max": (int, float), "envelope_highpass": (int, float),
    "full_scale": (int, float, list, type(None)), "mean": (list, type(None)), "std": (list, type(None)),
}
_STATS = ("log_rms", "log_kurtosis", "log_crest")


@dataclass(frozen=True)
class SensorFeatures:
    """Per-channel features of one window, then normalization with training statistics.

    For each channel: remove the linear trend (drift, gravity); log RMS, log kurtosis, log crest
    factor; log energies of `bands` log-spaced bands of the Hann-windowed power spectrum from f_min
    to Nyquist (shaft harmonics, resonances); log energies of `envelope_bands` bands (f_min up to
    envelope_f_max) of the envelope spectrum of the signal band-passed above envelope_highpass
    (the classic bearing-fault demodulation). mean/std (from training NORMAL data) turn raw features
    into z-scores; call(windows) returns them normalized.
    """

    sample_rate: float
    window: int
    channels: tuple[str, ...]
    bands: int = 32
    f_min: float = 5.0
    envelope_bands: int = 16
    envelope_f_max: float = 500.0
    envelope_highpass: float = 600.0
    full_scale: float | tuple[float, ...] | None = None  # one for all channels or one per channel
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    units: tuple[str, ...] | None = None  # one per channel ("g", "deg/s", "m/s^2", ...); None: not declared

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.units is not None:
            object.__setattr__(self, "units", tuple(self.units))
            if len(self.units) != len(self.channels) or not all(isinstance(u, str) and u for u in self.units):
                raise ModelError(f"sensor features: units needs one unit name per channel ({len(self.channels)})")
        nyquist = self.sample_rate / 2
        numbers = (self.sample_rate, self.f_min, self.envelope_f_max, self.envelope_highpass)
        if isinstance(self.full_scale, (list, tuple)):
            object.__setattr__(self, "full_scale", tuple(self.full_scale))
            if len(self.full_scale) != len(self.channels) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.full_scale):
                raise ModelError(f"sensor features: full_scale needs one number per channel ({len(self.channels)})")
        scales = () if self.full_scale is None else np.atleast_1d(np.asarray(self.full_scale, np.float64))
        if not all(math.isfinite(v) for v in numbers) or not all(math.isfinite(v) and v > 0 for v in scales):
            raise ModelError("sensor features: sample_rate, f_min, envelope_f_max, envelope_highpass and full_scale "
                             "must be finite (and full_scale positive)")
        if self.window < 16 or self.sample_rate <= 0 or not self.channels or self.bands < 1 or self.envelope_bands < 1:
            raise ModelError("sensor features need window >= 16 samples, sample_rate > 0, at least one channel and "
                             f"at least one band of each kind; got window={self.window} sample_rate={self.sample_rate} "
                             f"bands={self.bands} envelope_bands={self.envelope_bands}")
        if not 0 < self.f_min < self.envelope_f_max <= nyquist or not 0 < self.envelope_highpass < 0.95 * nyquist:
            raise ModelError(
                f"sensor features: need 0 < f_min < envelope_f_max <= Nyquist ({nyquist:g} Hz) and "
                f"envelope_highpass below {0.95 * nyquist:g} Hz")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
                if len(getattr(self, name)) != self.n_features:
                    raise ModelError(f"sensor features: {name} has {len(v)} values for {self.n_features} features")
        _ = self._band_edges, self._env_edges  # fail at load time when the bands do not fit the window

    @property
    def per_channel(self) -> int:
        return len(_STATS) + self.bands + self.envelope_bands

    @property
    def n_features(self) -> int:
        return len(self.channels) * self.per_channel

    def feature_names(self) -> list[str]:
        names = list(_STATS) + [f"band{i}" for i in range(self.bands)] + [f"env{i}" for i in range(self.envelope_bands)]
        return [f"{c}.{n}" for c in self.channels for n in names]

    def _edges(self, lo_hz: float, hi_hz: float, n: int, what: str) -> np.ndarray:
        df = self.sample_rate / self.window
        lo = max(1, int(math.ceil(lo_hz / df)))
        hi = min(self.window // 2 + 1, int(math.floor(hi_hz / df)) + 1)
        e = np.round(np.geomspace(lo, hi, n + 1)).astype(np.int64)
        for i in range(1, len(e)):  # at least one FFT bin per band
            e[i] = max(e[i], e[i - 1] + 1)
        if e[-1] > self.window // 2 + 1:
            raise ModelError(f"sensor features: {n} {what} bands do not fit a {self.window}-sample window; use fewer bands")
        return e

    @cached_property
    def _band_edges(self) -> np.ndarray:
        return self._edges(self.f_min, self.sample_rate / 2, self.bands, "spectrum")

    @cached_property
    def _env_edges(self) -> np.ndarray:
        return self._edges(self.f_min, self.envelope_f_max, self.envelope_bands, "envelope")

    @cached_property
    def _hann(self) -> np.ndarray:
        w = np.hanning(self.window)
        return w / math.sqrt(float(np.sum(w**2)))

    @cached_property
    def _analytic_mask(self) -> np.ndarray:
        f = np.fft.fftfreq(self.window, 1.0 / self.sample_rate)
        keep = (f >= self.envelope_highpass) & (f <= 0.95 * self.sample_rate / 2)
        return np.where(keep, 2.0, 0.0)

    def raw(self, windows: np.ndarray) -> np.ndarray:
        """windows float [window, channels] or [n, window, channels] -> raw features float32 [F] or [n, F]."""
        x = np.asarray(windows, dtype=np.float64)
        single = x.ndim == 2
        if single:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.window, len(self.channels)):
            raise InputError("bad_window", f"a window must be [{self.window} samples, {len(self.channels)} channels "
                                           f"({', '.join(self.channels)})], got shape {list(np.shape(windows))}")
        if not np.all(np.isfinite(x)):
            raise InputError("missing_samples", "the window holds missing (NaN) or infinite samples; send complete windows")
        n, w, c = x.shape
        t = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        x = x - x.mean(axis=1, keepdims=True)
        slope = np.einsum("t,ntc->nc", t, x) / float(np.sum(t**2))
        x = x - slope[:, None, :] * t[None, :, None]
        power2 = np.mean(x**2, axis=1)
        rms = np.sqrt(power2)
        kurt = np.mean(x**4, axis=1) / np.maximum(power2**2, 1e-24)
        crest = np.max(np.abs(x), axis=1) / np.maximum(rms, 1e-12)
        stats = np.stack([np.log10(rms + 1e-6), np.log(np.maximum(kurt, 1e-3)), np.log(np.maximum(crest, 1e-3))], axis=2)
        spec = np.abs(np.fft.rfft(x * self._hann[None, :, None], axis=1)) ** 2
        bands = self._band_energy(spec, self._band_edges, 1e-10)
        analytic = np.fft.ifft(np.fft.fft(x, axis=1) * self._analytic_mask[None, :, None], axis=1)
        env = np.abs(analytic)
        env = env - env.mean(axis=1, keepdims=True)
        env_spec = np.abs(np.fft.rfft(env * self._hann[None, :, None], axis=1)) ** 2
        env_bands = self._band_energy(env_spec, self._env_edges, 1e-12)
        feats = np.concatenate([stats, bands, env_bands], axis=2)  # [n, channels, per_channel]
        out = feats.reshape(n, c * self.per_channel).astype(np.float32)
        return out[0] if single else out

    @staticmethod
    def _band_energy(spec: np.ndarray, edges: np.ndarray, floor: float) -> np.ndarray:
        cs = np.concatenate([np.zeros_like(spec[:, :1]), np.cumsum(spec, axis=1)], axis=1)
        energy = cs[:, edges[1:], :] - cs[:, edges[:-1], :]  # [n, bands, channels]
        return np.log10(np.maximum(energy, 0.0) + floor).transpose(0, 2, 1)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise ModelError("sensor features have no normalization statistics (mean/std); fit them on training data")
        mean = np.asarray(self.mean, np.float32)
        std = np.maximum(np.asarray(self.std, np.float32), 1e-6)
        return ((np.asarray(raw, np.float32) - mean) / std).astype(np.float32)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """Normalized features: what the model takes."""
        return self.normalize(self.raw(windows))

    def fitted(self, raw_normal: np.ndarray) -> SensorFeatures:
        """A copy whose mean/std come from raw features of training NORMAL windows [n, F]."""
        raw_normal = np.asarray(raw_normal, np.float64)
        std = np.maximum(raw_normal.std(axis=0), 1e-3)
        return replace(self, mean=tuple(raw_normal.mean(axis=0).tolist()), std=tuple(std.tolist()))

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": FEATURES_KIND,
            "sample_rate": self.sample_rate,
            "window": self.window,
            "channels": list(self.channels),
            "units": list(self.units) if self.units is not None else None,
            "bands": self.bands,
            "f_min": self.f_min,
            "envelope_bands": self.envelope_bands,
            "envelope_f_max": self.envelope_f_max,
            "envelope_highpass": self.envelope_highpass,
            "full_scale": list(self.full_scale) if isinstance(self.full_scale, tuple) else self.full_scale,
            "mean": None if self.mean is None else [round(v, 7) for v in self.mean],
            "std": None if self.std is None else [round(v, 7) for v in self.std],
        }

    @classmethod
    def from_manifest(cls, data: Any, where: str = "preprocessing.features") -> SensorFeatures:
        """Rebuild from a manifest section; ModelError names the bad or unknown key."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: expected an object with the sensor feature settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FEATURE_KEYS))
        if unknown:
            raise ModelError(f"{where}: unknown key(s) {', '.join(unknown)}; this edge-slm knows {', '.join(_FEATURE_KEYS)}")
        for key in ("kind", "sample_rate", "window", "channels"):
            if key not in data:
                raise ModelError(f"{where}: missing key {key!r}")
        for key, typ in _FEATURE_KEYS.items():
            if key in data and (not isinstance(data[key], typ) or isinstance(data[key], bool)):
                raise ModelError(f"{where}.{key}: wrong type {type(data[key]).__name__}")
        if data["kind"] != FEATURES_KIND:
            raise ModelError(f"{where}.kind: {data['kind']!r} is not supported (this edge-slm computes {FEATURES_KIND!r}); "
                             "upgrade edge-slm or re-train the model")
        if not data["channels"] or not all(isinstance(c, str) for c in data["channels"]):
            raise ModelError(f"{where}.channels: must be a non-empty list of channel names")
        for key in ("mean", "std"):
            v = data.get(key)
            if v is not None and not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                         for x in v):
                raise ModelError(f"{where}.{key}: must be a list of finite numbers")
        kwargs = {k: v for k, v in data.items() if k != "kind"}
        kwargs["channels"] = tuple(data["channels"])
        try:
            return cls(**kwargs)
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from exc
