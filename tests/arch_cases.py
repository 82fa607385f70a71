"""Tiny sequence-classification models of many transformers architectures, built from configs
(no downloads), and synthetic fine-tunes with their own head sizes, for the engine's
architecture coverage test. ``python tests/arch_cases.py`` prints the coverage table of
docs/architectures.md (architecture, path, max error against one-model-at-a-time ``apply``)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

VOCAB = 99
BASE_LABELS = 3
# sizes set wherever a config has the attribute; per-type overrides below
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=40,
             vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, n_embd=32, dim=32, n_layers=2, n_heads=2,
             hidden_dim=40, ffn_dim=40, d_ff=40, num_layers=2, embedding_size=16, max_position_embeddings=64,
             n_positions=64, head_dim=16, moe_intermediate_size=16, num_experts=4, num_local_experts=4,
             num_experts_per_tok=2, shared_expert_intermediate_size=16, word_embed_proj_dim=32)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model_type (or "name:model_type" for a second configuration of one type) -> overrides
CASES: dict[str, dict] = {
    "bert": {}, "albert": {}, "big_bird": dict(attention_type="original_full"), "camembert": {}, "convbert": {},
    "data2vec-text": {}, "deberta": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16),
    "deberta-v2": {},
    # the DeBERTa-v3 configuration: relative attention with log buckets, a LayerNorm on the
    # relative embeddings, shared attention keys, no absolute positions
    "deberta-v3:deberta-v2": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                                  position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                                  position_biased_input=False),
    "distilbert": {}, "electra": {}, "ernie": {}, "fnet": {}, "flaubert": {}, "funnel": dict(block_sizes=[1, 1]),
    "ibert": {}, "megatron-bert": {}, "modernbert": dict(cls_token_id=3, sep_token_id=4, global_attn_every_n_layers=1),
    "mpnet": {}, "mra": {}, "nomic_bert": {}, "nystromformer": {}, "roberta": dict(pad_token_id=1),
    "roberta-prelayernorm": dict(pad_token_id=1), "roformer": {}, "xlm-roberta": dict(pad_token_id=1),
    "gpt2": {}, "openai-gpt": {}, "gpt_bigcode": {}, "gpt_neox": {}, "bloom": {}, "biogpt": {}, "opt": {},
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": {}, "qwen2_moe": {}, "qwen3": {}, "gemma": {}, "gemma2": {},
    "phi": {}, "olmo2": {}, "mpt": {}, "persimmon": {},
}


def model_type(case: str) -> str:
    return case.split(":")[-1]


def config(case: str, num_labels: int = BASE_LABELS):
    mt = model_type(case)
    default = AutoConfig.for_model(mt)
    kw = {k: v for k, v in SIZES.items()
          if getattr(default, k, None) is not None and not isinstance(getattr(default, k), (list, dict))}
    kw.update({k: v for k, v in TOKENS.items() if hasattr(default, k)})
    if mt == "funnel":
        kw.pop("num_hidden_layers", None)
    kw.update(CASES[case])
    cfg = AutoConfig.for_model(mt, **kw)
    cfg.num_labels = num_labels
    return cfg


def build_base(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config(case)).eval()


def finetune(case: str, base: torch.nn.Module, num_labels: int, seed: int) -> torch.nn.Module:
    """The base's weights with a relative perturbation of every tensor (a fine-tune's delta is
    small and dense) and a fresh head of ``num_labels``."""
    torch.manual_seed(seed)
    ft = AutoModelForSequenceClassification.from_config(config(case, num_labels)).eval()
    state = ft.state_dict()
    g = torch.Generator().manual_seed(seed)
    params = {n for n, _ in ft.named_parameters()}
    with torch.no_grad():
        for k, v in base.state_dict().items():
            t = state[k]
            if t.shape == v.shape:
                t.copy_(v)
            if t.is_floating_point() and k in params:  # buffers (e.g. quantizer statistics) stay
                t.add_(0.02 * torch.randn(t.shape, generator=g) * (t.abs() + 1e-2))
    return ft


def batch(B: int, L: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 6), (2, 4), (6, 7)):  # padded rows of a base row and of both tenants
        if row < B:
            mask[row, n:] = 0
    ids[mask == 0] = 0
    return ids, mask


def run_case(case: str, root) -> dict:
    """Engine vs one-model-at-a-time ``apply`` on a mixed batch: two tenants with different
    head sizes and base rows (models saved under ``root`` as a user's checkpoints would be).
    Returns the path, the max abs error, the logits' scale and how far the tenants are from
    the base."""
    from pathlib import Path

    from bitdelta_core.apply import apply
    from bitdelta_core.compress import compress
    from bitdelta_core.multitenant import MultiTenantEngine

    root = Path(root)
    base = build_base(case)
    base.save_pretrained(root / "base")
    arts, refs = {}, {None: base}
    for n, (labels, seed) in {"a": (2, 1), "b": (4, 2)}.items():
        finetune(case, base, labels, seed).save_pretrained(root / n)
        arts[n] = compress(root / "base", root / n, progress=False)
        refs[n] = apply(root / "base", arts[n]).eval()
    eng = MultiTenantEngine(root / "base")
    for n, a in arts.items():
        eng.register(n, a)
    names = ["a", None, "b", "a", "b", None, "a"]
    ids, mask = batch(len(names))
    enc = {"input_ids": ids, "attention_mask": mask}
    if model_type(case) == "fnet":  # FNet takes no attention mask: unpadded rows
        ids[ids == 0] = 7
        enc = {"input_ids": ids}
    got = eng.forward(enc, names)
    err, scale, diff = 0.0, 0.0, 0.0
    for i, n in enumerate(names):
        with torch.no_grad():
            want = refs[n](**{k: v[i:i + 1] for k, v in enc.items()}).logits[0].float()
        err = max(err, float((got[i, : want.shape[0]] - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
        if n is not None:  # the tenants really differ from the base
            with torch.no_grad():
                b = base(**{k: v[i:i + 1] for k, v in enc.items()}).logits[0].float()
            k = min(b.shape[0], want.shape[0])
            diff = max(diff, float((want[:k] - b[:k]).abs().max()))
    return {"case": case, "architecture": type(base).__name__, "path": eng.path, "skip_padding": eng.skip_padding,
            "per_group_modules": sorted(set(eng.per_group_modules)), "max_abs_error": err, "logit_scale": scale,
            "tenant_vs_base": diff, "widths": tuple(got.shape)}


if __name__ == "__main__":  # the coverage table of docs/architectures.md
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    print("| model type | class | path | modules run once per tenant group | padding skipped | max abs error |")
    print("|---|---|---|---|---|---|")
    import tempfile

    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            r = run_case(c, d)
        print(f"| {c} | {r['architecture']} | {r['path']} | {', '.join(r['per_group_modules']) or '-'} | "
              f"{'yes' if r['skip_padding'] else 'no'} | {r['max_abs_error']:.1e} |", flush=True)
