"""`edge-slm convert`: argument handling and the report table. Host only; all logic is in convert.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converters.convert import Attempt, ConversionResult, GateError, convert_model
from converters.tf_env import console
from edge_slm.errors import ConversionError
from edge_slm.table import format_table


def attempts_table(attempts: list[Attempt], baseline: Attempt | None, chosen: str | None = None) -> str:
    """One row per recipe tried (float32 first as the reference); LM reports add perplexity."""
    rows = []
    lm = any("perplexity_quantized" in a.report for a in attempts if a.report)
    base_size = baseline.size_bytes if baseline else 0
    for a in ([baseline] if baseline and baseline not in attempts else []) + attempts:
        r = a.report
        if a.error:
            verdict = "no: " + a.error.split(": ", 1)[-1][:100]
        elif a is baseline and a.recipe == "float32" and chosen != "float32":
            verdict = "reference"
        else:
            verdict = "CHOSEN" if a.recipe == chosen else ("pass" if a.passed else "FAIL")
        rows.append([
            a.recipe,
            f"{a.size_bytes / 1024:.1f}" if a.size_bytes else "-",
            f"{base_size / a.size_bytes:.2f}x" if a.size_bytes and base_size else "-",
            r.get("top1_agreement", "-") if r else "-",
            r.get("accuracy_quantized", "-") if r else "-",
            r.get("cosine_mean", "-") if r else "-",
            r.get("max_abs_error", "-") if r else "-",
            f"{a.latency_ms:.4f}" if a.latency_ms else "-",
            verdict,
        ])
        if lm:
            rows[-1][4] = r.get("perplexity_quantized", "-") if r else "-"
    headers = ["recipe", "KiB", "smaller", "agreement", "perplexity" if lm else "accuracy", "cosine", "max_err",
               "ms/token" if lm else "ms", "verdict"]
    return format_table(headers, rows)


def cmd_convert(args: argparse.Namespace) -> int:
    labels = None
    if args.labels:
        p = Path(args.labels)
        if not p.is_file():
            raise ConversionError(f"labels file not found: {p}")
        labels = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = console() if not args.quiet else None

    def say(msg: str) -> None:
        if out is not None and not args.json:
            print(msg, file=out)

    options = {k: getattr(args, k) for k in ("head", "max_length", "prefill_len", "max_cache", "min_lm_agreement")
               if getattr(args, k, None) is not None}
    try:
        result: ConversionResult = convert_model(
            args.model, args.output, calib=args.calib, eval_data=args.eval, quantize=args.quantize,
            min_agreement=args.min_agreement, min_cosine=args.min_cosine, task=args.task, name=args.name,
            version=args.pkg_version, tokenizer=args.tokenizer, labels=labels, progress=not args.quiet and not args.json,
            say=say, target=getattr(args, "target", None), **options,
        )
    except GateError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "tried": [a.to_json() for a in exc.attempts]}, indent=2))
        else:
            print(attempts_table(exc.attempts, exc.baseline), file=sys.stderr)
        raise
    if args.json:
        print(json.dumps({"ok": True, "package": str(result.package.path), "chosen": result.chosen,
                          "reason": result.reason, "tried": [a.to_json() for a in result.attempts],
                          "float": result.baseline.to_json() if result.baseline else None}, indent=2))
        return 0
    print(attempts_table(result.attempts, result.baseline, result.chosen))
    print(f"\nchosen: {result.reason}")
    print(f"wrote {result.package.path} (sha256 {result.package.sha256[:12]}…)")
    return 0
