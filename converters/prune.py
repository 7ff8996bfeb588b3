"""Structured pruning: rebuild a smaller Keras model (fewer layers, heads, FFN neurons, conv channels).

Host only; TensorFlow via converters.tf_env. Never imported by edge_slm (the device package).

Not masks: the pruned model has new, smaller layer shapes with the kept weights sliced in, so the
converted TFLite is really smaller and faster (unstructured sparsity does neither on CPU).

Importance scores (per prunable unit: attention head, FFN neuron, conv output channel):
- "magnitude": weight norms. A head: L2 norm of its query/key/value columns and its output-kernel rows;
  an FFN neuron: ||ffn1 column||_2 * ||ffn2 row||_2; a conv channel: L1 norm of its filter (Li et al. 2017).
- "taylor": data-driven first-order Taylor estimate of the loss change when the unit is removed
  (Molchanov et al. 2019): removing a unit is zeroing the weights that carry its output onward (a head's
  output-kernel rows, an FFN neuron's ffn2 row, a channel's input rows in the next layer), so
  dL ~= -sum(g * w) over that group; the score is mean over calibration batches of (sum g * w)^2.
  Labels come from the calibration set, or the model's own predictions when it has none.
The lowest-scored units are removed. Transformer layers are dropped by index (PrunePlan.layers).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.tf_env import tf
from edge_slm.errors import ConfigError, ConversionError

SCORES = ("taylor", "magnitude")
_CHANNEL_PASS = ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D",
                 "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "Dropout", "Activation",
                 "ReLU", "SpatialDropout1D", "SpatialDropout2D")

EXAMPLE = """example:
  edge-slm prune model.keras --tokenizer tokenizer.json --train train.tsv --eval eval.tsv --labels labels.txt \\
      --heads 0.5 --ffn 0.5 --drop-layers 1 --score taylor --recover-epochs 2 -o pruned.keras --report report/
  edge-slm convert pruned.keras -o pkg/ --calib calib.npz --eval eval.npz

data files: "text<TAB>label" lines or .jsonl records {"text": ..., "label": ...}.
"""


@dataclass
class PrunePlan:
    """Fractions to REMOVE (each in (0, 1), None = keep all) and transformer block indices to drop."""

    heads: float | None = None
    ffn: float | None = None
    layers: list[int] = field(default_factory=list)
    channels: float | None = None

    def check(self) -> None:
        for name in ("heads", "ffn", "channels"):
            v = getattr(self, name)
            if v is not None and not 0.0 < float(v) < 1.0:
                raise ConfigError(f"prune ratio {name}={v} is outside (0, 1): give the fraction to remove, e.g. 0.5")


def _keep(n: int, ratio: float | None) -> int:
    return n if ratio is None else max(1, int(round(n * (1.0 - ratio))))


def count_params(model: Any) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


# ---------------------------------------------------------------- structure detection


@dataclass
class _Block:
    mha: Any
    ln1: Any
    ffn1: Any
    ffn2: Any
    ln2: Any


def _transformer_blocks(model: Any) -> list[_Block] | None:
    names = {layer.name: layer for layer in model.layers}
    blocks = []
    i = 0
    while f"mha_{i}" in names:
        try:
            blocks.append(_Block(*(names[f"{p}_{i}"] for p in ("mha", "ln1", "ffn1", "ffn2", "ln2"))))
        except KeyError as exc:
            raise ConversionError(f"{model.name}: block {i} has mha_{i} but no {exc.args[0]}; only the edge-slm "
                                  "text transformer layout (mha_i, ln1_i, ffn1_i, ffn2_i, ln2_i) can be pruned") from exc
        i += 1
    return blocks or None


def describe(model: Any) -> dict[str, Any]:
    """What prune sees in MODEL: kind, blocks (heads, ffn) or conv layers (filters)."""
    blocks = _transformer_blocks(model)
    if blocks:
        return {"kind": "transformer", "layers": len(blocks),
                "heads": [b.mha.num_heads for b in blocks], "ffn": [b.ffn1.units for b in blocks]}
    convs = [la for la in model.layers if type(la).__name__ in ("Conv1D", "Conv2D")]
    if convs:
        return {"kind": "cnn", "convs": {c.name: c.filters for c in convs}}
    return {"kind": "unknown"}


# ---------------------------------------------------------------- scores


def _loss_grads(model: Any, calib: tuple[np.ndarray, np.ndarray | None], batch_size: int = 64) -> list[dict[str, np.ndarray]]:
    """Per calibration batch: {weight path: dL/dw} for the cross-entropy on labels (or own predictions)."""
    t = tf()
    x, y = calib
    x = np.asarray(x)
    if y is None:
        y = np.argmax(np.asarray(model.predict(x, batch_size=batch_size, verbose=0)), axis=-1)
    y = np.asarray(y).astype(np.int32)
    out = []
    for s in range(0, len(x), batch_size):
        xb = t.convert_to_tensor(x[s:s + batch_size])
        with t.GradientTape() as tape:
            logits = model(xb, training=False)
            loss = t.reduce_mean(t.nn.sparse_softmax_cross_entropy_with_logits(y[s:s + batch_size], logits))
        grads = tape.gradient(loss, model.trainable_weights)
        out.append({w.path: (None if g is None else np.asarray(t.convert_to_tensor(g)))
                    for w, g in zip(model.trainable_weights, grads)})
    return out


def _taylor(grads: list[dict[str, np.ndarray]], weight: Any, axis_groups: int) -> np.ndarray:
    """mean over batches of (sum over each unit's group of g * w)^2; units along AXIS_GROUPS of WEIGHT."""
    w = np.asarray(weight.numpy())
    total = np.zeros(w.shape[axis_groups])
    for g in grads:
        gw = g.get(weight.path)
        if gw is None:
            continue
        prod = np.moveaxis(gw * w, axis_groups, 0).reshape(w.shape[axis_groups], -1)
        total += prod.sum(axis=1) ** 2
    return total / max(1, len(grads))


def _mha_weights(mha: Any) -> dict[str, Any]:
    return {w.path.split("/", 1)[1]: w for w in mha.weights}


def _head_scores(mha: Any, score: str, grads: list | None) -> np.ndarray:
    w = _mha_weights(mha)
    out = w["attention_output/kernel"]
    if score == "taylor":
        return _taylor(grads, out, 0)
    s = sum(np.square(np.asarray(w[f"{n}/kernel"].numpy())).sum(axis=(0, 2)) for n in ("query", "key", "value"))
    return np.sqrt(s + np.square(np.asarray(out.numpy())).sum(axis=(1, 2)))


def _ffn_scores(ffn1: Any, ffn2: Any, score: str, grads: list | None) -> np.ndarray:
    if score == "taylor":
        return _taylor(grads, ffn2.kernel, 0)
    return np.linalg.norm(np.asarray(ffn1.kernel.numpy()), axis=0) * np.linalg.norm(np.asarray(ffn2.kernel.numpy()), axis=1)


def _top(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the KEEP highest scores, in their original order (stable on ties)."""
    order = np.argsort(-scores, kind="stable")[:keep]
    return np.sort(order)


# ---------------------------------------------------------------- transformer


def _clone(layer: Any, **changes: Any) -> Any:
    cfg = layer.get_config() | changes
    return type(layer).from_config(cfg)


def _position_constant(model: Any) -> np.ndarray | None:
    """The position term added to the token embeddings: build_model adds pos_emb(arange) as a constant."""
    first = model.get_layer("mha_0")._inbound_nodes[0].arguments.args[0]
    for op in model.operations:
        for node in op._inbound_nodes:
            if first in list(node.outputs):
                consts = [a for a in node.arguments.args if not hasattr(a, "_keras_history")
                          and hasattr(a, "shape") and len(a.shape) >= 2]
                if type(op).__name__ == "Add" and len(consts) == 1:
                    return np.asarray(consts[0])
                if op.name == "tok_emb":
                    return None
                raise ConversionError(f"{model.name}: {op.name} ({type(op).__name__}) feeds mha_0; prune expects "
                                      "token embeddings plus a constant position term (build_model's layout)")
    return None


def _prune_transformer(model: Any, blocks: list[_Block], plan: PrunePlan, score: str, grads: list | None,
                       kept: dict[str, list[int]]) -> Any:
    keras = tf().keras
    n = len(blocks)
    bad = [i for i in plan.layers if not -n <= i < n]
    if bad:
        raise ConfigError(f"{model.name} has {n} transformer layers (0..{n - 1}); there is no layer {bad[0]} to drop")
    drop = {i % n for i in plan.layers}
    if len(drop) >= n:
        raise ConfigError(f"dropping layers {sorted(drop)} would leave none of the {n}; keep at least one")
    if plan.channels is not None:
        raise ConfigError("channels= prunes conv models; this is a transformer: use heads=, ffn= and layers=")
    names = {la.name: la for la in model.layers}
    if len(model.inputs) != 1 or "tok_emb" not in names:
        raise ConversionError(f"{model.name}: only the edge-slm text transformer layout (one input_ids input, tok_emb, "
                              "pos_emb, mha_i ... ln2_i, pooling, dense head) can be pruned")
    last_ln = blocks[-1].ln2
    ops = list(model.operations)
    head_layers = ops[ops.index(last_ln) + 1:]
    odd = [op.name for op in head_layers if not isinstance(op, keras.layers.Layer) or len(op._inbound_nodes) != 1]
    if odd:
        raise ConversionError(f"{model.name}: {odd[0]} after the last block is not a plain single-input layer; prune "
                              "rebuilds the head as a chain of layers (pooling, dense, logits)")

    ids = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    tok = _clone(names["tok_emb"])
    x = tok(ids)
    new_weights: list[tuple[Any, list[np.ndarray]]] = [(tok, names["tok_emb"].get_weights())]
    pos = _position_constant(model)
    if pos is not None:
        x = x + keras.ops.convert_to_tensor(pos)
    for i, b in enumerate(blocks):
        if i in drop:
            continue
        heads = b.mha.num_heads
        kh = _keep(heads, plan.heads)
        hk = _top(_head_scores(b.mha, score, grads), kh)
        kept[b.mha.name] = hk.tolist()
        w = {k: np.asarray(v.numpy()) for k, v in _mha_weights(b.mha).items()}
        mha = _clone(b.mha, num_heads=kh)
        att = mha(x, x)
        mha_w = []
        for v in mha.weights:  # same order as the original's, whatever it is
            key = v.path.split("/", 1)[1]
            src = w[key]
            if key == "attention_output/kernel":
                src = src[hk]
            elif key != "attention_output/bias":
                src = src[:, hk] if key.endswith("kernel") else src[hk]
            mha_w.append(src)
        new_weights.append((mha, mha_w))
        ln1 = _clone(b.ln1)
        x = ln1(x + att)
        units = b.ffn1.units
        ku = _keep(units, plan.ffn)
        uk = _top(_ffn_scores(b.ffn1, b.ffn2, score, grads), ku)
        kept[b.ffn1.name] = uk.tolist()
        f1 = _clone(b.ffn1, units=ku)
        f2 = _clone(b.ffn2)
        h = f2(f1(x))
        k1, b1 = b.ffn1.get_weights()
        k2, b2 = b.ffn2.get_weights()
        ln2 = _clone(b.ln2)
        x = ln2(x + h)
        new_weights += [(f1, [k1[:, uk], b1[uk]]), (f2, [k2[uk], b2]), (ln1, b.ln1.get_weights()),
                        (ln2, b.ln2.get_weights())]
    for la in head_layers:
        c = _clone(la)
        x = c(x)
        new_weights.append((c, la.get_weights()))
    pruned = keras.Model(ids, x, name=f"{model.name}_pruned")
    for layer, ws in new_weights:
        layer.set_weights(ws)
    return pruned


# ---------------------------------------------------------------- CNN


def _single(nodes: list) -> bool:
    return len(nodes) <= 1


def _prune_cnn(model: Any, plan: PrunePlan, score: str, grads: list | None, kept: dict[str, list[int]]) -> Any:
    keras = tf().keras
    if plan.heads is not None or plan.ffn is not None or plan.layers:
        raise ConfigError(f"{model.name} is a conv model: prune it with channels=, not heads/ffn/layers")
    if plan.channels is None:
        raise ConfigError("give channels= (the fraction of conv filters to remove) to prune a conv model")
    layers = [la for la in model.layers if type(la).__name__ != "InputLayer"]
    for la in layers:
        if len(la._inbound_nodes) > 1 or any(len(getattr(n, "parent_nodes", []) or []) > 1 for n in la._inbound_nodes):
            raise ConversionError(f"{model.name}: layer {la.name} is shared or merges branches; channel pruning "
                                  "handles chains of layers (Conv -> [BatchNorm] -> pooling -> Conv/Dense) only")
    cfg = model.get_config()
    by_name = {c["config"]["name"]: c for c in cfg["layers"]}
    for c in cfg["layers"]:
        c.pop("build_config", None)  # old input shapes; layers rebuild from their new inputs
    weights: dict[str, list[np.ndarray]] = {la.name: la.get_weights() for la in layers}
    convs = [la for la in layers if type(la).__name__ in ("Conv1D", "Conv2D")]
    if not convs:
        raise ConversionError(f"{model.name}: no Conv1D/Conv2D layers to prune")
    for conv in convs:
        idx = layers.index(conv)
        # the layer that consumes this conv's channels: skip BatchNorm and channel-preserving layers
        bns, nxt = [], None
        for la in layers[idx + 1:]:
            kind = type(la).__name__
            if kind == "BatchNormalization":
                bns.append(la)
            elif kind in _CHANNEL_PASS:
                continue
            elif kind in ("Conv1D", "Conv2D", "Dense"):
                nxt = la
                break
            else:
                raise ConversionError(f"{model.name}: {kind} layer {la.name} after {conv.name} changes the channel "
                                      "layout; channel pruning cannot follow it (no Flatten/Reshape/merges)")
        if nxt is None:
            continue  # the last conv feeds the output: its channels are the model's output
        n = conv.filters
        keep = _keep(n, plan.channels)
        nxt_kernel = nxt.kernel
        if score == "taylor":
            s = _taylor(grads, nxt_kernel, nxt_kernel.ndim - 2)
        else:
            s = np.abs(np.asarray(conv.kernel.numpy())).reshape(-1, n).sum(axis=0)
        ck = _top(s, keep)
        kept[conv.name] = ck.tolist()
        cw = weights[conv.name]
        weights[conv.name] = [cw[0][..., ck]] + [cw[1][ck]] if len(cw) == 2 else [cw[0][..., ck]]
        for bn in bns:
            weights[bn.name] = [v[ck] for v in weights[bn.name]]
        nw = weights[nxt.name]
        weights[nxt.name] = [np.take(nw[0], ck, axis=nw[0].ndim - 2)] + nw[1:]
        by_name[conv.name]["config"]["filters"] = int(keep)
    if not kept:
        raise ConversionError(f"{model.name}: no conv layer feeds another conv/dense layer; nothing to prune")
    pruned = keras.Model.from_config(cfg)
    for la in pruned.layers:
        if la.name in weights:
            la.set_weights(weights[la.name])
    return pruned


# ---------------------------------------------------------------- public API


def prune(model: Any, plan: PrunePlan, score: str = "magnitude",
          calib: tuple[np.ndarray, np.ndarray | None] | np.ndarray | None = None) -> Any:
    """A new, smaller keras.Model: PLAN's share of the lowest-SCORE heads/FFN neurons/conv channels removed.

    CALIB: (x, y) or x (the model's own predictions then stand in for labels); required for score="taylor".
    MODEL is not changed.
    """
    return prune_with_info(model, plan, score, calib)[0]


def prune_with_info(model: Any, plan: PrunePlan, score: str = "magnitude",
                    calib: tuple[np.ndarray, np.ndarray | None] | np.ndarray | None = None,
                    ) -> tuple[Any, dict[str, list[int]]]:
    """prune(), also returning the kept unit indices per original layer (mha_i: heads, ffn1_i: neurons,
    conv name: channels), in the original's numbering."""
    plan.check()
    if score not in SCORES:
        raise ConfigError(f"unknown importance score {score!r}; use one of {', '.join(SCORES)}")
    grads = None
    if score == "taylor":
        if calib is None:
            raise ConfigError("score='taylor' needs calib=(x, y): a calibration batch to take gradients on")
        if not isinstance(calib, tuple):
            calib = (calib, None)
        grads = _loss_grads(model, calib)
    kept: dict[str, list[int]] = {}
    blocks = _transformer_blocks(model)
    if blocks:
        return _prune_transformer(model, blocks, plan, score, grads, kept), kept
    if any(type(la).__name__ in ("Conv1D", "Conv2D") for la in model.layers):
        return _prune_cnn(model, plan, score, grads, kept), kept
    kinds = sorted({type(la).__name__ for la in model.layers if la.weights})
    raise ConversionError(f"{model.name}: cannot prune this kind of model (layers: {', '.join(kinds)}); prune knows "
                          "the edge-slm text transformer (mha_i/ffn1_i blocks) and Conv1D/Conv2D chains")


def _distill_available() -> bool:
    try:
        from converters.distill import distill  # noqa: F401
    except ImportError:
        return False
    return True


def recover(model: Any, train: tuple[np.ndarray, np.ndarray], eval: tuple[np.ndarray, np.ndarray] | None = None,  # noqa: A002
            epochs: int = 2, *, teacher: Any = None, texts: tuple[Any, Any] | None = None, tokenizer: Any = None,
            learning_rate: float = 1e-3, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Fine-tune the pruned MODEL in place for EPOCHS; returns {"method", "eval_accuracy"}.

    With TEACHER (a converters.distill.Teacher) and TEXTS=(train TextSet, eval TextSet|None) plus TOKENIZER,
    recovery is knowledge distillation from the teacher (converters.distill.distill); otherwise plain
    fine-tuning on the labels of TRAIN=(x, y).
    """
    keras = tf().keras
    if epochs <= 0:
        return {"method": "none", "eval_accuracy": accuracy(model, eval) if eval else None}
    if teacher is not None and texts is not None and _distill_available():
        from converters.distill import distill

        distill(teacher, model, texts[0], texts[1], tokenizer=tokenizer, epochs=epochs, patience=epochs,
                batch_size=batch_size, learning_rate=learning_rate, progress=False, seed=seed)
        method = "distill"
    else:
        keras.utils.set_random_seed(seed)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(train[0], np.asarray(train[1]), epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
        method = "fine-tune"
    return {"method": method, "eval_accuracy": accuracy(model, eval) if eval else None}


def accuracy(model: Any, data: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = data
    pred = np.argmax(np.asarray(model.predict(x, batch_size=128, verbose=0)), axis=-1)
    return float(np.mean(pred == np.asarray(y)))


# ---------------------------------------------------------------- CLI


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `prune` on an argparse sub-parser set."""
    p = subparsers.add_parser("prune", help="structured pruning: drop layers, heads, FFN neurons, conv channels",
                              description=__doc__.splitlines()[0], epilog=EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the .keras model to prune")
    p.add_argument("--train", required=True, help="training texts for recovery: text<TAB>label lines or .jsonl")
    p.add_argument("--eval", help="held-out texts for accuracy")
    p.add_argument("--labels", required=True, help="labels.txt, one label per line")
    p.add_argument("--tokenizer", help="tokenizer.json (default: beside the model)")
    p.add_argument("--heads", type=float, help="fraction of attention heads to remove per layer, in (0, 1)")
    p.add_argument("--ffn", type=float, help="fraction of FFN neurons to remove per layer, in (0, 1)")
    p.add_argument("--drop-layers", type=int, nargs="*", default=[], help="transformer layer indices to drop")
    p.add_argument("--score", default="taylor", choices=SCORES, help="importance score (default taylor)")
    p.add_argument("--recover-epochs", type=int, default=2, help="fine-tuning epochs after pruning (0: none)")
    p.add_argument("--no-distill", action="store_true", help="recover by plain fine-tuning, not from the original")
    p.add_argument("-o", "--out", required=True, help="output .keras path")
    p.add_argument("--report", help="also write a size/latency/accuracy report (original vs pruned) into this dir")
    p.set_defaults(func=cmd_prune)
    return p


def cmd_prune(args: argparse.Namespace) -> int:
    from converters.distill import load_teacher, read_labels, read_textset
    from edge_slm.text import TextEncoder

    keras = tf().keras
    src = Path(args.model)
    if not src.is_file() or src.suffix != ".keras":
        raise ConfigError(f"{src}: give a .keras model file")
    tok_path = Path(args.tokenizer) if args.tokenizer else src.with_name("tokenizer.json")
    if not tok_path.is_file():
        raise ConfigError(f"tokenizer not found: {tok_path}; pass --tokenizer tokenizer.json")
    from tokenizers import Tokenizer

    model = keras.models.load_model(src, compile=False)
    labels = read_labels(args.labels)
    tok = Tokenizer.from_file(str(tok_path))
    enc = TextEncoder(tok, int(model.inputs[0].shape[1]))
    train = read_textset(args.train, labels)
    ev = read_textset(args.eval, labels) if args.eval else None
    if train.labels is None:
        raise ConfigError(f"{args.train}: recovery needs labels: write text<TAB>label lines")
    xtr = (enc.encode_batch(train.texts), train.labels)
    xev = (enc.encode_batch(ev.texts), ev.labels) if ev is not None and ev.labels is not None else None
    plan = PrunePlan(heads=args.heads, ffn=args.ffn, layers=list(args.drop_layers))
    pruned = prune(model, plan, score=args.score, calib=(xtr[0][:256], xtr[1][:256]))
    teacher = None
    if not args.no_distill and args.recover_epochs > 0 and _distill_available():
        teacher = load_teacher(src, tokenizer=tok_path)
    rec = recover(pruned, xtr, xev, args.recover_epochs, teacher=teacher, texts=(train, ev), tokenizer=tok)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pruned.save(out)
    summary = {"original": {"path": str(src), "params": count_params(model), **describe(model)},
               "pruned": {"path": str(out), "params": count_params(pruned), **describe(pruned)},
               "recovery": rec}
    if xev is not None:
        summary["original"]["eval_accuracy"] = accuracy(model, xev)
    print(json.dumps(summary, indent=2))
    if args.report:
        from converters.size_report import Candidate, build_report, format_table, write_report

        calib = xtr[0][:128]
        cands = [Candidate("original", src, "dynamic"), Candidate("pruned", out, "dynamic")]
        rep = build_report(cands, calib=calib, eval_data=xev, teacher="original")
        write_report(rep, args.report)
        print(format_table(rep))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-slm")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
