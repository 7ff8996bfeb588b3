"""Train the vibration models (anomaly autoencoder, fault classifier) and convert them to full-int8 packages.

Host only: TensorFlow through converters.tf_env. Windows and features come from edge_slm.sensors and
anomaly scores from edge_slm.sensor_tasks, the code the device runs, so training and device never drift.

    python -m converters.sensor_models --out models/   # writes models/vibration-anomaly, models/vibration-faults

Anomaly threshold: the `percentile` (default 98) of the int8 model's scores on NORMAL windows of
validation machines (never seen in training), so the false-alarm rate on a new machine is about
1 - percentile/100. Detection quality (AUC, detection and false-alarm rate at that threshold) is
measured on test machines, for the float model and for the int8 model as the device runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.datasets import vibration
from edge_slm import runtime
from edge_slm.errors import ConversionError
from edge_slm.package import ModelPackage, write_package
from edge_slm.sensor_tasks import error_to_score, reconstruction_error
from edge_slm.sensors import SensorFeatures, SensorWindower
from edge_slm.streams import SensorBlock

log = logging.getLogger(__name__)

WINDOW = 1024  # 0.32 s at 3200 Hz: several shaft turns at 15 Hz, 3.1 Hz spectral resolution
HOP = 512


@dataclass
class SensorData:
    """Raw features of every clean window, with labels and machine ids, split by machine."""

    features: SensorFeatures  # fitted: mean/std from the train split's normal windows
    raw: np.ndarray  # float32 [n, F]
    labels: np.ndarray  # int [n], index into vibration.CONDITIONS
    machines: np.ndarray  # int [n]
    split: np.ndarray  # str [n]: train / val / test
    hop: int
    skipped: int  # windows with missing or clipped samples, left out like the device leaves them out

    def x(self, split: str, condition: str | None = None) -> np.ndarray:
        keep = self.split == split
        if condition is not None:
            keep &= self.labels == vibration.CONDITIONS.index(condition)
        return self.features.normalize(self.raw[keep])

    def y(self, split: str) -> np.ndarray:
        return self.labels[self.split == split]

    def machine_ids(self, split: str) -> list[int]:
        return sorted({int(m) for m in self.machines[self.split == split]})


def window_features(recordings: Sequence[vibration.Recording], features: SensorFeatures,
                    hop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Raw features of every window the device would analyse; windows it would refuse are skipped."""
    xs, ys, ms, skipped = [], [], [], 0
    for r in recordings:
        w = SensorWindower(features.window, hop, features.channels, features.sample_rate, full_scale=features.full_scale)
        items = w.feed(SensorBlock(r.samples, r.sample_rate, r.channels, t0=r.t0))
        wins = [it.samples for it in items if not isinstance(it, Exception)]
        skipped += len(items) - len(wins)
        if wins:
            xs.append(features.raw(np.stack(wins)))
            ys += [r.label] * len(wins)
            ms += [r.machine.machine_id] * len(wins)
    return np.concatenate(xs), np.asarray(ys, np.int64), np.asarray(ms, np.int64), skipped


def prepare_data(recordings: Sequence[vibration.Recording], *, window: int = WINDOW, hop: int = HOP,
                 fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> SensorData:
    """Window, featurize and split by machine (train / val / test); normalization from train normals."""
    first = recordings[0]
    scales = tuple(first.machine.full_scale_g if c in vibration.ACCEL_CHANNELS else vibration.GYRO_FULL_SCALE
                   for c in first.channels)
    units = tuple("g" if c in vibration.ACCEL_CHANNELS else "deg/s" for c in first.channels)
    base = SensorFeatures(first.sample_rate, window, tuple(first.channels),
                          full_scale=scales if len(set(scales)) > 1 else scales[0], units=units)
    raw, labels, machines, skipped = window_features(recordings, base, hop)
    groups = vibration.split_by_machine(recordings, fractions, seed)
    split = np.empty(len(raw), dtype="<U5")
    for name, group in zip(("train", "val", "test"), groups):
        split[np.isin(machines, [r.machine.machine_id for r in group])] = name
    normal = raw[(split == "train") & (labels == 0)]
    return SensorData(base.fitted(normal), raw, labels, machines, split, hop, skipped)


def build_autoencoder(n_features: int, hidden: Sequence[int] = (64, 16), seed: int = 0):  # noqa: ANN201
    keras = _keras()
    keras.utils.set_random_seed(seed)
    inp = keras.Input((n_features,), name="features")
    h = inp
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"enc{i}")(h)
    for i, units in enumerate(reversed(hidden[:-1])):
        h = keras.layers.Dense(units, activation="relu", name=f"dec{i}")(h)
    out = keras.layers.Dense(n_features, name="reconstruction")(h)
    return keras.Model(inp, out, name="vibration_autoencoder")


def build_classifier(n_features: int, n_classes: int, hidden: Sequence[int] = (64, 32), seed: int = 0):  # noqa: ANN201
    keras = _keras()
    keras.utils.set_random_seed(seed)
    inp = keras.Input((n_features,), name="features")
    h = keras.layers.GaussianNoise(0.1)(inp)
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(h)
        h = keras.layers.Dropout(0.1)(h)
    out = keras.layers.Dense(n_classes, name="logits")(h)
    return keras.Model(inp, out, name="vibration_faults")


def _keras():  # noqa: ANN202
    from converters.tf_env import tf

    return tf().keras


def auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve: the chance an anomalous window scores above a normal one (ties half)."""
    a = np.asarray(normal, np.float64)
    b = np.asarray(anomalous, np.float64)
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # tied values share their average rank
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def detection_report(normal: np.ndarray, faults: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """False alarms on normal windows, detection rate per fault and overall, AUC; all at THRESHOLD."""
    allf = np.concatenate(list(faults.values()))
    return {
        "auc": round(auc(normal, allf), 6),
        "false_alarm_rate": round(float(np.mean(normal > threshold)), 6),
        "detection_rate": round(float(np.mean(allf > threshold)), 6),
        "detection_by_fault": {k: round(float(np.mean(v > threshold)), 6) for k, v in faults.items()},
        "normal_windows": int(len(normal)),
        "fault_windows": int(len(allf)),
    }


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(np.mean(v)), 6), "std": round(float(np.std(v)), 6),
            **{f"p{p}": round(float(np.percentile(v, p)), 6) for p in (50, 90, 95, 99)},
            "max": round(float(np.max(v)), 6), "n": int(len(v))}


def tflite_outputs(model: runtime.Model, x: np.ndarray) -> np.ndarray:
    """Every row of x through the device runtime, one window at a time, as the device does it."""
    return np.stack([model.run(row[None, :])[0].reshape(-1) for row in x])


def _convert(keras_model: Any, work: Path, out: Path, calib: np.ndarray, ev: np.ndarray, ev_y: np.ndarray | None,
             *, task: str, name: str, labels: list[str] | None, preprocessing: dict[str, Any], quantize: str,
             min_agreement: float, min_cosine: float, say: Callable[[str], None]) -> ModelPackage:
    from converters.convert import convert_model
    from converters.tf_env import silenced

    path = work / f"{name}.keras"
    with silenced():
        keras_model.save(path)
    np.savez(work / f"{name}-calib.npz", x=calib.astype(np.float32))
    ev_arrays = {"x": ev.astype(np.float32)} | ({"y": ev_y.astype(np.int64)} if ev_y is not None else {})
    np.savez(work / f"{name}-eval.npz", **ev_arrays)
    result = convert_model(path, out, calib=work / f"{name}-calib.npz", eval_data=work / f"{name}-eval.npz",
                           quantize=quantize, task=task, name=name, labels=labels, preprocessing=preprocessing,
                           min_agreement=min_agreement, min_cosine=min_cosine, progress=False, say=say)
    if result.package is None:  # convert_model raises GateError instead; this guards a future change
        raise ConversionError(f"{name}: conversion wrote no package ({result.reason})")
    return result.package


def _keep(keras_model: Any, path: str | Path | None) -> None:
    if path is not None:
        from converters.tf_env import silenced

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with silenced():
            keras_model.save(path)


def _rewrite(package: ModelPackage, preprocessing: dict[str, Any], validation: dict[str, Any]) -> ModelPackage:
    """Add numbers that need the converted model (threshold, device-side metrics) to its manifest."""
    manifest = dict(package.manifest)
    manifest["preprocessing"] = dict(manifest.get("preprocessing", {})) | preprocessing
    manifest["validation"] = dict(manifest.get("validation", {})) | validation
    return write_package(package.path, package.model_path.read_bytes(), manifest)


def train_anomaly(data: SensorData, out: str | Path, *, epochs: int = 40, percentile: float = 98.0,
                  quantize: str = "int8", seed: int = 0, name: str = "vibration-anomaly",
                  keras_out: str | Path | None = None, say: Callable[[str], None] = lambda s: None) -> ModelPackage:
    """Autoencoder on train NORMAL windows -> int8 package with threshold and detection report.

    keras_out: also keep the float Keras model there (for comparisons).
    """
    keras = _keras()
    x_train = data.x("train", "normal")
    x_val = data.x("val", "normal")
    ae = build_autoencoder(data.features.n_features, seed=seed)
    ae.compile(keras.optimizers.Adam(2e-3), "mse")
    say(f"training the autoencoder on {len(x_train)} normal windows of {len(data.machine_ids('train'))} machines")
    rng = np.random.default_rng(seed)
    noisy = x_train + rng.normal(0.0, 0.3, x_train.shape).astype(np.float32)  # denoising: smoother normal manifold
    ae.fit(noisy, x_train, epochs=epochs, batch_size=64, verbose=0, validation_data=(x_val, x_val))
    _keep(ae, keras_out)
    prep = {"features": data.features.to_manifest(), "hop": data.hop}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = _convert(ae, Path(tmp), Path(out), x_train, x_val, None, task="sensor-anomaly", name=name, labels=None,
                       preprocessing=prep, quantize=quantize, min_agreement=0.99, min_cosine=0.98, say=say)
    model = runtime.load(pkg.model_path, threads=1)
    faults = [c for c in vibration.CONDITIONS if c != "normal"]
    x_test_normal = data.x("test", "normal")
    x_test_faults = {c: data.x("test", c) for c in faults}
    report: dict[str, Any] = {"percentile": percentile, "val_machines": data.machine_ids("val"),
                              "test_machines": data.machine_ids("test")}
    thresholds = {}
    for kind, run in (("float", lambda x: ae.predict(x, verbose=0)), ("int8", lambda x: tflite_outputs(model, x))):
        val_err = reconstruction_error(x_val, run(x_val))
        scale = round(float(np.median(val_err)), 6)  # rounded as the manifest stores them: the device's numbers
        threshold = round(float(np.percentile(error_to_score(val_err, scale), percentile)), 6)
        thresholds[kind] = (scale, threshold)
        normal_scores = error_to_score(reconstruction_error(x_test_normal, run(x_test_normal)), scale)
        fault_scores = {c: error_to_score(reconstruction_error(x, run(x)), scale) for c, x in x_test_faults.items()}
        report[kind] = detection_report(normal_scores, fault_scores, threshold) | {
            "threshold": round(threshold, 6), "error_scale": round(scale, 6), "val_normal_error": _summary(val_err)}
        say(f"  {kind}: AUC {report[kind]['auc']:.4f}, detection {report[kind]['detection_rate']:.3f} at "
            f"{report[kind]['false_alarm_rate']:.3f} false alarms")
    scale, threshold = thresholds["int8"]
    anomaly = {"threshold": round(threshold, 6), "error_scale": round(scale, 6), "percentile": percentile,
               "score": "error / (error + error_scale); error = mean squared difference between normalized "
                        "features and the model's reconstruction"}
    return _rewrite(pkg, {"anomaly": anomaly}, {"anomaly": report})


def train_classifier(data: SensorData, out: str | Path, *, epochs: int = 40, quantize: str = "int8", seed: int = 0,
                     name: str = "vibration-faults", keras_out: str | Path | None = None,
                     say: Callable[[str], None] = lambda s: None) -> ModelPackage:
    """Fault classifier on train machines -> int8 package validated on held-out (test) machines.

    keras_out: also keep the float Keras model there (for comparisons).
    """
    keras = _keras()
    x_train, y_train = data.x("train"), data.y("train")
    x_val, y_val = data.x("val"), data.y("val")
    x_test, y_test = data.x("test"), data.y("test")
    clf = build_classifier(data.features.n_features, len(vibration.CONDITIONS), seed=seed)
    clf.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    say(f"training the fault classifier on {len(x_train)} windows of {len(data.machine_ids('train'))} machines")
    counts = np.bincount(y_train, minlength=len(vibration.CONDITIONS))
    weights = {i: float(len(y_train) / (len(counts) * max(c, 1))) for i, c in enumerate(counts)}  # normal is plentiful
    clf.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0, validation_data=(x_val, y_val),
            class_weight=weights)
    _keep(clf, keras_out)
    prep = {"features": data.features.to_manifest(), "hop": data.hop}
    rng = np.random.default_rng(seed)
    calib = x_train[rng.permutation(len(x_train))[:400]]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = _convert(clf, Path(tmp), Path(out), calib, x_test, y_test, task="sensor-classification", name=name,
                       labels=list(vibration.CONDITIONS), preprocessing=prep, quantize=quantize,
                       min_agreement=0.97, min_cosine=0.99, say=say)
    model = runtime.load(pkg.model_path, threads=1)
    pred = tflite_outputs(model, x_test).argmax(axis=1)
    n = len(vibration.CONDITIONS)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (y_test, pred), 1)
    extra = {"held_out": {
        "test_machines": data.machine_ids("test"),
        "accuracy_int8": round(float(np.mean(pred == y_test)), 6),
        "recall_int8": {c: round(float(confusion[i, i] / max(1, confusion[i].sum())), 6)
                        for i, c in enumerate(vibration.CONDITIONS)},
        "confusion_int8": confusion.tolist(),
    }}
    say(f"  int8 accuracy on held-out machines: {extra['held_out']['accuracy_int8']:.4f}")
    return _rewrite(pkg, {}, extra)


def train_sensor_models(out: str | Path, *, machines: int = 30, normal_only: int = 60, seconds: float = 4.0,
                        seed: int = 0, epochs: int = 40, gyro: bool = False, percentile: float = 98.0,
                        say: Callable[[str], None] = lambda s: None) -> dict[str, ModelPackage]:
    """Generate data, train and convert both models into OUT/vibration-anomaly and OUT/vibration-faults."""
    out = Path(out)
    say(f"generating {machines} machines x {len(vibration.CONDITIONS)} conditions and {normal_only} healthy "
        f"machines, {seconds:g} s each")
    recordings = vibration.make_dataset(machines, seconds, seed=seed, gyro=gyro, normal_only=normal_only)
    data = prepare_data(recordings, seed=seed)
    return {
        "anomaly": train_anomaly(data, out / "vibration-anomaly", epochs=epochs, percentile=percentile, seed=seed, say=say),
        "classifier": train_classifier(data, out / "vibration-faults", epochs=epochs, seed=seed, say=say),
    }


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, help="directory for the two packages")
    p.add_argument("--machines", type=int, default=30, help="machines with fault recordings (split 60/20/20 by machine)")
    p.add_argument("--normal-only", type=int, default=60, help="more machines recorded in normal operation only")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of recording per machine and condition")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gyro", action="store_true", help="also use a 3-axis gyro (6 channels)")
    p.add_argument("--percentile", type=float, default=98.0,
                   help="anomaly threshold: this percentile of scores on held-out normal machines")
    p.add_argument("--json", action="store_true", help="print the validation numbers as JSON")
    p.set_defaults(func=cmd_train_sensor)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train-sensor` on an argparse sub-parser set."""
    p = subparsers.add_parser("train-sensor", help="train and convert the vibration anomaly and fault models",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    return p


def cmd_train_sensor(args: argparse.Namespace) -> int:
    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    pkgs = train_sensor_models(args.out, machines=args.machines, normal_only=args.normal_only, seconds=args.seconds, seed=args.seed,
                               epochs=args.epochs, gyro=args.gyro, percentile=args.percentile, say=say)
    a = pkgs["anomaly"].manifest["validation"]["anomaly"]
    c = pkgs["classifier"].manifest["validation"]
    if args.json:
        print(json.dumps({"anomaly": {"path": str(pkgs["anomaly"].path), **a},
                          "classifier": {"path": str(pkgs["classifier"].path), "quantized": c["quantized"],
                                         "held_out": c["held_out"]}}, indent=2))
        return 0
    from edge_slm.table import format_table

    rows = [[f"anomaly {k}", a[k]["auc"], a[k]["detection_rate"], a[k]["false_alarm_rate"], "-", "-"]
            for k in ("float", "int8")]
    q = c["quantized"]
    rows.append(["classifier float", "-", "-", "-", q.get("accuracy_float", "-"), "-"])
    rows.append(["classifier int8", "-", "-", "-", q.get("accuracy_quantized", "-"), q.get("top1_agreement", "-")])
    print(format_table(["model", "AUC", "detection", "false alarms", "accuracy", "agreement"], rows))
    print(f"packages: {pkgs['anomaly'].path}  {pkgs['classifier'].path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.sensor_models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    args = p.parse_args(argv)
    from edge_slm.errors import EdgeSlmError

    try:
        return args.func(args)
    except EdgeSlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
