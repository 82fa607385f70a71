"""Scale distillation (BitDelta step 2): train only the scales of a 1-bit delta so the compressed
model's outputs match the fine-tune's on unlabeled inputs of the task.

Maths. For every 1-bit tensor (codec ``sign1``/``resized``) with base ``W_b`` and packed signs
``S ∈ {−1,+1}^(rows×cols)`` (cols = the other dims flattened), the student's weight is

    W(α) = W_b + diag(α) · S          (row granularity: α ∈ R^rows, one trainable per row)
    W(α) = W_b + α · (m ⊙ S)          (tensor granularity: α ∈ R, m = the row mask)

rebuilt every step and fed to the unchanged model with :func:`torch.func.functional_call`, so
the same code works for any parameter of any module type (Linear, Embedding, Conv1D, ...).
``∂L/∂α_r = Σ_c ∂L/∂W[r,c] · S[r,c]``: the delta path passes gradients to the scales and to
nothing else (base, dense tensors and signs are constants). Rows whose stored scale is 0 (rows
the fine-tune never changed) stay exactly 0: their signs carry no information.

Loss on calibration batches (teacher = the fine-tune, outputs cached per batch):

    L = mean((z_student − z_teacher)²)                                   logits (BitDelta)
      + hidden_weight · mean_layers(masked mean((h_s − h_t)²))           optional hidden states

Optimiser: AdamW (no weight decay) on the scales. The distilled scales are written back in the
artifact's scale dtype (fp16 by default; fp32 where a value would leave fp16's normal range,
as :func:`bitdelta_core.codec._store_scale` does) and the run is recorded in
``artifact.compression["distillation"]``.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .apply import check_base, load_base_for, reconstruct
from .artifact import DeltaArtifact, load_artifact
from .codec import Granularity, _store_scale
from .data import TextDataset
from .errors import ConfigError, DataError, ModelLoadError
from .finetune import encode_texts, length_batches
from .models import ModelSource, load_model, require_tokenizer
from .packing import unpack_signs
from .codec import Codec

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Options of :func:`distill` (defaults measured on MiniLM-L6, see README)."""

    steps: int = 200
    lr: float = 1e-5  # measured on MiniLM SST-2: 1e-4 overshoots (agreement 96.1% -> 92.8%), 1e-5: -> 99.4%
    batch_size: int = 8
    max_length: int = 128
    calib_size: int = 800
    heldout_size: int = 128
    hidden_weight: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for k in ("steps", "batch_size", "max_length", "calib_size"):
            if int(getattr(self, k)) <= 0:
                raise ConfigError(f"{k} must be positive, got {getattr(self, k)}")
        if self.lr <= 0 or self.hidden_weight < 0 or self.heldout_size < 0:
            raise ConfigError(f"lr must be > 0 and hidden_weight, heldout_size >= 0 "
                              f"(got {self.lr}, {self.hidden_weight}, {self.heldout_size})")


@dataclass
class DistillResult:
    artifact: DeltaArtifact
    loss_before: float  # mean loss on held-out calibration inputs, initial (mean |Δ|) scales
    loss_after: float
    train_loss_first: float  # mean of the first / last 10 training steps
    train_loss_last: float
    steps: int
    wall_s: float
    num_scales: int
    history: list[float] = field(default_factory=list)


class ScaleStudent(nn.Module):
    """The compressed model with trainable scales (see the module docstring for the maths).

    Keeps one reference to each base tensor, the unpacked signs of the rows that changed
    (float32, ``(active_rows, cols)``) and one ``nn.Parameter`` of scales per 1-bit tensor.
    """

    def __init__(self, module: nn.Module, base_state: dict[str, torch.Tensor], art: DeltaArtifact):
        super().__init__()
        self._module = [module]  # not a submodule: its own parameters are not trained
        for p in module.parameters():
            p.requires_grad_(False)
        self.names: list[str] = []
        self.scales = nn.ParameterList()
        self._plan: dict[str, tuple] = {}
        self._fixed: dict[str, torch.Tensor] = {}
        for name, e in art.tensors.items():
            if e.codec in (Codec.SIGN1, Codec.RESIZED):
                sd = e.sign
                rows = sd.rows
                cols = sd.numel // max(rows, 1)
                b = base_state[name]
                b_shared = b[:rows].float().reshape(rows, cols)
                kept = sd.kept_rows()  # None: every row stored
                signs = unpack_signs(sd.signs, (sd.kept, cols), torch.float32)
                if sd.granularity == Granularity.ROW:
                    stored = sd.scale.float()
                    active = torch.nonzero(stored != 0).reshape(-1)  # positions among the stored rows
                    if active.numel() == 0:
                        self._fixed[name] = reconstruct(e, b)
                        continue
                    rows_of = active if kept is None else kept[active]
                    full = rows_of.numel() == rows
                    self._plan[name] = ("row", b_shared, signs if full else signs[active].contiguous(),
                                        None if full else rows_of, e, active)
                    self.scales.append(nn.Parameter(stored[active].clone()))
                else:
                    if kept is not None:  # unchanged rows: sign 0, so the shared scale leaves them alone
                        signs = torch.zeros(rows, cols).index_copy_(0, kept, signs)
                    self._plan[name] = ("tensor", b_shared, signs, None, e, None)
                    self.scales.append(nn.Parameter(sd.scale.float().clone()))
                self.names.append(name)
            else:
                self._fixed[name] = reconstruct(e, base_state.get(name))
        self._index = {n: i for i, n in enumerate(self.names)}

    @property
    def module(self) -> nn.Module:
        return self._module[0]

    def num_scales(self) -> int:
        return sum(p.numel() for p in self.scales)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor of the fine-tune's state dict (aliases of tied tensors omitted)."""
        out = dict(self._fixed)
        for name in self.names:
            kind, b, s, active, e, _ = self._plan[name]
            a = self.scales[self._index[name]]
            if kind == "tensor":
                w = b + a * s
            elif active is None:
                w = torch.addcmul(b, a.unsqueeze(1), s)  # one fused pass over the tensor
            else:
                w = b.index_add(0, active, a.unsqueeze(1) * s)
            w = w.reshape(e.sign.shape)
            if e.codec == Codec.RESIZED and e.dense is not None:
                w = torch.cat([w, e.dense.float()], dim=0)
            out[name] = w
        return out

    def forward(self, **kwargs):
        return functional_call(self.module, self.weights(), args=(), kwargs=kwargs, strict=False)

    def write_back(self, art: DeltaArtifact, finetuned_state: dict[str, torch.Tensor] | None = None) -> DeltaArtifact:
        """A copy of ``art`` whose 1-bit tensors carry the trained scales (dtype kept).

        With ``finetuned_state`` the fp16/fp32 choice per tensor follows the codec's rule exactly
        (subnormal fp16 scales kept when their rounding costs < 0.1% of the 1-bit error);
        without it any scale outside fp16's normal range falls back to fp32.
        """
        new = copy.copy(art)
        new.tensors = dict(art.tensors)
        new.compression = copy.deepcopy(art.compression)
        for name in self.names:
            kind, b, _, _, e, active = self._plan[name]
            a = self.scales[self._index[name]].detach().float()
            sd = copy.copy(e.sign)
            if kind == "row" and active is not None and active.numel() != sd.kept:
                stored = torch.zeros(sd.kept)
                stored[active] = a
                a = stored
            delta2d = None
            if finetuned_state is not None and name in finetuned_state:
                rows = sd.rows
                delta2d = finetuned_state[name][:rows].detach().float().reshape(rows, -1) - b
                kept = sd.kept_rows()
                if kept is not None:
                    delta2d = delta2d[kept]
            sd.scale = _store_scale(a, e.sign.scale.dtype, delta2d)
            ne = copy.copy(e)
            ne.sign = sd
            new.tensors[name] = ne
        return new


def _loss(student_out, teacher_logits, teacher_hidden, mask, hidden_weight: float) -> torch.Tensor:
    loss = torch.mean((student_out.logits.float() - teacher_logits) ** 2)
    if hidden_weight > 0:
        m = mask.unsqueeze(-1).float()
        denom = m.sum() * student_out.hidden_states[0].shape[-1]
        hs = [((s.float() - t) ** 2 * m).sum() / denom for s, t in zip(student_out.hidden_states, teacher_hidden)]
        loss = loss + hidden_weight * torch.stack(hs).mean()
    return loss


def distill(
    base: ModelSource,
    finetuned: ModelSource,
    art: DeltaArtifact | str | os.PathLike,
    calib: TextDataset,
    config: DistillConfig | None = None,
    *,
    tokenizer=None,
    progress: bool = True,
) -> DistillResult:
    """Distill the scales of ``art`` (made from ``base`` and ``finetuned``) on ``calib``'s texts.

    ``base``/``finetuned`` are HF folders or modules; labels of ``calib`` are not used.
    """
    cfg = config or DistillConfig()
    t0 = time.perf_counter()
    if not isinstance(art, DeltaArtifact):
        art = load_artifact(art)
    if len(calib) == 0:
        raise DataError("distillation needs at least one calibration example")
    b = load_base_for(art, base)
    base_state = b.base_tensors()
    check_base(base_state, art)
    if b.module is None:
        raise ModelLoadError("distillation needs the base as an HF folder or nn.Module, not a state dict")
    teacher = load_model(finetuned).module if not isinstance(finetuned, nn.Module) else finetuned
    if teacher is None:
        raise ModelLoadError("distillation needs the fine-tune as an HF folder or nn.Module")
    teacher.eval()
    n_out = getattr(getattr(teacher, "config", None), "num_labels", None)
    if art.num_labels is not None and n_out is not None and art.num_labels != n_out:
        raise DataError(f"the delta has a {art.num_labels}-way head but the fine-tune has {n_out}")
    if tokenizer is None:
        if not isinstance(finetuned, (str, os.PathLike)):
            raise ModelLoadError("pass tokenizer= when the fine-tune is not an HF folder")
        tokenizer = require_tokenizer(finetuned)

    student = ScaleStudent(b.module, base_state, art)
    student.module.eval()
    want_hidden = cfg.hidden_weight > 0

    # calibration / held-out split of the texts (labels unused)
    idx = list(range(len(calib)))
    random.Random(cfg.seed).shuffle(idx)
    n_held = min(cfg.heldout_size, len(idx) // 5)
    held, train = idx[:n_held], idx[n_held:][: cfg.calib_size]
    texts = [calib.texts[i] for i in train]
    held_texts = [calib.texts[i] for i in held]

    def make_batches(tx, shuffle, seed):
        return [encode_texts(tokenizer, [tx[i] for i in bb], cfg.max_length)
                for bb in length_batches(tx, cfg.batch_size, shuffle=shuffle, seed=seed)]

    @torch.no_grad()
    def teacher_out(enc):
        o = teacher(**enc, output_hidden_states=want_hidden)
        return o.logits.float(), ([h.float() for h in o.hidden_states] if want_hidden else None)

    train_batches = make_batches(texts, True, cfg.seed)
    cache = [teacher_out(enc) if not want_hidden else None for enc in train_batches]
    held_batches = make_batches(held_texts, False, cfg.seed) if held_texts else []
    held_cache = [teacher_out(enc) for enc in held_batches]

    @torch.no_grad()
    def heldout_loss() -> float:
        if not held_batches:
            return float("nan")
        tot, n = 0.0, 0
        for enc, (tl, th) in zip(held_batches, held_cache):
            o = student(**enc, output_hidden_states=want_hidden)
            k = enc["input_ids"].shape[0]
            tot += float(_loss(o, tl, th, enc["attention_mask"], cfg.hidden_weight)) * k
            n += k
        return tot / n

    loss_before = heldout_loss()
    opt = torch.optim.AdamW(student.scales.parameters(), lr=cfg.lr, weight_decay=0.0)
    history: list[float] = []
    order: list[int] = []
    rng = random.Random(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="distill scales", unit="step", disable=not progress)
    for step in bar:
        if not order:
            order = list(range(len(train_batches)))
            rng.shuffle(order)
        j = order.pop()
        enc = train_batches[j]
        if want_hidden:
            tl, th = teacher_out(enc)
        else:
            tl, th = cache[j]
        o = student(**enc, output_hidden_states=want_hidden)
        loss = _loss(o, tl, th, enc["attention_mask"], cfg.hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if step % 10 == 9:
            bar.set_postfix(loss=f"{sum(history[-10:]) / 10:.3g}")
    bar.close()
    loss_after = heldout_loss()
    k = min(10, len(history))
    res_art = student.write_back(art, teacher.state_dict())
    wall = time.perf_counter() - t0
    result = DistillResult(res_art, loss_before, loss_after, sum(history[:k]) / k, sum(history[-k:]) / k,
                           cfg.steps, wall, student.num_scales(), history)
    res_art.compression["distillation"] = {
        **asdict(cfg), "task": calib.task.name, "calibration_examples": len(texts),
        "heldout_examples": len(held_texts), "loss": "logit_mse" + ("+hidden_mse" if want_hidden else ""),
        "loss_before": loss_before, "loss_after": loss_after, "num_scales": result.num_scales,
        "wall_s": round(wall, 2),
    }
    logger.info("distilled %d scales in %d steps (%.1f s): held-out loss %.4g -> %.4g", result.num_scales,
                cfg.steps, wall, loss_before, loss_after)
    return result


__all__ = ["DistillConfig", "DistillResult", "ScaleStudent", "distill"]
