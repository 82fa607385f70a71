"""The CLI as a Unix tool: output piped into a reader that goes away (``| head``) ends quietly,
and ``--no-progress`` leaves no progress bar on stderr, whoever draws it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import build, finetune

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
for _k in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    ENV.pop(_k, None)
BAR_MARKS = ("%|", "it/s]", "s/it]", "tensor/s]", "step/s]")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base folder, a fine-tune folder and its delta file."""
    root = tmp_path_factory.mktemp("cli_io")
    base = build("bert", "seqcls")
    base.save_pretrained(root / "base")
    ft = build("bert", "seqcls")
    finetune(ft, "seqcls")
    ft.save_pretrained(root / "ft")
    r = _run("compress", "--base", root / "base", "--finetuned", root / "ft", "--out", root / "d.safetensors",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    return root


def _run(*argv, module: str = "serve.cli", stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=ROOT, env=ENV, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def _run_into_closed_pipe(*argv, module: str = "serve.cli") -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reading end is already closed: the first write fails (EPIPE),
    as for `... | head -3` once head has exited."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        return _run(*argv, module=module, stdout=w_fd)
    finally:
        os.close(w_fd)


@pytest.mark.parametrize(("module", "argv"), [
    pytest.param("serve.cli", ["inspect", "{d}"], id="inspect"),
    pytest.param("bitdelta_core.cli", ["inspect", "{d}", "--json"], id="core-inspect-json"),
    pytest.param("serve.cli", ["compress", "--base", "{base}", "--finetuned", "{ft}", "--dry-run", "--no-progress"],
                 id="compress-dry-run"),
    pytest.param("serve.cli", ["--help"], id="help"),
])
def test_closed_stdout_ends_quietly(models, module, argv):
    argv = [a.format(d=models / "d.safetensors", base=models / "base", ft=models / "ft") for a in argv]
    ok = _run(*argv, module=module)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) >= 3, ok.stderr  # there is output to lose
    r = _run_into_closed_pipe(*argv, module=module)
    # 141 = 128 + SIGPIPE, as for a Unix tool; argparse itself drops a failed --help write and exits 0
    assert r.returncode == (0 if argv == ["--help"] else 141), r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr
    assert r.stderr.strip() == ""


def test_real_pipe_into_head(models):
    """The shell form: the reader takes 3 lines and exits; nothing is printed to stderr."""
    cmd = f"{sys.executable} -m serve.cli inspect {models / 'd.safetensors'} | head -3"
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    assert r.stderr == ""


def _has_bar(stderr: str) -> bool:
    return any(m in stderr for m in BAR_MARKS)


@pytest.mark.parametrize(("argv", "where"), [
    pytest.param(["compress", "--base", "{base}", "--finetuned", "{ft}", "--out", "{tmp}/x.safetensors"], "after",
                 id="compress"),
    pytest.param(["apply", "--base", "{base}", "--delta", "{d}", "--out", "{tmp}/applied"], "before", id="apply"),
])
def test_no_progress_silences_every_bar(models, argv, where, tmp_path):
    """compress draws our own bar and transformers' "Loading weights" bars; apply only the latter."""
    argv = [a.format(d=models / "d.safetensors", base=models / "base", ft=models / "ft", tmp=tmp_path)
            for a in argv]
    shown = _run(*argv)
    assert shown.returncode == 0, shown.stderr
    assert _has_bar(shown.stderr), shown.stderr  # without the flag there is a bar to silence
    # the flag after the command name or before it
    full = [*argv, "--no-progress"] if where == "after" else ["--no-progress", *argv]
    quiet = _run(*full)
    assert quiet.returncode == 0, quiet.stderr
    assert not _has_bar(quiet.stderr), quiet.stderr


def test_no_progress_reaches_child_processes():
    """Worker processes started after the switch (Ray replicas of `serve` / `demo`) draw no bars."""
    code = ("import subprocess, sys\n"
            "from bitdelta_core.progress import silence_progress_bars\n"
            "child = [sys.executable, '-c', 'from tqdm import tqdm\\nfor _ in tqdm(range(3)): pass']\n"
            "before = subprocess.run(child, capture_output=True, text=True).stderr\n"
            "silence_progress_bars()\n"
            "after = subprocess.run(child, capture_output=True, text=True).stderr\n"
            "print(repr(before)); print(repr(after))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, after = r.stdout.strip().splitlines()
    assert "3/3" in before and after == "''"
