"""Keras encoders built from safetensors match transformers' own BERT/DistilBERT, heads and all.

Tiny random checkpoints are written by transformers in tmp dirs; PyTorch is only the reference here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from converters.checkpoint.encoders import build_encoder
from converters.checkpoint.loader import open_checkpoint
from converters.tf_env import tf
from edge_slm.errors import ConversionError

LENGTH = 16
LENGTHS = [16, 11, 5, 1]  # real tokens per row: no padding, two pad lengths, a lone [CLS]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
DISTIL = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)


def _save(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    # HF init (std 0.02, LayerNorm 1/0) makes every output near zero; noise on every tensor gives a
    # reference where a transposed kernel or swapped LayerNorm weight/bias cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    model.eval().save_pretrained(path)
    return model


def _sentence_layout(root: Path, transformer_path: str, pooling: dict, normalize: bool) -> torch.nn.Module:
    model = _save(transformers.BertModel(transformers.BertConfig(**BERT)), root / transformer_path)
    modules = [{"idx": 0, "name": "0", "path": transformer_path, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (root / "2_Normalize").mkdir()
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("encoders")
    made = {
        "bert": transformers.BertModel(transformers.BertConfig(**BERT)),
        "bert_cls": transformers.BertForSequenceClassification(
            transformers.BertConfig(**BERT, hidden_act="gelu_new", num_labels=3, id2label=LABELS)),
        "distil": transformers.DistilBertModel(transformers.DistilBertConfig(**DISTIL, activation="relu")),
        "distil_cls": transformers.DistilBertForSequenceClassification(
            transformers.DistilBertConfig(**DISTIL, num_labels=3, id2label=LABELS)),
    }
    out = {name: (root / name, _save(model, root / name)) for name, model in made.items()}
    out["st_mean"] = (root / "st_mean", _sentence_layout(root / "st_mean", "", {"pooling_mode_mean_tokens": True},
                                                         normalize=True))
    out["st_cls_max"] = (root / "st_cls_max", _sentence_layout(
        root / "st_cls_max", "0_Transformer",
        {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
        normalize=False))
    return out


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = (np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    ids = rng.integers(1, 100, size=(len(LENGTHS), LENGTH)).astype(np.int32) * mask  # pad id 0
    return ids, mask


def _torch(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray):  # noqa: ANN202
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))


def _reference_embedding(hidden: np.ndarray, mask: np.ndarray, modes: list[str], normalize: bool) -> np.ndarray:
    """sentence-transformers' pooling and Normalize, written out in numpy."""
    m = mask[..., None].astype(np.float32)
    parts = {"cls": hidden[:, 0], "max": np.where(m > 0, hidden, -1e9).max(1),
             "mean": (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)}
    out = np.concatenate([parts[k] for k in modes], axis=-1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


@pytest.mark.parametrize("name", ["bert_cls", "distil_cls"])
def test_classifier_logits_match_transformers(ckpts, batch, name):
    path, model = ckpts[name]
    ckpt = open_checkpoint(path)
    assert ckpt.head == "classification" and ckpt.labels == ["negative", "neutral", "positive"]
    keras_model = build_encoder(ckpt, LENGTH)
    assert [t.name for t in keras_model.inputs] == ["input_ids", "attention_mask"]
    assert keras_model.output_names == ["logits"]
    got = np.asarray(keras_model([*batch], training=False))
    want = _torch(model, *batch).logits.numpy()
    assert got.shape == (len(LENGTHS), 3)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name,modes,normalize", [
    ("bert", ["mean"], True),  # a bare HF checkpoint: mean pooling, normalized
    ("distil", ["mean"], True),
    ("st_mean", ["mean"], True),
    ("st_cls_max", ["cls", "max"], False),
])
def test_embedding_matches_transformers_pooled(ckpts, batch, name, modes, normalize):
    path, model = ckpts[name]
    ckpt = open_checkpoint(path)
    assert ckpt.head == "embedding" and ckpt.normalize == normalize
    keras_model = build_encoder(ckpt, LENGTH)
    assert keras_model.output_names == ["embedding"]
    got = np.asarray(keras_model([*batch], training=False))
    hidden = _torch(model, *batch).last_hidden_state.numpy()
    want = _reference_embedding(hidden, batch[1], modes, normalize)
    assert got.shape == (len(LENGTHS), 32 * len(modes))
    assert np.abs(got - want).max() < 1e-4


def _copy(ckpts, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(ckpts[name][0], dst)
    return dst


def test_tensor_of_wrong_shape_is_named(ckpts, tmp_path):
    path = _copy(ckpts, "bert", tmp_path)
    tensors = load_file(path / "model.safetensors")
    bad = "encoder.layer.1.intermediate.dense.weight"
    tensors[bad] = tensors[bad][:63]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=bad.replace(".", r"\.") + r".*\(63, 32\).*\(64, 32\)"):
        build_encoder(open_checkpoint(path), LENGTH)


def test_unsupported_activation_and_too_long_input_name_the_config_key(ckpts, tmp_path):
    path = _copy(ckpts, "bert", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    with pytest.raises(ConversionError, match="hidden_act 'silu'"):
        build_encoder(open_checkpoint(path), LENGTH)
    with pytest.raises(ConversionError, match="max_position_embeddings = 64"):
        build_encoder(open_checkpoint(ckpts["distil"][0]), 65)


def test_unsupported_model_type_lists_supported_ones(ckpts, tmp_path):
    path = _copy(ckpts, "bert", tmp_path)
    (path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(ConversionError, match=r"'t5' is not supported.*BERT.*DistilBERT"):
        open_checkpoint(path)


def test_truncated_safetensors_is_a_conversion_error(ckpts, tmp_path):
    path = _copy(ckpts, "bert", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="model.safetensors"):
        build_encoder(open_checkpoint(path), LENGTH)


def _tflite_outputs(keras_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dynamic-range TFLite of a batch-1 copy of the model, run row by row with ai-edge-litert."""
    from ai_edge_litert.interpreter import Interpreter

    t = tf()
    keras = t.keras
    names = ("input_ids", "attention_mask")
    inputs = [keras.Input(shape=(LENGTH,), batch_size=1, dtype="int32", name=n) for n in names]
    fixed = keras.Model(inputs, keras_model(inputs))
    conv = t.lite.TFLiteConverter.from_keras_model(fixed)
    conv.optimizations = [t.lite.Optimize.DEFAULT]
    interp = Interpreter(model_content=conv.convert())
    ops = {d["op_name"] for d in interp._get_ops_details()}
    assert not ops & {"EINSUM", "FLEX_EINSUM", "CUSTOM"}, ops
    run = interp.get_signature_runner()
    rows = []
    for i in range(len(ids)):
        res = run(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        (out,) = res.values()
        rows.append(out[0])
    return np.stack(rows)


def test_dynamic_range_tflite_agrees_with_keras(ckpts, batch):
    classifier = build_encoder(open_checkpoint(ckpts["bert_cls"][0]), LENGTH)
    want = np.asarray(classifier([*batch], training=False))
    got = _tflite_outputs(classifier, *batch)
    assert (got.argmax(-1) == want.argmax(-1)).all(), (got, want)

    embedder = build_encoder(open_checkpoint(ckpts["st_mean"][0]), LENGTH)
    want = np.asarray(embedder([*batch], training=False))
    got = _tflite_outputs(embedder, *batch)
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() > 0.99, cosine
