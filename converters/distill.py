"""Knowledge distillation: train a small Keras student from a teacher's soft targets or embeddings.

Host only: imports TensorFlow through converters.tf_env; edge_slm never imports this module.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.student import StudentConfig, build_student, count_params
from converters.tf_env import console, tf
from edge_slm.errors import ConfigError, ConversionError
from edge_slm.text import TextEncoder

CHECKPOINT = "checkpoint"
_BATCH = 64


@dataclass
class TextSet:
    texts: list[str]
    labels: np.ndarray | None = None  # (N,) int label indices


@dataclass
class Teacher:
    """A model the student learns from. kind: keras | package | checkpoint | sentence-encoder."""

    kind: str
    path: Path
    tokenizer: Any  # tokenizers.Tokenizer
    max_length: int
    labels: list[str] | None
    n_params: int
    keras_model: Any = None
    _logits: Callable[[list[str]], np.ndarray] | None = None
    _embed: Callable[[list[str]], np.ndarray] | None = None
    _hidden: Callable[[list[str]], np.ndarray] | None = None
    _order: list[int] | None = None  # teacher column for each label of the student's label set

    @property
    def has_logits(self) -> bool:
        return self._logits is not None

    def logits(self, texts: list[str]) -> np.ndarray:
        """(N, n_labels) float32 in the order of the label set the student uses."""
        if self._logits is None:
            raise ConversionError(f"{self.path}: a {self.kind} teacher gives embeddings, not class scores")
        out = self._logits(list(texts))
        return out[:, self._order] if self._order is not None else out

    def embeddings(self, texts: list[str]) -> np.ndarray | None:
        return None if self._embed is None else self._embed(list(texts))

    def hidden_states(self, texts: list[str]) -> np.ndarray | None:
        return None if self._hidden is None else self._hidden(list(texts))

    def align_labels(self, labels: list[str]) -> None:
        """Check the teacher predicts exactly this label set, and reorder its scores to match it."""
        if self._logits is None:
            return
        if self.labels is None:
            n = int(self._logits(["a"]).shape[-1])
            if n != len(labels):
                raise ConversionError(f"{self.path}: the teacher has {n} outputs but the label set has "
                                      f"{len(labels)} labels; give the labels.txt the teacher was trained with")
            return
        missing = sorted(set(labels) - set(self.labels))
        extra = sorted(set(self.labels) - set(labels))
        if missing or extra:
            raise ConversionError(
                f"{self.path}: the teacher's labels differ from the label set (not in the teacher: "
                f"{', '.join(missing) or '-'}; only in the teacher: {', '.join(extra) or '-'}); "
                "use the teacher's labels or a teacher trained on yours")
        self._order = [self.labels.index(lab) for lab in labels]

    def embedding_matrix(self) -> np.ndarray | None:
        """The token embedding table (vocab, d) when the teacher is a Keras graph that has one."""
        if self.keras_model is None:
            return None
        keras = tf().keras
        size = self.tokenizer.get_vocab_size()
        for layer in self.keras_model.layers:
            if isinstance(layer, keras.layers.Embedding) and layer.input_dim == size:
                return np.asarray(layer.get_weights()[0])
        return None

    def block_shape(self) -> tuple[int, int, int, int] | None:
        """(layers, hidden, heads, ffn) of an edge-slm text transformer teacher, else None."""
        m = self.keras_model
        if m is None or self.kind != "keras":
            return None
        names = {layer.name for layer in m.layers}
        n = sum(1 for i in range(64) if f"mha_{i}" in names)
        if not n or "ffn1_0" not in names:
            return None
        mha = m.get_layer("mha_0")
        return n, int(m.get_layer("ln1_0").get_weights()[0].shape[0]), int(mha.num_heads), int(m.get_layer("ffn1_0").units)


def _batched(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], enc: TextEncoder, texts: list[str]) -> np.ndarray:
    outs = []
    for start in range(0, len(texts), _BATCH):
        ids, mask = enc.encode_batch_with_mask(texts[start : start + _BATCH])
        outs.append(np.asarray(fn(ids, mask), dtype=np.float32))
    return np.concatenate(outs)


def _read_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ConversionError(f"teacher tokenizer not found: {path}; put tokenizer.json next to the teacher or pass --tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ConversionError(f"{path}: not a valid tokenizer.json ({exc})") from exc


def load_teacher(path: str | Path, *, tokenizer: str | Path | None = None, max_length: int | None = None) -> Teacher:
    """A .keras model, a model package dir, a transformer classification checkpoint or a sentence encoder."""
    from converters.checkpoint.loader import is_checkpoint

    p = Path(path)
    if not p.exists():
        raise ConversionError(f"teacher not found: {p}")
    if p.is_file() and p.suffix == ".keras":
        return _keras_teacher(p, Path(tokenizer) if tokenizer else p.parent / "tokenizer.json")
    if p.is_dir() and (p / "manifest.json").is_file():
        return _package_teacher(p)
    if is_checkpoint(p):
        return _checkpoint_teacher(p, max_length)
    raise ConversionError(f"{p}: expected a teacher .keras file, a model package directory (manifest.json) or a "
                          "transformer checkpoint directory (config.json)")


def _keras_teacher(p: Path, tok_path: Path) -> Teacher:
    from converters.source_model import source_from_keras

    keras = tf().keras
    try:
        model = keras.models.load_model(p, compile=False)
    except Exception as exc:
        raise ConversionError(f"{p}: Keras could not load it ({type(exc).__name__}: {exc})") from exc
    src = source_from_keras(model, p)  # checks fixed input shapes
    tok = _read_tokenizer(tok_path)
    length = src.input_specs[0][0][-1]
    enc = TextEncoder(tok, length)
    two = len(src.input_names) == 2

    def feed(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return [ids, mask] if two else [ids]

    head = model.layers[-1]
    feats = keras.Model(model.inputs, head.input)
    names = {layer.name for layer in model.layers}
    last = max((int(n[4:]) for n in names if n.startswith("ln2_") and n[4:].isdigit()), default=None)
    hidden = keras.Model(model.inputs, model.get_layer(f"ln2_{last}").output) if last is not None else None
    return Teacher(
        "keras", p, tok, length, None, count_params(model), model,
        _logits=lambda texts: _batched(lambda i, m: src.predict(feed(i, m), _BATCH)[0], enc, texts),
        _embed=lambda texts: _batched(lambda i, m: feats(feed(i, m), training=False), enc, texts),
        _hidden=None if hidden is None else lambda texts: _batched(lambda i, m: hidden(feed(i, m), training=False), enc, texts),
    )


def _package_teacher(p: Path) -> Teacher:
    from edge_slm import runtime
    from edge_slm.package import ModelPackage

    pkg = ModelPackage.open(p)
    if pkg.tokenizer_path is None:
        raise ConversionError(f"{p}: the package has no tokenizer.json; a text teacher needs one")
    model = runtime.load(pkg.model_path)
    length = int(pkg.preprocessing.get("max_length", model.inputs[0].shape[-1]))
    tok = _read_tokenizer(pkg.tokenizer_path)
    enc = TextEncoder(tok, length)
    names = [i.name for i in model.inputs]

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rows = []
        for k in range(len(ids)):
            if len(names) == 2:
                rows.append(model.run_named(input_ids=ids[k : k + 1], attention_mask=mask[k : k + 1])[0])
            else:
                rows.append(model.run(ids[k : k + 1])[0])
        return np.concatenate(rows)

    return Teacher("package", p, tok, length, list(pkg.labels) or None, tflite_params(pkg.model_path.read_bytes()),
                   _logits=lambda texts: _batched(run, enc, texts))


def tflite_params(model_bytes: bytes) -> int:
    """Elements of the constant tensors (weights, biases, tables) in a .tflite flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(bytearray(model_bytes), 0)
    seen: set[int] = set()
    total = 0
    for g in range(model.SubgraphsLength()):
        sub = model.Subgraphs(g)
        for i in range(sub.TensorsLength()):
            tensor = sub.Tensors(i)
            b = tensor.Buffer()
            buf = model.Buffers(b) if b else None
            if b in seen or buf is None or not (buf.DataLength() or getattr(buf, "Size", lambda: 0)()):
                continue
            seen.add(b)
            total += int(np.prod(tensor.ShapeAsNumpy())) if tensor.ShapeLength() else 1
    return total


def _checkpoint_teacher(p: Path, max_length: int | None) -> Teacher:
    from converters.checkpoint.encoders import build_encoder
    from converters.checkpoint.loader import open_checkpoint

    ckpt = open_checkpoint(p)
    if ckpt.head not in ("classification", "embedding"):
        raise ConversionError(f"{p}: a {ckpt.arch} {ckpt.head} checkpoint cannot teach a text classifier")
    if ckpt.tokenizer_path is None:
        raise ConversionError(f"{p}: no tokenizer.json in the checkpoint; save the tokenizer with it")
    length = max_length or min(64, int(ckpt.cfg("max_position_embeddings", 64)))
    model = build_encoder(ckpt, length)
    tok = _read_tokenizer(ckpt.tokenizer_path)
    enc = TextEncoder(tok, length)

    def call(texts: list[str]) -> np.ndarray:
        return _batched(lambda i, m: model([i, m], training=False), enc, texts)

    if ckpt.head == "classification":
        return Teacher("checkpoint", p, tok, length, list(ckpt.labels), count_params(model), model, _logits=call)
    return Teacher("sentence-encoder", p, tok, length, None, count_params(model), model, _embed=call)


# --- training --------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    student: Any
    epochs_run: int  # epochs trained in total, across resumes
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def _student_inputs(student: Any, enc: TextEncoder, texts: list[str]) -> list[np.ndarray]:
    """What the device feeds the student: ids alone (TextEncoder.encode) or ids and mask."""
    if len(student.inputs) == 2:
        return list(enc.encode_batch_with_mask(texts))
    return [enc.encode_batch(texts)]


def _predict(model: Any, xs: list[np.ndarray]) -> np.ndarray:
    outs = [np.asarray(model([x[s : s + 256] for x in xs] if len(xs) > 1 else xs[0][s : s + 256], training=False))
            for s in range(0, len(xs[0]), 256)]
    return np.concatenate(outs)


def _save_arrays(path: Path, values: list[Any]) -> None:
    np.savez(path, **{f"v{i}": np.asarray(v) for i, v in enumerate(values)})


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"v{i}"] for i in range(len(data.files))]


def _diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in keys if saved.get(k) != now.get(k)]


def distill(
    teacher: Teacher,
    student: Any,
    train: TextSet,
    eval: TextSet | None = None,  # noqa: A002 - the usual name for the held-out set
    *,
    tokenizer: Any = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 10,
    patience: int = 3,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    match: str = "auto",
    match_weight: float = 1.0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
    seed: int = 0,
) -> DistillResult:
    """Train an already-built Keras student (ids [, mask] -> logits) in place; returns it with its history.

    Loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) for a teacher with class
    scores; plus match_weight * (MSE or 1 - cosine) between the student's penultimate features, through a
    learned projection when widths differ, and the teacher's embeddings (match "mse"/"cosine"; "auto" uses
    cosine for a sentence-encoder teacher only). The projection is never part of the student.
    """
    t = tf()
    keras = t.keras
    if not train.texts:
        raise ConversionError("the training set is empty; give at least one example")
    if match not in ("auto", "none", "mse", "cosine"):
        raise ConfigError(f"match {match!r}: choose auto, none, mse or cosine")
    if not teacher.has_logits and train.labels is None and match == "none":
        raise ConversionError("an embedding teacher without labels needs --match mse or cosine")
    if match == "auto":
        match = "none" if teacher.has_logits else "cosine"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str((tokenizer or teacher.tokenizer).to_str())
    enc = TextEncoder(tok, int(student.inputs[0].shape[-1]))
    x_train = _student_inputs(student, enc, train.texts)
    t_logits = teacher.logits(train.texts) if teacher.has_logits else None
    t_emb = teacher.embeddings(train.texts) if match != "none" else None
    if match != "none" and t_emb is None:
        raise ConversionError(f"{teacher.path}: this {teacher.kind} teacher exposes no embeddings to match")
    has_y = train.labels is not None
    y_train = np.asarray(train.labels if has_y else np.zeros(len(train.texts)), dtype=np.int32)
    x_eval = _student_inputs(student, enc, eval.texts) if eval is not None and eval.texts else None
    t_eval = teacher.logits(eval.texts) if x_eval is not None and teacher.has_logits else None

    logits_layer = student.layers[-1]
    feat_model = keras.Model(student.inputs, [student.output, logits_layer.input])
    proj = None
    if t_emb is not None:
        width = int(logits_layer.input.shape[-1])
        if width != t_emb.shape[-1]:
            proj = keras.layers.Dense(int(t_emb.shape[-1]), name="distill_projection")
            proj.build((None, width))
    train_vars = list(student.trainable_variables) + (list(proj.trainable_variables) if proj is not None else [])
    opt = keras.optimizers.Adam(learning_rate)
    opt.build(train_vars)
    T = float(temperature)

    @t.function(reduce_retracing=True)
    def step(xs, y, tl, te):  # noqa: ANN001, ANN202
        with t.GradientTape() as tape:
            logits, feat = feat_model(xs, training=True)
            loss = 0.0
            if tl is not None:
                p_t = t.nn.softmax(tl / T)
                kl = t.reduce_mean(t.reduce_sum(p_t * (t.math.log(p_t + 1e-9) - t.nn.log_softmax(logits / T)), -1))
                loss += (alpha if has_y else 1.0) * T * T * kl
            if has_y:
                ce = t.reduce_mean(t.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
                loss += ((1.0 - alpha) if tl is not None else 1.0) * ce
            if te is not None:
                f = proj(feat) if proj is not None else feat
                if match == "mse":
                    m = t.reduce_mean(t.square(f - te))
                else:
                    m = 1.0 - t.reduce_mean(t.reduce_sum(t.math.l2_normalize(f, -1) * t.math.l2_normalize(te, -1), -1))
                loss += match_weight * m
        grads = tape.gradient(loss, train_vars)
        opt.apply_gradients(zip(grads, train_vars))
        return loss

    history: list[dict[str, float]] = []
    start_epoch, best, best_epoch, wait = 0, -np.inf, 0, 0
    best_weights = [np.asarray(w) for w in student.get_weights()]
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    shapes = {"student_weights": [list(map(int, w.shape)) for w in student.weights]}
    fp = {**(fingerprint or {}), **shapes}
    if resume:
        if ck is None or not (ck / "state.json").is_file():
            raise ConversionError(f"nothing to resume: no checkpoint in {ck}; run without --resume")
        state = json.loads((ck / "state.json").read_text())
        diffs = _diff(state["fingerprint"], json.loads(json.dumps(fp)))
        if diffs:
            raise ConfigError(f"{ck}: the checkpoint is from another configuration; differing: {'; '.join(diffs)}. "
                              "Resume with the same settings, or start again with another -o")
        student.set_weights(_load_arrays(ck / "student.npz"))
        best_weights = _load_arrays(ck / "best.npz")
        if proj is not None:
            proj.set_weights(_load_arrays(ck / "projection.npz"))
        for var, value in zip(opt.variables, _load_arrays(ck / "optimizer.npz")):
            var.assign(value)
        start_epoch, best, best_epoch, wait = state["epoch"], state["best"], state["best_epoch"], state["wait"]
        history = state["history"]

    from tqdm import tqdm

    stopped = False
    n = len(train.texts)
    for epoch in range(start_epoch, epochs):
        if wait >= patience:
            stopped = True
            break
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(n)
        bar = tqdm(range(0, n, batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   dynamic_ncols=True, file=console(), disable=not progress)
        total = 0.0
        for k, s in enumerate(bar):
            idx = order[s : s + batch_size]
            xs = [x[idx] for x in x_train]
            loss = step(xs if len(xs) > 1 else xs[0], y_train[idx],
                        None if t_logits is None else t_logits[idx], None if t_emb is None else t_emb[idx])
            total += float(loss)
            bar.set_postfix(loss=f"{total / (k + 1):.4f}")
        row: dict[str, float] = {"epoch": epoch + 1, "loss": total / max(1, len(bar))}
        if x_eval is not None:
            pred = _predict(student, x_eval).argmax(-1)
            if eval is not None and eval.labels is not None:
                row["eval_accuracy"] = float((pred == eval.labels).mean())
            if t_eval is not None:
                row["agreement"] = float((pred == t_eval.argmax(-1)).mean())
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('eval_accuracy', row.get('agreement', 0)):.3f}")
        bar.close()
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}"
                  + "".join(f", {k} {v:.3f}" for k, v in row.items() if k not in ("epoch", "loss")), file=console())
        history.append(row)
        metric = row.get("eval_accuracy", row.get("agreement", -row["loss"]))
        if metric > best + 1e-9:
            best, best_epoch, wait = metric, epoch + 1, 0
            best_weights = [np.asarray(w) for w in student.get_weights()]
        else:
            wait += 1
        if ck is not None:
            _save_checkpoint(ck, student, proj, opt, best_weights,
                             {"epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "wait": wait,
                              "history": history, "fingerprint": fp})
    else:
        stopped = wait >= patience and len(history) < epochs
    student.set_weights(best_weights)
    return DistillResult(student, len(history), best_epoch, float(best), history, stopped)


def _save_checkpoint(ck: Path, student: Any, proj: Any, opt: Any, best: list[np.ndarray], state: dict[str, Any]) -> None:
    """Write the new checkpoint beside the old one, then swap: a crash leaves one whole checkpoint."""
    ck.parent.mkdir(parents=True, exist_ok=True)
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_arrays(tmp / "student.npz", student.get_weights())
    _save_arrays(tmp / "best.npz", best)
    _save_arrays(tmp / "optimizer.npz", [v.numpy() for v in opt.variables])
    if proj is not None:
        _save_arrays(tmp / "projection.npz", proj.get_weights())
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = ck.with_name(ck.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ck.exists():
        ck.rename(old)
    tmp.rename(ck)
    shutil.rmtree(old, ignore_errors=True)


# --- the whole job: data files in, OUT/student.keras + report out ---------------------------------
def read_labels(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"labels file not found: {p}")
    labels = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ConversionError(f"{p}: no labels in it; write one label per line")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ConversionError(f"{p}: label {dup[0]!r} is listed twice")
    return labels


def read_textset(path: str | Path, labels: list[str]) -> TextSet:
    from converters.text_data import load_texts

    try:
        texts, y = load_texts(path, labels)
    except ConversionError as exc:
        line = _first_unknown_label_line(Path(path), labels) if "label set" in str(exc) else None
        if line is None:
            raise
        raise ConversionError(f"{exc}; it is on line {line}") from exc
    return TextSet(texts, None if y is None else y.astype(np.int32))


def _first_unknown_label_line(p: Path, labels: list[str]) -> int | None:
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                label = json.loads(line).get("label")
            except (json.JSONDecodeError, AttributeError):
                continue
        else:
            label = line.partition("\t")[2] or None
        if label is not None and str(label) not in labels and not str(label).strip().lstrip("-").isdigit():
            return n
    return None


def run_distill(
    teacher_path: str | Path,
    out: str | Path,
    *,
    train: str | Path,
    eval: str | Path | None = None,  # noqa: A002
    labels: str | Path | list[str] | None = None,
    student: StudentConfig | None = None,
    tokenizer: str | Path | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 10,
    patience: int = 3,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    match: str = "auto",
    resume: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Distil TEACHER into a new student; OUT gets student.keras, tokenizer.json, labels.txt and
    distill_report.json all at once (staged, then renamed), and OUT/checkpoint after every epoch."""
    out = Path(out)
    cfg = student or StudentConfig()
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ConfigError(f"alpha must be in [0, 1] and temperature > 0 (got alpha {alpha}, temperature {temperature})")
    ck = out / CHECKPOINT
    if not resume and out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} is not empty (an earlier distillation?); pass --resume to continue its "
                              "checkpoint, or choose another -o")
    if resume and not (ck / "state.json").is_file():
        raise ConversionError(f"nothing to resume: {ck} has no checkpoint; run without --resume")
    teacher = load_teacher(teacher_path, tokenizer=tokenizer, max_length=cfg.max_length)
    names = (read_labels(labels) if isinstance(labels, (str, Path)) else list(labels) if labels
             else teacher.labels)
    if not names:
        raise ConversionError("no label set: pass --labels labels.txt (one label per line)")
    teacher.align_labels(names)
    train_set = read_textset(train, names)
    eval_set = read_textset(eval, names) if eval is not None else None
    if train_set.labels is None and not teacher.has_logits:
        raise ConversionError(f"{train}: an embedding teacher needs labelled training lines (text<TAB>label)")
    model, tok = build_student(cfg, teacher, len(names), train_set.texts, seed=seed)
    fingerprint = {**cfg.to_dict(), "temperature": temperature, "alpha": alpha, "batch_size": batch_size,
                   "learning_rate": learning_rate, "match": match, "seed": seed, "labels": names,
                   "student_config_hash": cfg.digest()}
    res = distill(teacher, model, train_set, eval_set, tokenizer=tok, temperature=temperature, alpha=alpha,
                  epochs=epochs, patience=patience, batch_size=batch_size, learning_rate=learning_rate, match=match,
                  checkpoint_dir=ck, resume=resume, fingerprint=fingerprint, progress=progress, seed=seed)
    report: dict[str, Any] = {
        "teacher": {"path": str(teacher.path), "kind": teacher.kind, "params": teacher.n_params},
        "student": {"params": count_params(model), "config": cfg.to_dict(), "config_hash": cfg.digest()},
        "compression": round(teacher.n_params / max(1, count_params(model)), 2),
        "temperature": temperature, "alpha": alpha, "match": match, "epochs": res.epochs_run, "best_epoch": res.best_epoch,
        "stopped_early": res.stopped_early, "history": res.history,
    }
    if eval_set is not None:
        enc = TextEncoder(tok, int(model.inputs[0].shape[-1]))
        s_pred = _predict(model, _student_inputs(model, enc, eval_set.texts)).argmax(-1)
        ev: dict[str, Any] = {"examples": len(eval_set.texts)}
        if teacher.has_logits:
            t_pred = teacher.logits(eval_set.texts).argmax(-1)
            ev["agreement"] = float((s_pred == t_pred).mean())
            if eval_set.labels is not None:
                ev["teacher_accuracy"] = float((t_pred == eval_set.labels).mean())
        if eval_set.labels is not None:
            ev["student_accuracy"] = float((s_pred == eval_set.labels).mean())
        report["eval"] = ev
    _publish(out, model, tok, names, report)
    return report


def _publish(out: Path, model: Any, tok: Any, labels: list[str], report: dict[str, Any]) -> None:
    stage = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    stage.mkdir(parents=True)
    try:
        model.save(stage / "student.keras")
        tok.save(str(stage / "tokenizer.json"))
        (stage / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        (stage / "distill_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        if (out / CHECKPOINT).is_dir():
            (out / CHECKPOINT).rename(stage / CHECKPOINT)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if (stage / CHECKPOINT).is_dir() and not (out / CHECKPOINT).exists():
            out.mkdir(parents=True, exist_ok=True)
            (stage / CHECKPOINT).rename(out / CHECKPOINT)
        shutil.rmtree(stage, ignore_errors=True)
        raise


# --- CLI ---------------------------------------------------------------------------------------------
EXAMPLE = """example:
  edge-slm distill teacher/model.keras --train train.tsv --eval eval.tsv --labels labels.txt -o student \\
      --layers 1 --hidden 32 --heads 2 --ffn 64 --temperature 4 --alpha 0.7
  edge-slm convert student/student.keras -o pkg --tokenizer student/tokenizer.json --labels student/labels.txt ...

TEACHER is a .keras model (tokenizer.json beside it), a model package directory, a transformer
classification checkpoint, or a sentence encoder (the student then matches its embeddings).
Data lines are "text<TAB>label" (.tsv/.txt) or {"text": ..., "label": ...} (.jsonl).
"""


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `distill` on an argparse sub-parser set."""
    p = subparsers.add_parser("distill", help="distil a teacher model into a small student transformer",
                              description=__doc__.splitlines()[0], epilog=EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help=".keras file, package dir, checkpoint dir or sentence encoder dir")
    p.add_argument("--train", required=True, help="training texts: text<TAB>label lines or .jsonl")
    p.add_argument("--eval", help="held-out texts for accuracy, agreement and early stopping")
    p.add_argument("--labels", help="labels.txt, one label per line (default: the teacher's)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--config", help="student config TOML ([student] layers, hidden, heads, ffn, ...)")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--vocab", help="teacher (default), new, or a tokenizer.json path")
    p.add_argument("--no-reuse-embeddings", action="store_true", help="learn the student's embeddings from scratch")
    p.add_argument("--init-from-teacher-layers", help="comma-separated teacher block indices, one per student layer")
    p.add_argument("--tokenizer", help="the teacher's tokenizer.json (default: beside a .keras teacher)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target loss (1 - alpha: labels)")
    p.add_argument("--match", default="auto", choices=["auto", "none", "mse", "cosine"],
                   help="also match the teacher's embeddings (auto: only for a sentence encoder)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without a better eval score")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_distill)
    return p


def student_config_from_args(args: argparse.Namespace) -> StudentConfig:
    init = None
    if args.init_from_teacher_layers:
        try:
            init = [int(v) for v in args.init_from_teacher_layers.split(",")]
        except ValueError as exc:
            raise ConfigError(f"--init-from-teacher-layers {args.init_from_teacher_layers!r}: "
                              "give comma-separated integers, e.g. 0,2") from exc
    flags = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "ffn": args.ffn,
             "max_length": args.max_length, "vocab": args.vocab, "init_from_teacher_layers": init}
    if args.no_reuse_embeddings:
        flags["reuse_embeddings"] = False
    if args.config:
        return StudentConfig.from_toml(args.config, **flags)
    return StudentConfig(**{k: v for k, v in flags.items() if v is not None})


def cmd_distill(args: argparse.Namespace) -> int:
    report = run_distill(args.teacher, args.out, train=args.train, eval=args.eval, labels=args.labels,
                         student=student_config_from_args(args), tokenizer=args.tokenizer,
                         temperature=args.temperature, alpha=args.alpha, epochs=args.epochs, patience=args.patience,
                         batch_size=args.batch_size, learning_rate=args.learning_rate, match=args.match,
                         resume=args.resume, progress=not args.json, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from edge_slm.table import format_table

    ev = report.get("eval", {})
    rows = [["teacher", report["teacher"]["params"], ev.get("teacher_accuracy", "-"), "-"],
            ["student", report["student"]["params"], ev.get("student_accuracy", "-"), ev.get("agreement", "-")]]
    print(format_table(["model", "params", "accuracy", "agreement"], rows))
    print(f"{report['compression']}x fewer parameters after {report['epochs']} epochs; student in {args.out}")
    return 0
