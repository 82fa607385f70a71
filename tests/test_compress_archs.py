"""compress -> save -> load -> apply on tiny models of 14 transformers architectures (both heads
where they exist) and a plain nn.Module, checked against a direct reference computation."""

from __future__ import annotations

import copy

import pytest
import torch

from bitdelta_core.apply import apply, apply_to_state_dict
from bitdelta_core.artifact import artifact_from_bytes
from bitdelta_core.codec import Codec
from bitdelta_core.compress import compress
from bitdelta_core.models import find_tied

from core_reference import assert_states_equal, expected_state, packed_bytes_ok
from tiny_models import CASES, batch, conv_pair, logits, one_torch_thread, pair  # noqa: F401


def _expected_codec(name, b, f):
    if torch.equal(b, f):
        return Codec.BASE
    if f.dim() >= 2 and f.is_floating_point() and b.shape == f.shape:
        return Codec.SIGN1
    return Codec.DENSE


@pytest.mark.parametrize(("arch", "head"), CASES, ids=[f"{a}-{h}" for a, h in CASES])
def test_architecture_roundtrip(arch, head):
    base, ft = pair(arch, head)
    bsd, fsd = base.state_dict(), ft.state_dict()
    art = compress(base, ft, progress=False)

    # every tensor got the codec its rank/change status calls for; aliases are stored once
    tied = find_tied(fsd)
    assert art.tied == tied
    for name in fsd:
        if name in tied:
            assert name not in art.tensors
        else:
            assert art.tensors[name].codec == _expected_codec(name, bsd[name], fsd[name]), name
    assert any(e.codec == Codec.SIGN1 for e in art.tensors.values())
    assert art.num_parameters == sum(t.numel() for n, t in fsd.items() if n not in tied)
    packed_bytes_ok(art)

    # applied weights == base + α·sign(Δ) (reference computed here), dense/base tensors as stored
    want = expected_state(bsd, fsd, art)
    assert_states_equal(apply_to_state_dict(bsd, art), want)

    # save -> load -> apply is bit-exact, and apply() on a module gives the same weights
    loaded = artifact_from_bytes(art.to_bytes())
    model = apply(copy.deepcopy(base), loaded)
    assert_states_equal(model.state_dict(), want)
    for alias, target in tied.items():  # tying survives
        assert model.state_dict()[alias].data_ptr() == model.state_dict()[target].data_ptr()

    # the 1-bit model is much closer to the fine-tune than the base is
    x = batch(seed=5)
    l_ft = logits(ft, x)
    d_comp = (logits(model, x) - l_ft).norm()
    d_base = (logits(base, x) - l_ft).norm()
    assert d_base > 0
    assert d_comp < 0.5 * d_base, (float(d_comp), float(d_base))


def test_gpt2_lm_head_stored_once():
    base, ft = pair("gpt2", "causal")
    art = compress(base, ft, progress=False)
    assert art.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in art.tensors
    assert not any(k.startswith("lm_head.weight") for k in art.flat_tensors())
    assert art.tensors["transformer.wte.weight"].codec == Codec.SIGN1


def test_plain_module_with_conv_kernel():
    base, ft = conv_pair()
    bsd, fsd = base.state_dict(), ft.state_dict()
    art = compress(base, ft, progress=False)
    assert art.tensors["conv.weight"].codec == Codec.SIGN1
    assert art.tensors["conv.weight"].sign.shape == (6, 3, 3, 3)
    assert art.tensors["conv.weight"].sign.scale.shape == (6,)
    assert art.tensors["norm.running_mean"].codec == Codec.DENSE
    assert art.tensors["norm.num_batches_tracked"].codec == Codec.DENSE
    assert art.model["architecture"] is None
    packed_bytes_ok(art)
    want = expected_state(bsd, fsd, art)
    model = apply(copy.deepcopy(base), artifact_from_bytes(art.to_bytes()))
    assert_states_equal(model.state_dict(), want)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        d_comp = (model(x) - ft(x)).norm()
        d_base = (base(x) - ft(x)).norm()
    assert d_comp < 0.5 * d_base


def test_state_dicts_in_state_dicts_out():
    base, ft = pair("llama", "causal")
    bsd, fsd = base.state_dict(), ft.state_dict()
    art = compress(dict(bsd), dict(fsd), progress=False)
    assert art.model["architecture"] is None
    assert_states_equal(apply_to_state_dict(bsd, art), expected_state(bsd, fsd, art))
