"""Structured pruning: the rebuilt model is exactly the masked original, smaller, and recovers its accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_slm.errors import ConfigError, ConversionError

DIM, HEADS, FFN, LAYERS, LENGTH = 64, 4, 128, 2, 24


@dataclass
class Intent2:
    path: Path
    tokenizer: Path
    vocab: int
    n_classes: int
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    train_texts: list[str]
    test_texts: list[str]
    labels: list[str]


@pytest.fixture(scope="module")
def intent2(tmp_path_factory) -> Intent2:  # noqa: ANN001
    """A 2-layer, 4-head intent transformer trained for a few epochs."""
    from converters.datasets.smart_home import LABELS, generate
    from converters.text_classifier import build_model, train_tokenizer
    from converters.tf_env import tf
    from edge_slm.text import TextEncoder

    keras = tf().keras
    work = tmp_path_factory.mktemp("intent2")
    train, test = generate(per_intent=120)
    tok = train_tokenizer(train.texts, 800)
    tok.save(str(work / "tokenizer.json"))
    enc = TextEncoder(tok, LENGTH)
    xtr, ytr = enc.encode_batch(train.texts), np.asarray(train.labels, dtype=np.int32)
    xte, yte = enc.encode_batch(test.texts), np.asarray(test.labels, dtype=np.int32)
    model = build_model(tok.get_vocab_size(), LENGTH, len(LABELS), dim=DIM, heads=HEADS, ffn=FFN, layers=LAYERS)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(xtr, ytr, epochs=6, batch_size=32, verbose=0)
    path = work / "model.keras"
    model.save(path)
    return Intent2(path, work / "tokenizer.json", tok.get_vocab_size(), len(LABELS), (xtr, ytr), (xte, yte),
                   list(train.texts), list(test.texts), list(LABELS))


def _load(path: Path):  # noqa: ANN202
    from converters.tf_env import tf

    return tf().keras.models.load_model(path, compile=False)


def _transformer_params(vocab: int, n_classes: int, blocks: list[tuple[int, int]]) -> int:
    """Hand count: embeddings, per block (heads, ffn) MHA + 2 LN + FFN, then Dense(dim) and logits."""
    hd = DIM // HEADS
    total = vocab * DIM  # build_model adds its position embedding as a constant, not a weight
    for h, f in blocks:
        total += 3 * (DIM * h * hd + h * hd) + (h * hd * DIM + DIM)  # q, k, v kernels+biases; output
        total += 2 * 2 * DIM  # ln1, ln2 gamma+beta
        total += DIM * f + f + f * DIM + DIM  # ffn1, ffn2
    return total + DIM * DIM + DIM + DIM * n_classes + n_classes


def _masked(model, kept: dict[str, list[int]]):  # noqa: ANN001, ANN202
    """A copy of MODEL with the removed heads' output rows and removed neurons' ffn2 rows zeroed."""
    from converters.tf_env import tf

    keras = tf().keras
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    for i in range(LAYERS):
        mha = m.get_layer(f"mha_{i}")
        if mha.name in kept:
            out = next(w for w in mha.weights if w.path.endswith("attention_output/kernel"))
            v = out.numpy()
            v[[h for h in range(v.shape[0]) if h not in kept[mha.name]]] = 0.0
            out.assign(v)
        f2 = m.get_layer(f"ffn2_{i}")
        if f"ffn1_{i}" in kept:
            k = f2.kernel.numpy()
            k[[j for j in range(k.shape[0]) if j not in kept[f"ffn1_{i}"]]] = 0.0
            f2.kernel.assign(k)
    return m


@pytest.mark.parametrize("score", ["magnitude", "taylor"])
def test_heads_and_ffn_slicing_equals_masking(intent2: Intent2, score: str) -> None:
    from converters.prune import PrunePlan, count_params, prune_with_info

    model = _load(intent2.path)
    calib = (intent2.train[0][:128], intent2.train[1][:128])
    pruned, kept = prune_with_info(model, PrunePlan(heads=0.5, ffn=0.5), score=score, calib=calib)
    assert [len(kept[f"mha_{i}"]) for i in range(LAYERS)] == [2, 2]
    assert [len(kept[f"ffn1_{i}"]) for i in range(LAYERS)] == [64, 64]
    assert pruned.get_layer("mha_0").num_heads == 2 and pruned.get_layer("ffn1_1").units == 64
    assert count_params(pruned) == _transformer_params(intent2.vocab, intent2.n_classes, [(2, 64), (2, 64)])
    x = intent2.test[0][:64]
    want = np.asarray(_masked(model, kept).predict(x, verbose=0))
    got = np.asarray(pruned.predict(x, verbose=0))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and it really changed something: the original's logits differ
    assert np.abs(np.asarray(model.predict(x, verbose=0)) - got).max() > 1e-3


def test_scores_rank_differently_and_taylor_uses_data(intent2: Intent2) -> None:
    from converters.prune import PrunePlan, prune_with_info

    model = _load(intent2.path)
    plan = PrunePlan(ffn=0.5)
    _, mag = prune_with_info(model, plan, score="magnitude")
    _, t1 = prune_with_info(model, plan, score="taylor", calib=(intent2.train[0][:128], intent2.train[1][:128]))
    _, t2 = prune_with_info(model, plan, score="taylor", calib=(intent2.train[0][-128:], intent2.train[1][-128:]))
    assert mag["ffn1_0"] != t1["ffn1_0"]
    assert t1["ffn1_0"] != t2["ffn1_0"]  # data-driven: another calibration batch ranks neurons differently


def test_drop_layer_matches_original_blocks_skipped(intent2: Intent2) -> None:
    from converters.prune import PrunePlan, count_params, prune
    model = _load(intent2.path)
    pruned = prune(model, PrunePlan(layers=[1]))
    assert count_params(pruned) == _transformer_params(intent2.vocab, intent2.n_classes, [(HEADS, FFN)])
    x = intent2.test[0][:32]
    g = model.get_layer
    from converters.prune import _position_constant

    h = g("tok_emb")(x) + _position_constant(model)
    h = g("ln1_0")(h + g("mha_0")(h, h))
    h = g("ln2_0")(h + g("ffn2_0")(g("ffn1_0")(h)))
    for layer in model.layers[model.layers.index(g("ln2_1")) + 1:]:
        h = layer(h)
    np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(h), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pruned_recovered(intent2: Intent2, tmp_path_factory):  # noqa: ANN001, ANN201
    from converters.prune import PrunePlan, accuracy, prune, recover

    model = _load(intent2.path)
    pruned = prune(model, PrunePlan(heads=0.5, ffn=0.5, layers=[1]), score="taylor",
                   calib=(intent2.train[0][:256], intent2.train[1][:256]))
    before = accuracy(pruned, intent2.test)
    info = recover(pruned, intent2.train, intent2.test, epochs=3)
    path = tmp_path_factory.mktemp("pruned") / "pruned.keras"
    pruned.save(path)
    return path, before, info, accuracy(model, intent2.test)


def test_full_plan_param_count_and_recovery(intent2: Intent2, pruned_recovered) -> None:  # noqa: ANN001
    from converters.prune import count_params

    path, before, info, original_acc = pruned_recovered
    pruned = _load(path)
    assert count_params(pruned) == _transformer_params(intent2.vocab, intent2.n_classes, [(2, 64)])
    assert info["method"] == "fine-tune"
    assert original_acc > 0.6, original_acc  # held-out phrasings (chance: 1/14); a tiny model stays below 100%
    assert info["eval_accuracy"] >= original_acc - 0.05, (before, info, original_acc)


def test_pruned_tflite_is_smaller_with_fewer_ops(intent2: Intent2, pruned_recovered) -> None:  # noqa: ANN001
    """Size strictly smaller; speed via a deterministic proxy (fewer ops, smaller tensors); the measured
    side-by-side latency is reported (printed), not asserted: timing assertions are flaky on shared CI."""
    from converters.size_report import Candidate, build_report, format_table
    from edge_slm import runtime

    path = pruned_recovered[0]
    rep = build_report([Candidate("original", intent2.path, "dynamic"), Candidate("pruned", path, "dynamic")],
                       calib=intent2.train[0][:64], eval_data=intent2.test,
                       teacher="original", runs=300)
    rows = {r["name"]: r for r in rep["candidates"]}
    assert rows["pruned"]["size_bytes"] < 0.8 * rows["original"]["size_bytes"]
    assert rows["pruned"]["params"] < rows["original"]["params"]
    assert rows["pruned"]["accuracy"] >= rows["original"]["accuracy"] - 0.08
    print("\n" + format_table(rep))
    from converters import recipes
    from converters.source_model import source_from_keras

    ops = {}
    for name, p in (("original", intent2.path), ("pruned", path)):
        m = runtime.load(content=recipes.convert(source_from_keras(_load(p), p), "dynamic", None))
        ops[name] = len(m._interp._get_ops_details())  # noqa: SLF001 - every op instance, not the distinct names
    assert ops["pruned"] < ops["original"], ops


def test_conv_channels_slicing_equals_masking(sensor_model) -> None:  # noqa: ANN001
    from converters.prune import PrunePlan, count_params, prune_with_info
    from converters.tf_env import tf

    keras = tf().keras
    model = _load(sensor_model.keras_path)
    ev = np.load(sensor_model.eval)
    for score in ("magnitude", "taylor"):
        pruned, kept = prune_with_info(model, PrunePlan(channels=0.5), score=score, calib=(ev["x"][:64], ev["y"][:64]))
        convs = [la for la in pruned.layers if type(la).__name__ == "Conv1D"]
        assert [c.filters for c in convs] == [16, 32]
        # hand count: conv(5x2->16), conv(3x16->32), dense(32->64), dense(64->3)
        assert count_params(pruned) == (5 * 2 * 16 + 16) + (3 * 16 * 32 + 32) + (32 * 64 + 64) + (64 * 3 + 3)
        masked = keras.models.clone_model(model)
        masked.set_weights(model.get_weights())
        layers = [la for la in masked.layers if la.weights]
        for conv, nxt in zip(layers, layers[1:]):
            if conv.name in kept:
                k = nxt.kernel.numpy()
                drop = [c for c in range(k.shape[-2]) if c not in kept[conv.name]]
                k[..., drop, :] = 0.0
                nxt.kernel.assign(k)
        x = ev["x"][:50]
        np.testing.assert_allclose(np.asarray(pruned.predict(x, verbose=0)), np.asarray(masked.predict(x, verbose=0)),
                                   rtol=1e-4, atol=1e-4)


def test_cli_prunes_recovers_with_distill_and_reports(intent2: Intent2, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    import json

    from converters.prune import main

    def tsv(name: str, texts: list[str], ys: np.ndarray) -> Path:
        p = tmp_path / name
        p.write_text("".join(f"{t}\t{intent2.labels[y]}\n" for t, y in zip(texts, ys)))
        return p

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(intent2.labels) + "\n")
    train = tsv("train.tsv", intent2.train_texts[:600], intent2.train[1][:600])
    ev = tsv("eval.tsv", intent2.test_texts[:200], intent2.test[1][:200])
    out = tmp_path / "pruned.keras"
    assert main(["prune", str(intent2.path), "--train", str(train), "--eval", str(ev), "--labels", str(labels),
                 "--tokenizer", str(intent2.tokenizer), "--heads", "0.5", "--ffn", "0.5", "--drop-layers", "1",
                 "--recover-epochs", "1", "-o", str(out), "--report", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[: text.index("\n}\n") + 2])
    assert summary["recovery"]["method"] == "distill"
    assert summary["pruned"]["heads"] == [2] and summary["pruned"]["ffn"] == [64]
    assert out.is_file() and (tmp_path / "rep" / "tradeoff.svg").is_file()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["name"] for r in rep["candidates"]] == ["original", "pruned"]
    assert "edge-slm convert" in text


def test_help_has_example(capsys) -> None:  # noqa: ANN001
    from converters.prune import main

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "edge-slm prune model.keras" in capsys.readouterr().out


def test_bad_input_errors(intent2: Intent2, sensor_model) -> None:  # noqa: ANN001
    from converters.prune import PrunePlan, prune
    from converters.tf_env import tf

    keras = tf().keras
    model = _load(intent2.path)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"outside \(0, 1\)"):
            prune(model, PrunePlan(heads=bad))
    with pytest.raises(ConfigError, match="no layer 5"):
        prune(model, PrunePlan(layers=[5]))
    with pytest.raises(ConfigError, match="leave none"):
        prune(model, PrunePlan(layers=[0, 1]))
    with pytest.raises(ConfigError, match="unknown importance score"):
        prune(model, PrunePlan(heads=0.5), score="random")
    with pytest.raises(ConfigError, match="needs calib"):
        prune(model, PrunePlan(heads=0.5), score="taylor")
    with pytest.raises(ConfigError, match="conv model"):
        prune(_load(sensor_model.keras_path), PrunePlan(heads=0.5))
    inp = keras.Input((8,))
    mlp = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(16, name="hidden")(inp)), name="mlp")
    with pytest.raises(ConversionError, match="mlp: cannot prune this kind of model"):
        prune(mlp, PrunePlan(ffn=0.5))
