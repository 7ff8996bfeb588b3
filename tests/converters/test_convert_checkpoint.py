"""`edge-slm convert CHECKPOINT_DIR`: a fine-tuned BERT and a sentence encoder to validated packages."""

from __future__ import annotations

import json

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


def test_sharded_checkpoint_converts_like_the_single_file(bert_intent_checkpoint, tmp_path):
    import shutil

    from transformers import BertForSequenceClassification

    from converters.convert import convert_model

    ck = bert_intent_checkpoint
    sharded = tmp_path / "sharded"
    BertForSequenceClassification.from_pretrained(ck.path).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(ck.path / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    res = convert_model(sharded, tmp_path / "pkg", eval_data=ck.eval_txt, quantize="dynamic", max_length=32,
                        progress=False)
    assert res.package.manifest["validation"]["quantized"]["top1_agreement"] >= 0.99


def test_checkpoint_without_tokenizer_is_refused_and_nothing_written(bert_intent_checkpoint, tmp_path):
    import shutil

    import pytest

    from converters.convert import convert_model
    from edge_slm.errors import ConversionError

    ck = tmp_path / "no-tok"
    shutil.copytree(bert_intent_checkpoint.path, ck)
    (ck / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer.json"):
        convert_model(ck, tmp_path / "pkg", eval_data=bert_intent_checkpoint.eval_txt, quantize="dynamic",
                      progress=False)
    assert not (tmp_path / "pkg").exists()


def test_eval_labels_outside_the_label_set_are_named(bert_intent_checkpoint, tmp_path):
    import pytest

    from converters.convert import convert_model
    from edge_slm.errors import ConversionError

    bad = tmp_path / "bad.tsv"
    bad.write_text("turn on the light\tlights_on\nmake coffee\tbrew_coffee\n")
    with pytest.raises(ConversionError, match="'brew_coffee' on example 2 is not in the label set"):
        convert_model(bert_intent_checkpoint.path, tmp_path / "pkg", eval_data=bad, quantize="dynamic",
                      progress=False)
