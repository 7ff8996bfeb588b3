"""`edge-slm convert CHECKPOINT_DIR`: a fine-tuned BERT and a sentence encoder to validated packages."""

from __future__ import annotations

import json

import numpy as np

from converters.convert import convert_model
from edge_slm.package import ModelPackage
from edge_slm.tasks import load_task
from tests.conftest import run_cli


def test_fine_tuned_bert_checkpoint_converts_and_keeps_agreement(bert_intent_checkpoint, tmp_path):
    ck = bert_intent_checkpoint
    res = run_cli("convert", str(ck.path), "-o", str(tmp_path / "pkg"), "--eval", str(ck.eval_txt),
                  "--calib", str(ck.calib_txt), "--max-length", "32", "--json")
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    report = json.loads(res.stdout)
    tried = {t["recipe"]: t for t in report["tried"]}
    assert set(tried) == {"int8", "int8-float-attention", "dynamic"}
    chosen = tried[report["chosen"]]
    assert chosen["top1_agreement"] >= 0.99
    assert chosen["accuracy_quantized"] > 0.5
    pkg = ModelPackage.open(tmp_path / "pkg")
    assert pkg.task == "text-classification" and pkg.labels == ck.labels
    assert pkg.manifest["source"]["format"] == "checkpoint"
    assert {t["name"].split(":")[0].removeprefix("serving_default_") for t in pkg.manifest["inputs"]} == {
        "input_ids", "attention_mask"}
    # the device task tokenizes with [CLS]/[SEP] and a mask, and agrees with the PyTorch model
    import torch
    from transformers import BertForSequenceClassification

    ref = BertForSequenceClassification.from_pretrained(ck.path).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ck.path / "tokenizer.json"))
    task = load_task(pkg)
    texts = [line.split("\t")[0] for line in ck.eval_txt.read_text().splitlines()[:60]]
    agree = 0
    for t in texts:
        enc = tok.encode(t)
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([enc.ids]), attention_mask=torch.tensor([enc.attention_mask])).logits
        agree += task(t)["label"] == ck.labels[int(logits.argmax())]
    assert agree / len(texts) >= 0.95


def test_sentence_encoder_becomes_an_intent_recogniser(bert_intent_checkpoint, tmp_path):
    """The BERT body in a sentence-transformers layout: embedding package + example phrases."""
    import shutil

    from converters.datasets.smart_home import INTENTS
    from edge_slm.config import PipelineConfig

    st = tmp_path / "st"
    shutil.copytree(bert_intent_checkpoint.path, st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                              "pooling_mode_mean_tokens": True}))
    eval_txt = tmp_path / "eval.txt"
    eval_txt.write_text("\n".join(bert_intent_checkpoint.eval_txt.read_text().split("\n")[i].split("\t")[0]
                                  for i in range(100)) + "\n")
    res = convert_model(st, tmp_path / "pkg", eval_data=eval_txt, quantize="dynamic", max_length=32, progress=False)
    m = res.package.manifest
    assert m["task"] == "embedding" and m["validation"]["quantized"]["cosine_mean"] >= 0.99
    examples = {k: [v[0].format(room="kitchen", light="light", n="50", t="21", door="front door",
                                song="jazz", min="5 minutes", when="today")] for k, v in INTENTS.items()}
    task = load_task(res.package, options=PipelineConfig(name="e", model="x", examples=examples))
    out = task("turn on the kitchen light please")
    assert out["label"] == "lights_on" and out["score"] > 0.9
    assert "embedding" not in out
    vec = load_task(res.package)("turn on the kitchen light please")["embedding"]
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-3
