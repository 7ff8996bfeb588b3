"""A trained LLaMA-architecture checkpoint to a text-generation package; generation on the device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import convert_model
from edge_slm.errors import ConversionError, InputError
from edge_slm.package import ModelPackage
from edge_slm.tasks import load_task
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def lm_packages(llama_lm_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_pkgs")
    auto = run_cli("convert", str(llama_lm_checkpoint.path), "-o", str(out / "auto"), "--eval",
                   str(llama_lm_checkpoint.eval_txt), "--prefill-len", "16", "--max-cache", "48", "--json")
    assert auto.returncode == 0, auto.stderr.decode()[-2000:]
    f32 = convert_model(llama_lm_checkpoint.path, out / "f32", eval_data=llama_lm_checkpoint.eval_txt,
                        quantize="float32", prefill_len=16, max_cache=48, progress=False)
    return {"auto": out / "auto", "auto_report": json.loads(auto.stdout), "f32": f32.package.path}


def test_auto_recipe_passes_the_lm_gate_and_reports_perplexity(lm_packages):
    report = lm_packages["auto_report"]
    tried = {t["recipe"]: t for t in report["tried"]}
    assert set(tried) == {"dynamic", "float16"}
    chosen = tried[report["chosen"]]
    assert chosen["top1_agreement"] >= 0.95
    assert chosen["perplexity_quantized"] < 1.1 * chosen["perplexity_float"]
    assert chosen["perplexity_float"] < 100, "far better than chance (a uniform guess over 600 tokens is 600)"
    m = ModelPackage.open(lm_packages["auto"]).manifest
    assert m["task"] == "text-generation" and sorted(m["signatures"]) == ["decode", "prefill"]
    assert m["preprocessing"]["prefill_len"] == 16 and m["preprocessing"]["max_cache"] == 48
    assert m["size_bytes"] < report["float"]["size_bytes"]


def test_device_greedy_generation_equals_transformers(lm_packages, llama_lm_checkpoint):
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(llama_lm_checkpoint.path).eval()
    tok = Tokenizer.from_file(str(llama_lm_checkpoint.path / "tokenizer.json"))
    gen = load_task(ModelPackage.open(lm_packages["f32"]))
    bos, eos = ref.config.bos_token_id, ref.config.eos_token_id
    for prompt in ("turn on the", "set the volume", "what is the"):
        ids = [bos] + tok.encode(prompt).ids
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)[0].tolist()[len(ids):]
        expected = tok.decode([t for t in out if t != eos])
        got = gen(prompt, {"max_new_tokens": 10})
        assert got["text"] == expected, (prompt, got, expected)
        assert got["finish_reason"] == ("eos" if eos in out else "length")


def test_generation_options_and_limits(lm_packages):
    gen = load_task(ModelPackage.open(lm_packages["auto"]))
    streamed = []
    res = gen("please turn", {"max_new_tokens": 8}, streamed.append)
    assert "".join(t["text"] for t in streamed) == res["text"]
    a = gen("play", {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7, "max_new_tokens": 8})
    b = gen("play", {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7, "max_new_tokens": 8})
    assert a["text"] == b["text"], "a seeded sample is reproducible"
    long_prompt = "turn on the kitchen light " * 20
    res = gen(long_prompt, {"max_new_tokens": 4})
    assert res["prompt_truncated"]["kept_last"] == 15 and res["prompt_tokens"] == 16
    res = gen("turn on the kitchen light and the hallway lamps", {"max_new_tokens": 64})
    assert res["finish_reason"] in ("eos", "cache_full")
    res = gen("turn on the", {"max_new_tokens": 40, "stop": [" light", " lamp"]})
    assert " light" not in res["text"] and " lamp" not in res["text"]
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"colour": 1}, {"seed": "x"}):
        with pytest.raises(InputError) as err:
            gen("hello", bad)
        assert err.value.code == "bad_request"


def test_full_int8_is_refused_for_decoders_with_the_reason(llama_lm_checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="not offered for decoders"):
        convert_model(llama_lm_checkpoint.path, tmp_path / "x", eval_data=llama_lm_checkpoint.eval_txt,
                      quantize="int8", progress=False)
    assert not (tmp_path / "x").exists()


def test_decoder_cache_rows_past_the_prompt_stay_empty(lm_packages):
    from edge_slm import runtime

    m = runtime.load(ModelPackage.open(lm_packages["f32"]).model_path)
    ids = np.zeros((1, 16), dtype=np.int32)
    ids[0, :3] = [1, 5, 6]
    out = m.signature("prefill")(input_ids=ids, length=np.array([3], dtype=np.int32))
    assert np.all(out["k_cache"][:, :, 3:, :] == 0) and np.any(out["k_cache"][:, :, :3, :] != 0)
