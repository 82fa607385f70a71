"""Tiny Hugging Face models and tokenizers built from configs (no downloads) for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

VOCAB = 120

TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    vocab_size=VOCAB, pad_token_id=1),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})


def tiny_tokenizer(words: list[str] | None = None, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = words or [f"w{i}" for i in range(VOCAB - 4)]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=model_max_length,
    )


def save_tiny_base(path: Path, model_type: str = "bert", seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random-init tiny base saved as an HF folder (a sequence-classification checkpoint)."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type))
    model.save_pretrained(path)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return Path(path)


def finetune_tiny(base_path: Path, out: Path, num_labels: int, *, seed: int = 1, steps: int = 4,
                  problem_type: str | None = None, lr: float = 1e-2) -> Path:
    """The base after a few real AdamW steps on synthetic labels (a head of ``num_labels``)."""
    torch.manual_seed(seed)
    kwargs = {"num_labels": num_labels}
    if problem_type:
        kwargs["problem_type"] = problem_type
    if num_labels > 1:
        kwargs["id2label"] = {i: f"{out.name}_l{i}" for i in range(num_labels)}
        kwargs["label2id"] = {v: k for k, v in kwargs["id2label"].items()}
    model = AutoModelForSequenceClassification.from_pretrained(base_path, ignore_mismatched_sizes=True, **kwargs)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.randint(4, VOCAB, (16, 12))
    if model.config.problem_type == "multi_label_classification" :
        y = torch.randint(0, 2, (16, num_labels)).float()
    elif num_labels == 1:
        y = torch.randn(16)
    else:
        y = torch.randint(0, num_labels, (16,))
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return Path(out)
