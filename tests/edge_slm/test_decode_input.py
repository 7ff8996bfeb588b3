"""decode_input: payload bytes to (input_id, text), or an InputError with a stable code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.errors import InputError
from edge_slm.pipeline import decode_input
from edge_slm.sources import RawInput

LIMIT = 1024


def raw(payload: bytes, input_id: str | None = None) -> RawInput:
    return RawInput(payload, "test", input_id=input_id)


def code_of(payload: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(InputError) as err:
        decode_input(raw(payload), limit)
    return err.value.code


def test_plain_utf8_text_keeps_a_generated_id():
    r = raw("allume la lumière 💡".encode())
    input_id, text = decode_input(r, LIMIT)
    assert text == "allume la lumière 💡"
    assert input_id and r.input_id == input_id
    other, _ = decode_input(raw(b"x"), LIMIT)
    assert other != input_id  # generated ids are unique


def test_source_given_id_is_kept_for_plain_text():
    assert decode_input(raw(b"lights on", "stdin:3"), LIMIT) == ("stdin:3", "lights on")


def test_json_with_id_and_text():
    r = raw(b'  {"id": "a1", "text": "turn on the light", "extra": [1]}')
    assert decode_input(r, LIMIT) == ("a1", "turn on the light")
    assert r.input_id == "a1"


def test_json_integer_id_becomes_a_string_and_long_ids_are_cut():
    assert decode_input(raw(b'{"id": 42, "text": "x"}'), LIMIT) == ("42", "x")
    long_id = "i" * 500
    input_id, _ = decode_input(raw(json.dumps({"id": long_id, "text": "x"}).encode()), LIMIT)
    assert input_id == long_id[:128]


def test_json_without_id_keeps_the_generated_one():
    r = raw(b'{"text": "hi"}', "mqtt:7")
    assert decode_input(r, LIMIT) == ("mqtt:7", "hi")


def test_non_utf8_is_bad_encoding_and_names_the_byte():
    with pytest.raises(InputError) as err:
        decode_input(raw(b"ok \xff\xfe"), LIMIT)
    assert err.value.code == "bad_encoding" and "byte 3" in str(err.value)


def test_oversize_is_input_too_long_even_when_not_utf8():
    assert code_of(b"a" * (LIMIT + 1)) == "input_too_long"
    assert code_of(b"\xff" * (LIMIT + 1)) == "input_too_long"
    assert decode_input(raw(b"a" * LIMIT), LIMIT)[1] == "a" * LIMIT  # the limit itself is allowed


def test_error_still_names_the_input():
    r = raw(b"\xff")
    with pytest.raises(InputError):
        decode_input(r, LIMIT)
    assert r.input_id  # an error record can say which input failed


@pytest.mark.parametrize("payload", [b"{", b'{"text": "a",}', b"{'text': 'a'}", b' {"text": "a"} trailing'])
def test_bad_json_is_bad_json(payload):
    assert code_of(payload) == "bad_json"


@pytest.mark.parametrize(
    "payload",
    [b"{}", b'{"id": "a"}', b'{"text": 3}', b'{"text": null}', b'{"text": ["a"]}',
     b'{"text": "a", "id": true}', b'{"text": "a", "id": 1.5}', b'{"text": "a", "id": null}'],
)
def test_json_without_a_usable_text_or_id_is_bad_request(payload):
    assert code_of(payload) == "bad_request"


@pytest.mark.parametrize("payload", [b"", b"   \n\t", b'{"text": ""}', b'{"text": " \\n "}', "\u3000".encode()])
def test_empty_is_empty_input(payload):
    assert code_of(payload) == "empty_input"


def test_json_that_is_not_an_object_is_plain_text():
    assert decode_input(raw(b'["a"]'), LIMIT)[1] == '["a"]'


CODES = {"bad_encoding", "input_too_long", "bad_json", "bad_request", "empty_input"}


def _check(payload: bytes, limit: int) -> None:
    r = raw(payload)
    try:
        input_id, text = decode_input(r, limit)
    except InputError as exc:
        assert exc.code in CODES and r.input_id
    else:
        assert isinstance(text, str) and text.strip() and len(payload) <= limit
        assert isinstance(input_id, str) and input_id == r.input_id and len(input_id) <= 128


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 400))
def test_arbitrary_bytes_only_ever_raise_input_error(payload, limit):
    _check(payload, limit)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "text", "x"]), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(JSONISH, st.sampled_from(["", " ", "\n", "x", "}", ","]))
def test_arbitrary_json_payloads_only_ever_raise_input_error(obj, tail):
    _check((json.dumps(obj) + tail).encode("utf-8", "surrogatepass"), 4096)


@pytest.mark.parametrize(
    "payload",
    [b'{"text": "a", "id": ' + b"1" * 5000 + b"}",  # int longer than sys.int_info.str_digits_check_threshold
     b'{"text": "a", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"],  # deeper than the recursion limit
)
def test_pathological_json_is_bad_json(payload):
    assert len(payload) < 65536  # both fit under the default max_input_bytes
    assert code_of(payload, 65536) == "bad_json"
