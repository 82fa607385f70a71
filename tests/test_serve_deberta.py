"""A DeBERTa-v3-style tiny base served end to end over HTTP: two fine-tunes registered through
the API, classified concurrently so that forwards mix them, each answer equal to offline
``apply``. Only HTTP and the service's own start/stop helpers are used, so the test holds
whatever the service topology."""

from __future__ import annotations

import concurrent.futures as cf
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from bitdelta_core.apply import apply
from bitdelta_core.compress import compress
from serve import run
from serve.config import ServeConfig
from serve_helpers import (ADMIN, AUTH, VOCAB, client, finetune, free_port, metric, reference_predictions, texts,
                           tiny_tokenizer)

pytestmark = pytest.mark.slow

LABELS = {"sent": ["neg", "pos"], "topic": ["a", "b", "c"]}


def save_deberta_v3_base(path, seed: int = 0):
    """DeBERTa-v2 classes in the DeBERTa-v3 configuration (relative attention with log buckets,
    a LayerNorm on the relative embeddings, shared attention keys, no absolute positions)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("deberta-v2", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=40, max_position_embeddings=32,
                               relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                               position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
                               position_biased_input=False, type_vocab_size=0, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_deberta")
    base = save_deberta_v3_base(root / "base")
    files, refs = {}, {}
    for i, (name, labels) in enumerate(LABELS.items()):
        art = compress(base, finetune(base, root / f"ft_{name}", labels, seed=20 + i), progress=False)
        assert art.tensors["deberta.encoder.rel_embeddings.weight"].codec == "sign1"  # read outside forward
        files[name] = root / f"{name}.safetensors"
        art.save(files[name])
        refs[name] = apply(str(base), art)
    cfg = ServeConfig(base=str(base), store=str(root / "store"), admin_token=ADMIN, port=free_port(),
                      max_wait_ms=30, max_batch_size=64, replica_num_cpus=0.5)
    url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    with client(url) as c:
        for name in LABELS:
            r = c.post("/v1/models", data={"name": name}, headers=AUTH,
                       files={"file": ("delta.safetensors", files[name].read_bytes(), "application/octet-stream")})
            assert r.status_code == 201, r.text
        yield {"c": c, "refs": refs, "tok": tiny_tokenizer()}
    run.stop()


def test_deberta_v3_mixed_batches_equal_offline_apply(served):
    c = served["c"]
    jobs = [(list(LABELS)[i % 2], texts(1 + i % 3, seed=200 + i)) for i in range(16)]

    def one(job):
        name, inputs = job
        return name, inputs, c.post("/v1/classify", json={"model": name, "inputs": inputs, "return_all_scores": True})

    before = metric(c, "bitdelta_batch_requests_count")
    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, jobs))
    for name, inputs, r in results:
        assert r.status_code == 200, r.text
        want = reference_predictions(served["refs"][name], served["tok"], inputs, dict(enumerate(LABELS[name])))
        got = r.json()["predictions"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g["label"] == w["label"], (name, g, w)
            assert math.isclose(g["score"], w["score"], abs_tol=1e-4), (name, g, w)
            for k in w["scores"]:
                assert math.isclose(g["scores"][k], w["scores"][k], abs_tol=1e-4)
    batches = metric(c, "bitdelta_batch_requests_count") - before
    assert 1 <= batches < len(jobs), f"{len(jobs)} concurrent requests ran in {batches} forwards"
    mixed = metric(c, "bitdelta_batch_models_count") - metric(c, "bitdelta_batch_models_bucket", le="1")
    assert mixed >= 1, "no forward mixed the two fine-tunes"
    # the self-check's choice is visible to operators: the listing and a metrics label
    assert c.get("/v1/models").json()["serving_path"] == "mixed"
    assert metric(c, "bitdelta_serving_path", path="mixed") >= 1
