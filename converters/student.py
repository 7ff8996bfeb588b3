"""The student side of distillation: its config (TOML or CLI flags) and a Keras student built from it.

Host only: imports TensorFlow through converters.tf_env; never imported by edge_slm.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tomllib

from edge_slm.errors import ConfigError, ConversionError

if TYPE_CHECKING:
    from converters.distill import Teacher


@dataclass(frozen=True)
class StudentConfig:
    """Shape of the student transformer. vocab: "teacher" (reuse its tokenizer and embeddings), "new"
    (train a WordPiece tokenizer on the training texts) or a path to a tokenizer.json."""

    layers: int = 1
    hidden: int = 32
    heads: int = 2
    ffn: int = 64
    max_length: int | None = None  # None: the teacher's
    vocab: str = "teacher"
    init_from_teacher_layers: tuple[int, ...] | None = None
    reuse_embeddings: bool = True  # copy (or project) the teacher's token embeddings when vocabularies match

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"student {name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"student hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ConfigError(f"student max_length must be a positive integer, got {self.max_length!r}")
        if self.init_from_teacher_layers is not None:
            object.__setattr__(self, "init_from_teacher_layers", tuple(int(i) for i in self.init_from_teacher_layers))
            if len(self.init_from_teacher_layers) != self.layers:
                raise ConfigError(f"init_from_teacher_layers lists {len(self.init_from_teacher_layers)} teacher "
                                  f"blocks for a student with {self.layers} layers; list one teacher block per layer")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["init_from_teacher_layers"] is not None:
            d["init_from_teacher_layers"] = list(d["init_from_teacher_layers"])
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> StudentConfig:
        """Read a [student] table (or top-level keys); unknown keys are an error naming the key and file."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read the student config ({exc})") from exc
        data = data.get("student", data)
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{p}: unknown key {key!r} in the student config (known: {', '.join(sorted(known))})")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def count_params(model: Any) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


def _project_rows(matrix: np.ndarray, width: int) -> np.ndarray:
    """Keep the top principal directions of a (vocab, d) embedding table: (vocab, width)."""
    if matrix.shape[1] == width:
        return matrix.astype(np.float32)
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(width, vt.shape[0])
    out = np.zeros((matrix.shape[0], width), dtype=np.float32)
    out[:, :k] = centred @ vt[:k].T
    # keep the scale Keras initialises embeddings with so the first blocks see familiar magnitudes
    out *= 0.05 / max(float(out.std()), 1e-6)
    return out


def check_vocab_compatible(student_vocab: dict[str, int], teacher_vocab: dict[str, int], where: str) -> None:
    if student_vocab == teacher_vocab:
        return
    only_s = sorted(set(student_vocab) - set(teacher_vocab))[:3]
    moved = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])[:3]
    detail = (f"tokens not in the teacher's: {', '.join(map(repr, only_s))}" if only_s
              else f"tokens with other ids: {', '.join(map(repr, moved))}" if moved else "fewer tokens")
    raise ConversionError(
        f"{where}: the student tokenizer's vocabulary ({len(student_vocab)} tokens) differs from the teacher's "
        f"({len(teacher_vocab)} tokens; {detail}), so the teacher's embedding matrix cannot be reused. "
        "Use --vocab teacher to reuse the teacher's tokenizer and embeddings, or --no-reuse-embeddings to learn "
        "new embeddings (the student then follows the teacher through a learned projection)"
    )


def build_student(cfg: StudentConfig, teacher: Teacher, n_classes: int, train_texts: list[str] | None = None,
                  seed: int = 0) -> tuple[Any, Any]:
    """(Keras student: int32 input_ids (max_length,) -> logits (n_classes,), its tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer

    from converters.text_classifier import build_model, train_tokenizer

    max_length = cfg.max_length or teacher.max_length
    teacher_vocab = teacher.tokenizer.get_vocab()
    if cfg.vocab == "teacher":
        tok = Tokenizer.from_str(teacher.tokenizer.to_str())
    elif cfg.vocab == "new":
        if not train_texts:
            raise ConversionError("vocab 'new' trains a tokenizer on the training texts; none were given")
        tok = train_tokenizer(train_texts, vocab_size=min(4000, max(200, len(teacher_vocab))))
    else:
        p = Path(cfg.vocab)
        if not p.is_file():
            raise ConversionError(f"student vocab {p}: no such tokenizer.json; use 'teacher', 'new' or a path")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise ConversionError(f"{p}: not a valid tokenizer.json ({exc})") from exc
        if cfg.reuse_embeddings:
            check_vocab_compatible(tok.get_vocab(), teacher_vocab, str(p))
    model = build_model(tok.get_vocab_size(), max_length, n_classes, dim=cfg.hidden, heads=cfg.heads,
                        ffn=cfg.ffn, layers=cfg.layers, seed=seed)
    same_vocab = tok.get_vocab() == teacher_vocab
    table = teacher.embedding_matrix()
    if cfg.reuse_embeddings and same_vocab and table is not None and table.shape[0] == tok.get_vocab_size():
        model.get_layer("tok_emb").set_weights([_project_rows(table, cfg.hidden)])
    if cfg.init_from_teacher_layers is not None:
        _copy_teacher_blocks(model, cfg, teacher)
    return model, tok


def _copy_teacher_blocks(model: Any, cfg: StudentConfig, teacher: Teacher) -> None:
    shape = teacher.block_shape()
    if shape is None:
        raise ConversionError(
            f"init_from_teacher_layers needs a teacher built from the edge-slm text transformer (layers mha_0, "
            f"ffn1_0, ...); this {teacher.kind} teacher has no such blocks. Drop --init-from-teacher-layers")
    t_layers, t_hidden, t_heads, t_ffn = shape
    wrong = [f"{n} {s} vs teacher {t}" for n, s, t in
             (("hidden", cfg.hidden, t_hidden), ("heads", cfg.heads, t_heads), ("ffn", cfg.ffn, t_ffn)) if s != t]
    if wrong:
        raise ConversionError(
            "init_from_teacher_layers copies whole teacher blocks, so the student must have the teacher's block "
            f"shape ({'; '.join(wrong)}). Set --hidden {t_hidden} --heads {t_heads} --ffn {t_ffn} (a smaller student "
            "then comes from fewer layers), or drop --init-from-teacher-layers to train the blocks from scratch")
    bad = [i for i in cfg.init_from_teacher_layers or () if not 0 <= i < t_layers]
    if bad:
        raise ConversionError(f"init_from_teacher_layers {bad}: the teacher has blocks 0..{t_layers - 1}")
    tm = teacher.keras_model
    for s_i, t_i in enumerate(cfg.init_from_teacher_layers or ()):
        for part in ("mha", "ln1", "ffn1", "ffn2", "ln2"):
            model.get_layer(f"{part}_{s_i}").set_weights(tm.get_layer(f"{part}_{t_i}").get_weights())
    # build_model's position table is called on a constant, so Keras keeps no pos_emb layer to copy
    if "pos_emb" in {layer.name for layer in tm.layers} and "pos_emb" in {layer.name for layer in model.layers}:
        pos = tm.get_layer("pos_emb").get_weights()
        if pos[0].shape == model.get_layer("pos_emb").get_weights()[0].shape:
            model.get_layer("pos_emb").set_weights(pos)
