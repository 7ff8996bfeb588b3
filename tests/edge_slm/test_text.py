"""Text to fixed-length token ids: the one function training and the device share."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from edge_slm.errors import InputError, ModelError
from edge_slm.text import TextEncoder

WORDS = ["turn", "on", "the", "light", "off", "music"]


def word_tokenizer(specials: dict[str, int]) -> Tokenizer:
    vocab = dict(specials)
    for w in WORDS:
        vocab[w] = len(vocab) + 10  # ids well away from 0 so padding is visible
    unk = next(t for t in specials if "unk" in t.lower())
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_pads_with_the_pad_token_id_not_zero():
    enc = TextEncoder(word_tokenizer({"[UNK]": 0, "[PAD]": 5}), max_length=6)
    ids, truncated = enc.encode("turn on")
    assert ids.dtype == np.int32 and ids.shape == (1, 6)
    t = enc.tokenizer
    assert ids[0, :2].tolist() == [t.token_to_id("turn"), t.token_to_id("on")]
    assert ids[0, 2:].tolist() == [5, 5, 5, 5]
    assert truncated is False


def test_sentencepiece_style_pad_token_is_used():
    enc = TextEncoder(word_tokenizer({"<s>": 0, "<pad>": 1, "<unk>": 3}), max_length=4)
    assert enc.encode("light")[0][0, 1:].tolist() == [1, 1, 1]


def test_tokenizer_padding_setting_wins_and_is_then_disabled():
    tok = word_tokenizer({"[PAD]": 0, "[UNK]": 1, "<blank>": 2})
    tok.enable_padding(pad_id=2, pad_token="<blank>", length=50)
    enc = TextEncoder(tok, max_length=3)
    ids, _ = enc.encode("off")
    assert ids[0].tolist() == [tok.token_to_id("off"), 2, 2]


def test_pad_id_is_zero_when_the_tokenizer_has_none():
    assert TextEncoder(word_tokenizer({"[UNK]": 4}), max_length=2).pad_id == 0


def test_truncates_to_max_length_and_reports_it():
    tok = word_tokenizer({"[PAD]": 0, "[UNK]": 1})
    tok.enable_truncation(max_length=2)  # a tokenizer.json's own truncation must not hide long inputs
    enc = TextEncoder(tok, max_length=3)
    full = tok.encode("turn on the light off").ids
    assert len(full) == 5
    ids, truncated = enc.encode("turn on the light off")
    assert truncated is True and ids[0].tolist() == full[:3]
    ids, truncated = enc.encode("turn on the")  # exactly max_length: nothing lost
    assert truncated is False and ids[0].tolist() == full[:3]


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r", "\u3000\u2003", "\x0b\x0c"])
def test_empty_or_whitespace_text_is_empty_input(text):
    enc = TextEncoder(word_tokenizer({"[PAD]": 0, "[UNK]": 1}), max_length=4)
    with pytest.raises(InputError) as err:
        enc.encode(text)
    assert err.value.code == "empty_input"


def test_lone_surrogate_is_an_input_error_not_a_crash():
    # decode_input can hand one over from a JSON "\ud800" escape; tokenizers raises TypeError on it
    enc = TextEncoder(word_tokenizer({"[PAD]": 0, "[UNK]": 1}), max_length=4)
    with pytest.raises(InputError) as err:
        enc.encode("turn \ud800 on")
    assert err.value.code == "bad_encoding"


def test_bad_max_length_and_bad_tokenizer_files_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="max_length"):
        TextEncoder(word_tokenizer({"[PAD]": 0, "[UNK]": 1}), max_length=0)
    with pytest.raises(ModelError, match="tokenizer not found"):
        TextEncoder.from_file(tmp_path / "missing.json", 8)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ModelError, match="not a valid tokenizer.json"):
        TextEncoder.from_file(bad, 8)


def test_from_file_loads_the_packages_tokenizer(text_model):
    enc = TextEncoder.from_file(text_model.tokenizer, 24)
    ids, truncated = enc.encode("turn on the kitchen lights")
    assert ids.shape == (1, 24) and not truncated
    assert enc.pad_id == 0 and ids[0, -1] == enc.pad_id and ids[0, 0] != enc.pad_id


@pytest.fixture(scope="module")
def real_encoder(text_model) -> TextEncoder:
    return TextEncoder.from_file(text_model.tokenizer, 12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=60).filter(lambda s: s.strip()), min_size=1, max_size=5))
def test_encode_and_encode_batch_agree(real_encoder, texts):
    batch = real_encoder.encode_batch(texts)
    assert batch.shape == (len(texts), 12) and batch.dtype == np.int32
    for i, text in enumerate(texts):
        ids, truncated = real_encoder.encode(text)
        np.testing.assert_array_equal(ids[0], batch[i])
        full = real_encoder.tokenizer.encode(text).ids
        assert truncated == (len(full) > 12)
        n = min(len(full), 12)
        assert ids[0, :n].tolist() == full[:n] and (ids[0, n:] == real_encoder.pad_id).all()
