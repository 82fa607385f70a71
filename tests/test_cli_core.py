"""``bitdelta compress / inspect / apply`` on real Hugging Face folders (tiny BERT, real MiniLM
tokenizer files, a fine-tune that adds tokens and a new 3-label head)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bitdelta_core.apply import apply
from bitdelta_core.cli import build_parser, main

from tiny_models import build, finetune, one_torch_thread  # noqa: F401

ADDED = ["<movie>", "[EMO]"]


def _tokenizer():
    from bitdelta_core.bases import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = _tokenizer()
    base = build("bert", "seqcls", vocab_size=len(tok))
    base.bert.save_pretrained(root / "base")  # a bare backbone, like a real pretrained base
    tok.save_pretrained(root / "base")
    ft = copy.deepcopy(base)
    tok.add_tokens([ADDED[0]])
    tok.add_special_tokens({"additional_special_tokens": [ADDED[1]]})
    ft.resize_token_embeddings(len(tok))
    ft.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    ft.config.label2id = {v: k for k, v in ft.config.id2label.items()}
    finetune(ft, "seqcls")
    ft.save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    other = build("bert", "seqcls", seed=7, vocab_size=len(_tokenizer()))
    other.bert.save_pretrained(root / "other")
    return root


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compress_inspect_apply(folders, capsys, tmp_path):
    delta = tmp_path / "d.safetensors"
    rc, out, err = run(capsys, "compress", "--base", folders / "base", "--finetuned", folders / "ft",
                       "--out", delta, "--no-progress")
    assert rc == 0, err
    m = re.search(r"(\d+) tensors \((.*)\), (\d+) bytes, ([\d.]+) bits/parameter \((\d+) parameters\)", out)
    assert m, out
    size, bpp, nparams = int(m[3]), float(m[4]), int(m[5])
    assert size == delta.stat().st_size
    assert bpp == pytest.approx(size * 8 / nparams, abs=1e-4)
    assert "resized=1" in m[2] and "sign1=" in m[2]

    rc, out, _ = run(capsys, "inspect", delta, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["file_bytes"] == size and info["num_parameters"] == nparams
    assert info["model"]["architecture"] == "BertForSequenceClassification"
    assert info["model"]["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    ft_tok = AutoTokenizer.from_pretrained(folders / "ft")
    added = info["tokenizer"]["added_tokens"]
    assert [a["content"] for a in added] == ADDED
    assert [a["id"] for a in added] == [ft_tok.convert_tokens_to_ids(t) for t in ADDED]
    assert [a["special"] for a in added] == [False, True]
    codecs = {t["name"]: t["codec"] for t in info["tensors"]}
    assert codecs["classifier.weight"] == "dense"  # the base folder has no head
    assert codecs["bert.embeddings.word_embeddings.weight"] == "resized"
    assert codecs["bert.pooler.dense.weight"] == "sign1"

    rc, out, _ = run(capsys, "inspect", delta)
    assert rc == 0
    assert "bits/parameter all-inclusive" in out and "bert.pooler.dense.weight" in out
    assert f"{size} bytes" in out and "<movie>" in out

    rc, out, err = run(capsys, "apply", "--base", folders / "base", "--delta", delta, "--out", tmp_path / "model")
    assert rc == 0, err
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    in_memory = apply(str(folders / "base"), delta)
    sd_e, sd_m = exported.state_dict(), in_memory.state_dict()
    assert set(sd_e) == set(sd_m) and all(torch.equal(sd_e[k], sd_m[k]) for k in sd_m)
    assert exported.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert exported.config.vocab_size == len(ft_tok)
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert len(tok) == len(ft_tok)
    text = f"a {ADDED[0]} with {ADDED[1]} feelings"
    assert tok(text)["input_ids"] == ft_tok(text)["input_ids"]
    ft = AutoModelForSequenceClassification.from_pretrained(folders / "ft")
    base = AutoModelForSequenceClassification.from_pretrained(folders / "base", num_labels=3)
    enc = ft_tok(["plain words here", "the film was fine"], return_tensors="pt", padding=True)  # base's vocab
    with torch.no_grad():
        lf, le, lb = ft(**enc).logits, exported(**enc).logits, base(**enc).logits
    assert (le - lf).norm() < 0.5 * (lb - lf).norm()


def test_dry_run(folders, capsys, tmp_path):
    rc, out, _ = run(capsys, "compress", "--base", folders / "base", "--finetuned", folders / "ft",
                     "--dry-run", "--exclude", "classifier.weight", "--exclude", "re:.*\\.query\\.weight")
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "absent from base" in lines["classifier.weight"]
    assert " dense " in lines["bert.encoder.layer.0.attention.self.query.weight"]
    assert "excluded by rule" in lines["bert.encoder.layer.1.attention.self.query.weight"]
    assert " sign1 " in lines["bert.encoder.layer.0.attention.self.key.weight"]
    assert " resized " in lines["bert.embeddings.word_embeddings.weight"]
    assert re.search(r"\d+ tensors: .*sign1=", out)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("argv", "msg"), [
    (["compress", "--base", "{root}/nope", "--finetuned", "{root}/ft", "--out", "{tmp}/x.safetensors"], "does not exist"),
    (["compress", "--base", "{root}/base", "--finetuned", "{root}/ft", "--out", "{tmp}/x.safetensors",
      "--include", "typo.weight"], "matched no tensor"),
    (["compress", "--base", "{root}/base", "--finetuned", "{root}/ft"], "--out is required"),
    (["inspect", "{root}/ft/config.json"], "safetensors"),
    (["inspect", "{tmp}/missing.safetensors"], "does not exist"),
], ids=["missing-base", "rule-no-match", "no-out", "not-an-artifact", "missing-delta"])
def test_errors(folders, capsys, tmp_path, argv, msg):
    rc, out, err = run(capsys, *[a.format(root=folders, tmp=tmp_path) for a in argv])
    assert rc == 2
    errline = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errline) == 1 and msg in errline[0], err
    assert not (tmp_path / "x.safetensors").exists()


def test_apply_to_wrong_base(folders, capsys, tmp_path):
    delta = tmp_path / "d.safetensors"
    assert run(capsys, "compress", "--base", folders / "base", "--finetuned", folders / "ft", "--out", delta,
               "--no-progress")[0] == 0
    rc, _, err = run(capsys, "apply", "--base", folders / "other", "--delta", delta, "--out", tmp_path / "m")
    assert rc == 2 and "fingerprint" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("cmd", "flags"), [
    ("compress", ["--base", "--finetuned", "--out", "--granularity", "--scale-dtype", "--dense-dtype", "--include",
                  "--exclude", "--dry-run", "--no-progress"]),
    ("inspect", ["--json", "DELTA"]),
    ("apply", ["--base", "--delta", "--out"]),
])
def test_help(cmd, flags, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in flags:
        assert f in out, f
