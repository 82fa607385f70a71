"""Codec selection: include/exclude rules, dry run, tensor granularity, zero rows, resized
vocabularies, unchanged and tied tensors, dtype options."""

from __future__ import annotations

import copy

import pytest
import torch

from bitdelta_core.apply import apply, apply_to_state_dict
from bitdelta_core.artifact import artifact_from_bytes
from bitdelta_core.codec import Codec
from bitdelta_core.compress import compress, plan
from bitdelta_core.errors import ConfigError
from bitdelta_core.select import CompressionConfig

from core_reference import assert_states_equal, expected_state, packed_bytes_ok
from tiny_models import SEQ, TRAIN_TOKENS, VOCAB, batch, build, finetune, logits, one_torch_thread, pair  # noqa: F401

EMB = "bert.embeddings.word_embeddings.weight"
POS = "bert.embeddings.position_embeddings.weight"


def test_dry_run_lists_every_tensor_and_agrees_with_compress():
    base, ft = pair("bert", "seqcls")
    plans = plan(base, ft)
    assert [p.name for p in plans] == list(ft.state_dict())
    art = compress(base, ft, progress=False)
    for p in plans:
        assert p.reason
        assert art.tensors[p.name].codec == p.codec, p.name


def test_exclude_and_include_rules():
    base, ft = pair("bert", "seqcls")
    bsd, fsd = base.state_dict(), ft.state_dict()
    cfg = CompressionConfig(exclude=["classifier.weight", "query.weight", "re:.*layer\\.1\\.output\\.dense\\.weight"])
    art = compress(base, ft, cfg, progress=False)
    assert art.tensors["classifier.weight"].codec == Codec.DENSE
    for i in (0, 1):  # a suffix rule matches in every layer
        assert art.tensors[f"bert.encoder.layer.{i}.attention.self.query.weight"].codec == Codec.DENSE
        assert art.tensors[f"bert.encoder.layer.{i}.attention.self.key.weight"].codec == Codec.SIGN1
    assert art.tensors["bert.encoder.layer.1.output.dense.weight"].codec == Codec.DENSE
    assert art.tensors["bert.encoder.layer.0.output.dense.weight"].codec == Codec.SIGN1
    assert_states_equal(apply_to_state_dict(bsd, art), expected_state(bsd, fsd, art))

    art = compress(base, ft, CompressionConfig(include=["re:.*attention\\.self\\..*"]), progress=False)
    for name, e in art.tensors.items():
        if fsd[name].dim() >= 2:
            want = Codec.SIGN1 if ".attention.self." in name else Codec.DENSE
            assert e.codec == want, name
    reasons = {p.name: p.reason for p in plan(base, ft, CompressionConfig(include=["re:.*attention\\.self\\..*"]))}
    assert reasons["classifier.weight"] == "not matched by include rules"


@pytest.mark.parametrize("kwargs", [
    {"exclude": ["no.such.weight"]},
    {"include": ["re:nothing.*"]},
    {"exclude": ["query.weight", "typo.weight"]},
], ids=["exclude", "include", "one-of-two"])
def test_rule_matching_nothing_is_an_error(kwargs):
    base, ft = pair("bert", "seqcls")
    with pytest.raises(ConfigError, match="matched no tensor"):
        compress(base, ft, CompressionConfig(**kwargs), progress=False)
    with pytest.raises(ConfigError):
        plan(base, ft, CompressionConfig(**kwargs))


@pytest.mark.parametrize("kwargs", [
    {"exclude": ["re:(unclosed"]}, {"include": [""]}, {"exclude": "query.weight"},
    {"granularity": "diagonal"}, {"scale_dtype": "int8"}, {"dense_dtype": "float8"},
], ids=["regex", "empty", "string", "granularity", "scale", "dense"])
def test_invalid_config(kwargs):
    with pytest.raises(ConfigError):
        CompressionConfig(**kwargs)


def test_zero_rows_stay_exact_and_tensor_granularity():
    base, ft = pair("bert", "seqcls")
    bsd, fsd = base.state_dict(), ft.state_dict()
    # training used token ids < TRAIN_TOKENS and positions < SEQ: other rows are untouched
    assert torch.equal(bsd[EMB][TRAIN_TOKENS:], fsd[EMB][TRAIN_TOKENS:])
    for gran in ("row", "tensor"):
        art = artifact_from_bytes(compress(base, ft, CompressionConfig(granularity=gran), progress=False).to_bytes())
        got = apply_to_state_dict(bsd, art)
        assert torch.equal(got[EMB][TRAIN_TOKENS:], bsd[EMB][TRAIN_TOKENS:]), gran
        assert torch.equal(got[POS][SEQ:], bsd[POS][SEQ:]), gran
        assert (got[EMB][3:TRAIN_TOKENS] != bsd[EMB][3:TRAIN_TOKENS]).all()
        assert_states_equal(got, expected_state(bsd, fsd, art))
        if gran == "tensor":
            for name, e in art.tensors.items():
                if e.codec == Codec.SIGN1:
                    assert e.sign.scale.shape == (1,), name
            assert art.tensors[EMB].sign.rowmask is not None
            assert art.compression["granularity"] == "tensor"
        x = batch(seed=5)
        assert (logits(apply(copy.deepcopy(base), art), x) - logits(ft, x)).norm() < \
            0.5 * (logits(base, x) - logits(ft, x)).norm()


def test_unchanged_matrix_stored_as_nothing():
    base = build("bert", "seqcls")
    ft = copy.deepcopy(base)
    frozen = "bert.encoder.layer.1.intermediate.dense.weight"
    dict(ft.named_parameters())[frozen].requires_grad_(False)
    finetune(ft, "seqcls")
    art = compress(base, ft, progress=False)
    assert art.tensors[frozen].codec == Codec.BASE
    assert not any(k.startswith(frozen) for k in art.flat_tensors())
    assert frozen in art.base["fingerprint_names"]
    assert_states_equal(apply_to_state_dict(base.state_dict(), art),
                        expected_state(base.state_dict(), ft.state_dict(), art))


@pytest.mark.parametrize(("arch", "head", "emb"), [
    ("bert", "seqcls", EMB), ("gpt2", "causal", "transformer.wte.weight"),
], ids=["bert-seqcls", "gpt2-causal-tied"])
def test_resized_vocabulary(arch, head, emb):
    base = build(arch, head)
    ft = copy.deepcopy(base)
    ft.resize_token_embeddings(VOCAB + 6)
    finetune(ft, head, vocab=VOCAB + 6)  # the new rows get trained too
    bsd, fsd = base.state_dict(), ft.state_dict()
    art = artifact_from_bytes(compress(base, ft, progress=False).to_bytes())
    e = art.tensors[emb]
    assert e.codec == Codec.RESIZED
    assert e.sign.shape == (VOCAB, 32) and e.dense.shape == (6, 32)
    assert e.base_shape == (VOCAB, 32) and e.shape == (VOCAB + 6, 32)
    packed_bytes_ok(art)
    if head == "causal":
        assert art.tied == {"lm_head.weight": emb}
    want = expected_state(bsd, fsd, art)
    assert_states_equal(apply_to_state_dict(bsd, art), want)
    model = apply(copy.deepcopy(base), art)  # shapes differ: rebuilt from the delta's config
    assert model.config.vocab_size == VOCAB + 6
    assert_states_equal(model.state_dict(), want)
    x = batch(seed=5, vocab=VOCAB)
    lm, lf = logits(model, x)[..., :VOCAB], logits(ft, x)[..., :VOCAB]  # causal LMs: the base's vocab
    assert (lm - lf).norm() < 0.5 * (logits(base, x) - lf).norm()
    new_rows = model.get_input_embeddings().weight[VOCAB:]  # the new tokens' rows: dense fp16 copies
    assert torch.equal(new_rows, fsd[emb][VOCAB:].half().float())


def test_dtype_options():
    base, ft = pair("bert", "seqcls")
    bsd, fsd = base.state_dict(), ft.state_dict()
    art = compress(base, ft, CompressionConfig(dense_dtype="exact", scale_dtype="float32"), progress=False)
    assert art.tensors["classifier.bias"].dense.dtype == torch.float32
    assert art.tensors[EMB].sign.scale.dtype == torch.float32
    got = apply_to_state_dict(bsd, art)
    for name, e in art.tensors.items():
        if e.codec == Codec.DENSE:
            assert torch.equal(got[name], fsd[name]), name  # exact
    assert_states_equal(got, expected_state(bsd, fsd, art, dense_dtype=None))
    art16 = compress(base, ft, CompressionConfig(dense_dtype="bfloat16"), progress=False)
    assert art16.tensors["classifier.bias"].dense.dtype == torch.bfloat16
    assert_states_equal(apply_to_state_dict(bsd, art16), expected_state(bsd, fsd, art16, dense_dtype=torch.bfloat16))


def test_half_precision_models():
    base, ft = pair("llama", "causal")
    b16, f16 = copy.deepcopy(base).to(torch.bfloat16), copy.deepcopy(ft).to(torch.bfloat16)
    art = compress(b16, f16, progress=False)
    got = apply_to_state_dict(b16.state_dict(), art)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_states_equal(got, expected_state(b16.state_dict(), f16.state_dict(), art))
