"""Train a small text classifier (and its WordPiece tokenizer) in Keras 3: the demo's model.

Host only. Token ids come from edge_slm.text.TextEncoder, the same code the device runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from converters.tf_env import tf
from edge_slm.text import TextEncoder

SPECIAL = ["[PAD]", "[UNK]"]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1000) -> Tokenizer:
    """A lowercase WordPiece tokenizer; [PAD] is id 0."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_model(vocab_size: int, max_length: int, n_classes: int, kind: str = "transformer",
                dim: int = 64, heads: int = 2, ffn: int = 128, layers: int = 1, seed: int = 0):  # noqa: ANN201
    """Keras functional model: int32 ids (max_length,) -> logits (n_classes,)."""
    keras = tf().keras
    keras.utils.set_random_seed(seed)
    ids = keras.Input(shape=(max_length,), dtype="int32", name="input_ids")
    x = keras.layers.Embedding(vocab_size, dim, name="tok_emb")(ids)
    if kind == "transformer":
        pos = keras.layers.Embedding(max_length, dim, name="pos_emb")(keras.ops.arange(max_length))
        x = x + pos
        for i in range(layers):
            att = keras.layers.MultiHeadAttention(heads, dim // heads, name=f"mha_{i}")(x, x)
            x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"ln1_{i}")(x + att)
            h = keras.layers.Dense(ffn, activation="gelu", name=f"ffn1_{i}")(x)
            h = keras.layers.Dense(dim, name=f"ffn2_{i}")(h)
            x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"ln2_{i}")(x + h)
        x = keras.layers.GlobalAveragePooling1D()(x)
    elif kind == "cnn":
        x = keras.layers.Conv1D(dim, 3, padding="same", activation="relu")(x)
        x = keras.layers.GlobalMaxPooling1D()(x)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    x = keras.layers.Dense(dim, activation="relu")(x)
    logits = keras.layers.Dense(n_classes, name="logits")(x)
    return keras.Model(ids, logits, name=f"intent_{kind}")


def train_text_classifier(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    n_classes: int,
    out_dir: str | Path,
    *,
    max_length: int = 24,
    kind: str = "transformer",
    epochs: int = 8,
    vocab_size: int = 1000,
    seed: int = 0,
    verbose: int = 0,
) -> tuple[Path, Path, TextEncoder]:
    """Train tokenizer + model; writes tokenizer.json and model.keras into out_dir and returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, vocab_size)
    tok_path = out / "tokenizer.json"
    tok.save(str(tok_path))
    encoder = TextEncoder(tok, max_length)
    x = encoder.encode_batch(list(train_texts))
    y = np.asarray(train_labels, dtype=np.int32)
    keras = tf().keras
    model = build_model(tok.get_vocab_size(), max_length, n_classes, kind=kind, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=verbose, shuffle=True)
    model_path = out / "model.keras"
    model.save(model_path)
    return model_path, tok_path, encoder
