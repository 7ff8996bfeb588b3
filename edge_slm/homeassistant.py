"""Home Assistant MQTT discovery: one sensor per pipeline, availability from the status topic.

Standard library only. Configs are retained and re-published when `<prefix>/status` says online.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_slm import __version__
from edge_slm.mqtt import Topics

# HA keeps a state of at most 255 characters; longer text goes to the attributes only.
STATE_TEMPLATES = {
    "text-classification": "{{ value_json.output.label }}",
    "embedding": "{{ value_json.output.label | default(value_json.output.dim) }}",
    "text-generation": "{{ value_json.output.text[:250] }}",
}


def _slug(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "_", s)


def discovery_messages(topics: Topics, pipelines: list[tuple[str, str, dict[str, str]]],
                       prefix: str = "homeassistant") -> list[tuple[str, bytes]]:
    """[(topic, retained payload)] for pipelines given as (name, task, model identity)."""
    device_id = topics.device_id
    node = _slug(f"edge_slm_{device_id}")
    device = {
        "identifiers": [f"edge-slm-{device_id}"],
        "name": f"edge-slm {device_id}",
        "manufacturer": "edge-slm",
        "sw_version": __version__,
    }
    out: list[tuple[str, bytes]] = []
    for name, task, model in pipelines:
        config: dict[str, Any] = {
            "name": name,
            "unique_id": f"edge-slm-{device_id}-{name}",
            "object_id": _slug(f"{device_id}_{name}"),
            "state_topic": topics.result(name),
            "value_template": STATE_TEMPLATES.get(task, "{{ value_json.seq }}"),
            "json_attributes_topic": topics.result(name),
            "json_attributes_template": "{{ {'input_id': value_json.input_id, 'seq': value_json.seq, "
                                        "'latency_ms': value_json.latency_ms, 'output': value_json.output} | tojson }}",
            "availability_topic": topics.status,
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "icon": "mdi:chip",
            "device": device | {"model": f"{model.get('name', '?')} {model.get('version', '')}".strip()},
        }
        out.append((f"{prefix}/sensor/{node}/{_slug(name)}/config", json.dumps(config).encode()))
    latency = {
        "name": "inference latency p50",
        "unique_id": f"edge-slm-{device_id}-latency",
        "object_id": _slug(f"{device_id}_latency_p50"),
        "state_topic": topics.metrics,
        "value_template": "{{ (value_json.pipelines.values() | map(attribute='latency_ms_p50') | select | list | max) "
                          "if value_json.pipelines else none }}",
        "unit_of_measurement": "ms",
        "state_class": "measurement",
        "availability_topic": topics.status,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
    }
    out.append((f"{prefix}/sensor/{node}/latency/config", json.dumps(latency).encode()))
    return out
