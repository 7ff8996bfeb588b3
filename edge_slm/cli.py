"""The `edge-slm` command: thin sub-commands that parse arguments, call the library, print.

Device commands (run, validate, bench) import only edge_slm; host commands (convert, demo) load
converters/devices lazily, so `edge-slm run` on a Pi never needs TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm import __version__
from edge_slm.errors import EdgeSlmError

log = logging.getLogger("edge_slm")

EPILOG = """examples:
  edge-slm demo                                   train, convert and serve an intent model end to end
  edge-slm convert model.keras -o pkg --calib calib.npz --eval eval.npz --tokenizer tokenizer.json
  edge-slm validate pkg --eval eval.npz           check a package on this device
  edge-slm run agent.toml                         serve pipelines, publish results over MQTT
  edge-slm bench pkg                              time the model on this device
  edge-slm train-kws -o kws_pkg                   speak, train and convert a keyword spotter
  edge-slm train-sensor -o sensor_pkgs            vibration anomaly + fault models
  edge-slm export-mcu pkg -o firmware/model       C array, op resolver and arena size for TFLite Micro
  edge-slm fit pkg --target pi-zero-2w            RAM, storage, ops and latency on a device before buying it
  edge-slm simulate scenario.toml -o report/      a fleet with broker outages, latency and crashes
  edge-slm bundle pkg agent.toml --target pi-5 -o b.tar.gz && edge-slm deploy b.tar.gz ssh://pi@kitchen/opt/edge-slm
  edge-slm doctor agent.toml                      what works on this machine, and how to fix what does not
  edge-slm distill teacher.keras --train t.tsv --eval e.tsv --labels l.txt -o student/   a 4x smaller model
  edge-slm prune student/student.keras --heads 0.5 --ffn 0.5 ... -o pruned.keras --report report/
"""

# Commands whose parsers live with their code; imported only when that command runs, so the device
# path (edge-slm run) never loads converters or devices. module, one-line help.
HOST_COMMANDS = {
    "doctor": ("edge_slm.doctor", "check this machine: Python, numpy, TFLite runtime, packages, broker, audio, serial"),
    "fit": ("devices.fit", "will a package fit a device? RAM, storage, ops, estimated latency (--list: targets)"),
    "simulate": ("devices.simulator", "a fleet of virtual devices running the real agent, with faults, and a report"),
    "bundle": ("devices.bundle", "package + agent config + pinned requirements + systemd unit -> bundle.tar.gz"),
    "deploy": ("devices.deploy", "install a bundle over ssh://user@host/path or into dir://PATH"),
    "train-kws": ("converters.kws", "speak a keyword dataset with espeak-ng, train a keyword spotter, write an int8 package"),
    "train-sensor": ("converters.sensor_models", "train the vibration anomaly and fault models, write int8 packages"),
    "distill": ("converters.distill", "train a small student from a teacher (.keras, package, checkpoint, encoder)"),
    "prune": ("converters.prune", "drop layers, heads, FFN neurons or conv channels; recover; size/latency/accuracy report"),
    "export-mcu": ("firmware_bridge.tflm_export", "export a package for TensorFlow Lite Micro: C array, op resolver, arena size"),
}


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- run -----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from edge_slm.agent import Agent
    from edge_slm.config import load_agent_config

    cfg = load_agent_config(args.config)
    if args.broker:
        import dataclasses

        cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, broker=args.broker))
    _setup_logging(args.log_level or cfg.log_level)
    Agent(cfg, config_path=args.config).run_forever()
    return 0


# --- validate ------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from edge_slm.package import ModelPackage
    from edge_slm.tasks import load_task

    pkg = ModelPackage.open(args.package)
    task = load_task(pkg, threads=args.threads)
    report: dict = {
        "package": str(pkg.path), "name": pkg.name, "version": pkg.version, "task": pkg.task,
        "sha256": pkg.sha256, "sha256_ok": True, "runtime": task.model.backend,
        "recipe": pkg.manifest.get("quantization", {}).get("recipe"),
        "manifest_validation": pkg.manifest.get("validation", {}).get("quantized", {}),
    }
    if args.eval:
        report["eval"] = _evaluate(task.model, args.eval)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report.get("eval", {}).get("ok", True) else 1
    from edge_slm.table import format_table

    rows = [["package", report["package"]], ["model", f"{pkg.name} {pkg.version} ({pkg.task})"],
            ["sha256", f"{pkg.sha256[:16]}… verified"], ["runtime", report["runtime"]],
            ["recipe", report["recipe"]]]
    mv = report["manifest_validation"]
    for k in ("top1_agreement", "accuracy_quantized", "cosine_mean"):
        if k in mv:
            rows.append([f"converter {k}", mv[k]])
    for k, v in report.get("eval", {}).items():
        rows.append([f"this device {k}", v])
    print(format_table(["check", "value"], rows))
    return 0 if report.get("eval", {}).get("ok", True) else 1


def _evaluate(model, path: str) -> dict:  # noqa: ANN001
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EdgeSlmError(f"{p}: not a readable .npz file ({exc})") from exc
    if "x" not in data:
        raise EdgeSlmError(f"{p}: needs key 'x' (and optionally 'y' labels)")
    x = data["x"]
    preds, times = [], []
    for i in range(len(x)):
        t0 = time.perf_counter()
        out = model.run(x[i : i + 1])[0]
        times.append(time.perf_counter() - t0)
        preds.append(int(np.argmax(out)))
    res: dict = {"examples": len(x), "latency_ms_p50": round(float(np.median(times)) * 1000, 4), "ok": True}
    if "y" in data:
        acc = float(np.mean(np.asarray(preds) == data["y"].reshape(-1)))
        res["accuracy"] = round(acc, 4)
    return res


# --- bench ---------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from edge_slm import runtime
    from edge_slm.package import ModelPackage
    from edge_slm.table import format_table

    path = Path(args.model)
    model_path = ModelPackage.open(path).model_path if path.is_dir() else path
    rows, out = [], []
    for threads in args.threads:
        m = runtime.load(model_path, threads=threads, backend=args.runtime)
        for info in m.inputs:
            zeros = np.zeros(info.shape, dtype=np.float32 if not np.issubdtype(info.dtype, np.integer) or info.quantized else info.dtype)
            m._interp.set_tensor(info.index, m._prepare(zeros, info))  # noqa: SLF001
        for _ in range(args.warmup):
            m.invoke_raw()
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            m.invoke_raw()
            times.append(time.perf_counter() - t0)
        ms = np.asarray(times) * 1000
        row = {"runtime": m.backend, "threads": threads, "runs": args.runs,
               "p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
               "per_s": round(1000.0 / float(np.mean(ms)), 1)}
        out.append(row)
        rows.append(list(row.values()))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_table(list(out[0].keys()), rows))
    return 0


# --- host commands, loaded lazily ----------------------------------------------------------------
def _host(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise EdgeSlmError(
                f"this command runs on the host and needs the convert extra ({exc.name} is missing): "
                "pip install 'edge-slm[convert,sim]'"
            ) from exc
        return getattr(mod, func)(args)

    return call


def _add_host_commands(sub: Any, command: str | None) -> None:
    for name, (module, help_text) in HOST_COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; never parsed
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise EdgeSlmError(f"{name} needs a package that is not installed ({exc.name}): "
                               "pip install 'edge-slm[convert,sim]' on the host") from exc
        mod.add_cli(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; COMMAND (the sub-command being run) decides which host parsers are imported."""
    parser = argparse.ArgumentParser(
        prog="edge-slm",
        description="Put small language models on edge devices: convert to int8 TFLite, validate, "
        "run on a Pi or Jetson, publish results over MQTT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-slm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("demo", help="train, convert and serve a smart-home intent model end to end", formatter_class=fmt,
                       description="Trains an intent classifier on the shipped smart-home dataset, converts it with "
                       "--quantize auto, starts an embedded broker (or uses --broker), runs 3 simulated devices "
                       "on held-out commands and prints the results as they arrive.")
    p.add_argument("--broker", help="use this broker (mqtt://HOST:PORT) instead of the embedded amqtt one")
    p.add_argument("--workdir", help="keep the dataset, model and package here (default: a temp dir)")
    p.add_argument("--devices", type=int, default=3, help="simulated devices")
    p.add_argument("--messages", type=int, default=5, help="held-out commands sent to each device")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_host("devices.demo", "cmd_demo"))

    p = sub.add_parser("convert", help="Keras/SavedModel -> validated int8 TFLite model package", formatter_class=fmt,
                       description="Converts MODEL (a Keras 3 .keras file or a SavedModel dir) with a fixed batch-1 "
                       "signature, validates each recipe against the float model on --eval, and writes the package. "
                       "auto tries int8, int8-float-attention and dynamic and keeps the smallest that passes. "
                       "NPZ files hold the inputs under 'x' (or the input names) and labels under 'y'.")
    p.add_argument("model", help="model.keras, a SavedModel directory, or a transformer checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="package directory to write")
    p.add_argument("--calib", help="calibration inputs (.npz; for checkpoints a .txt/.jsonl of texts), a few hundred typical examples")
    p.add_argument("--eval", required=True, help="evaluation inputs (.npz with optional labels 'y'; for checkpoints "
                   "a .txt/.tsv with 'text[<TAB>label]' lines or .jsonl with text/label)")
    p.add_argument("--quantize", default="auto", choices=["auto", "int8", "int8-float-attention", "dynamic", "float16", "float32"])
    p.add_argument("--min-agreement", type=float, default=0.99, help="gate: top-1 agreement with the float model")
    p.add_argument("--min-cosine", type=float, default=0.99, help="gate for non-classifiers: mean cosine similarity")
    p.add_argument("--task", help="what the model does (default text-classification with --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json for text models")
    p.add_argument("--labels", help="labels.txt, one label per line, in output order")
    p.add_argument("--name", help="package name (default: the model file name)")
    p.add_argument("--version", dest="pkg_version", default="1.0.0", help="package version")
    p.add_argument("--target", help="device profile (edge-slm fit --list): only conversion flags and recipes its "
                   "runtime can load, e.g. no FULLY_CONNECTED v12 for tflite-runtime 2.14")
    ck = p.add_argument_group("transformer checkpoints (config.json + model.safetensors + tokenizer.json)")
    ck.add_argument("--head", choices=["classification", "embedding", "causal-lm"],
                    help="default: classification if its weights exist, causal-lm for decoders, else embedding")
    ck.add_argument("--max-length", type=int, help="encoder input length in tokens (default 128)")
    ck.add_argument("--prefill-len", type=int, help="decoder prompt length in tokens (default 64)")
    ck.add_argument("--max-cache", type=int, help="decoder KV-cache length: prompt + generated tokens (default 256)")
    ck.add_argument("--min-lm-agreement", type=float, help="decoder gate: next-token top-1 agreement (default 0.95)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_host("converters.cli", "cmd_convert"))

    p = sub.add_parser("validate", help="verify a model package and (optionally) measure it on an eval set", formatter_class=fmt)
    p.add_argument("package")
    p.add_argument("--eval", help="eval .npz with 'x' and optional 'y'")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run the agent: pipelines from AGENT.toml, results to MQTT/stdout", formatter_class=fmt,
                       description="Serves every [[pipelines]] entry of AGENT.toml until SIGINT/SIGTERM, or until "
                       "file/stdin sources are exhausted. See examples/agent.toml.")
    p.add_argument("config", help="AGENT.toml")
    p.add_argument("--broker", help="override [mqtt].broker")
    p.add_argument("--log-level", help="override log_level (DEBUG, INFO, WARNING, ERROR)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time a model or package on this device", formatter_class=fmt)
    p.add_argument("model", help="package directory or .tflite file")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to compare")
    p.add_argument("--runtime", choices=["ai-edge-litert", "tflite-runtime", "tensorflow"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    class UpdateHelp(argparse.RawDescriptionHelpFormatter):
        """Descriptions keep their line breaks; only defaults worth reading are shown."""

        def _get_help_string(self, action: argparse.Action) -> str:
            text = action.help or ""
            if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
                text += " (default: %(default)s)"
            return text

    p = sub.add_parser("keygen", help="make the Ed25519 key pair that signs model updates", formatter_class=UpdateHelp,
                       description="Writes two files:\n"
                       "  DIR/update_key.pem  the secret signing key (mode 0600); keep it on the build host\n"
                       "  DIR/update_key.pub  copy it to every device: the agent installs only updates\n"
                       "                      signed by the matching secret key\n"
                       "An existing key pair is never replaced without --force: devices already trust it.",
                       epilog="example:\n  edge-slm keygen -o keys")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for update_key.pem and update_key.pub")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=_host("devices.publish_model", "cmd_keygen"))

    update_help = {
        "key": "secret signing key (update_key.pem from edge-slm keygen)",
        "version": "version the update carries: numbers like 1.2.10, compared numerically, must be newer than "
                   "the device's. Rewrites manifest.json inside the archive; the package on disk is untouched. "
                   "Without it: the package's own version",
        "expires": "the device refuses the update after this long (30m, 12h, 7d, 2w), so an old update "
                   "cannot be replayed later",
        "golden": "text the device runs the new model on before switching to it (without it: 'hello')",
        "golden_label": "label the golden text must get, else the device keeps its current model",
    }
    checks = ("The device checks, in order: the signature, the device id, the expiry and that the version\n"
              "is newer (all before it looks at the archive), then the archive's size and sha256, that it\n"
              "unpacks safely and is a valid package, and that the model answers the golden input. Only\n"
              "then does it switch, and the new model stays on trial: the device goes back to the old\n"
              "one by itself unless the new one is committed in time.")
    p = sub.add_parser("sign", help="sign a model package as an update: UPDATE.json + UPDATE.tar.gz",
                       formatter_class=UpdateHelp,
                       description="Packs PKG as a reproducible .tar.gz (written next to UPDATE.json as UPDATE.tar.gz)\n"
                       "and writes a manifest (name, version, the archive's sha256 and size, expiry, device)\n"
                       "signed with Ed25519 to UPDATE.json.\n\n" + checks,
                       epilog="example:\n  edge-slm keygen -o keys\n  edge-slm sign pkg --key keys/update_key.pem "
                       "--version 1.1.0 --device kitchen-pi -o out/intents-1.1.0.json")
    p.add_argument("package", metavar="PKG", help="model package directory (made by edge-slm convert)")
    p.add_argument("--key", required=True, help=update_help["key"])
    p.add_argument("-o", "--output", required=True, metavar="UPDATE.json", help="signed update to write")
    p.add_argument("--version", dest="version", help=update_help["version"])
    p.add_argument("--expires", default="7d", help=update_help["expires"])
    p.add_argument("--device", default="*", help="device id the update is for; '*' lets any device install it")
    p.add_argument("--golden", help=update_help["golden"])
    p.add_argument("--golden-label", help=update_help["golden_label"])
    p.add_argument("--json", action="store_true", help="print the written paths and manifest as JSON")
    p.set_defaults(func=_host("devices.publish_model", "cmd_sign"))

    p = sub.add_parser("publish-model", help="sign a package and push it to a device over MQTT",
                       formatter_class=UpdateHelp,
                       description="Signs PKG like `edge-slm sign --device ID`, sends the archive in 256 KiB QoS 1\n"
                       "chunks to <prefix>/<device>/cmd/model/update/blob, then the signed update to\n"
                       "<prefix>/<device>/cmd/model/update, and waits for the device's answer on .../reply.\n\n"
                       + checks + "\n\nExits 0 when the device applied the update, 1 when it refused (the reply's "
                       "code says\nwhy) or did not answer within --timeout.",
                       epilog="example:\n  edge-slm publish-model pkg --device kitchen-pi --key keys/update_key.pem "
                       "--version 1.1.0 \\\n      --broker mqtt://broker.local:1883")
    p.add_argument("package", metavar="PKG", help="model package directory (made by edge-slm convert)")
    p.add_argument("--device", required=True, help="device id of the agent to update")
    p.add_argument("--key", required=True, help=update_help["key"])
    p.add_argument("--broker", default="mqtt://localhost:1883", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--prefix", default="edge-slm", help="topic prefix the agent uses")
    p.add_argument("--version", dest="version", help=update_help["version"])
    p.add_argument("--expires", default="7d", help=update_help["expires"])
    p.add_argument("--golden", help=update_help["golden"])
    p.add_argument("--golden-label", help=update_help["golden_label"])
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the device's reply")
    p.add_argument("--username", help="MQTT user name")
    p.add_argument("--password", help="MQTT password (visible to other local users in the process list)")
    p.add_argument("--json", action="store_true", help="print the device's reply as JSON")
    p.set_defaults(func=_host("devices.publish_model", "cmd_publish_model"))
    p = sub.add_parser("status", help="a device's status and metrics, read from the broker", formatter_class=fmt,
                       description="Reads the retained status (online/offline) and the latest metrics message the "
                       "agent publishes under <prefix>/<device>/ and prints them.",
                       epilog="example:\n  edge-slm status kitchen-pi --broker mqtt://broker.lan:1883")
    p.add_argument("device_id")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--prefix", default="edge-slm", help="topic prefix the agent uses")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for retained messages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_host("devices.status", "cmd_status"))

    _add_host_commands(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except EdgeSlmError as exc:
        print(f"edge-slm {command}: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "run":
        _setup_logging(os.environ.get("EDGE_SLM_LOG_LEVEL", "WARNING"))
    try:
        return args.func(args)
    except EdgeSlmError as exc:
        print(f"edge-slm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-slm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
