"""A pipeline: decode each input, run the task, hand a result or an error record to the sinks.

Per-input failures become error records with a stable code; the loop never stops for one.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_slm.errors import EdgeSlmError, InputError
from edge_slm.media_input import decode_audio, decode_sensor
from edge_slm.mqtt import MqttLink, Topics
from edge_slm.outbox import Outbox
from edge_slm.seq import SeqCounter
from edge_slm.sources import RawInput, next_input_id
from edge_slm.streams import StreamEnd
from edge_slm.tasks import Task

log = logging.getLogger(__name__)

RECORD_SCHEMA = 1
_END = object()


def decode_input(raw: RawInput, max_bytes: int) -> tuple[str, str]:
    """Payload bytes -> (input_id, text); see decode_request."""
    input_id, text, _ = decode_request(raw, max_bytes)
    return input_id, text


def decode_request(raw: RawInput, max_bytes: int) -> tuple[str, str, dict[str, Any]]:
    """Payload bytes -> (input_id, text, params). UTF-8 text, or JSON {"text": ..., "id": ..., PARAMS}.

    PARAMS are task options such as a generation's max_new_tokens or temperature.

    Sets raw.input_id as soon as it is known, so an error record can still name the input.
    """
    if raw.input_id is None:
        raw.input_id = next_input_id()
    input_id = raw.input_id
    if len(raw.payload) > max_bytes:
        raise InputError("input_too_long", f"input is {len(raw.payload)} bytes; the limit is {max_bytes} (max_input_bytes)")
    try:
        text = raw.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("bad_encoding", f"input is not UTF-8 (byte {exc.start}); send UTF-8 text or JSON") from exc
    params: dict[str, Any] = {}
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError("bad_json", f"input looks like JSON but does not parse: {exc.msg} at {exc.pos}") from exc
        except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, or nesting too deep
            raise InputError("bad_json", f"input JSON is not acceptable: {type(exc).__name__}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError("bad_request", 'JSON input needs a "text" string, e.g. {"id": "a1", "text": "turn on the light"}')
        if "id" in obj:
            if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                raise InputError("bad_request", 'JSON input "id" must be a string or integer')
            input_id = str(obj["id"])[:128]
            try:
                input_id.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError("bad_request", 'JSON input "id" is not valid Unicode') from exc
            if input_id:  # an empty id is no id: keep the generated one
                raw.input_id = input_id
            input_id = raw.input_id
        text = obj["text"]
        params = {k: v for k, v in obj.items() if k not in ("id", "text")}
    if not text.strip():
        raise InputError("empty_input", "input text is empty")
    return input_id, text, params


class StdoutSink:
    """One JSON line per record on stdout."""

    def __init__(self, stream=None) -> None:  # noqa: ANN001
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def emit(self, kind: str, pipeline: str, record: dict[str, Any]) -> None:
        if kind == "token":
            return  # stdout carries whole records only
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        pass


class MqttSink:
    """Publishes results and errors at the configured QoS, through the durable outbox when there is one."""

    def __init__(self, link: MqttLink, topics: Topics, outbox: Outbox | None = None) -> None:
        self.link = link
        self.topics = topics
        self.outbox = outbox

    def emit(self, kind: str, pipeline: str, record: dict[str, Any]) -> None:
        if kind == "token":
            # tokens are a live view; the whole answer goes to result at QoS 1
            self.link.publish(self.topics.tokens(pipeline), json.dumps(record, separators=(",", ":")).encode(), qos=0)
            return
        topic = self.topics.result(pipeline) if kind == "result" else self.topics.error(pipeline)
        payload = json.dumps(record, separators=(",", ":")).encode()
        if self.outbox is None:
            self.link.publish(topic, payload)
            return
        try:
            # False: refused by outbox.overflow = "reject_new"; the outbox counts and logs it.
            self.outbox.put(topic, payload)
        except EdgeSlmError:
            # The disk refused it: paho's memory still delivers it unless this process dies first.
            log.exception("pipeline %s: outbox write failed; publishing seq %s without it", pipeline, record.get("seq"))
            self.link.publish(topic, payload)

    def close(self) -> None:
        pass


class Pipeline:
    """Queue -> worker thread -> task -> sinks. Inputs are handled in arrival order."""

    def __init__(
        self,
        name: str,
        device_id: str,
        task: Task,
        seq: SeqCounter,
        sinks: list,
        *,
        max_input_bytes: int = 65536,
        queue_size: int = 1000,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
        stream_tokens: bool = True,
    ) -> None:
        self.name = name
        self.stream_tokens = stream_tokens
        self.device_id = device_id
        self.task = task
        self.seq = seq
        self.sinks = sinks
        self.max_input_bytes = max_input_bytes
        self.on_record = on_record
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.counts = {"results": 0, "errors": 0}
        self._thread = threading.Thread(target=self._work, name=f"pipeline-{name}", daemon=True)
        self.done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def submit(self, raw: RawInput) -> None:
        # Blocking put: back-pressure on the source rather than dropping an accepted input.
        self.queue.put(raw)

    def end(self) -> None:
        """No more input will come: finish what is queued, then stop."""
        self.queue.put(_END)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is _END:
                    return
                self.handle(item)
        finally:
            self.done.set()

    def handle(self, raw: RawInput) -> dict[str, Any] | list[dict[str, Any]]:
        """Process one input synchronously; returns the record that went to the sinks.

        Streaming (audio, sensor) tasks return the list of records the input produced: zero or more.
        """
        if getattr(self.task, "input_kind", "text") != "text":
            return self._handle_stream(raw)
        model = self.task.package.identity()
        try:
            input_id, text, params = decode_request(raw, self.max_input_bytes)
            on_token = self._token_emitter(input_id) if self.stream_tokens else None
            output = self.task(text, params, on_token)
        except InputError as exc:
            return self._emit("error", self._error(raw.input_id, exc.code, str(exc), model))
        except Exception as exc:  # a bug or a runtime failure: report it, keep serving
            log.exception("pipeline %s: inference failed", self.name)
            return self._emit("error", self._error(raw.input_id, "inference_failed", f"{type(exc).__name__}: {exc}", model))
        record = self._header(input_id) | {
            "model": model,
            "output": output,
            "latency_ms": round((time.monotonic() - raw.received) * 1000.0, 3),
        }
        return self._emit("result", record)

    def _handle_stream(self, raw: RawInput) -> list[dict[str, Any]]:
        """A block (from a media source or decoded from a payload) -> the task -> one record per output."""
        task = self.task
        model = task.package.identity()
        try:
            outputs = self._feed(task, raw)
        except InputError as exc:
            return [self._emit("error", self._error(raw.input_id, exc.code, str(exc), model))]
        except Exception as exc:  # a bug or a runtime failure: report it, keep serving
            log.exception("pipeline %s: inference failed", self.name)
            return [self._emit("error", self._error(raw.input_id, "inference_failed", f"{type(exc).__name__}: {exc}", model))]
        records = []
        for out in outputs:
            if isinstance(out, InputError):
                records.append(self._emit("error", self._error(raw.input_id, out.code, str(out), model)))
                continue
            records.append(self._emit("result", self._header(raw.input_id) | {
                "model": model,
                "output": out,
                "latency_ms": round((time.monotonic() - raw.received) * 1000.0, 3),
            }))
        return records

    def _feed(self, task: Any, raw: RawInput) -> list[Any]:
        if raw.input_id is None:
            raw.input_id = next_input_id()
        if isinstance(raw.data, InputError):  # a source could not read it (a file that is not audio)
            raise raw.data
        if isinstance(raw.data, StreamEnd):
            return task.flush()
        if raw.data is not None:
            return task.feed(raw.data)
        if task.input_kind == "audio":
            block, whole_clip = decode_audio(raw, self.max_input_bytes, task.sample_rate)
            if whole_clip:  # a WAV file on its own: one answer for the clip
                return [task.classify(block.samples, block.sample_rate)]
            return task.feed(block)
        return task.feed(decode_sensor(raw, self.max_input_bytes, task.sample_rate, list(task.channels)))

    def _header(self, input_id: str | None) -> dict[str, Any]:
        """What results and error records share; takes the next seq."""
        return {
            "schema_version": RECORD_SCHEMA,
            "device_id": self.device_id,
            "pipeline": self.name,
            "seq": self.seq.next(),
            "ts": round(time.time(), 3),
            "input_id": input_id,
        }

    def _token_emitter(self, input_id: str) -> Callable[[dict[str, Any]], None]:
        def emit(token: dict[str, Any]) -> None:
            record = {"device_id": self.device_id, "pipeline": self.name, "input_id": input_id, **token}
            for sink in self.sinks:
                try:
                    sink.emit("token", self.name, record)
                except Exception:
                    log.exception("pipeline %s: sink %s failed on a token", self.name, type(sink).__name__)

        return emit

    def _error(self, input_id: str | None, code: str, message: str, model: dict[str, str]) -> dict[str, Any]:
        return self._header(input_id) | {"error": code, "message": message, "model": model}

    def _emit(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        self.counts["results" if kind == "result" else "errors"] += 1
        for sink in self.sinks:
            try:
                sink.emit(kind, self.name, record)
            except Exception:  # one broken sink must not take the others down
                log.exception("pipeline %s: sink %s failed", self.name, type(sink).__name__)
        if self.on_record is not None:
            self.on_record(kind, record)
        return record
