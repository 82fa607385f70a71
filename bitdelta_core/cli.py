"""``bitdelta`` command line: a thin layer over the Python API.

Each command group lives in its own ``add_*`` function so the groups stay independent.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import BitDeltaError

logger = logging.getLogger("bitdelta")


def add_core_commands(sub: argparse._SubParsersAction) -> None:
    """compress / inspect / apply (issue: core)."""
    # COMMANDS-CORE
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
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
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
        counts: dict[str, int] = {}
        for p in plans:
            counts[p.codec.value] = counts.get(p.codec.value, 0) + 1
        print(f"{len(plans)} tensors: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return 0
    art = compress(base, ft, config, progress=args.progress)
    size = art.save(args.out)
    counts = {}
    for e in art.tensors.values():
        counts[e.codec.value] = counts.get(e.codec.value, 0) + 1
    print(f"wrote {args.out}: {len(art.tensors)} tensors ("
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
          + f"), {size} bytes, {size * 8 / max(art.num_parameters, 1):.4f} bits/parameter "
          f"({art.num_parameters} parameters)")
    return 0


def _cmd_inspect(args) -> int:
    import json

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
    print(f"{'tensor':<{width}}  {'shape':<14} {'codec':<8} {'gran.':<6} {'bytes':>10} {'bits/param':>10}")
    for r in rows:
        bpp = r["bytes"] * 8 / r["numel"] if r["numel"] else 0.0
        print(f"{r['name']:<{width}}  {str(r['shape']):<14} {r['codec']:<8} {r.get('granularity', '-'):<6} "
              f"{r['bytes']:>10} {bpp:>10.3f}")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(info["codec_counts"].items()))
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
    """finetune / distill / eval (issue: distillation & evaluation)."""
    # COMMANDS-DATA


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """serve / demo / register / models (issue: service)."""
    # COMMANDS-SERVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitdelta", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_core_commands(sub)
    add_data_commands(sub)
    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except BitDeltaError as e:
        logger.debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
