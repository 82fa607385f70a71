"""The data files travel with the installed packages: built into a wheel and loaded from that
install (not from this checkout) through importlib.resources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bitdelta_core.data import TASKS, default_data_dir, load_task, shipped_data_dir

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_dir_is_the_package_folder(monkeypatch):
    import bitdelta_core

    monkeypatch.delenv("BITDELTA_DATA_DIR", raising=False)
    assert shipped_data_dir() == Path(bitdelta_core.__file__).parent / "task_data"
    assert default_data_dir() == shipped_data_dir()
    for spec in TASKS.values():  # every shipped layout points at a file that exists
        for layout in spec.local.values():
            assert (shipped_data_dir() / layout.file).is_file(), layout.file


def test_data_dir_env_overrides(monkeypatch, tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "validation.tsv").write_text("sentence\tlabel\ngreat\t1\nawful\t0\n")
    monkeypatch.setenv("BITDELTA_DATA_DIR", str(tmp_path))
    ds = load_task("sst2", "validation")
    assert ds.texts == [("great",), ("awful",)] and ds.labels == [1, 0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy of the sources: an in-tree build would leave build/ and *.egg-info here
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "cache", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("bitdelta_core", "serve", "benchmarks"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                        "--wheel-dir", str(out), str(src)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{r.stdout}\n{r.stderr}")
    (whl,) = out.glob("bitdelta_serve-*.whl")
    return whl


def test_wheel_holds_the_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for spec in TASKS.values():
        for layout in spec.local.values():
            assert f"bitdelta_core/task_data/{layout.file}" in names, layout.file
    assert "bitdelta_core/csrc/signed_linear.cpp" in names
    shipped = ROOT / "serve" / "demo_data"
    for f in sorted(shipped.glob("*.safetensors")) + sorted(shipped.glob("manifest.json")):
        assert f"serve/demo_data/{f.name}" in names, f.name
    assert not any(n.startswith("benchmarks/data/") for n in names)


def test_installed_wheel_loads_its_own_data(wheel, tmp_path):
    """Unpack the wheel (what pip does for a pure-Python wheel) and load task data from it, in an
    interpreter whose working directory and import path hold no checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import json, bitdelta_core, serve.demo_build as db\n"
        "from bitdelta_core.data import load_task, shipped_data_dir\n"
        "ds = load_task('subj', 'validation')\n"
        "print(json.dumps({'pkg': bitdelta_core.__file__, 'data': str(shipped_data_dir()), 'n': len(ds),\n"
        "                  'first': list(ds.texts[0]), 'demo': str(db.shipped_dir()),\n"
        "                  'manifest': db.read_manifest(db.shipped_dir()) is not None}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BITDELTA_DATA_DIR")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["pkg"].startswith(str(site)) and out["data"].startswith(str(site))
    here = load_task("subj", "validation")
    assert out["n"] == len(here) == 2000 and out["first"] == list(here.texts[0])
    assert out["demo"].startswith(str(site))
    assert out["manifest"] == (ROOT / "serve" / "demo_data" / "manifest.json").is_file()
