"""Helpers for the serve tests: a tiny BERT base with a word-level tokenizer (no downloads),
real short fine-tunes, a local Ray Serve service on 127.0.0.1, bounded wait loops."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import torch
from tenant_fixtures import tiny_tokenizer as _tiny_tokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from serve.run import free_local_port as free_port  # noqa: F401 - the tests' port picker

VOCAB = 120
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
ADMIN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style word-level tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, then w0..w115."""
    return _tiny_tokenizer(WORDS, model_max_length=32)


def save_base(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=32, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)


def finetune(base: Path, out: Path, labels: list[str] | None, *, seed: int, steps: int = 4) -> Path:
    """A few real AdamW steps on synthetic labels; ``labels=None`` makes a regression head."""
    torch.manual_seed(seed)
    kw: dict = {"num_labels": len(labels) if labels else 1}
    if labels:
        kw["id2label"] = dict(enumerate(labels))
        kw["label2id"] = {v: k for k, v in enumerate(labels)}
    else:
        kw["problem_type"] = "regression"
    model = AutoModelForSequenceClassification.from_pretrained(base, ignore_mismatched_sizes=True, **kw)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(4, VOCAB, (16, 10))
    y = torch.randint(0, len(labels), (16,)) if labels else torch.randn(16)
    for _ in range(steps):
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(out)
    return Path(out)


def texts(n: int, seed: int = 0, length: int = 6) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)) for _ in range(n)]


def reference_predictions(model, tokenizer, inputs, id2label) -> list[dict]:
    """Offline predictions one input at a time (softmax top label / regression value)."""
    out = []
    for x in inputs:
        enc = tokenizer(*((x,) if isinstance(x, str) else tuple(x)), return_tensors="pt", truncation=True)
        with torch.no_grad():
            logits = model(**enc).logits[0].float()
        if logits.numel() == 1 and id2label is None:
            out.append({"label": None, "score": float(logits[0])})
        else:
            p = torch.softmax(logits, -1)
            k = int(p.argmax())
            out.append({"label": id2label[k], "score": float(p[k]),
                        "scores": {id2label[i]: float(p[i]) for i in range(len(p))}})
    return out


def wait_until(fn, *, timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "condition"):
    """Call ``fn`` until it returns a truthy value; bounded in time and attempts."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            break
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60.0)


def metric(c: httpx.Client, name: str, **labels) -> float:
    """Sum of a metric's samples in the service's ``/metrics`` text, over all replicas
    (optionally only the samples carrying every given label value)."""
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total
