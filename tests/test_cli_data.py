"""CLI round trip on a user-written file with flags only: finetune -> compress -> distill -> eval,
plus the typed errors the data commands report."""

from __future__ import annotations

import json

import pytest
import torch

from bitdelta_core.artifact import load_artifact
from bitdelta_core.cli import main

from distill_fixtures import NEG, POS, tiny_base, tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny_base().save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


def _user_csv(path, n_rep=3):
    """No header, label FIRST, string labels, quoted text with commas and quotes."""
    lines = []
    for _ in range(n_rep):
        lines += [f'pos,"{s}, said ""me"""' for s in POS] + [f'neg,"{s}, said ""me"""' for s in NEG]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip_with_flags_only(tmp_path, base_dir, capsys):
    data = _user_csv(tmp_path / "reviews.csv")
    flags = ["--data", str(data), "--no-header", "--label-col", "0", "--text-col", "1"]
    ft, one, dist = tmp_path / "ft", tmp_path / "d1.safetensors", tmp_path / "d2.safetensors"
    assert main(["finetune", "--base", str(base_dir), "--out", str(ft), *flags, "--epochs", "8",
                 "--batch-size", "8", "--lr", "3e-3", "--no-progress"]) == 0
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    assert (ft / "tokenizer.json").is_file() and (ft / "finetune.json").is_file()
    assert main(["compress", "--base", str(base_dir), "--finetuned", str(ft), "--out", str(one),
                 "--no-progress"]) == 0
    assert main(["distill", "--base", str(base_dir), "--finetuned", str(ft), "--delta", str(one), "--out",
                 str(dist), *flags, "--steps", "30", "--lr", "1e-3", "--calib-size", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out
    art = load_artifact(dist)
    d = art.compression["distillation"]
    assert d["loss_after"] < d["loss_before"] and d["steps"] == 30
    report = tmp_path / "eval.json"
    assert main(["eval", "--base", str(base_dir), "--finetuned", str(ft), "--delta", f"1bit={one}",
                 "--delta", f"distilled={dist}", *flags, "--json", str(report), "--no-progress"]) == 0
    rep = json.loads(report.read_text())
    assert rep["examples"] == 60 and set(rep["models"]) == {"original", "1bit", "distilled"}
    orig = rep["models"]["original"]
    assert orig["accuracy"] >= 0.9  # learnable toy data: the fine-tune really trained
    for name in ("1bit", "distilled"):
        m = rep["models"][name]
        assert 0 <= m["agreement"] <= 1 and m["bytes"] == (tmp_path / f"d{1 if name == '1bit' else 2}.safetensors").stat().st_size
        assert m["bytes"] < orig["bytes"]
    assert rep["models"]["distilled"]["agreement"] >= 0.9
    printed = capsys.readouterr().out
    assert "distilled" in printed and "agreement" in printed


def test_eval_errors(tmp_path, base_dir, capsys):
    data = _user_csv(tmp_path / "reviews.csv", 1)
    ft = tmp_path / "ft"
    assert main(["finetune", "--base", str(base_dir), "--out", str(ft), "--data", str(data), "--no-header",
                 "--label-col", "0", "--text-col", "1", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    # a label outside the model's label set
    bad = tmp_path / "bad.csv"
    bad.write_text('pos,"fine"\nmeh,"so so"\n')
    rc = main(["eval", "--finetuned", str(ft), "--data", str(bad), "--no-header", "--label-col", "0",
               "--text-col", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not in the label set" in err and "'meh'" in err
    # three labels against a two-way head
    three = tmp_path / "three.tsv"
    three.write_text("text\tlabel\na\tx\nb\ty\nc\tz\n")
    rc = main(["eval", "--finetuned", str(ft), "--data", str(three), "--labels", "x,y,z", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 label(s)" in err and "2-way head" in err
    # unknown task, missing column, empty file
    rc = main(["eval", "--finetuned", str(ft), "--task", "nope", "--no-progress"])
    assert rc == 2 and "unknown task 'nope'" in capsys.readouterr().err
    rc = main(["eval", "--finetuned", str(ft), "--data", str(three), "--text-col", "review", "--no-progress"])
    assert rc == 2 and "missing column 'review'" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(["finetune", "--base", str(base_dir), "--out", str(tmp_path / "x"), "--data", str(empty), "--no-progress"])
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_finetune_api_on_a_task_subset(tmp_path, base_dir):
    from bitdelta_core.finetune import finetune

    out = finetune(base_dir, "cola", tmp_path / "cola", max_examples=24, epochs=1, batch_size=8, max_length=32,
                   progress=False)
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(out)
    assert m.config.id2label == {0: "unacceptable", 1: "acceptable"}
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["examples"] == 24 and summary["steps"] == 3
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    changed = [n for n, p in m.state_dict().items() if n in base.state_dict() and not torch.equal(p, base.state_dict()[n])]
    assert any("encoder" in n for n in changed)  # the encoder really trained
