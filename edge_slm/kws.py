"""Keyword spotting on a stream of audio blocks: incremental log-mel frames, a model call every stride, smoothed posteriors.

Device code: numpy, edge_slm.audio and edge_slm.runtime only. Never imports TensorFlow, converters or devices.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from edge_slm import runtime
from edge_slm.audio import FeatureStream, FrontEnd, Resampler, resample
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.streams import AudioBlock, Block, StreamOutput
from edge_slm.vad import make_vad

# Classes that never produce a detection.
NON_COMMANDS = frozenset({"_unknown_", "_silence_", "_background_noise_", "unknown", "silence", "background"})
DEFAULT_STREAMING = {"stride_ms": 100.0, "smoothing_ms": 300.0, "threshold": 0.7, "refractory_ms": 1000.0}


def _streaming_settings(package: ModelPackage, given: dict[str, float | None]) -> dict[str, float]:
    """Manifest preprocessing.streaming over the defaults, then the caller's overrides; each checked."""
    from_manifest = package.preprocessing.get("streaming") or {}
    if not isinstance(from_manifest, dict):
        raise ModelError(f"{package.path}: manifest preprocessing.streaming must be an object")
    out: dict[str, float] = {}
    for key, default in DEFAULT_STREAMING.items():
        where = "argument" if given.get(key) is not None else "manifest preprocessing.streaming"
        value = given[key] if given.get(key) is not None else from_manifest.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ModelError(f"{package.path}: {where} {key} must be a number, got {value!r}")
        low_ok = value > 0 if key == "stride_ms" else value >= 0
        if not low_ok or (key == "threshold" and value > 1):
            want = "in [0, 1]" if key == "threshold" else ("> 0" if key == "stride_ms" else ">= 0")
            raise ModelError(f"{package.path}: {where} {key} must be {want}, got {value!r}")
        out[key] = float(value)
    return out


class KeywordSpotter:
    """keyword-spotting: a StreamTask over AudioBlocks, and one-shot classify() for a clip.

    Outputs {"keyword", "score", "t", "t_start"}: t is the stream time (s) of the end of the window that fired,
    t_start its start; stream time starts at the first block's t0 (or 0) and counts samples from there.
    """

    input_kind = "audio"

    def __init__(self, package: ModelPackage, model: runtime.Model, *, threshold: float | None = None,
                 smoothing_ms: float | None = None, refractory_ms: float | None = None,
                 stride_ms: float | None = None, vad: str | None = None) -> None:
        self.package = package
        self.model = model
        prep = package.preprocessing
        if package.task != "keyword-spotting":
            raise ModelError(f"{package.path}: task is {package.task!r}, KeywordSpotter runs keyword-spotting packages")
        if not isinstance(prep.get("audio"), dict):
            raise ModelError(f"{package.path}: manifest preprocessing.audio (the front end) is missing; "
                             "re-convert with converters.kws")
        self.front_end = FrontEnd.from_manifest(prep["audio"])
        self.sample_rate = int(self.front_end.sample_rate)
        self.clip_s = float(prep.get("clip_s", 1.0))
        self.labels = package.labels
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ModelError(f"{package.path}: a keyword model has one input (features) and one output (posteriors)")
        self.clip_samples = int(round(self.clip_s * self.sample_rate))
        self.clip_frames = self.front_end.n_frames(self.clip_samples)
        self.n_features = self.front_end.n_features()
        self._input_shape = tuple(int(d) for d in model.inputs[0].shape)
        if int(np.prod(self._input_shape)) != self.clip_frames * self.n_features:
            raise ModelError(f"{package.path}: model input {self._input_shape} does not hold {self.clip_frames} frames "
                             f"x {self.n_features} features of a {self.clip_s} s clip; the manifest's front end "
                             "does not match the model")
        n_out = int(np.prod(model.outputs[0].shape))
        if len(self.labels) != n_out:
            raise ModelError(f"{package.path}: {len(self.labels)} labels for {n_out} model outputs")
        self.command_ids = np.array([i for i, lab in enumerate(self.labels) if lab not in NON_COMMANDS], dtype=int)
        stream = _streaming_settings(package, {"threshold": threshold, "smoothing_ms": smoothing_ms,
                                               "refractory_ms": refractory_ms, "stride_ms": stride_ms})
        self.threshold = float(stream["threshold"])
        hop_ms = 1000.0 * self.front_end.hop_length() / self.sample_rate
        self.stride_frames = max(1, int(round(float(stream["stride_ms"]) / hop_ms)))
        self.stride_ms = self.stride_frames * hop_ms
        self.smoothing = max(1, int(round(float(stream["smoothing_ms"]) / self.stride_ms)))
        self.refractory_s = float(stream["refractory_ms"]) / 1000.0
        # vad: "energy" or "webrtc" skips the model while nobody speaks (what a battery device wants);
        # None takes the manifest's streaming.vad, "" or "off" turns it off.
        kind = vad if vad is not None else (package.preprocessing.get("streaming") or {}).get("vad", "")
        if kind not in ("", "off", "energy", "webrtc"):
            raise ModelError(f"{package.path}: vad must be energy, webrtc or off, got {kind!r}")
        self.vad_kind = "" if kind == "off" else kind
        self.windows_run = 0
        self.windows_skipped = 0  # stride points where the VAD heard no speech in the clip: no model call
        self.reset()

    # --- settings as reported ------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "stride_ms": self.stride_ms, "vad": self.vad_kind or "off",
                "smoothing_ms": self.smoothing * self.stride_ms, "refractory_ms": 1000.0 * self.refractory_s,
                "clip_s": self.clip_s, "sample_rate": self.sample_rate}

    # --- one window ----------------------------------------------------------------------------
    def _posteriors(self, features: np.ndarray) -> np.ndarray:
        out = self.model.run(features.reshape(self._input_shape).astype(np.float32))[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def _fit_clip(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if int(sample_rate) != self.sample_rate:
            x = np.asarray(resample(x, int(sample_rate), self.sample_rate), dtype=np.float32)
        return x

    def posteriors_batch(self, clips: np.ndarray, sample_rate: int) -> np.ndarray:
        """float32 [n, samples] clips of clip_s -> posteriors [n, classes] (one model call per clip)."""
        clips = np.asarray(clips, dtype=np.float32)
        if clips.ndim != 2:
            raise InputError("bad_audio", f"clips must be [n, samples], got shape {clips.shape}")
        if int(sample_rate) != self.sample_rate:
            clips = np.stack([self._fit_clip(c, sample_rate) for c in clips])
        if clips.shape[1] != self.clip_samples:
            raise InputError("bad_audio", f"clips hold {clips.shape[1]} samples; the model takes {self.clip_samples} "
                             f"({self.clip_s} s at {self.sample_rate} Hz)")
        feats = self.front_end.features_batch(clips)
        return np.stack([self._posteriors(f) for f in feats])

    def classify(self, samples: np.ndarray, sample_rate: int, top_k: int = 3) -> dict[str, Any]:
        """One clip -> {"label", "score", "top", "t"}: shorter clips are padded with silence; longer ones are
        scanned every stride and the window with the strongest command wins (else the most confident window)."""
        x = self._fit_clip(samples, sample_rate)
        if len(x) == 0:
            raise InputError("empty_audio", "no audio samples to classify")
        if len(x) < self.clip_samples:
            pad = self.clip_samples - len(x)
            x = np.pad(x, (pad // 2, pad - pad // 2))
        feats = self.front_end.features(x)
        starts = list(range(0, len(feats) - self.clip_frames + 1, self.stride_frames))
        if starts[-1] != len(feats) - self.clip_frames:
            starts.append(len(feats) - self.clip_frames)
        best, best_key, best_start = None, (-1, -1.0), 0
        for s in starts:
            p = self._posteriors(feats[s:s + self.clip_frames])
            top = int(np.argmax(p))
            key = (int(top in self.command_ids), float(p[top]))
            if key > best_key:
                best, best_key, best_start = p, key, s
        assert best is not None
        order = np.argsort(-best)[:max(1, top_k)]
        hop = self.front_end.hop_length() / self.sample_rate
        return {"label": self.labels[int(order[0])], "score": round(float(best[order[0]]), 4),
                "is_command": bool(int(order[0]) in self.command_ids),
                "top": [{"label": self.labels[int(i)], "score": round(float(best[i]), 4)} for i in order],
                "t_start": round(best_start * hop, 3)}

    # --- streaming -----------------------------------------------------------------------------
    def reset(self) -> None:
        self._resampler: Resampler | None = None  # set while blocks arrive at another rate
        self._features = FeatureStream(self.front_end)  # frame i starts at sample i * hop of the stream
        self._ring = np.zeros((self.clip_frames, self.n_features), dtype=np.float32)
        self._frames = 0  # frames computed in this stream
        self._last_run = -1  # frame count at the last model call
        self._recent: deque[np.ndarray] = deque(maxlen=self.smoothing)
        self._last_fire: float | None = None
        self._t_base = 0.0
        self._stream: str | None = None
        self._vad = make_vad(self.vad_kind, sample_rate=self.sample_rate) if self.vad_kind else None
        self._vad_buf = np.zeros(0, np.float32)
        self._samples = 0  # model-rate samples consumed in this stream
        self._last_speech = -(10**12)  # sample index at the end of the last speech frame

    def _window(self) -> np.ndarray:
        k = self._frames % self.clip_frames  # the oldest frame's slot once the ring is full
        return np.concatenate([self._ring[k:], self._ring[:k]])

    def _frame_end_t(self, frames: int) -> float:
        """Stream time of the end of frame number `frames` (1-based)."""
        hop, win = self.front_end.hop_length(), self.front_end.window_length()
        return self._t_base + ((frames - 1) * hop + win) / self.sample_rate

    def _infer(self) -> list[StreamOutput]:
        self._last_run = self._frames
        self.windows_run += 1
        self._recent.append(self._posteriors(self._window()))
        if len(self.command_ids) == 0:
            return []
        smooth = np.mean(self._recent, axis=0)
        best = int(self.command_ids[np.argmax(smooth[self.command_ids])])
        score = float(smooth[best])
        t = self._frame_end_t(self._frames)
        if score < self.threshold or (self._last_fire is not None and t - self._last_fire < self.refractory_s - 1e-9):
            return []
        self._last_fire = t
        t_start = self._t_base + (self._frames - self.clip_frames) * self.front_end.hop_length() / self.sample_rate
        return [{"keyword": self.labels[best], "score": round(score, 4), "t": round(t, 3),
                 "t_start": round(t_start, 3)}]

    def _listen(self, x: np.ndarray) -> None:
        """Feed the VAD whole frames; remember where speech was last heard."""
        assert self._vad is not None
        n = self._vad.frame_length()
        buf = np.concatenate([self._vad_buf, x])
        used = (len(buf) // n) * n
        end = self._samples - len(self._vad_buf)
        for i in range(0, used, n):
            if self._vad.is_speech(buf[i:i + n]):
                self._last_speech = end + i + n
        self._vad_buf = buf[used:]

    def _heard_speech(self) -> bool:
        """Speech ended inside the last clip plus the smoothing span (or is still going on)."""
        hop, win = self.front_end.hop_length(), self.front_end.window_length()
        now = (self._frames - 1) * hop + win  # the end of the newest frame, in stream samples
        span = self.clip_samples + self.smoothing * self.stride_frames * hop
        return now - self._last_speech <= span

    def _consume(self, x: np.ndarray) -> list[StreamOutput]:
        """Model-rate samples in; their whole frames into the ring; a model call every stride frames."""
        outputs: list[StreamOutput] = []
        self._samples += len(x)
        if self._vad is not None:
            self._listen(x)
        for f in self._features.push(x):
            self._ring[self._frames % self.clip_frames] = f
            self._frames += 1
            if self._frames >= self.clip_frames and (self._frames - self.clip_frames) % self.stride_frames == 0:
                if self._vad is not None and not self._heard_speech():
                    self.windows_skipped += 1
                    self._last_run = self._frames
                    self._recent.clear()  # silence: nothing to smooth with
                    continue
                outputs.extend(self._infer())
        return outputs

    def feed(self, block: Block) -> list[StreamOutput]:
        if not isinstance(block, AudioBlock):
            return [InputError("bad_input_kind", "keyword spotting takes audio blocks; route sensor streams "
                               "to a sensor task")]
        outputs: list[StreamOutput] = []
        if self._stream is None or block.stream != self._stream:
            self.reset()
            self._stream = block.stream
            self._t_base = float(block.t0) if block.t0 is not None else 0.0
        if self._resampler is not None and self._resampler.from_rate != block.sample_rate:
            outputs.extend(self._consume(self._resampler.finish()))  # the rate changed mid-stream
            self._resampler = None
        if block.sample_rate != self.sample_rate and self._resampler is None:
            self._resampler = Resampler(block.sample_rate, self.sample_rate)
        x = self._resampler.feed(block.samples) if self._resampler is not None else block.samples
        outputs.extend(self._consume(x))
        return outputs

    def flush(self) -> list[StreamOutput]:
        outputs: list[StreamOutput] = []
        if self._resampler is not None:
            outputs.extend(self._consume(self._resampler.finish()))
        if self._frames >= self.clip_frames and self._last_run != self._frames:
            outputs.extend(self._infer())  # the tail since the last stride
        self.reset()
        return outputs
