"""Train a small keyword-spotting CNN on the espeak-ng keyword dataset and ship it as a full-int8 package.

Host only; TensorFlow comes lazily through converters.tf_env. Features are edge_slm.audio.FrontEnd, the
same code the device runs, so training and device never drift.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.datasets import keywords as kw
from converters.tf_env import console, silenced, tf
from edge_slm.audio import FrontEnd, mel_filterbank
from edge_slm.errors import ConversionError

DEFAULT_STREAMING: dict[str, float] = {"stride_ms": 100.0, "smoothing_ms": 300.0, "threshold": 0.7,
                                       "refractory_ms": 1000.0}


def clip_features(front_end: FrontEnd, audio: np.ndarray, batch: int = 512) -> np.ndarray:
    """float32 [n, clip samples] -> model inputs float32 [n, frames, features, 1]."""
    out = [front_end.features_batch(audio[i:i + batch]) for i in range(0, len(audio), batch)]
    return np.concatenate(out)[..., None].astype(np.float32)


def build_model(input_shape: tuple[int, int, int], n_classes: int, *, width: int = 48,
                feature_mean: float = 0.0, feature_scale: float = 1.0, seed: int = 0):  # noqa: ANN201 - keras.Model
    """Temporal CNN on [frames, features, 1]: a first Conv2D spanning all mel bands, then (3 x 1) Conv2D
    blocks along time, each BatchNorm (folded into the conv at conversion) + ReLU, global average pool,
    dense, softmax.

    Every op (CONV_2D, MEAN, FULLY_CONNECTED, SOFTMAX, plus the MUL/ADD of the input scaling) has
    full-int8 kernels in TFLite and TFLM. Sliding along time only is what makes it cheap: ~0.5 M MACs.
    """
    keras = tf().keras
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inp = keras.Input(shape=input_shape, name="features")
    # Log-mel values sit around -14..6; a fixed affine centres them for training.
    x = layers.Rescaling(1.0 / feature_scale, offset=-feature_mean / feature_scale, name="standardize")(inp)
    x = layers.Conv2D(width, (3, input_shape[1]), use_bias=False, name="conv0")(x)
    x = layers.BatchNormalization(momentum=0.9, name="bn0")(x)
    x = layers.ReLU(max_value=6.0, name="relu0")(x)
    plan = ((width, 1), (width * 3 // 2, 2), (width * 3 // 2, 1), (width * 2, 2), (width * 2, 1))
    for i, (channels, stride) in enumerate(plan, 1):
        x = layers.Conv2D(channels, (3, 1), strides=(stride, 1), padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.ReLU(max_value=6.0, name=f"relu{i}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(0.2, name="drop")(x)
    x = layers.Dense(n_classes, name="logits")(x)
    out = layers.Softmax(name="posteriors")(x)
    return keras.Model(inp, out, name="keyword_tcnn")


class FeatureAugmenter:
    """Augmentation on log-mel features, so training never recomputes the front end.

    Time shift: whole frames (the word stays in the clip). Extra noise: ln(e^speech + e^noise) with
    noise features of every synthetic kind at 0-20 dB below the clip's mean power (power spectra add).
    Level: a gain of +-6 dB. Voice: a random stretch of the mel axis (see warp()). Band: some clips lose
    everything above 4 kHz, as 8 kHz input upsampled to the model's rate does.
    """

    def __init__(self, front_end: FrontEnd, frames: int, rng: np.random.Generator, per_kind: int = 6) -> None:
        n = front_end.n_samples(frames * 4)
        noise = np.stack([kw.make_noise(k, n, rng, front_end.sample_rate) * 0.05 for k in kw.NOISES
                          for _ in range(per_kind)]).astype(np.float32)
        self.noise = front_end.features_batch(noise)  # at RMS 0.05
        self.frames = frames
        self.floor = float(np.log(front_end.log_floor))
        self.log_floor = front_end.log_floor
        # Share of each mel filter's weight below 4 kHz: what is left of a flat spectrum after 8 kHz audio
        # was upsampled to the model's rate (telephone-band input).
        mel = mel_filterbank(front_end.sample_rate, front_end.fft_length(), front_end.n_mels, float(front_end.fmin),
                             front_end.upper_hz())
        freqs = np.linspace(0.0, front_end.sample_rate / 2, mel.shape[0])
        self.narrowband = np.stack([mel[freqs < cut].sum(axis=0) / np.maximum(mel.sum(axis=0), 1e-12)
                                    for cut in (3400.0, 3700.0, 4000.0)]).astype(np.float32)  # resamplers roll off early
        self.hop_s = front_end.hop_length() / front_end.sample_rate

    @staticmethod
    def warp(x: np.ndarray, rng: np.random.Generator, max_warp: float = 0.12) -> np.ndarray:
        """Vocal tract length perturbation: stretch each clip's mel axis by a factor in 1 +- max_warp
        (a longer or shorter vocal tract moves every formant by the same ratio)."""
        n_mels = x.shape[-1]
        alpha = rng.uniform(1 - max_warp, 1 + max_warp, size=(len(x), 1))
        src = np.clip(np.arange(n_mels)[None, :] * alpha, 0, n_mels - 1)  # [n, mels]
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_mels - 1)
        w = (src - lo).astype(np.float32)[:, None, :]
        a = np.take_along_axis(x, np.broadcast_to(lo[:, None, :], x.shape), axis=2)
        b = np.take_along_axis(x, np.broadcast_to(hi[:, None, :], x.shape), axis=2)
        return a * (1 - w) + b * w

    def __call__(self, x: np.ndarray, meta: Sequence[dict[str, Any]], rng: np.random.Generator,
                 max_shift_s: float = 0.25, noise_prob: float = 0.6, narrowband_prob: float = 0.15) -> np.ndarray:
        """x: float32 [n, frames, features] -> augmented copy."""
        out = np.empty_like(x)
        max_shift = int(max_shift_s / self.hop_s)
        for i, m in enumerate(meta):
            if m["offset_s"] is None:
                lo, hi = -max_shift, max_shift
            else:
                start = int(m["offset_s"] / self.hop_s)
                end = int(np.ceil((m["offset_s"] + m["duration_s"]) / self.hop_s))
                lo, hi = max(-max_shift, -start), min(max_shift, self.frames - end)
            out[i] = np.roll(x[i], int(rng.integers(lo, hi + 1)) if hi >= lo else 0, axis=0)
        out = self.warp(out, rng)
        out += rng.uniform(-1.38, 1.38, size=(len(x), 1, 1)).astype(np.float32)  # ln(gain^2), +-6 dB
        extra = np.flatnonzero(rng.random(len(x)) < noise_prob)
        if len(extra):
            rows = rng.integers(len(self.noise), size=len(extra))
            starts = rng.integers(self.noise.shape[1] - self.frames, size=len(extra))
            noise = np.stack([self.noise[r, s:s + self.frames] for r, s in zip(rows, starts)])
            power = np.log(np.mean(np.exp(out[extra]), axis=(1, 2), keepdims=True))  # clip's mean mel power
            level = power - np.log(np.mean(np.exp(noise), axis=(1, 2), keepdims=True))
            level -= rng.uniform(0.0, 20.0, size=(len(extra), 1, 1)) * np.log(10) / 10  # dB below the clip
            out[extra] = np.logaddexp(out[extra], noise + level.astype(np.float32))
        narrow = np.flatnonzero(rng.random(len(x)) < narrowband_prob)
        if len(narrow):  # as if the clip had come in at 8 kHz
            keep = self.narrowband[rng.integers(len(self.narrowband), size=len(narrow))][:, None, :]
            power = np.maximum(np.exp(out[narrow]) - self.log_floor, 0.0) * keep
            out[narrow] = np.log(power + self.log_floor)
        return np.maximum(out, self.floor)


@dataclass
class TrainedKeywordModel:
    model: Any  # keras.Model
    labels: list[str]
    front_end: FrontEnd
    test_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_keyword_model(
    dataset: kw.KeywordDataset,
    front_end: FrontEnd | None = None,
    *,
    epochs: int = 24,
    batch_size: int = 32,
    width: int = 48,
    learning_rate: float = 3e-3,
    augment: bool = True,
    label_smoothing: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainedKeywordModel:
    """Train the CNN on dataset.train (fresh feature augmentation every epoch); accuracy on the held-out voices."""
    front_end = front_end or FrontEnd(sample_rate=dataset.sample_rate)
    if front_end.sample_rate != dataset.sample_rate:
        raise ConversionError(f"front end runs at {front_end.sample_rate} Hz, the dataset at {dataset.sample_rate} Hz")
    keras = tf().keras
    rng = np.random.default_rng(seed)
    x_train = clip_features(front_end, dataset.train.audio)[..., 0]
    x_test = clip_features(front_end, dataset.test.audio)
    shape = (x_train.shape[1], x_train.shape[2], 1)
    model = build_model(shape, len(dataset.labels), width=width, seed=seed, feature_mean=float(x_train.mean()),
                        feature_scale=float(x_train.std()) or 1.0)
    steps = epochs * int(np.ceil(len(dataset.train) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.02)
    # Label smoothing keeps the logits in a narrow range, so their int8 steps stay fine enough that
    # quantization rarely swaps the top two classes.
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  metrics=["accuracy"])
    y_train = np.eye(len(dataset.labels), dtype=np.float32)[dataset.train.y]
    augmenter = FeatureAugmenter(front_end, shape[0], rng) if augment else None
    history = []
    for epoch in range(epochs):
        x = augmenter(x_train, dataset.train.meta, rng) if augmenter else x_train
        h = model.fit(x[..., None], y_train, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
        record = {k: round(float(v[-1]), 4) for k, v in h.history.items()}
        history.append(record)
        if progress:
            progress(epoch + 1, epochs, record)
    probs = model.predict(x_test, batch_size=256, verbose=0)
    acc = float(np.mean(np.argmax(probs, axis=1) == dataset.test.y))
    return TrainedKeywordModel(model, list(dataset.labels), front_end, acc, history)


@dataclass
class KeywordPackageResult:
    package: Path
    labels: list[str]
    heldout: dict[str, Any]  # what went into manifest["validation"]["heldout_voice_accuracy"]
    keras_model: Path
    calib: Path
    eval_data: Path
    float_model_bytes: bytes


def heldout_accuracy(package_dir: str | Path, float_model: bytes, test: kw.KeywordSplit) -> dict[str, Any]:
    """Held-out-voice accuracy through the device path (edge_slm.kws: FrontEnd + runtime), int8 and float."""
    from edge_slm import runtime
    from edge_slm.kws import KeywordSpotter
    from edge_slm.package import ModelPackage

    pkg = ModelPackage.open(package_dir)
    int8 = KeywordSpotter(pkg, runtime.load(pkg.model_path))
    flt = KeywordSpotter(pkg, runtime.load(content=float_model))
    p_int8 = int8.posteriors_batch(test.audio, pkg.preprocessing["audio"]["sample_rate"])
    p_float = flt.posteriors_batch(test.audio, pkg.preprocessing["audio"]["sample_rate"])
    top_i, top_f = p_int8.argmax(1), p_float.argmax(1)
    return {"split": "held-out voices (variants never heard in training)", "voices": sorted(test.voices),
            "n": int(len(test)), "float": round(float(np.mean(top_f == test.y)), 6),
            "int8": round(float(np.mean(top_i == test.y)), 6),
            "int8_float_agreement": round(float(np.mean(top_i == top_f)), 6)}


def build_keyword_package(
    out_dir: str | Path,
    dataset: kw.KeywordDataset | None = None,
    *,
    front_end: FrontEnd | None = None,
    work_dir: str | Path | None = None,
    commands: Sequence[str] = kw.COMMANDS,
    epochs: int = 24,
    width: int = 48,
    seed: int = 0,
    quantize: str = "int8",
    streaming: dict[str, float] | None = None,
    name: str = "keywords",
    calib_size: int = 400,
    dataset_options: dict[str, Any] | None = None,
    say: Callable[[str], None] = lambda s: None,
    progress: bool = False,
) -> KeywordPackageResult:
    """Dataset (made here when not given) -> trained CNN -> validated package at out_dir.

    The manifest carries the front end, clip length, streaming defaults and, under
    validation.heldout_voice_accuracy, float and int8 accuracy on the held-out voices measured through
    the device runtime, plus their top-1 agreement.
    """
    from converters.convert import convert_model
    from edge_slm.package import LABELS_FILE, write_package

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="kws-"))
    work.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        say(f"speaking the dataset with espeak-ng (cache {work / 'speech'})")
        dataset = kw.make_keyword_dataset(work / "speech", commands=commands, seed=seed,
                                          progress=kw.tqdm_progress() if progress else None,
                                          **(dataset_options or {}))
    say(f"dataset: {len(dataset.train)} training clips, {len(dataset.test)} held-out-voice clips, "
        f"labels {', '.join(dataset.labels)}")
    front_end = front_end or FrontEnd(sample_rate=dataset.sample_rate)

    def show(epoch: int, total: int, record: dict[str, float]) -> None:
        say(f"epoch {epoch}/{total}: loss {record.get('loss', 0):.3f} accuracy {record.get('accuracy', 0):.3f}")

    with silenced():
        trained = train_keyword_model(dataset, front_end, epochs=epochs, width=width, seed=seed,
                                      progress=show if progress else None)
    say(f"float accuracy on held-out voices (Keras): {trained.test_accuracy:.3f}")
    keras_path = work / "kws.keras"
    trained.model.save(keras_path)
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(dataset.train))[:calib_size]
    calib, ev = work / "calib.npz", work / "eval.npz"
    np.savez(calib, x=clip_features(front_end, dataset.train.audio[pick]))
    np.savez(ev, x=clip_features(front_end, dataset.test.audio), y=dataset.test.y)
    prep = {"audio": front_end.to_manifest(), "clip_s": dataset.clip_s,
            "streaming": {**DEFAULT_STREAMING, **(streaming or {})},
            "dataset": {"generator": "converters.datasets.keywords (espeak-ng)", **dataset.settings}}
    result = convert_model(keras_path, out_dir, calib=calib, eval_data=ev, quantize=quantize,
                           task="keyword-spotting", labels=list(dataset.labels), preprocessing=prep, name=name,
                           progress=progress, say=say)
    if result.package is None or result.baseline is None:
        raise ConversionError(f"conversion wrote no package: {result.reason}")
    heldout = heldout_accuracy(result.package.path, result.baseline.model_bytes, dataset.test)
    heldout["keras_float"] = round(trained.test_accuracy, 6)
    heldout["quantized_recipe"] = result.chosen  # what the "int8" numbers were measured on
    say(f"held-out voices through the device runtime: float {heldout['float']:.3f}, {result.chosen} "
        f"{heldout['int8']:.3f}, agreement {heldout['int8_float_agreement']:.3f}")
    # Re-write the package with the device-path numbers in its manifest (write_package re-hashes it).
    manifest = dict(result.package.manifest)
    manifest["validation"] = {**manifest["validation"], "heldout_voice_accuracy": heldout}
    model_bytes = result.package.model_path.read_bytes()
    pkg = write_package(out_dir, model_bytes, manifest,
                        {LABELS_FILE: ("\n".join(dataset.labels) + "\n").encode()})
    return KeywordPackageResult(pkg.path, list(dataset.labels), heldout, keras_path, calib, ev,
                                result.baseline.model_bytes)


# --- CLI ------------------------------------------------------------------------------------------
def add_cli(subparsers: argparse._SubParsersAction, command: str = "train-kws") -> argparse.ArgumentParser:
    """Register `train-kws` on an argparse sub-command set; the handler is cmd_train_kws."""
    p = subparsers.add_parser(
        command, help="speak a keyword dataset with espeak-ng, train a keyword spotter, write a full-int8 package",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generates command words, unknown words and noise clips with espeak-ng (many voices, noise at "
        "several SNRs), trains a small DS-CNN on log-mel features from edge_slm.audio.FrontEnd, converts it to a "
        "full-int8 TFLite package and reports accuracy on voices held out from training.")
    p.add_argument("--out", "-o", required=True, help="package directory to write")
    p.add_argument("--words", nargs="+", default=list(kw.COMMANDS), help="command words")
    p.add_argument("--workdir", help="keep the speech cache, model.keras and npz files here (default: a temp dir)")
    p.add_argument("--per-command", type=int, default=300, help="training clips per command")
    p.add_argument("--mixes", type=int, default=2, help="clips mixed from each espeak-ng rendition (other noise, "
                   "SNR, offset, level)")
    p.add_argument("--test-per-command", type=int, default=40, help="held-out-voice clips per command")
    p.add_argument("--snr", type=float, nargs="+", default=[20.0, 10.0, 5.0], help="SNRs (dB) of the mixed noise")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--width", type=int, default=48, help="channels per conv layer")
    p.add_argument("--quantize", default="int8", choices=["int8", "float32", "float16", "dynamic", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=DEFAULT_STREAMING["threshold"],
                   help="streaming: smoothed score that reports a command")
    p.add_argument("--json", action="store_true", help="print the held-out numbers as JSON")
    p.set_defaults(func=cmd_train_kws)
    return p


def cmd_train_kws(args: argparse.Namespace) -> int:
    out = console()

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=out)

    unknown = tuple(w for w in kw.UNKNOWN_WORDS if w not in set(args.words))
    result = build_keyword_package(
        args.out, work_dir=args.workdir, commands=args.words, epochs=args.epochs, width=args.width, seed=args.seed,
        quantize=args.quantize, streaming={"threshold": args.threshold}, say=say, progress=not args.json,
        dataset_options={"train_per_command": args.per_command, "mixes_per_utterance": args.mixes,
                         "test_per_command": args.test_per_command,
                         "snrs_db": tuple(args.snr), "unknown_words": unknown})
    if args.json:
        print(json.dumps({"ok": True, "package": str(result.package), "labels": result.labels,
                          "heldout_voice_accuracy": result.heldout}, indent=2))
    else:
        h = result.heldout
        print(f"wrote {result.package}: held-out voices float {h['float']:.3f}, int8 {h['int8']:.3f}, "
              f"agreement {h['int8_float_agreement']:.3f} ({h['n']} clips, {len(h['voices'])} voices)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from edge_slm.errors import EdgeSlmError

    parser = argparse.ArgumentParser(prog="python -m converters.kws", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p = add_cli(sub)
    p.prog = "python -m converters.kws"
    # `python -m converters.kws --out DIR` is the train-kws command itself.
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except EdgeSlmError as exc:
        print(f"train-kws: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
