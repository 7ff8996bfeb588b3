"""Turn an MQTT (or any byte) payload into an audio or sensor block for a streaming task.

numpy and the standard library only. Never imports TensorFlow, converters or devices.

Accepted payloads (documented in the README, "Voice and sensor inputs"):
- audio: a whole WAV file (RIFF....WAVE: classified as one clip); JSON (UTF-8 text starting with '{')
  {"id", "stream", "sample_rate", "t0", "pcm16": BASE64} or {"samples": [floats]}; anything else is
  raw PCM16 little-endian mono at the model's sample rate (a chunk of the topic's continuous stream).
- sensor: JSON {"id", "stream", "sample_rate", "channels", "t0", "samples": [[ch0, ch1, ...], ...]};
  null entries are missing samples.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

from edge_slm.errors import InputError
from edge_slm.sources import RawInput, next_input_id
from edge_slm.streams import AudioBlock, SensorBlock

MAX_JSON_SAMPLES = 1_000_000


def _json(raw: RawInput, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError("bad_json", f"input looks like JSON but does not parse: {exc.msg} at {exc.pos}") from exc
    except (ValueError, RecursionError) as exc:
        raise InputError("bad_json", f"input JSON is not acceptable: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise InputError("bad_request", "JSON input must be an object")
    if "id" in obj:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise InputError("bad_request", 'JSON input "id" must be a string or integer')
        if str(obj["id"]):
            raw.input_id = str(obj["id"])[:128]
    return obj


def _number(obj: dict[str, Any], key: str, default: float | None) -> float | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError("bad_request", f'JSON input "{key}" must be a finite number, got {value!r}')
    return float(value)


def _stream(obj: dict[str, Any], default: str) -> str:
    value = obj.get("stream", default)
    if not isinstance(value, str):
        raise InputError("bad_request", 'JSON input "stream" must be a string')
    return value[:128]


def _check_size(raw: RawInput, max_bytes: int) -> None:
    if raw.input_id is None:
        raw.input_id = next_input_id()
    if len(raw.payload) > max_bytes:
        raise InputError("input_too_long",
                         f"input is {len(raw.payload)} bytes; the limit is {max_bytes} (max_input_bytes)")


def decode_audio(raw: RawInput, max_bytes: int, sample_rate: int) -> tuple[AudioBlock, bool]:
    """Payload -> (block, whole_clip). whole_clip is True for a WAV file: classify it on its own."""
    _check_size(raw, max_bytes)
    payload = raw.payload
    stream = raw.origin.split(":", 1)[-1]
    if payload[:4] == b"RIFF" and payload[8:12] == b"WAVE":
        from edge_slm.wav import read_wav

        block = read_wav(payload)
        block.stream = f"{stream}#{raw.input_id}"
        return block, True
    text = _utf8_object(payload)
    if text is not None:
        obj = _json(raw, text)
        rate = _number(obj, "sample_rate", sample_rate)
        if rate is None or rate <= 0 or rate != int(rate):
            raise InputError("bad_audio", f'"sample_rate" must be a positive integer, got {obj.get("sample_rate")!r}')
        if "pcm16" in obj:
            if not isinstance(obj["pcm16"], str):
                raise InputError("bad_audio", '"pcm16" must be a base64 string of little-endian 16-bit samples')
            try:
                pcm = base64.b64decode(obj["pcm16"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InputError("bad_audio", f'"pcm16" is not valid base64: {exc}') from exc
            samples = _pcm16(pcm)
        elif "samples" in obj:
            samples = _float_list(obj["samples"], "samples", 1)
            if not np.all(np.isfinite(samples)):
                raise InputError("bad_audio", '"samples" must be finite numbers in [-1, 1]')
        else:
            raise InputError("bad_request", 'audio JSON needs "pcm16" (base64) or "samples" (floats in [-1, 1])')
        return AudioBlock(samples, int(rate), t0=_number(obj, "t0", None), stream=_stream(obj, stream)), False
    return AudioBlock(_pcm16(payload), sample_rate, stream=stream), False


def _utf8_object(payload: bytes) -> str | None:
    """The payload as text when it looks like a JSON object; None for binary (raw PCM may start with '{')."""
    if payload.lstrip()[:1] != b"{":
        return None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _pcm16(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise InputError("bad_audio", f"PCM16 audio must have an even number of bytes, got {len(data)}")
    if not data:
        raise InputError("empty_input", "audio chunk is empty")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _float_list(value: Any, key: str, ndim: int) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise InputError("bad_request", f'"{key}" must be a non-empty list')
    try:
        arr = np.array(value, dtype=np.float64)  # None -> nan
    except (TypeError, ValueError) as exc:
        raise InputError("bad_request", f'"{key}" must hold numbers (or null for a missing sample)') from exc
    if arr.ndim != ndim:
        want = "a list of numbers" if ndim == 1 else "a list of rows, one number per channel"
        raise InputError("bad_request", f'"{key}" must be {want}; got {arr.ndim} dimensions')
    if arr.size > MAX_JSON_SAMPLES:
        raise InputError("input_too_long", f'"{key}" holds {arr.size} values; the limit is {MAX_JSON_SAMPLES}')
    if np.any(np.isinf(arr)):
        raise InputError("bad_request", f'"{key}" holds an infinite value')
    return arr.astype(np.float32)


def decode_sensor(raw: RawInput, max_bytes: int, sample_rate: float, channels: list[str]) -> SensorBlock:
    """JSON payload -> SensorBlock; NaN (JSON null) marks missing samples for the task to report."""
    _check_size(raw, max_bytes)
    if raw.payload.lstrip()[:1] != b"{":
        raise InputError("bad_request", 'sensor input must be JSON: {"sample_rate": 1000, "samples": [[ax, ay, az], ...]}')
    obj = _json(raw, raw.payload.decode("utf-8", errors="replace"))
    if "samples" not in obj:
        raise InputError("bad_request", 'sensor JSON needs "samples": [[ch0, ch1, ...], ...]')
    samples = _float_list(obj["samples"], "samples", 2)
    rate = _number(obj, "sample_rate", sample_rate)
    names = obj.get("channels", channels)
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise InputError("bad_request", '"channels" must be a list of channel names')
    if samples.shape[1] != len(names):
        raise InputError("bad_request", f"rows have {samples.shape[1]} values but there are {len(names)} channels "
                                        f"({', '.join(names)})")
    return SensorBlock(samples, rate or 0.0, tuple(names), t0=_number(obj, "t0", None),
                       stream=_stream(obj, raw.origin.split(":", 1)[-1]))
