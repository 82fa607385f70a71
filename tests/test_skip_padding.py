"""Linear layers on a padded batch's real tokens only (``PackedTokens``): the same logits as the
padded computation, the padding really skipped, and left on for models whose real tokens read
the padding (the start-up self-check decides per architecture)."""

from __future__ import annotations

import copy

import pytest
import torch

from bitdelta_core import cpu_kernel as cpu_kernel_mod
from bitdelta_core.compress import compress
from bitdelta_core.multitenant import MultiTenantEngine
from bitdelta_core.multitenant.layers import LinearLayer
from arch_cases import build_base
from tiny_models import ARCHS, build, finetune, one_torch_thread  # noqa: F401

NAMES = ["a", "b", None, "a", "b", "b"]
LENGTHS = [9, 4, 6, 2, 9, 7]


def _engines(model_type: str):
    """Two engines on one base with the same two tenants: padding skipped where the
    self-check allows it, and padding always computed (the reference)."""
    base = build(model_type, "seqcls") if model_type in ARCHS else build_base(model_type)
    arts = [compress(base, finetune(copy.deepcopy(base), "seqcls", seed=s), progress=False) for s in (2, 3)]
    engs = []
    for skip in (True, False):
        eng = MultiTenantEngine(copy.deepcopy(base), skip_padding=skip)
        for n, a in zip("ab", arts):
            eng.register(n, a)
        engs.append(eng)
    return engs


def _padded(lengths, left: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, 60, (len(lengths), L), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if left:
            mask[i, L - n:] = 1
        else:
            mask[i, :n] = 1
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    return _engines("bert")


def test_padding_is_skipped_with_the_same_logits(bert, monkeypatch):
    skip, full = bert
    assert skip.skip_padding and not full.skip_padding
    assert skip.memory_report()["skip_padding"] is True
    enc = _padded(LENGTHS)
    rows_seen = []
    real = cpu_kernel_mod.signed_linear_groups

    def spy(mod, x, *a, **k):
        rows = k.get("rows")  # real tokens read in place on the padded grid
        rows_seen.append(x.shape[0] if rows is None else rows.numel())
        return real(mod, x, *a, **k)

    monkeypatch.setattr(cpu_kernel_mod, "signed_linear_groups", spy)
    packed = []
    orig = LinearLayer._packed
    monkeypatch.setattr(LinearLayer, "_packed", lambda self, x, ctx: packed.append(self.name) or orig(self, x, ctx))
    got = skip.forward(enc, NAMES)
    assert packed, "no Linear layer ran on the packed tokens"
    if skip._kernel is not None:  # the fused kernel saw the real tokens, not the padded grid
        # token layers see the real tokens; the pooler sees one row per sentence
        assert set(rows_seen) == {sum(LENGTHS), len(LENGTHS)}, rows_seen
    rows_seen.clear()
    want = full.forward(enc, NAMES)
    if full._kernel is not None:
        assert set(rows_seen) == {len(LENGTHS) * max(LENGTHS), len(LENGTHS)}
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("models", [["a"] * 6, [None] * 6, ["b", "b", "b", "a", "a", "a"]],
                         ids=["one-tenant", "base-only", "two-groups"])
def test_single_tenant_base_only_and_grouped_batches(bert, models, monkeypatch):
    skip, full = bert
    enc = _padded(LENGTHS, seed=3)
    in_place = []
    real = cpu_kernel_mod.signed_linear_groups

    def spy(mod, x, out, *a, rows=None, zero_rows=None, **k):
        if rows is not None:  # the real tokens read and written on the padded grid
            in_place.append((x.shape[0], rows.numel(), zero_rows.numel()))
            out.fill_(float("nan"))  # every position must be written: real tokens or zeroed padding
        return real(mod, x, out, *a, rows=rows, zero_rows=zero_rows, **k)

    monkeypatch.setattr(cpu_kernel_mod, "signed_linear_groups", spy)
    got = skip.forward(enc, models)
    monkeypatch.undo()
    want = full.forward(enc, models)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    if skip._kernel is not None and None not in models:
        grid = len(LENGTHS) * max(LENGTHS)
        assert in_place and set(in_place) == {(grid, sum(LENGTHS), grid - sum(LENGTHS))}, in_place
    # and each row equals that row alone, unpadded
    for i, m in enumerate(models):
        n = LENGTHS[i]
        one = full.forward({k: v[i:i + 1, :n] for k, v in enc.items()}, [m])
        assert torch.allclose(got[i], one[0], rtol=1e-4, atol=1e-5), i


def test_unpadded_batch_takes_the_plain_path(bert, monkeypatch):
    skip, _ = bert
    calls = []
    orig = LinearLayer._packed
    monkeypatch.setattr(LinearLayer, "_packed", lambda self, x, ctx: calls.append(1) or orig(self, x, ctx))
    skip.forward(_padded([5, 5, 5]), ["a", "b", None])
    assert not calls


def test_left_padding_decoder():
    skip, full = _engines("gpt2")
    assert skip.skip_padding
    enc = _padded(LENGTHS, left=True, seed=5)
    got, want = skip.forward(enc, NAMES), full.forward(enc, NAMES)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_model_whose_real_tokens_read_padding_keeps_it(caplog):
    """ConvBERT's convolution over positions reads the padding next to real tokens."""
    with caplog.at_level("INFO", logger="bitdelta_core.multitenant.selfcheck"):
        skip, full = _engines("convbert")
    assert not skip.skip_padding
    assert any("reads padding positions" in r.getMessage() for r in caplog.records)
    enc = _padded(LENGTHS, seed=7)
    assert torch.equal(skip.forward(enc, NAMES), full.forward(enc, NAMES))


def test_model_without_attention_mask_keeps_padding():
    skip, _ = _engines("fnet")  # FNet takes no attention mask: nothing tells it where padding is
    assert not skip.skip_padding
