"""GPT-2 / LLaMA decoders built from safetensors match transformers, and their KV cache matches recompute.

Tiny random checkpoints are made with transformers' own classes; PyTorch is the reference only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
litert = pytest.importorskip("ai_edge_litert.interpreter")

from converters.checkpoint.decoders import (  # noqa: E402
    Decoder,
    build_decoder,
    convert_decoder_tflite,
    export_saved_model,
)
from converters.checkpoint.loader import Checkpoint, open_checkpoint  # noqa: E402
from converters.checkpoint.weights import Weights  # noqa: E402
from converters.tflite_info import op_versions  # noqa: E402
from edge_slm.errors import ConversionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB, MAX_CACHE, PREFILL = 100, 32, 8
PROMPT_LEN, NEW = 5, 10
# initializer_range 0.1 instead of 0.02 so random logits have real gaps between the top tokens.
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
VARIANTS = ("gpt2", "llama-untied-llama3", "llama-tied-linear", "qwen2-bias")
IDS = np.random.default_rng(0).integers(3, VOCAB, (1, 24)).astype(np.int32)


@dataclass
class Built:
    kind: str
    path: Path
    dec: Decoder
    torch_logits: np.ndarray  # [1, 24, V] for IDS
    torch_params: int


def _torch_model(kind: str) -> Any:
    t = transformers
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           initializer_range=0.1, bos_token_id=1, eos_token_id=2)
        return t.GPT2LMHeadModel(cfg)
    if kind == "llama-untied-llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
        return t.LlamaForCausalLM(t.LlamaConfig(**LLAMA, rope_scaling=rope, tie_word_embeddings=False))
    if kind == "llama-tied-linear":
        return t.LlamaForCausalLM(t.LlamaConfig(**LLAMA, rope_scaling={"type": "linear", "factor": 2.0},
                                                rope_theta=500.0, tie_word_embeddings=True))
    return t.Qwen2ForCausalLM(t.Qwen2Config(**LLAMA))


def _open(path: Path) -> Checkpoint:
    config = json.loads((path / "config.json").read_text())
    if config["model_type"] == "qwen2":
        # loader.py maps only model_type "llama"; a Qwen2 checkpoint is the LLaMA graph plus q/k/v biases.
        return Checkpoint(path, config, "llama", "causal-lm", Weights(path, ("", "model.")), None)
    return open_checkpoint(path)


def _save(kind: str, path: Path) -> tuple[np.ndarray, int]:
    torch.manual_seed(0)
    model = _torch_model(kind).eval()
    with torch.no_grad():  # init leaves biases at 0 and norm weights at 1, which would hide their misuse
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(IDS).long()).logits.numpy()
    return logits, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for kind in VARIANTS:
        logits, n = _save(kind, root / kind)
        out[kind] = Built(kind, root / kind, build_decoder(_open(root / kind), MAX_CACHE, PREFILL), logits, n)
    return out


@pytest.fixture(scope="module")
def tflite(built: dict[str, Built], tmp_path_factory: pytest.TempPathFactory) -> Any:
    saved: dict[str, Path] = {}
    cache: dict[tuple[str, str], bytes] = {}

    def get(kind: str, recipe: str) -> bytes:
        if kind not in saved:
            saved[kind] = export_saved_model(built[kind].dec, tmp_path_factory.mktemp("sm") / kind)
        if (kind, recipe) not in cache:
            cache[kind, recipe] = convert_decoder_tflite(saved[kind], recipe)
        return cache[kind, recipe]

    return get


def _padded(ids: np.ndarray, fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    padded = np.full((1, PREFILL), fill, dtype=np.int32)
    padded[0, : ids.shape[1]] = ids[0]
    return padded, np.array([ids.shape[1]], dtype=np.int32)


def _runners(model: bytes) -> tuple[Any, Any]:
    interp = litert.Interpreter(model_content=model)
    return interp.get_signature_runner("prefill"), interp.get_signature_runner("decode")


def _teacher_forced(prefill: Any, decode: Any) -> np.ndarray:
    """Logits at positions PROMPT_LEN-1 .. PROMPT_LEN+NEW-1 feeding IDS one token at a time."""
    ids, length = _padded(IDS[:, :PROMPT_LEN])
    out = prefill(input_ids=ids, length=length)
    rows = [np.asarray(out["logits"])]
    k, v = out["k_cache"], out["v_cache"]
    for p in range(PROMPT_LEN, PROMPT_LEN + NEW):
        out = decode(token=IDS[:, p : p + 1], position=np.array([p], np.int32), k_cache=k, v_cache=v)
        rows.append(np.asarray(out["logits"]))
        k, v = out["k_cache"], out["v_cache"]
    return np.concatenate(rows)


def _greedy(prefill: Any, decode: Any, n: int = 8) -> list[int]:
    ids, length = _padded(IDS[:, :PROMPT_LEN])
    out = prefill(input_ids=ids, length=length)
    tokens = []
    for p in range(PROMPT_LEN, PROMPT_LEN + n):
        tokens.append(int(np.argmax(np.asarray(out["logits"])[0])))
        out = decode(token=np.array([[tokens[-1]]], np.int32), position=np.array([p], np.int32),
                     k_cache=out["k_cache"], v_cache=out["v_cache"])
    return tokens


@pytest.mark.parametrize("kind", VARIANTS)
def test_full_logits_match_transformers(built: dict[str, Built], kind: str) -> None:
    b = built[kind]
    ours = b.dec.full_logits(IDS).numpy()
    assert ours.shape == (1, IDS.shape[1], VOCAB)
    assert np.abs(ours - b.torch_logits).max() < 1e-4
    assert b.torch_logits.std() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("kind", VARIANTS)
def test_param_count_counts_exported_weights(built: dict[str, Built], kind: str) -> None:
    b = built[kind]
    # GPT-2 keeps only the max_cache rows of wpe that a position can reach.
    dropped = (64 - MAX_CACHE) * 32 if kind == "gpt2" else 0
    assert b.dec.param_count == b.torch_params - dropped
    assert b.dec.weight_bytes_float32 == 4 * b.dec.param_count
    assert (b.dec.n_heads, b.dec.n_kv_heads, b.dec.head_dim) == ((4, 4, 8) if kind == "gpt2" else (4, 2, 8))


@pytest.mark.parametrize("kind", VARIANTS)
def test_prefill_then_decode_reproduces_full_logits(built: dict[str, Built], kind: str) -> None:
    dec = built[kind].dec
    full = dec.full_logits(IDS).numpy()[0, PROMPT_LEN - 1 : PROMPT_LEN + NEW]
    assert np.abs(_teacher_forced(dec.prefill, dec.decode) - full).max() < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama-untied-llama3"])
def test_padding_changes_nothing_and_cache_rows_past_length_are_zero(built: dict[str, Built], kind: str) -> None:
    dec = built[kind].dec
    a = dec.prefill(*_padded(IDS[:, :PROMPT_LEN], fill=0))
    b = dec.prefill(*_padded(IDS[:, :PROMPT_LEN], fill=77))
    for key in ("logits", "k_cache", "v_cache"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    k = a["k_cache"].numpy()
    assert k.shape == (2, dec.n_kv_heads, MAX_CACHE, dec.head_dim)
    assert not k[:, :, PROMPT_LEN:].any() and not a["v_cache"].numpy()[:, :, PROMPT_LEN:].any()
    assert k[:, :, :PROMPT_LEN].any()


@pytest.mark.parametrize("kind", VARIANTS)
def test_tflite_float32_greedy_matches_tensorflow(built: dict[str, Built], tflite: Any, kind: str) -> None:
    dec = built[kind].dec
    model = tflite(kind, "float32")
    ops = op_versions(model)
    assert not [op for op in ops if op.startswith(("CUSTOM", "FLEX"))], ops
    prefill, decode = _runners(model)
    cache_shape = [2, dec.n_kv_heads, MAX_CACHE, dec.head_dim]
    ins = {k: (list(v["shape"]), np.dtype(v["dtype"])) for k, v in decode.get_input_details().items()}
    assert ins == {"token": ([1, 1], np.int32), "position": ([1], np.int32),
                   "k_cache": (cache_shape, np.float32), "v_cache": (cache_shape, np.float32)}
    outs = {k: list(v["shape"]) for k, v in prefill.get_output_details().items()}
    assert outs == {"logits": [1, VOCAB], "k_cache": cache_shape, "v_cache": cache_shape}
    assert _greedy(prefill, decode) == _greedy(dec.prefill, dec.decode)
    assert np.abs(_teacher_forced(prefill, decode) - _teacher_forced(dec.prefill, dec.decode)).max() < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama-untied-llama3"])
def test_tflite_dynamic_range_keeps_top1(built: dict[str, Built], tflite: Any, kind: str) -> None:
    dec = built[kind].dec
    model = tflite(kind, "dynamic")
    assert len(model) < 0.8 * len(tflite(kind, "float32"))
    ref = _teacher_forced(dec.prefill, dec.decode)
    got = _teacher_forced(*_runners(model))
    agree = np.mean(ref.argmax(-1) == got.argmax(-1))
    cos = np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    # What the float model gives up by taking the quantized pick: 0 on agreement, tiny on a near-tie.
    regret = ref.max(-1) - ref[np.arange(len(ref)), got.argmax(-1)]
    assert agree >= 0.7, agree
    assert regret.max() < 0.05 * np.ptp(ref), regret
    assert cos.min() > 0.999, cos


def test_tflite_float16_stays_close(built: dict[str, Built], tflite: Any) -> None:
    dec = built["llama-untied-llama3"].dec
    ref = _teacher_forced(dec.prefill, dec.decode)
    got = _teacher_forced(*_runners(tflite("llama-untied-llama3", "float16")))
    assert np.abs(ref - got).max() < 2e-2
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.9


def test_decode_past_max_cache_fails_instead_of_guessing(built: dict[str, Built], tflite: Any) -> None:
    # The device refuses before calling; the graph backs that up: the position table has exactly
    # max_cache rows, so GATHER rejects position >= max_cache rather than overwrite or clamp.
    for kind in ("gpt2", "llama-tied-linear"):
        _, decode = _runners(tflite(kind, "float32"))
        dec = built[kind].dec
        cache = np.zeros((2, dec.n_kv_heads, MAX_CACHE, dec.head_dim), np.float32)
        with pytest.raises(RuntimeError, match="out of bounds"):
            decode(token=np.array([[5]], np.int32), position=np.array([MAX_CACHE], np.int32),
                   k_cache=cache, v_cache=cache)


def test_saved_model_holds_only_prefill_and_decode(built: dict[str, Built], tmp_path: Path) -> None:
    from converters.tf_env import tf

    export_saved_model(built["gpt2"].dec, tmp_path / "sm")
    assert set(tf().saved_model.load(str(tmp_path / "sm")).signatures) == {"prefill", "decode"}


@pytest.mark.parametrize("kind,key", [("gpt2", "n_positions"), ("llama-tied-linear", "max_position_embeddings")])
def test_max_cache_beyond_position_table_is_refused(built: dict[str, Built], kind: str, key: str) -> None:
    with pytest.raises(ConversionError, match=key):
        build_decoder(_open(built[kind].path), 65, 8)
    with pytest.raises(ConversionError, match="prefill_len"):
        build_decoder(_open(built[kind].path), 16, 17)


@pytest.mark.parametrize("kind,tensor", [("gpt2", "transformer.h.1.mlp.c_fc.bias"),
                                         ("llama-untied-llama3", "lm_head.weight")])
def test_missing_tensor_is_named(built: dict[str, Built], tmp_path: Path, kind: str, tensor: str) -> None:
    from safetensors.numpy import load_file, save_file

    src = built[kind].path
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[tensor]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    short = tensor.removeprefix("transformer.")
    with pytest.raises(ConversionError, match=short.replace(".", r"\.")):
        build_decoder(open_checkpoint(tmp_path), MAX_CACHE, PREFILL)


def test_dynamic_rope_is_refused(built: dict[str, Built], tmp_path: Path) -> None:
    src = built["llama-tied-linear"].path
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match="rope_type 'dynamic'"):
        build_decoder(open_checkpoint(tmp_path), MAX_CACHE, PREFILL)


def test_bfloat16_checkpoint_matches_its_float32_upcast(tmp_path: Path) -> None:
    # TinyLlama and SmolLM ship bf16 safetensors; numpy reads them through ml_dtypes (TensorFlow imports it).
    torch.manual_seed(1)
    model = _torch_model("llama-tied-linear").eval()
    with torch.no_grad():  # round the weights only: .to(bfloat16) would round the RoPE buffer as well
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        ref = model(torch.from_numpy(IDS).long()).logits.numpy()
    model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    dec = build_decoder(open_checkpoint(tmp_path), MAX_CACHE, PREFILL)
    assert np.abs(dec.full_logits(IDS).numpy() - ref).max() < 1e-4


def test_decoder_builds_without_pytorch(built: dict[str, Built]) -> None:
    code = (
        "import sys, numpy as np\n"
        "from converters.checkpoint.loader import open_checkpoint\n"
        "from converters.checkpoint.decoders import build_decoder\n"
        f"dec = build_decoder(open_checkpoint({str(built['llama-tied-linear'].path)!r}), 16, 4)\n"
        "dec.prefill(np.zeros((1, 4), np.int32), np.array([2], np.int32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
