"""Multi-tenant engine: mixed batches must equal one-model-at-a-time ``apply`` references."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitdelta_core import cpu_kernel
from bitdelta_core.apply import apply
from bitdelta_core.compress import compress
from bitdelta_core.errors import (
    BaseMismatchError,
    InputTooLongError,
    InvalidInputError,
    ModelExistsError,
    UnknownModelError,
)
from bitdelta_core.multitenant import MultiTenantEngine, merged_weight
from bitdelta_core.codec import encode
from bitdelta_core.packing import unpack_signs

from tenant_fixtures import VOCAB, finetune_tiny, save_tiny_base

ARCHS = ["bert", "distilbert", "gpt2", "llama", "roberta"]
HEADS = {"two": (2, None), "three": (3, None), "reg": (1, None), "multi": (3, "multi_label_classification")}


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = save_tiny_base(root / "base", arch)
    arts, refs = {}, {}
    for i, (name, (nl, pt)) in enumerate(HEADS.items()):
        ft = finetune_tiny(base, root / name, nl, seed=10 + i, problem_type=pt)
        arts[name] = compress(base, ft, progress=False)
        refs[name] = apply(base, arts[name])
    refs[None] = apply(base, compress(base, base, progress=False))  # the plain base, as loaded
    return arch, base, arts, refs


def _batch(seed=0, B=9, L=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[min(2, B - 1), 7:] = 0
    mask[min(5, B - 1), 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _reference(refs, names, ids, mask):
    rows = []
    for i, n in enumerate(names):
        with torch.no_grad():
            rows.append(refs[n](input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0])
    return rows


@pytest.mark.parametrize("cache_bytes,stacked,fused", [(1 << 30, False, False), (0, False, False),
                                                        (1 << 30, True, False), (1 << 30, False, True)],
                         ids=["cached", "uncached", "stacked-bmm", "fused-cpu-kernel"])
def test_mixed_batch_matches_per_model_reference(setup, cache_bytes, stacked, fused, monkeypatch):
    arch, base, arts, refs = setup
    calls = []
    if fused:
        if cpu_kernel.load() is None:
            pytest.skip(f"compiled CPU kernel unavailable here: {cpu_kernel._state.get('error')}")
        real = cpu_kernel.signed_linear_groups
        monkeypatch.setattr(cpu_kernel, "signed_linear_groups", lambda *a, **k: calls.append(len(a[-1])) or real(*a, **k))
    eng = MultiTenantEngine(base, cache_bytes=cache_bytes, stacked=stacked, cpu_kernel=fused)
    for n, a in arts.items():
        eng.register(n, a)
    names = ["two", "three", None, "reg", "two", "multi", "three", None, "reg"]
    ids, mask = _batch()
    for _ in range(2):  # second pass runs from the working-weight cache
        calls.clear()
        logits = eng.forward({"input_ids": ids, "attention_mask": mask}, names)
        assert logits.shape == (len(names), 3)
        for i, ref in enumerate(_reference(refs, names, ids, mask)):
            torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=1e-4, rtol=0,
                                       msg=f"{arch} row {i} ({names[i]})")
    # the reference is not trivially satisfied: tenants really differ from the base and each other
    assert not torch.allclose(logits[0, :2], logits[2, :2], atol=1e-3)
    mem = eng.memory_report()
    if not fused:
        assert not calls
        assert (mem["cache_bytes"] > 0) == (cache_bytes > 0)
    else:  # every 1-bit Linear (GPT-2: Conv1D) ran fused, all four tenants in one call: nothing merged
        assert calls and max(calls) == 4
        assert mem["cache_bytes"] == 0


def test_single_tenant_and_base_only_batches(setup):
    arch, base, arts, refs = setup
    eng = MultiTenantEngine(base)
    eng.register("three", arts["three"])
    ids, mask = _batch(seed=3, B=4)
    for names in (["three"] * 4, [None] * 4):
        logits = eng.forward({"input_ids": ids, "attention_mask": mask}, names)
        for i, ref in enumerate(_reference(refs, names, ids, mask)):
            torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=1e-4, rtol=0)


def test_merged_weight_is_base_plus_scaled_signs():
    torch.manual_seed(0)
    base = torch.randn(6, 24)
    delta = torch.randn(6, 24) * 1e-2
    delta[4] = 0
    code = encode(delta)
    assert code.kept_rows().tolist() == [0, 1, 2, 3, 5]  # the unchanged row is left out
    want = base + code.row_scales()[:, None] * torch.where(delta >= 0, 1.0, -1.0)
    got = merged_weight(base, code, code.kept_scales(), code.kept_rows())
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)  # index_add vs addcmul rounding
    assert torch.equal(got[4], base[4])
    full = encode(torch.randn(6, 24) * 1e-2)  # every row stored
    want = base + full.row_scales()[:, None] * unpack_signs(full.signs, (6, 24))
    assert full.rowmask is None
    torch.testing.assert_close(merged_weight(base, full, full.row_scales()), want, atol=1e-7, rtol=0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_err")
    base = save_tiny_base(root / "base", "bert")
    other = save_tiny_base(root / "other", "bert", seed=99)
    ft = finetune_tiny(base, root / "ft", 2)
    ft_other = finetune_tiny(other, root / "ft_other", 2)
    return base, compress(base, ft, progress=False), compress(other, ft_other, progress=False)


def test_classify_texts_and_pairs(bert):
    base, art, _ = bert
    eng = MultiTenantEngine(base)
    eng.register("sent", art)
    ref = apply(base, art)
    texts = ["w1 w2 w3", ["w4 w5", "w6"], "w7 w8 w9 w10 w11"]
    preds = eng.classify(texts, "sent", return_all_scores=True)
    for x, p in zip(texts, preds):
        enc = eng.tokenizer(*((x,) if isinstance(x, str) else tuple(x)), return_tensors="pt")
        with torch.no_grad():
            probs = ref(**enc).logits[0].softmax(-1)
        k = int(probs.argmax())
        assert p.label == ref.config.id2label[k]
        assert p.score == pytest.approx(float(probs[k]), abs=1e-5)
        assert set(p.scores) == set(ref.config.id2label.values())
    with pytest.raises(InputTooLongError, match="maximum"):
        eng.classify(["w1 " * 100], "sent", truncate=False)
    assert len(eng.classify(["w1 " * 100], "sent")) == 1  # truncated by default


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.tok(*a, **k)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("texts", [["w1 w2 w3", "w7 w8 w9 w10 w11"], [["w4 w5", "w6"], ["w1", "w2 w3"]],
                                   ["w1 w2 w3", ["w4 w5", "w6"], "w7"]], ids=["single", "pairs", "mixed"])
def test_encode_once_then_classify_encoded(bert, texts):
    base, art, _ = bert
    eng = MultiTenantEngine(base)
    eng.register("sent", art)
    want = eng.classify(texts, "sent", return_all_scores=True)
    eng.tokenizer = counting = _CountingTokenizer(eng.tokenizer)
    encs = eng.encode(texts)
    # one tokenizer call for the whole list (per input only when single texts and pairs mix)
    assert counting.calls == (len(texts) if texts[-1] == "w7" else 1)
    for x, e in zip(texts, encs):
        assert e["input_ids"] == counting.tok(*((x,) if isinstance(x, str) else tuple(x)))["input_ids"]
    got = eng.classify_encoded(encs, "sent", return_all_scores=True)
    assert [p.label for p in got] == [p.label for p in want]
    for g, w in zip(got, want):
        assert g.score == pytest.approx(w.score, abs=1e-6) and g.scores == pytest.approx(w.scores, abs=1e-6)


def test_encode_truncates_or_refuses_long_inputs(bert):
    base, _, _ = bert
    eng = MultiTenantEngine(base, max_length=16)
    short, long = "w1 w2", "w1 " * 40
    with pytest.raises(InputTooLongError, match="input 1 has 42 tokens, more than the maximum 16"):
        eng.encode([short, long], truncate=False)
    encs = eng.encode([short, long, [long, long]])
    assert [len(e["input_ids"]) for e in encs] == [4, 16, 16]
    assert eng.count_tokens([short, long]) == [4, 42]  # before truncation


def test_classify_encoded_bad_input(bert):
    base, art, _ = bert
    eng = MultiTenantEngine(base)
    eng.register("sent", art)
    enc = eng.encode(["w1"])
    with pytest.raises(InvalidInputError, match="empty"):
        eng.classify_encoded([], "sent")
    with pytest.raises(InvalidInputError, match="2 model names for 1 inputs"):
        eng.classify_encoded(enc, ["sent", "sent"])
    with pytest.raises(InvalidInputError, match="input_ids"):
        eng.classify_encoded([{"attention_mask": [1]}], "sent")
    with pytest.raises(UnknownModelError, match="nope"):
        eng.classify_encoded(enc, "nope")


def test_base_folder_without_tokenizer_files_has_no_tokenizer(bert, tmp_path):
    """A folder with weights and config only: no tokenizer (never an empty stand-in that maps
    every word to [UNK]); classify() says so, forward() still runs each row's tenant."""
    base, art, _ = bert
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in base.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (bare / f.name).write_bytes(f.read_bytes())
    eng = MultiTenantEngine(bare)
    assert eng.tokenizer is None
    eng.register("sent", art)
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        eng.classify(["w1 w2"], "sent")
    ids, mask = _batch(B=2)
    ref = MultiTenantEngine(base)
    ref.register("sent", art)
    assert ref.tokenizer is not None
    torch.testing.assert_close(eng.forward({"input_ids": ids, "attention_mask": mask}, ["sent", None]),
                               ref.forward({"input_ids": ids, "attention_mask": mask}, ["sent", None]))


def test_bad_input_keeps_pool_intact(bert):
    base, art, other_art = bert
    eng = MultiTenantEngine(base)
    eng.register("sent", art)
    before = eng.list()
    with pytest.raises(UnknownModelError, match="nope"):
        eng.classify(["w1"], ["nope"])
    with pytest.raises(BaseMismatchError):
        eng.register("other", other_art)
    with pytest.raises(ModelExistsError, match="sent"):
        eng.register("sent", art)
    with pytest.raises(InvalidInputError, match="name"):
        eng.register("../x", art)
    with pytest.raises(InvalidInputError):
        eng.classify([], "sent")
    with pytest.raises(InvalidInputError):
        eng.classify(["a", "b"], ["sent"])
    with pytest.raises(InvalidInputError):
        eng.classify([3], "sent")
    ids, mask = _batch(B=3)
    with pytest.raises(InvalidInputError, match="shape"):
        eng.forward({"input_ids": ids, "attention_mask": mask[:2]}, ["sent"] * 3)
    with pytest.raises(InvalidInputError, match="empty"):
        eng.forward({"input_ids": ids[:0]}, [])
    with pytest.raises(UnknownModelError):
        eng.unregister("nope")
    assert eng.list() == before
    assert eng.classify(["w1 w2"], "sent")[0].label is not None


def test_replace_and_unregister(bert, tmp_path):
    base, art, _ = bert
    ft2 = finetune_tiny(base, tmp_path / "ft2", 3, seed=5)
    art2 = compress(base, ft2, progress=False)
    eng = MultiTenantEngine(base)
    eng.register("m", art)
    eng.register("m", art2, replace=True)
    assert eng.get("m").num_labels == 3
    ref = apply(base, art2)
    ids, mask = _batch(B=2)
    torch.testing.assert_close(eng.forward({"input_ids": ids, "attention_mask": mask}, ["m", "m"]),
                               ref(input_ids=ids, attention_mask=mask).logits.detach(), atol=1e-4, rtol=0)
    eng.unregister("m")
    assert "m" not in eng and eng.memory_report()["pool_bytes"] == 0
    with pytest.raises(UnknownModelError):
        eng.forward({"input_ids": ids}, ["m", "m"])


def test_concurrent_register_and_classify(bert):
    base, art, _ = bert
    eng = MultiTenantEngine(base)
    eng.register("fixed", art)
    want = [p.label for p in eng.classify(["w1 w2", "w3"], "fixed")]
    errors = []

    def reader():
        try:
            for _ in range(10):
                assert [p.label for p in eng.classify(["w1 w2", "w3"], "fixed")] == want
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def writer():
        try:
            for i in range(5):
                eng.register(f"t{i}", art)
                eng.unregister(f"t{i}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [t.name for t in eng.list()] == ["fixed"]


def test_packed_pool_bytes_close_to_artifact(bert, tmp_path):
    base, art, _ = bert
    eng = MultiTenantEngine(base)
    info = eng.register("m", art)
    size = art.save(tmp_path / "m.safetensors")
    # packed signs + scales + dense tensors in fp32 (the artifact keeps them in fp16)
    assert info.bytes <= 1.5 * size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-3), ("bfloat16", 6e-2)])
def test_cuda_mixed_batch_matches_cpu_reference(setup, dtype, atol):
    arch, base, arts, refs = setup
    eng = MultiTenantEngine(base, device="cuda", dtype=dtype)
    for n, a in arts.items():
        eng.register(n, a)
    names = ["two", "three", None, "reg", "multi", "two"]
    ids, mask = _batch(B=len(names))
    logits = eng.forward({"input_ids": ids.cuda(), "attention_mask": mask.cuda()}, names).float().cpu()
    for i, ref in enumerate(_reference(refs, names, ids, mask)):
        torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=atol, rtol=0)


def _deberta_v3_tiny(path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model("deberta-v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=VOCAB, relative_attention=True,
                               pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=8,
                               norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    return path


def test_deberta_v3_relative_positions_mix_per_row(tmp_path):
    """DeBERTa-v3 reads its relative-position table outside any layer's forward: the tenants'
    tables and projections are applied per group inside the attention, the rest stays mixed."""
    base = _deberta_v3_tiny(tmp_path / "base")
    arts = {}
    for name, labels, seed in (("a", 2, 1), ("b", 3, 2)):
        arts[name] = compress(base, finetune_tiny(base, tmp_path / name, labels, seed=seed), progress=False)
        # the fine-tune really changes the relative-position table (read outside forward)
        assert arts[name].tensors["deberta.encoder.rel_embeddings.weight"].codec == "sign1"
    refs = {n: apply(base, a) for n, a in arts.items()}
    refs[None] = apply(base, compress(base, base, progress=False))
    eng = MultiTenantEngine(base)
    mem = eng.memory_report()
    assert mem["path"] == "mixed" and mem["per_group_modules"] == ["DisentangledSelfAttention"]
    for n, a in arts.items():
        eng.register(n, a)
    names = ["a", None, "b", "a", "b", None]
    ids, mask = _batch(B=len(names))
    for _ in range(2):  # the second pass reads the tenants' derived relative-position tensors from the cache
        logits = eng.forward({"input_ids": ids, "attention_mask": mask}, names)
        for i, ref in enumerate(_reference(refs, names, ids, mask)):
            torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=1e-4, rtol=0, msg=f"row {i}")
    cached = eng.memory_report()["derived_cache_bytes"]
    assert cached > 0
    eng.unregister("a")
    eng.unregister("b")
    assert eng.memory_report()["derived_cache_bytes"] < cached  # the tenants' entries go with them


class _ChannelsFirstNorm(nn.LayerNorm):
    """A LayerNorm subclass that normalises dim 1 of (B, C, L) inputs (ConvNeXt-style): the
    plain LayerNorm kernel would be wrong for it."""

    def forward(self, x):
        return F.layer_norm(x.transpose(1, 2), self.normalized_shape, self.weight, self.bias, self.eps).transpose(1, 2)


class _NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.norm = _ChannelsFirstNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.norm(self.emb(input_ids).transpose(1, 2))  # (B, 16, L)
        return (self.head(h.mean(-1)),)


class _ReadsWeightNet(nn.Module):
    """Uses a parameter's value as a Python number outside any forward: no per-row mixing can
    express that, so the engine runs mixed batches once per tenant group."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.gate = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None):
        k = float(self.gate.weight.abs().mean())  # a Python float from a tenant's weight
        return (self.head(torch.tanh(self.gate(self.emb(input_ids)) * k).mean(1)),)


def _perturbed(model, seed):
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ft


@pytest.mark.parametrize("net,path", [(_NormNet, "mixed"), (_ReadsWeightNet, "fallback")], ids=["subclass", "fallback"])
def test_subclass_kernels_and_fallback_path(net, path):
    torch.manual_seed(0)
    base = net().eval()
    fts = {"a": _perturbed(base, 1), "b": _perturbed(base, 2)}
    arts = {n: compress(base, ft, progress=False) for n, ft in fts.items()}
    refs = {n: apply(copy.deepcopy(base), a).eval() for n, a in arts.items()}
    refs[None] = base
    eng = MultiTenantEngine(copy.deepcopy(base))
    assert eng.path == path and eng.memory_report()["path"] == path
    if net is _NormNet:  # a subclass takes the generic path, never the plain LayerNorm kernel
        from bitdelta_core.multitenant import _generic_kernel

        assert eng.model.norm.kernel is _generic_kernel
    for n, a in arts.items():
        eng.register(n, a)
    names = ["a", None, "b", "b", "a"]
    ids, _ = _batch(B=len(names))
    logits = eng.forward({"input_ids": ids}, names)
    for i, n in enumerate(names):
        with torch.no_grad():
            ref = refs[n](input_ids=ids[i : i + 1])[0][0]
        torch.testing.assert_close(logits[i, : ref.shape[0]], ref, atol=1e-4, rtol=0, msg=f"row {i}")
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_working_cache_keeps_hot_tenants_while_a_tail_streams_through():
    from bitdelta_core.multitenant import WorkingCache

    c = WorkingCache(budget=300, window=10**6)
    c.record({1: 10, 2: 8})
    assert c.admit(1, 100, {1, 2}) and c.admit(2, 100, {1, 2})
    for t in range(3, 50):  # each batch: the hot tenant 1 and one tail tenant seen once
        c.record({1: 2, t: 1})
        assert c.admit(1, 100, {1, t})
        assert c.admit(t, 100, {1, t}) == (t == 3)  # only the free space takes the tail
    assert set(c._entries) == {1, 2, 3} and c.evictions == 0 and c.rejections == 46
    c.record({99: 50})  # popularity shifts: a busier tenant displaces the least used one
    assert c.admit(99, 100, {99})
    assert set(c._entries) == {1, 2, 99} and c.evictions == 1
    assert not c.admit(7, 400, set())  # larger than the whole budget
    # counts halve every `window` rows, so yesterday's favourite can be displaced
    c = WorkingCache(budget=100, window=20)
    c.record({1: 19})
    assert c.admit(1, 100, {1})
    for _ in range(6):
        c.record({2: 10})
    assert c.admit(2, 100, {2}) and set(c._entries) == {2}
