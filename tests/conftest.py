"""Shared fixtures that start real things: mosquitto on a free port, amqtt, tiny trained models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["tests.fixtures_voice", "tests.fixtures_sensor", "tests.fixtures_mcu"]

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


@dataclass
class Mosquitto:
    """A real mosquitto process on a loopback port; restartable on the same port."""

    binary: str
    port: int
    conf: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_mosquitto(tmp: Path, persist: bool = False) -> Mosquitto:
    binary = mosquitto_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("mosquitto is not installed; `make test` installs it with apt-get")
        pytest.skip("mosquitto not installed (apt-get install mosquitto); CI installs it")
    port = free_port()
    conf = tmp / f"mosquitto-{port}.conf"
    # max_queued_messages 0: unlimited; with the default 1000 a slow QoS 1 subscriber lost messages here.
    conf.write_text(
        # as root mosquitto drops to user "mosquitto", which cannot write its session file into
        # pytest's 0700 temp dirs: sessions would then not survive a restart
        ("user root\n" if os.geteuid() == 0 else "")
        + f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nset_tcp_nodelay true\n"
        "log_dest stdout\nlog_type error\n"
        + (f"persistence true\npersistence_location {tmp}/\n" if persist else "persistence false\n")
    )
    return Mosquitto(binary, port, conf).start()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> Mosquitto:  # noqa: ANN001
    """One mosquitto for the session: tests must use their own device ids / topics."""
    m = _start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield m
    m.stop()


@pytest.fixture
def own_mosquitto(tmp_path) -> Mosquitto:  # noqa: ANN001
    """A mosquitto this test may stop and restart; sessions persist across its restarts."""
    m = _start_mosquitto(tmp_path, persist=True)
    yield m
    m.stop()


@pytest.fixture
def amqtt_broker():
    from devices.broker import EmbeddedBroker

    b = EmbeddedBroker().start()
    yield b
    b.stop()


@dataclass
class TextModel:
    """A tiny smart-home intent model, trained and converted once per session."""

    workdir: Path
    keras_path: Path
    tokenizer: Path
    package: Path
    calib: Path
    eval: Path
    labels: list[str]
    test_texts: list[str]
    test_labels: list[int]
    result: object


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> TextModel:  # noqa: ANN001
    from converters.convert import convert_model
    from converters.datasets.smart_home import LABELS, generate
    from converters.text_classifier import train_text_classifier

    work = tmp_path_factory.mktemp("text_model")
    train, test = generate(per_intent=200)
    keras_path, tok, enc = train_text_classifier(train.texts, train.labels, len(LABELS), work / "train", epochs=6)
    calib = work / "calib.npz"
    np.savez(calib, x=enc.encode_batch(train.texts[:200]))
    ev = work / "eval.npz"
    np.savez(ev, x=enc.encode_batch(test.texts[:400]), y=np.asarray(test.labels[:400], dtype=np.int32))
    result = convert_model(keras_path, work / "pkg", calib=calib, eval_data=ev, quantize="auto", tokenizer=tok,
                           labels=LABELS, name="intents", progress=False)
    return TextModel(work, keras_path, tok, result.package.path, calib, ev, list(LABELS), test.texts, test.labels, result)


@pytest.fixture
def package_copy(text_model, tmp_path) -> Path:  # noqa: ANN001
    """A private copy of the text package that a test may damage."""
    dest = tmp_path / "pkg"
    shutil.copytree(text_model.package, dest)
    return dest


@dataclass
class SensorModel:
    keras_path: Path
    calib: Path
    eval: Path


@pytest.fixture(scope="session")
def sensor_model(tmp_path_factory) -> SensorModel:  # noqa: ANN001
    """A Conv1D classifier on float windows (3 classes of synthetic vibration), trained in seconds."""
    from converters.tf_env import tf

    keras = tf().keras
    work = tmp_path_factory.mktemp("sensor_model")
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(64) / 64.0
        y = rng.integers(0, 3, n)
        freq = np.array([2.0, 5.0, 11.0])[y][:, None]
        x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28, (n, 1))) + 0.3 * rng.normal(size=(n, 64))
        x = np.stack([x, 0.5 * x + 0.1 * rng.normal(size=(n, 64))], axis=-1).astype(np.float32)
        return x, y.astype(np.int32)

    x, y = make(1200)
    keras.utils.set_random_seed(0)
    inp = keras.Input((64, 2), name="window")
    h = keras.layers.Conv1D(32, 5, activation="relu")(inp)
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.Conv1D(64, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    out = keras.layers.Dense(3)(h)
    model = keras.Model(inp, out)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    path = work / "sensor.keras"
    model.save(path)
    np.savez(work / "calib.npz", x=x[:200])
    xe, ye = make(300)
    np.savez(work / "eval.npz", x=xe, y=ye)
    return SensorModel(path, work / "calib.npz", work / "eval.npz")


def run_cli(*args: str, timeout: float = 300, input: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`edge-slm ARGS` in a subprocess of this interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge_slm.cli", *args], capture_output=True, timeout=timeout,
                          input=input, env=full_env, cwd=tempfile.gettempdir())


class Collector:
    """A real paho client that records every message on some topics, for assertions."""

    def __init__(self, url: str, *topics: str, persistent: bool = False, username: str = "", password: str = "",
                 tls: tuple | None = None, client_id: str | None = None) -> None:
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from edge_slm.mqtt import parse_broker_url

        addr = parse_broker_url(url)
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cv = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"collector-{free_port()}",
                                  clean_session=not persistent)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.client.reconnect_delay_set(0.2, 1)
        self.client.max_queued_messages_set(0)

        def on_connect(c, u, f, rc, p) -> None:  # noqa: ANN001
            for t in topics:
                c.subscribe(t, qos=1)

        def on_subscribe(c, u, mid, rc, p) -> None:  # noqa: ANN001
            self._subscribed.set()

        def on_message(c, u, msg) -> None:  # noqa: ANN001
            with self._cv:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
                self._cv.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"
        time.sleep(0.1)

    def wait_for(self, n: int, timeout: float = 30.0, topic_contains: str = "") -> list[tuple[str, bytes, bool]]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                got = [m for m in self.messages if topic_contains in m[0]]
                if len(got) >= n or time.monotonic() > deadline:
                    return got
                self._cv.wait(0.1)

    def json(self, topic_contains: str) -> list[dict]:
        import json

        with self._cv:
            return [json.loads(p) for t, p, _ in self.messages if topic_contains in t]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_agent_toml(path: Path, device_id: str, broker: str, package: Path, state_dir: Path,
                     source: str = "mqtt://", sinks: tuple[str, ...] = ("mqtt",), extra: str = "") -> Path:
    sinks_s = ", ".join(f'"{s}"' for s in sinks)
    path.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{state_dir}"\n{extra}\n'
        f'[mqtt]\nbroker = "{broker}"\nconnect_timeout_s = 3.0\n\n'
        f'[[pipelines]]\nname = "intent"\nmodel = "{package}"\nsource = "{source}"\nsinks = [{sinks_s}]\n'
    )
    return path


def start_agent_process(config: Path, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_slm.cli", "run", str(config)],
                            stdout=open(log_file, "wb"), stderr=subprocess.STDOUT)


def bert_tokenizer(texts: list[str]):  # noqa: ANN201
    """A real BERT-style tokenizer.json: WordPiece, lowercase, [CLS] ... [SEP] post-processor."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=800, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return tok


@dataclass
class BertCheckpoint:
    path: Path
    eval_txt: Path
    calib_txt: Path
    labels: list[str]


@pytest.fixture(scope="session")
def bert_intent_checkpoint(tmp_path_factory) -> BertCheckpoint:  # noqa: ANN001
    """A tiny BertForSequenceClassification fine-tuned with PyTorch on the intent data, saved with
    save_pretrained (safetensors) and a tokenizer.json: what a user brings from a model hub."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from converters.datasets.smart_home import LABELS, generate

    work = tmp_path_factory.mktemp("bert_ckpt")
    train, test = generate(per_intent=200)
    tok = bert_tokenizer(train.texts)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=len(LABELS),
                     id2label=dict(enumerate(LABELS)), label2id={k: i for i, k in enumerate(LABELS)})
    model = BertForSequenceClassification(cfg)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(32)
    enc = tok.encode_batch(train.texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    y = torch.tensor(train.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _epoch in range(4):
        perm = torch.randperm(len(y))
        for start in range(0, len(y), 64):
            b = perm[start : start + 64]
            loss = model(input_ids=ids[b], attention_mask=mask[b], labels=y[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ckpt = work / "tiny-bert-intents"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.no_padding()
    tok.no_truncation()
    tok.save(str(ckpt / "tokenizer.json"))
    eval_txt = work / "eval.tsv"
    eval_txt.write_text("".join(f"{t}\t{LABELS[y]}\n" for t, y in zip(test.texts[:300], test.labels[:300])))
    calib_txt = work / "calib.txt"
    calib_txt.write_text("\n".join(train.texts[:200]) + "\n")
    return BertCheckpoint(ckpt, eval_txt, calib_txt, list(LABELS))


@dataclass
class LmCheckpoint:
    path: Path
    eval_txt: Path


@pytest.fixture(scope="session")
def llama_lm_checkpoint(tmp_path_factory) -> LmCheckpoint:  # noqa: ANN001
    """A tiny LlamaForCausalLM (GQA, untied head) trained with PyTorch on smart-home commands, with a
    byte-level BPE tokenizer.json: a small real language model, saved as a hub checkpoint would be."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from converters.datasets.smart_home import generate

    work = tmp_path_factory.mktemp("llama_ckpt")
    train, test = generate(per_intent=150)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train.texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=bos, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    seqs = [[bos] + tok.encode(t).ids + [eos] for t in train.texts]
    length = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _epoch in range(3):
        perm = torch.randperm(len(seqs))
        for start in range(0, len(seqs), 64):
            b = perm[start : start + 64]
            loss = model(input_ids=ids[b], attention_mask=mask[b], labels=labels[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ckpt = work / "tiny-llama-home"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save(str(ckpt / "tokenizer.json"))
    eval_txt = work / "eval.txt"
    eval_txt.write_text("\n".join(test.texts[:80]) + "\n")
    return LmCheckpoint(ckpt, eval_txt)
