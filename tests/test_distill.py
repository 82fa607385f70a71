"""Scale distillation: the student reproduces apply(), gradients reach the scales and nothing else
(checked against the plain model's weight gradient), and distillation lowers the loss."""

from __future__ import annotations

import pytest
import torch

from bitdelta_core.apply import apply, apply_to_state_dict
from bitdelta_core.artifact import artifact_from_bytes
from bitdelta_core.codec import Codec
from bitdelta_core.compress import compress
from bitdelta_core.distill import DistillConfig, ScaleStudent, distill
from bitdelta_core.errors import ConfigError, DataError
from bitdelta_core.select import CompressionConfig

from distill_fixtures import dataset, tiny_base, tiny_finetune, tokenizer


@pytest.fixture(scope="module")
def pair():
    base = tiny_base()
    return base, tiny_finetune(base)


@pytest.fixture(scope="module", params=["row", "tensor"])
def compressed(request, pair):
    base, ft = pair
    art = compress(base, ft, CompressionConfig(granularity=request.param), progress=False)
    return base, ft, art


def _student(base, art):
    import copy

    module = copy.deepcopy(base)
    return ScaleStudent(module, {k: v.detach() for k, v in base.state_dict().items()}, art)


def _enc():
    return tokenizer()(["a good film", "bad bad bad", "i liked it a lot"], padding=True, return_tensors="pt")


def test_student_weights_equal_apply(compressed):
    base, _, art = compressed
    st = _student(base, art)
    ref = apply_to_state_dict(base.state_dict(), art)
    w = st.weights()
    assert set(w) == set(ref) - set(art.tied)
    for k, v in w.items():
        torch.testing.assert_close(v.detach().to(ref[k].dtype), ref[k], rtol=0, atol=1e-6, msg=k)
    assert st.num_scales() > 0


def test_gradient_reaches_the_scales_and_only_them(compressed):
    base, _, art = compressed
    st = _student(base, art)
    loss = st(**_enc()).logits.pow(2).sum()
    loss.backward()
    grads = [p.grad for p in st.scales]
    assert all(g is not None for g in grads)
    assert sum(int((g != 0).sum()) for g in grads) > 0.5 * sum(g.numel() for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in st.module.parameters())
    # reference: the plain model at the same weights, dL/dalpha_r = sum_c dL/dW[r,c] * S[r,c]
    ref = apply(tiny_base(), art)
    ref.zero_grad()
    ref(**_enc()).logits.pow(2).sum().backward()
    params = dict(ref.named_parameters())
    checked = 0
    for name, g in zip(st.names, grads):
        e = art.tensors[name]
        if name not in params or params[name].grad is None:
            continue
        signs = e.sign.decode(torch.float32) / e.sign.row_scales().clamp_min(1e-30).reshape(-1, *[1] * (len(e.shape) - 1))
        gw = params[name].grad.reshape(e.shape[0], -1)
        s = torch.sign(signs.reshape(e.shape[0], -1)) if e.sign.granularity.value == "row" else None
        if e.sign.granularity.value == "row":
            rows_of = st._plan[name][3]  # the trained rows (None: all)
            want = (gw * s).sum(1)
            want = want if rows_of is None else want[rows_of]
        else:
            want = (gw * torch.sign(signs.reshape(e.shape[0], -1))).sum().reshape(1)
        torch.testing.assert_close(g, want, rtol=1e-3, atol=1e-6, msg=name)
        checked += 1
    assert checked >= 8


def test_zero_delta_rows_stay_zero(pair):
    base, ft = pair
    art = compress(base, ft, progress=False)
    emb = next(n for n, e in art.tensors.items() if e.codec == Codec.SIGN1 and e.shape[0] == len(tokenizer()))
    zero = art.tensors[emb].sign.row_scales() == 0
    assert zero.sum() > 1000  # tokens never seen in training
    assert art.tensors[emb].sign.kept == int((~zero).sum())  # and left out of the stored rows
    r = distill(base, ft, art, dataset(), DistillConfig(steps=5, lr=1e-3, calib_size=16, heldout_size=8),
                tokenizer=tokenizer(), progress=False)
    new = r.artifact.tensors[emb].sign
    assert (new.row_scales()[zero] == 0).all() and (new.row_scales()[~zero] != 0).all()
    assert torch.equal(new.rowmask, art.tensors[emb].sign.rowmask) and torch.equal(new.signs, art.tensors[emb].sign.signs)


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0], ids=["logits", "logits+hidden"])
def test_distillation_lowers_the_loss(compressed, hidden_weight):
    base, ft, art = compressed
    cfg = DistillConfig(steps=40, lr=1e-3, batch_size=8, calib_size=32, heldout_size=8, hidden_weight=hidden_weight)
    r = distill(base, ft, art, dataset(3), cfg, tokenizer=tokenizer(), progress=False)
    # hidden states cannot all be matched by scales alone: a smaller (but real) reduction
    assert r.loss_after < (0.5 if hidden_weight == 0 else 0.9) * r.loss_before, (r.loss_before, r.loss_after)
    assert r.train_loss_last < r.train_loss_first
    # only the scales changed, dtype kept; the saved file applies to the distilled model
    new = artifact_from_bytes(r.artifact.to_bytes())
    changed = 0
    for name, e in art.tensors.items():
        n = new.tensors[name]
        if e.sign is not None:
            assert torch.equal(n.sign.signs, e.sign.signs) and n.sign.scale.dtype == e.sign.scale.dtype
            changed += int(not torch.equal(n.sign.scale, e.sign.scale))
        if e.dense is not None:
            assert torch.equal(n.dense, e.dense)
    assert changed > 0
    assert new.compression["distillation"]["loss_after"] == pytest.approx(r.loss_after)
    # the distilled artifact is closer to the fine-tune than the undistilled one (on the task's texts)
    enc = tokenizer()([t[0] for t in dataset(1).texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        t = ft(**enc).logits
        d0 = (apply(tiny_base(), art)(**enc).logits - t).pow(2).mean()
        d1 = (apply(tiny_base(), new)(**enc).logits - t).pow(2).mean()
    assert d1 < d0


def test_write_back_keeps_fp32_when_fp16_would_underflow(pair):
    base, ft = pair
    art = compress(base, ft, progress=False)
    st = _student(base, art)
    i = next(i for i, n in enumerate(st.names) if art.tensors[n].sign.scale.dtype == torch.float16)
    with torch.no_grad():
        st.scales[i][0] = 1e-7  # below fp16's normal range
    rows_of = st._plan[st.names[i]][3]  # row of the first trained scale (None: all rows)
    row = int(rows_of[0]) if rows_of is not None else 0
    new = st.write_back(art)
    s = new.tensors[st.names[i]].sign
    assert s.scale.dtype == torch.float32 and s.row_scales()[row].item() == pytest.approx(1e-7)
    assert art.tensors[st.names[i]].sign.scale.dtype == torch.float16  # the input is not modified


def test_bad_config_and_inputs(pair):
    base, ft = pair
    with pytest.raises(ConfigError):
        DistillConfig(steps=0)
    art = compress(base, ft, progress=False)
    empty = dataset(1).subset(None)
    empty.texts, empty.labels = [], []
    with pytest.raises(DataError, match="at least one"):
        distill(base, ft, art, empty, tokenizer=tokenizer(), progress=False)
    three = tiny_finetune(tiny_base(num_labels=3))
    with pytest.raises(DataError, match="2-way head but the fine-tune has 3"):
        distill(base, three, art, dataset(), tokenizer=tokenizer(), progress=False)
