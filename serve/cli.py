"""The installed ``bitdelta`` command: the core's commands plus the service's.

:func:`main` builds the core parser (:func:`bitdelta_core.cli.build_parser`) with this module's
command groups added (serve / demo / register / models / keys / audit), so ``bitdelta`` offers every command
while :mod:`bitdelta_core` never imports :mod:`serve` (``python -m bitdelta_core.cli`` offers the
core's commands alone). Ray, FastAPI and torch are imported only inside the commands that use them.

The ``serve`` command's options are generated from :class:`serve.config.ServeConfig`'s fields
(name, type, description, default), so a new setting is a flag without further code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from typing import Any, Sequence

from pydantic import BaseModel, SecretStr

from bitdelta_core import cli as core_cli
from bitdelta_core.naming import NAME_RULE

logger = logging.getLogger("bitdelta")


# ---- flags from a pydantic model -------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` / ``Optional[X]`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _json_object(raw: str) -> dict:
    try:
        v = json.loads(raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], *, env_prefix: str = "",
                      defaults_note: dict[str, str] | None = None) -> None:
    """One option per field of ``model``: ``--field-name`` with the field's type, choices
    (``Literal``), description and default in the help. Booleans get ``--x/--no-x``.

    Every option's parsed default is ``None`` (absent), so the model's own precedence (e.g.
    environment variables under defaults) decides for options that are not given.
    """
    notes = defaults_note or {}
    for name, f in model.model_fields.items():
        tp = _unwrap_optional(f.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            choices = typing.get_args(tp)
            kwargs.update(choices=list(choices), type=type(choices[0]))
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif tp is SecretStr:
            kwargs.update(type=str, metavar="TOKEN")
        elif tp is dict or origin is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        else:
            kwargs["type"] = str
        desc = (f.description or name.replace("_", " ")).rstrip(".")
        if name in notes:
            default = notes[name]
        elif f.is_required():
            default = "required"
        elif tp is SecretStr:
            default = "unset"
        else:
            default = json.dumps(f.default) if isinstance(f.default, (dict, list)) else str(f.default)
        env = f"; env {env_prefix}{name.upper()}" if env_prefix else ""
        kwargs["help"] = f"{desc} (default: {default}{env})".replace("%", "%%")
        parser.add_argument(flag_name(name), **kwargs)


def model_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The options given on the command line, by field name (absent ones left out)."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}


# ---- the service's commands ------------------------------------------------------------------


def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """serve / demo / register / models."""
    from .config import ENV_PREFIX, ServeConfig

    p = sub.add_parser(
        "serve", help="run the multi-tenant HTTP service locally (Ray Serve; Ctrl-C stops it)",
        description="Start a local Ray instance and the service: one base model, the fine-tunes in --store, "
                    "HTTP API on --host:--port (127.0.0.1 by default; use 0.0.0.0 deliberately). Every option "
                    "can also come from the environment as BITDELTA_<OPTION> (e.g. BITDELTA_ADMIN_TOKEN, "
                    "which is better than --admin-token on a shared machine).",
    )
    add_model_options(p, ServeConfig, env_prefix=ENV_PREFIX,
                      defaults_note={"base": "$BITDELTA_BASE, else the packaged MiniLM-L6"})
    p.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "demo", help="the one-command demo: MiniLM-L6 + 3 real 1-bit fine-tunes, served on 127.0.0.1:8000",
        description="Serve MiniLM-L6 with three real 1-bit fine-tunes (SST-2, AG News, SUBJ): the deltas shipped "
                    "in the package when the installed base is the one they were made for, else rebuilt with "
                    "the same recipe (fine-tune, compress, distil; cached under --cache). Starts the service, "
                    "registers them over HTTP, reports accuracy through the API and prints example curl "
                    "commands. Ctrl-C stops it.",
    )
    p.add_argument("--cache", default=".cache/demo", help="cache directory (default .cache/demo)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rebuild", action="store_true",
                   help="rebuild the deltas with the shipped recipe even when the shipped ones fit the base")
    p.add_argument("--steps", type=int,
                   help="rebuild with this many training steps per task instead of the recipe's (a quick demo)")
    p.add_argument("--batch-size", type=int, help="training batch size of a rebuild (default: the recipe's, 32)")
    p.add_argument("--eval-examples", type=int,
                   help="held-out examples per task classified through the API (default: the examples the "
                        "build measured: all 872 of SST-2 validation, 1000 of AG News test and of SUBJ validation)")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                   help="keep serving until Ctrl-C (--no-serve: exit once ready, e.g. for CI)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("register", help="register a 1-bit delta file with a running service (admin)",
                       description="POST FILE to URL/v1/models as NAME. The admin token comes from --token or "
                                   "$BITDELTA_ADMIN_TOKEN.")
    p.add_argument("file", metavar="FILE", help="delta artifact (.safetensors) made by 'bitdelta compress'")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--name", required=True, help=f"model name ({NAME_RULE})")
    p.add_argument("--token", help="admin bearer token (default: $BITDELTA_ADMIN_TOKEN)")
    p.add_argument("--replace", action=argparse.BooleanOptionalAction, default=False,
                   help="overwrite an existing model of that name")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("models", help="list the fine-tunes a running service serves")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", help="classify bearer token if the service requires one ($BITDELTA_CLASSIFY_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the JSON answer")
    p.set_defaults(func=_cmd_models)


def serve_config(args: argparse.Namespace, env: typing.Mapping[str, str] | None = None):
    """The :class:`ServeConfig` of a parsed ``serve`` command (flags > environment > defaults)."""
    from bitdelta_core.bases import minilm_path

    from .config import ENV_PREFIX, ServeConfig

    env = os.environ if env is None else env
    values = model_values(args, ServeConfig)
    if "base" not in values and not env.get(ENV_PREFIX + "BASE"):
        values["base"] = str(minilm_path())
    return ServeConfig.load(values, env=env)


def _cmd_serve(args) -> int:
    from .run import serve_forever

    cfg = serve_config(args)
    if cfg.admin_token is None:
        logger.warning("no admin token: POST/DELETE /v1/models answer 401 (set BITDELTA_ADMIN_TOKEN)")

    def banner(url: str) -> None:
        print(f"serving {cfg.base} from store {cfg.store} at {url} ({cfg.num_replicas} engine replica(s)); "
              f"docs at {url}/docs; Ctrl-C stops", flush=True)

    serve_forever(cfg, ray_num_cpus=args.ray_num_cpus, banner=banner)
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(steps=args.steps, batch_size=args.batch_size, eval_examples=args.eval_examples,
                            rebuild=args.rebuild)
    return run_demo(cache=args.cache, host=args.host, port=args.port, settings=settings, serve_forever=args.serve,
                    progress=args.progress)


def _cmd_register(args) -> int:
    from .client import Client, ServiceError

    try:
        with Client(args.url, admin_token=args.token) as c:
            info = c.register(args.name, args.file, replace=args.replace)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"registered {info['name']}: {info['num_labels']} labels {info['labels']}, {info['bytes']} bytes resident")
    return 0


def _cmd_models(args) -> int:
    from .client import Client, ServiceError

    try:
        with Client(args.url, token=args.token) as c:
            models = c.models()
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"models": models}, indent=2))
        return 0
    print(f"{'name':<24} {'labels':<40} {'bytes':>10}  created")
    for m in models:
        labels = ",".join(m["labels"]) if m["labels"] else "(regression)"
        print(f"{m['name']:<24} {labels[:40]:<40} {m['bytes']:>10}  {m['created']}")
    return 0


def add_access(sub: argparse._SubParsersAction) -> None:
    """keys create/list/revoke, audit (HTTP calls to a running service)."""
    from .access.cli import add_access_commands

    add_access_commands(sub)


SERVE_COMMANDS = (add_serve_commands, add_access)


def build_parser() -> argparse.ArgumentParser:
    """The full ``bitdelta`` parser: the core's command groups, then the service's."""
    return core_cli.build_parser((*core_cli.CORE_COMMANDS, *SERVE_COMMANDS))


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
