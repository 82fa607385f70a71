"""Tiny transformers models built from configs (no downloads) and real short fine-tunes.

Shared by the core tests. Every "fine-tune" is the base after a few Adam steps on synthetic
labels, restricted to token ids ``< TRAIN_TOKENS`` so embedding rows of the other ids stay
exactly unchanged (the "zero delta row" case).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

VOCAB = 99
TRAIN_TOKENS = 60
NUM_LABELS = 3
SEQ = 8

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=37, max_position_embeddings=64, pad_token_id=0)

# model_type -> config kwargs. intermediate_size 37 is not a multiple of 8, so packing pads.
ARCHS: dict[str, dict] = {
    "bert": dict(_COMMON),
    "distilbert": dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64,
                       pad_token_id=0),
    "albert": dict(_COMMON, embedding_size=16),
    "fnet": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=37,
                 max_position_embeddings=64, pad_token_id=0),
    "roberta": dict(_COMMON, max_position_embeddings=72, pad_token_id=1),
    "deberta-v2": dict(_COMMON),
    "electra": dict(_COMMON, embedding_size=16),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
    "llama": dict(_COMMON, num_key_value_heads=1, bos_token_id=1, eos_token_id=2),
    "mistral": dict(_COMMON, num_key_value_heads=1, bos_token_id=1, eos_token_id=2),
    "mpnet": dict(_COMMON, max_position_embeddings=72, pad_token_id=1),
    "xlm-roberta": dict(_COMMON, max_position_embeddings=72, pad_token_id=1),
    "opt": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=37,
                word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2),
    "gpt_neox": dict(_COMMON, bos_token_id=1, eos_token_id=2),
}

# (model_type, head) pairs: both heads where transformers has them.
CAUSAL = {"bert", "roberta", "electra", "gpt2", "llama", "mistral", "xlm-roberta", "opt", "gpt_neox"}
CASES = [(a, "seqcls") for a in ARCHS] + [(a, "causal") for a in ARCHS if a in CAUSAL]


def build(model_type: str, head: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    kw = dict(ARCHS[model_type], **overrides)
    if head == "causal" and model_type in {"bert", "roberta", "electra", "xlm-roberta"}:
        kw["is_decoder"] = True
    if head == "seqcls":
        kw["num_labels"] = NUM_LABELS
    cfg = AutoConfig.for_model(model_type, **kw)
    cls = AutoModelForSequenceClassification if head == "seqcls" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def batch(seed: int = 1, n: int = 6, vocab: int = TRAIN_TOKENS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, SEQ), generator=g)


def finetune(model: nn.Module, head: str, steps: int = 3, lr: float = 1e-3, seed: int = 2,
             vocab: int = TRAIN_TOKENS) -> nn.Module:
    """A few real Adam steps on synthetic labels (in place); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = torch.randint(3, vocab, (8, SEQ), generator=g)
        labels = torch.randint(0, NUM_LABELS, (8,), generator=g) if head == "seqcls" else x
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def pair(model_type: str, head: str) -> tuple[nn.Module, nn.Module]:
    """(base, fine-tune) for one case, built once per test session. Do not modify them."""
    base = build(model_type, head)
    ft = finetune(copy.deepcopy(base), head)
    return base, ft


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


class ConvNet(nn.Module):
    """A plain (non-transformers) module: conv kernel (rank 4), linear, norm, tied-free."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.norm = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


@functools.lru_cache(maxsize=None)
def conv_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = ConvNet().eval()
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam(ft.parameters(), lr=1e-3)
    ft.train()
    for _ in range(3):
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        nn.functional.cross_entropy(ft(x), y).backward()
        opt.step()
        opt.zero_grad()
    return base, ft.eval()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; OpenMP spin-waiting on a shared 2-core box costs
    seconds per test otherwise. Import this fixture into a test module to enable it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
