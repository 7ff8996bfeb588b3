"""No pickle, no eval/exec, no shell built from strings anywhere in the shipped packages."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|marshal|shelve)\b"), "pickle-like deserialisation"),
    (re.compile(r"(?<![\w.])eval\("), "eval"),
    (re.compile(r"(?<![\w.])exec\("), "exec"),
    (re.compile(r"shell\s*=\s*True"), "a shell"),
    (re.compile(r"\bos\.(system|popen)\("), "a shell"),
    (re.compile(r"allow_pickle\s*=\s*True"), "pickled numpy arrays"),
    (re.compile(r"\byaml\.load\("), "unsafe YAML"),
]


def test_shipped_code_never_evaluates_or_unpickles_payloads():
    offences = []
    for package in ("edge_slm", "converters", "devices", "firmware_bridge"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                for pattern, what in FORBIDDEN:
                    if pattern.search(line):
                        offences.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not offences, "\n".join(offences)
