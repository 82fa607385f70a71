"""``bitdelta`` command line: a thin layer over the Python API.

Each command group lives in its own ``add_*`` function so the groups stay independent. This
module holds the core's groups (compress / inspect / apply, finetune / distill / eval) and is
runnable on its own (``python -m bitdelta_core.cli``); the installed ``bitdelta`` command is
:func:`serve.cli.main`, which adds the service's groups (serve / demo / register / models) to the
same parser, so the core never imports the service.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from .errors import BitDeltaError
from .progress import silence_progress_bars

logger = logging.getLogger("bitdelta")


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    """compress / inspect / apply."""
    from .codec import Granularity

    rule_help = ("exact parameter name, suffix on a '.' boundary (e.g. 'query.weight'), or 're:<regex>' "
                 "matching the whole name; repeatable; a rule that matches nothing is an error")
    p = sub.add_parser(
        "compress", help="compress a fine-tune against its base into a 1-bit delta file",
        description="Compress FINETUNED against BASE: every changed tensor of rank >= 2 becomes packed sign "
                    "bits + scales, rank-1 and new tensors are stored densely, unchanged tensors not at all. "
                    "BASE/FINETUNED: a Hugging Face model folder, a hub id (needs network), or a .safetensors "
                    "state dict. Prints a one-line summary (tensors, bytes, bits per parameter).",
    )
    p.add_argument("--base", required=True, help="base model (HF folder, hub id or .safetensors)")
    p.add_argument("--finetuned", required=True, help="fine-tuned model of the same architecture")
    p.add_argument("--out", help="output delta file (DELTA.safetensors); required unless --dry-run")
    p.add_argument("--granularity", choices=[g.value for g in Granularity], default=Granularity.ROW.value,
                   help="one scale per output row (default), or one per tensor (the BitDelta paper)")
    p.add_argument("--scale-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the stored scales (default float16; falls back to float32 per tensor when out of fp16 range)")
    p.add_argument("--dense-dtype", choices=["float16", "bfloat16", "float32", "exact"], default="float16",
                   help="dtype of densely stored tensors: biases, norms, new heads (default float16; 'exact' keeps their own dtype)")
    p.add_argument("--include", action="append", metavar="RULE",
                   help="only tensors matching a rule may use the 1-bit codec (default: all). " + rule_help)
    p.add_argument("--exclude", action="append", default=[], metavar="RULE",
                   help="keep tensors matching a rule dense. " + rule_help)
    p.add_argument("--dry-run", action="store_true", help="list the codec decision per tensor, write nothing")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "inspect", help="show a delta file's metadata, per-tensor codecs and bits per parameter",
        description="Validate DELTA and print its base identity, model, per-tensor codec and size, and the "
                    "total bits per fine-tuned parameter (whole file incl. scales, dense tensors, metadata).",
    )
    p.add_argument("delta", metavar="DELTA", help="delta file written by 'bitdelta compress'")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "apply", help="rebuild the fine-tune (base + 1-bit delta) as a standalone Hugging Face folder",
        description="Load BASE in the fine-tune's class, check that it is the base the delta was made for "
                    "(fingerprint), add alpha*sign(delta) per tensor and save_pretrained() to OUT (with the "
                    "base's tokenizer plus any tokens the fine-tune added).",
    )
    p.add_argument("--base", required=True, help="the base model the delta was made against")
    p.add_argument("--delta", required=True, help="delta file (DELTA.safetensors)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_apply)


def _cmd_compress(args) -> int:
    from .codec import codec_counts, format_counts
    from .compress import compress, load_pair, plan
    from .errors import ConfigError
    from .select import CompressionConfig

    config = CompressionConfig(granularity=args.granularity, scale_dtype=args.scale_dtype,
                               dense_dtype=args.dense_dtype, include=args.include, exclude=args.exclude)
    if not args.dry_run and not args.out:
        raise ConfigError("--out is required (or pass --dry-run)")
    base, ft = load_pair(args.base, args.finetuned)
    if args.dry_run:
        plans = plan(base, ft, config)
        width = max(len(p.name) for p in plans)
        for p in plans:
            print(f"{p.name:<{width}}  {str(list(p.shape)):<14} {p.codec.value:<8} {p.reason}")
        print(f"{len(plans)} tensors: " + format_counts(codec_counts(p.codec for p in plans)))
        return 0
    art = compress(base, ft, config, progress=args.progress)
    size = art.save(args.out)
    print(f"wrote {args.out}: {len(art.tensors)} tensors ("
          + format_counts(codec_counts(e.codec for e in art.tensors.values()))
          + f"), {size} bytes, {size * 8 / max(art.num_parameters, 1):.4f} bits/parameter "
          f"({art.num_parameters} parameters)")
    return 0


def _cmd_inspect(args) -> int:
    import json

    from .codec import format_counts

    from .artifact import inspect_artifact

    info = inspect_artifact(args.delta)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    base, model = info["base"], info["model"]
    print(f"file:        {info['path']} ({info['file_bytes']} bytes, {info['library']}, {info['created']})")
    print(f"base:        {base.get('name_or_path')} (fingerprint {str(base.get('fingerprint'))[:16]})")
    print(f"model:       {model.get('architecture')} ({model.get('model_type')}), num_labels={model.get('num_labels')}"
          f", problem_type={model.get('problem_type')}")
    if model.get("id2label"):
        print(f"labels:      {model['id2label']}")
    added = (info.get("tokenizer") or {}).get("added_tokens") or []
    print(f"tokenizer:   {len(added)} added token(s)" + (f": {[a['content'] for a in added[:10]]}" if added else ""))
    print(f"compression: {info['compression']}")
    for alias, target in info["tied"].items():
        print(f"tied:        {alias} -> {target}")
    rows = info["tensors"]
    width = max([len(r["name"]) for r in rows] + [6])
    print(f"{'tensor':<{width}}  {'shape':<14} {'codec':<8} {'gran.':<6} {'rows kept':>10} {'bytes':>10} {'bits/param':>10}")
    for r in rows:
        bpp = r["bytes"] * 8 / r["numel"] if r["numel"] else 0.0
        print(f"{r['name']:<{width}}  {str(r['shape']):<14} {r['codec']:<8} {r.get('granularity', '-'):<6} "
              f"{r.get('rows_stored', '-'):>10} {r['bytes']:>10} {bpp:>10.3f}")
    counts = format_counts(info["codec_counts"])
    bpp = info["bits_per_parameter"]
    print(f"total: {len(rows)} tensors ({counts}), {info['file_bytes']} bytes for {info['num_parameters']} "
          f"parameters = {bpp:.4f} bits/parameter all-inclusive (fp32: 32)" if bpp is not None else "total: 0 parameters")
    return 0


def _cmd_apply(args) -> int:
    from .apply import export

    out = export(args.base, args.delta, args.out)
    print(f"wrote {out}")
    return 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """finetune / distill / eval."""
    from .data import TASKS

    def data_args(p, split_default: str, what: str) -> None:
        g = p.add_argument_group(
            "data", f"{what}: a registered task's shipped split (--task alone), or any labelled file (--data). "
            "Examples: --task cola --data cola_train.tsv --no-header --text-col 0 --label-col 1; "
            "--data mine.csv --text-col review --label-col stars --labels bad,good")
        g.add_argument("--task", help=f"registered task ({', '.join(sorted(TASKS))}): label set, metric, defaults")
        g.add_argument("--data", metavar="FILE", help="a TSV/CSV/JSONL file (overrides the task's shipped file)")
        g.add_argument("--split", default=split_default,
                       help=f"split of the task's shipped data when --data is not given (default {split_default}; "
                            "'eval' = the task's evaluation split)")
        g.add_argument("--data-dir", help="where the task files live (default: $BITDELTA_DATA_DIR, else the copies shipped in "
                            "the package, bitdelta_core/task_data)")
        g.add_argument("--format", choices=["tsv", "csv", "jsonl"], help="file format (default: from the extension)")
        g.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                       help="the first row is a header (default: auto-detect from known column names)")
        g.add_argument("--text-col", action="append", metavar="COL",
                       help="text column, by name or 0-based index; repeat for sentence pairs")
        g.add_argument("--label-col", metavar="COL", help="label column, by name or 0-based index")
        g.add_argument("--labels", help="comma-separated label names in class-id order (default: the task's, "
                                        "else the model's, else inferred from the data)")
        g.add_argument("--max-examples", type=int, help="use a random subset of this many examples")
        g.add_argument("--data-seed", type=int, default=0, help="seed of the random subset")

    p = sub.add_parser("finetune", help="fine-tune a base model on a task; writes a Hugging Face folder",
                       description="Fine-tune BASE (an HF folder; a bare encoder gets a fresh classification head) "
                                   "on a task or labelled file and save a Hugging Face folder (weights, config with "
                                   "id2label/label2id, tokenizer, finetune.json). CPU-friendly defaults.")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--out", required=True, help="output folder")
    data_args(p, "train", "training data")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the (subset of the) data (default 2)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per example (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.set_defaults(func=_cmd_finetune, max_examples_default=4000)

    p = sub.add_parser("distill", help="train a delta's scales to match the fine-tune's outputs (BitDelta step 2)",
                       description="Scale distillation: only the per-row (or per-tensor) scales of DELTA are trained, "
                                   "with AdamW on the MSE between the compressed model's and the fine-tune's logits "
                                   "(optionally + hidden states) on unlabeled calibration texts of the task. Writes a "
                                   "delta file of the same format to OUT and prints the loss before/after.")
    p.add_argument("--base", required=True, help="the base model the delta was made against")
    p.add_argument("--finetuned", required=True, help="the fine-tune (teacher) folder")
    p.add_argument("--delta", required=True, help="delta file written by 'bitdelta compress'")
    p.add_argument("--out", required=True, help="output delta file (may equal --delta)")
    data_args(p, "train", "calibration texts (labels are not used)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of the scales (default 1e-5)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per example (default 128)")
    p.add_argument("--calib-size", type=int, default=800, help="calibration examples cycled through (default 800)")
    p.add_argument("--hidden-mse", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT x hidden-state MSE (all layers) to the logit MSE (default 0: logits only)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.set_defaults(func=_cmd_distill, max_examples_default=None)

    p = sub.add_parser("eval", help="accuracy, task metric, agreement and size of a fine-tune and its deltas",
                       description="Evaluate the original fine-tune and each DELTA (applied to BASE) on labelled data: "
                                   "accuracy, the task's metric (MCC for CoLA, F1 for MRPC/QQP, Pearson for STS-B), "
                                   "agreement of predictions with the original, and sizes in bytes.")
    p.add_argument("--base", help="base model (needed with --delta)")
    p.add_argument("--finetuned", required=True, help="the original fine-tune folder")
    p.add_argument("--delta", action="append", default=[], metavar="[NAME=]FILE",
                   help="delta file to evaluate, optionally named (e.g. 1bit=sst2.safetensors); repeatable")
    data_args(p, "eval", "evaluation data")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per example (default 128)")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.set_defaults(func=_cmd_eval, max_examples_default=None)


def _load_data_args(args, labels=None):
    from .data import load_dataset

    label_list = [s.strip() for s in args.labels.split(",")] if args.labels else labels
    n = args.max_examples if args.max_examples is not None else args.max_examples_default
    return load_dataset(args.task, args.data, split=args.split, format=args.format, header=args.header,
                        text_cols=args.text_col, label_col=args.label_col, labels=label_list, max_examples=n,
                        seed=args.data_seed, data_dir=args.data_dir)


def _model_labels(folder) -> list[str] | None:
    """The fine-tune's label names, unless they are transformers' LABEL_i placeholders."""
    import json
    from pathlib import Path

    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    id2label = cfg.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _cmd_finetune(args) -> int:
    from .finetune import finetune

    ds = _load_data_args(args)
    out = finetune(args.base, ds, args.out, max_examples=None, epochs=args.epochs, max_length=args.max_length,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=args.progress)
    print(f"wrote {out} ({len(ds)} examples of {ds.task.name}, labels {ds.label_names})")
    return 0


def _cmd_distill(args) -> int:
    from .distill import DistillConfig, distill

    labels = _model_labels(args.finetuned) if not args.task else None
    ds = _load_data_args(args, labels)
    cfg = DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        calib_size=args.calib_size, hidden_weight=args.hidden_mse, seed=args.seed)
    r = distill(args.base, args.finetuned, args.delta, ds, cfg, progress=args.progress)
    size = r.artifact.save(args.out)
    print(f"distilled {r.num_scales} scales in {r.steps} steps ({r.wall_s:.1f} s): held-out loss "
          f"{r.loss_before:.6g} -> {r.loss_after:.6g} (train {r.train_loss_first:.6g} -> {r.train_loss_last:.6g})")
    print(f"wrote {args.out}: {size} bytes, {size * 8 / max(r.artifact.num_parameters, 1):.4f} bits/parameter")
    return 0


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from .evaluate import evaluate

    labels = _model_labels(args.finetuned) if not args.task else None
    ds = _load_data_args(args, labels)
    deltas = {}
    for d in args.delta:
        name, sep, path = d.partition("=")
        if not sep:
            name, path = Path(d).stem, d
        deltas[name] = path
    rep = evaluate(args.base, args.finetuned, ds, deltas, batch_size=args.batch_size, max_length=args.max_length,
                   progress=args.progress)
    m = rep["metric_name"]
    print(f"{rep['task']}: {rep['examples']} examples from {rep['source']}")
    print(f"{'model':<14} {m:>9} {'accuracy':>9} {'agreement':>9} {'bytes':>12} {'bits/param':>10}")
    for name, r in rep["models"].items():
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        print(f"{name:<14} {r['metric']:>9.4f} {acc:>9} {r['agreement']:>9.4f} {r['bytes']:>12} "
              f"{r['bits_per_parameter']:>10.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0


CommandGroup = Callable[[argparse._SubParsersAction], None]

CORE_COMMANDS: tuple[CommandGroup, ...] = (add_core_commands, add_data_commands)


def build_parser(groups: Sequence[CommandGroup] = CORE_COMMANDS) -> argparse.ArgumentParser:
    """The ``bitdelta`` parser with the given command groups (default: the core's own).

    Every command accepts ``--progress/--no-progress`` (also before the command name).
    """
    parser = argparse.ArgumentParser(prog="bitdelta", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars (--no-progress: none, from any library or worker process)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in groups:
        add(sub)
    for p in sub.choices.values():
        if not any("--progress" in a.option_strings for a in p._actions):
            # SUPPRESS: a command that does not repeat the flag keeps the top-level value
            p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help="show progress bars (default: yes)")
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; returns the exit status (2 for a :class:`BitDeltaError`, 141 when the
    reader of stdout went away, as for a process killed by SIGPIPE)."""
    parser = parser or build_parser()
    try:
        return _run(parser, argv)
    except BrokenPipeError:
        # `bitdelta inspect X | head -3`: the reader is gone; end quietly. stdout is pointed at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, usage errors: their output meets a closed pipe here, not at exit
        sys.stdout.flush()
        raise
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.progress:
        silence_progress_bars()
    try:
        rc = int(args.func(args) or 0)
    except BitDeltaError as e:
        logger.debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    sys.stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
