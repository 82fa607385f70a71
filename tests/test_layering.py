"""The core never depends on the service: no module under ``bitdelta_core`` imports ``serve``,
neither in its source (any import statement, at any depth) nor at run time. Inside the engine
package every module imports only the modules listed before it (no cycles)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "bitdelta_core"


def _serve_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of ``serve`` (or a submodule) in one file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call):  # importlib.import_module("serve...") / __import__("serve")
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
        found += [(node.lineno, n) for n in names if n == "serve" or n.startswith("serve.")]
    return sorted(found)


def test_ast_scan_finds_every_import_form(tmp_path):
    """The scanner itself, so that an empty result below means something."""
    f = tmp_path / "m.py"
    f.write_text("import os\nimport serve.app\nfrom serve import run\nfrom .serve import x\n"
                 "def g():\n    from serve.config import ServeConfig\n"
                 "importlib.import_module('serve.demo')\n__import__('serve')\nimport servers\n")
    assert _serve_imports(f) == [(2, "serve.app"), (3, "serve"), (6, "serve.config"), (7, "serve.demo"),
                                 (8, "serve")]


def test_no_core_module_imports_serve():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10  # the whole package is scanned
    hits = [f"{f.relative_to(ROOT)}:{line} {name}" for f in files for line, name in _serve_imports(f)]
    assert hits == [], f"bitdelta_core imports serve: {hits}"


# the engine package's modules, each allowed to import (at run time) only those before it
ENGINE_ORDER = ["tenants", "cache", "context", "kernels", "layers", "heads", "selfcheck", "engine"]


def _package_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every relative import of a sibling module in one file, at any depth,
    leaving out ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skip:
            if node.module:
                found.append((node.lineno, node.module.split(".")[0]))
            else:  # from . import x
                found += [(node.lineno, a.name) for a in node.names]
    return sorted(found)


def test_package_import_scan(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nfrom .a import x\nfrom . import b\nfrom ..codec import C\n"
                 "if TYPE_CHECKING:\n    from .c import y\ndef g():\n    from .d.e import z\n")
    assert _package_imports(f) == [(2, "a"), (3, "b"), (8, "d")]


def test_engine_package_modules_import_only_earlier_ones():
    pkg = CORE / "multitenant"
    assert sorted(p.stem for p in pkg.glob("*.py")) == sorted(ENGINE_ORDER + ["__init__"]), \
        "a new module of bitdelta_core/multitenant must take its place in ENGINE_ORDER"
    bad = []
    for i, name in enumerate(ENGINE_ORDER):
        for line, mod in _package_imports(pkg / f"{name}.py"):
            if mod not in ENGINE_ORDER[:i]:
                bad.append(f"multitenant/{name}.py:{line} imports .{mod}")
    assert bad == [], bad


def test_importing_every_core_module_loads_no_serve_module():
    """Import every module of bitdelta_core (and build the core CLI) in a fresh interpreter."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import bitdelta_core\n"
        "mods = [m.name for m in pkgutil.walk_packages(bitdelta_core.__path__, 'bitdelta_core.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "from bitdelta_core import cli\n"
        "cli.build_parser()\n"
        "print(json.dumps({'modules': mods, 'serve': sorted(k for k in sys.modules "
        "if k == 'serve' or k.startswith('serve.'))}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "bitdelta_core.multitenant" in out["modules"] and "bitdelta_core.cli" in out["modules"]
    assert out["serve"] == []


def test_core_cli_has_no_service_commands_and_full_cli_has_all():
    from bitdelta_core.cli import build_parser as core_parser

    from serve.cli import build_parser as full_parser

    def commands(p):
        sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
        return set(sub.choices)

    core = {"compress", "inspect", "apply", "finetune", "distill", "eval"}
    assert commands(core_parser()) == core
    assert commands(full_parser()) == core | {"serve", "demo", "register", "models", "keys", "audit"}


def test_entry_point_is_the_full_cli():
    tomllib = pytest.importorskip("tomllib")

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"bitdelta": "serve.cli:main"}


@pytest.mark.parametrize("module", ["bitdelta_core.cli", "serve.cli"])
def test_cli_modules_run_with_python_m(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "compress" in r.stdout and ("serve" in r.stdout) == (module == "serve.cli")
