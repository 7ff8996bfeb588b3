"""Knowledge distillation: a wide teacher into a 4x+ smaller student that keeps its accuracy, then int8 in the agent."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from converters.datasets.smart_home import LABELS, generate
from converters.distill import add_cli, load_teacher, run_distill
from converters.student import StudentConfig
from edge_slm.errors import ConfigError, ConversionError
from tests.conftest import run_cli, write_agent_toml

SMALL = StudentConfig(layers=1, hidden=32, heads=2, ffn=64)


@dataclass
class Intents:
    work: Path
    teacher: Path
    train: Path
    eval: Path
    labels: Path
    test_texts: list[str]
    test_labels: list[int]


def _write(path: Path, texts: list[str], labels: list[int]) -> Path:
    path.write_text("".join(f"{t}\t{LABELS[y]}\n" for t, y in zip(texts, labels)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def intents(tmp_path_factory) -> Intents:  # noqa: ANN001
    """A wide 2-block transformer teacher (dim 96, 4 heads) trained on the smart-home intents."""
    from converters.text_classifier import build_model, train_tokenizer
    from converters.tf_env import tf
    from edge_slm.text import TextEncoder

    work = tmp_path_factory.mktemp("distill")
    train, test = generate(per_intent=200)
    tok = train_tokenizer(train.texts)
    tok.save(str(work / "tokenizer.json"))
    keras = tf().keras
    model = build_model(tok.get_vocab_size(), 24, len(LABELS), dim=96, heads=4, ffn=192, layers=2)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(TextEncoder(tok, 24).encode_batch(train.texts), np.asarray(train.labels), epochs=6, batch_size=32,
              verbose=0)
    model.save(work / "teacher.keras")
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return Intents(work, work / "teacher.keras", _write(work / "train.tsv", train.texts, train.labels),
                   _write(work / "eval.tsv", test.texts, test.labels), work / "labels.txt", test.texts, test.labels)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edge-slm")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_worked_example_small_student_keeps_accuracy_and_answers_in_the_agent(intents, tmp_path, capsys):
    from converters.convert import convert_model
    from edge_slm.text import TextEncoder

    out = tmp_path / "student"
    rc = _cli("distill", str(intents.teacher), "--train", str(intents.train), "--eval", str(intents.eval),
              "--labels", str(intents.labels), "-o", str(out), "--layers", "1", "--hidden", "32", "--heads", "2",
              "--ffn", "64", "--temperature", "4", "--alpha", "0.7", "--epochs", "10", "--patience", "3", "--json")
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "distill_report.json", "labels.txt",
                                                     "student.keras", "tokenizer.json"]
    assert json.loads((out / "distill_report.json").read_text())["student"] == report["student"]
    assert report["teacher"]["params"] >= 4 * report["student"]["params"]
    ev = report["eval"]
    # held-out data includes whole phrasings the training never saw
    assert ev["teacher_accuracy"] > 0.65
    assert ev["student_accuracy"] >= 0.95 * ev["teacher_accuracy"], ev
    assert ev["agreement"] > 0.7

    enc = TextEncoder.from_file(out / "tokenizer.json", 24)
    calib, evnpz = tmp_path / "calib.npz", tmp_path / "eval.npz"
    train_texts = [line.split("\t")[0] for line in intents.train.read_text().splitlines()]
    np.savez(calib, x=enc.encode_batch(train_texts[:500]))
    np.savez(evnpz, x=enc.encode_batch(intents.test_texts[:400]), y=np.asarray(intents.test_labels[:400], np.int32))
    res = convert_model(out / "student.keras", tmp_path / "pkg", calib=calib, eval_data=evnpz, quantize="int8",
                        min_agreement=0.97, tokenizer=out / "tokenizer.json", labels=(out / "labels.txt").read_text().split(),
                        name="intents-student", progress=False)
    m = res.package.manifest
    assert m["quantization"]["recipe"] == "int8" and m["validation"]["gate"]["passed"]
    q = m["validation"]["quantized"]
    assert q["accuracy_quantized"] >= q["accuracy_float"] - 0.05, q
    asks = {"turn on the kitchen lights please": "lights_on", "lock the front door": "lock_door",
            "set a timer for 10 minutes": "set_timer", "what is the weather tomorrow": "get_weather",
            "play some jazz": "play_music", "close the blinds in the office": "close_blinds",
            "set the temperature to 21 degrees": "set_temperature", "stop the music": "stop_music"}
    cfg = write_agent_toml(tmp_path / "agent.toml", "distilled-1", "mqtt://127.0.0.1:1", res.package.path,
                           tmp_path / "state", source="stdin://", sinks=("stdout",))
    run = run_cli("run", str(cfg), input="".join(f"{t}\n" for t in asks).encode(), timeout=120)
    assert run.returncode == 0, run.stderr
    got = [json.loads(line)["output"]["label"] for line in run.stdout.decode().splitlines()]
    assert len(got) == len(asks)
    right = sum(g == want for g, want in zip(got, asks.values()))
    assert right >= len(asks) - 1, list(zip(asks, got))


def test_resume_continues_the_epoch_count_and_matches_an_uninterrupted_run(intents, tmp_path):
    common = {"train": intents.train, "eval": intents.eval, "labels": intents.labels, "student": SMALL,
              "patience": 10, "progress": False}
    whole = run_distill(intents.teacher, tmp_path / "whole", epochs=3, **common)
    first = run_distill(intents.teacher, tmp_path / "split", epochs=1, **common)
    assert first["epochs"] == 1
    state = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["fingerprint"]["student_config_hash"] == SMALL.digest()
    resumed = run_distill(intents.teacher, tmp_path / "split", epochs=3, resume=True, **common)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
        assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=0.03)
    assert resumed["eval"]["student_accuracy"] == pytest.approx(whole["eval"]["student_accuracy"], abs=0.03)


def test_resume_with_another_config_is_refused_and_nothing_is_overwritten(intents, tmp_path):
    out = tmp_path / "s"
    run_distill(intents.teacher, out, train=intents.train, eval=intents.eval, labels=intents.labels, student=SMALL,
                epochs=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = StudentConfig(layers=1, hidden=48, heads=2, ffn=64)
    with pytest.raises(ConfigError, match=r"hidden \(checkpoint 32, now 48\)"):
        run_distill(intents.teacher, out, train=intents.train, eval=intents.eval, labels=intents.labels,
                    student=other, epochs=2, resume=True, progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        run_distill(intents.teacher, out, train=intents.train, labels=intents.labels, student=SMALL, epochs=2,
                    temperature=2.0, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(ConversionError, match="--resume"):
        run_distill(intents.teacher, out, train=intents.train, labels=intents.labels, student=SMALL, epochs=1,
                    progress=False)


def test_label_outside_the_label_set_is_named_and_nothing_is_written(intents, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("turn on the lights\tlights_on\n\nmake coffee\tbrew_coffee\n")
    with pytest.raises(ConversionError, match="brew_coffee.*example 2.*line 3"):
        run_distill(intents.teacher, tmp_path / "out", train=bad, labels=intents.labels, student=SMALL, epochs=1,
                    progress=False)
    assert not (tmp_path / "out").exists()


def test_empty_dataset_and_empty_label_file_are_clear_errors(intents, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n\n")
    with pytest.raises(ConversionError, match="no text"):
        run_distill(intents.teacher, tmp_path / "out", train=empty, labels=intents.labels, student=SMALL,
                    progress=False)
    no_labels = tmp_path / "labels.txt"
    no_labels.write_text("")
    with pytest.raises(ConversionError, match="no labels"):
        run_distill(intents.teacher, tmp_path / "out", train=intents.train, labels=no_labels, student=SMALL,
                    progress=False)
    assert not (tmp_path / "out").exists()


def test_student_vocab_unlike_the_teacher_with_embedding_reuse_says_what_to_do(intents, tmp_path):
    from converters.text_classifier import train_tokenizer

    other = train_tokenizer(["completely different words for another tokenizer"] * 3, vocab_size=60)
    other.save(str(tmp_path / "other.json"))
    cfg = StudentConfig(layers=1, hidden=32, heads=2, ffn=64, vocab=str(tmp_path / "other.json"))
    with pytest.raises(ConversionError, match="--vocab teacher.*--no-reuse-embeddings"):
        run_distill(intents.teacher, tmp_path / "out", train=intents.train, labels=intents.labels, student=cfg,
                    progress=False)
    assert not (tmp_path / "out").exists()


def test_init_from_teacher_layers_copies_blocks_or_explains_the_shape_mismatch(intents, tmp_path):
    from converters.distill import TextSet, distill
    from converters.student import build_student

    teacher = load_teacher(intents.teacher)
    assert teacher.block_shape() == (2, 96, 4, 192)
    with pytest.raises(ConversionError, match="--hidden 96 --heads 4 --ffn 192"):
        build_student(StudentConfig(layers=1, hidden=32, heads=2, ffn=64, init_from_teacher_layers=[1]), teacher, 14)
    student, _ = build_student(StudentConfig(layers=1, hidden=96, heads=4, ffn=192, init_from_teacher_layers=[1]),
                               teacher, 14)
    for a, b in zip(student.get_layer("mha_0").get_weights(), teacher.keras_model.get_layer("mha_1").get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(student.get_layer("tok_emb").get_weights()[0], teacher.embedding_matrix())
    # and the copied student trains through the library entry point the pruning code uses
    train, _ = generate(per_intent=30)
    res = distill(teacher, student, TextSet(train.texts, np.asarray(train.labels)), epochs=1, progress=False)
    assert res.epochs_run == 1 and np.isfinite(res.history[0]["loss"])


def test_package_and_checkpoint_teachers_give_class_scores_in_the_label_order(text_model, bert_intent_checkpoint):
    texts, labels = text_model.test_texts[::9], np.asarray(text_model.test_labels[::9])  # every intent
    pkg = load_teacher(text_model.package)
    assert pkg.kind == "package"
    keras_params = load_teacher(text_model.keras_path, tokenizer=text_model.tokenizer).n_params
    assert 0.8 * keras_params <= pkg.n_params <= 1.05 * keras_params  # the same weights, counted in the flatbuffer
    pkg.align_labels(list(LABELS))
    assert (pkg.logits(texts).argmax(-1) == labels).mean() > 0.5
    bert = load_teacher(bert_intent_checkpoint.path, max_length=32)
    assert bert.kind == "checkpoint" and bert.labels == list(LABELS)
    reversed_labels = list(reversed(LABELS))
    bert.align_labels(reversed_labels)
    pred = bert.logits(texts).argmax(-1)
    assert (np.asarray([LABELS.index(reversed_labels[p]) for p in pred]) == labels).mean() > 0.5
    with pytest.raises(ConversionError, match="only in the teacher: .*lights_on"):
        bert.align_labels([lab for lab in LABELS if lab != "lights_on"])


def test_sentence_encoder_teacher_is_matched_through_a_projection_that_is_not_exported(tmp_path):
    import os

    from converters.tf_env import tf
    from tests.edge_slm.test_agent_tasks import minilm_dir

    src = minilm_dir()
    if src is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the all-MiniLM-L6-v2 wheel is not installed")
        pytest.skip("the all-MiniLM-L6-v2 wheel is not installed")
    teacher = load_teacher(src, max_length=24)
    assert teacher.kind == "sentence-encoder" and not teacher.has_logits
    emb = teacher.embeddings(["turn on the lights", "switch the lamp on", "what is the weather today"])
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])  # the encoder's own similarity structure
    train, test = generate(per_intent=40, seed=1)
    report = run_distill(src, tmp_path / "out", train=_write(tmp_path / "train.tsv", train.texts, train.labels),
                         eval=_write(tmp_path / "eval.tsv", test.texts[::3], test.labels[::3]),
                         labels=[*LABELS], student=StudentConfig(layers=1, hidden=32, heads=2, ffn=64, vocab="new"),
                         epochs=8, patience=8, batch_size=16, progress=False)
    assert report["teacher"]["kind"] == "sentence-encoder"
    assert report["teacher"]["params"] > 20_000_000
    assert report["eval"]["student_accuracy"] > 0.5
    student = tf().keras.models.load_model(tmp_path / "out" / "student.keras", compile=False)
    assert all("projection" not in layer.name for layer in student.layers)
    assert (tmp_path / "out" / "checkpoint" / "projection.npz").is_file()  # trained, kept for resume only
    assert student.output.shape[-1] == len(LABELS)


def test_bad_cli_flags_are_config_errors(intents, tmp_path):
    with pytest.raises(ConfigError, match="comma-separated integers"):
        _cli("distill", str(intents.teacher), "--train", str(intents.train), "-o", str(tmp_path / "o"),
             "--init-from-teacher-layers", "first")
    with pytest.raises(ConfigError, match="divisible"):
        _cli("distill", str(intents.teacher), "--train", str(intents.train), "-o", str(tmp_path / "o"),
             "--hidden", "30", "--heads", "4")
    toml = tmp_path / "student.toml"
    toml.write_text("[student]\nlayers = 1\nhidden = 32\nwidth = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'width'"):
        _cli("distill", str(intents.teacher), "--train", str(intents.train), "-o", str(tmp_path / "o"),
             "--config", str(toml))
    assert not (tmp_path / "o").exists()


def test_embedding_matching_through_a_projection_trains_a_plain_classifier(intents):
    from converters.distill import TextSet, distill
    from converters.student import build_student

    teacher = load_teacher(intents.teacher)
    assert teacher.hidden_states(["lock the front door"]).shape == (1, 24, 96)
    student, tok = build_student(SMALL, teacher, len(LABELS))
    n_weights = len(student.weights)
    train, test = generate(per_intent=40, seed=2)
    res = distill(teacher, student, TextSet(train.texts, np.asarray(train.labels)),
                  TextSet(test.texts, np.asarray(test.labels)), tokenizer=tok, match="mse", epochs=2, progress=False)
    assert len(res.history) == 2 and all(np.isfinite(h["loss"]) for h in res.history)
    assert len(student.weights) == n_weights  # the 32 -> 96 projection lives outside the student


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        _cli("distill", "--help")
    text = capsys.readouterr().out
    assert "edge-slm distill teacher/model.keras" in text and "--resume" in text
