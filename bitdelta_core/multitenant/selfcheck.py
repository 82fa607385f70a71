"""The start-up self-check: proves a mixed batch equals per-model forwards and picks the engine's path."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..codec import SignDelta
from ..errors import ModelLoadError
from .context import BatchContext, packed_tokens
from .heads import _logits
from .layers import GroupSplit, TenantLayer, _replace_submodule
from .tenants import BASE_SLOT, ParamDelta, Tenant, merged_weight

if TYPE_CHECKING:
    from .engine import MultiTenantEngine

logger = logging.getLogger(__name__)


def run_self_check(eng: MultiTenantEngine, skip_padding: bool = False) -> None:
    """Prove on this architecture that a mixed batch equals per-model forwards; pick the path.

    Two synthetic tenants (a random 1-bit delta on every matrix, a dense change to every
    vector) and a base row run in one batch, compared row by row with ``functional_call``
    on each tenant's merged weights. Where the model's code combines a per-tenant value read
    outside a layer's ``forward`` with per-row data (DeBERTa's relative-position table) or
    otherwise fails on the mixed batch, the module running that code (and every module of
    its type) is set to run once per tenant group (:class:`GroupSplit`) and the check
    repeats. When that does not make the batch exact, mixed batches run one forward per
    tenant group ("fallback" path, checked the same way; as a last resort on the groups'
    merged weights). Only a model that cannot run at all is refused.

    With ``skip_padding``, a padded mixed batch then runs with its Linear layers on the real
    tokens only (:class:`.context.PackedTokens`) and must give the logits of the same batch
    computed in full; the engine skips padding only when it does (not for models whose real
    tokens read the padding positions, such as ConvBERT's convolution over positions).
    """
    g = torch.Generator().manual_seed(0)
    probes, merged = {}, {}
    for slot in (-2, -3):
        probes[slot], merged[slot] = _probe_tenant(eng, slot, g)
    vocab = int(getattr(eng.config, "vocab_size", 0) or 100)
    B, L = 5, 7
    ids = torch.randint(min(5, vocab - 1), min(vocab, 100), (B, L), generator=g).to(eng.device)
    enc = {"input_ids": ids}
    if _accepts(eng.model, "attention_mask"):
        enc["attention_mask"] = torch.ones_like(ids)
    groups = [(-2, slice(0, 2)), (BASE_SLOT, slice(2, 3)), (-3, slice(3, 5))]
    row_slot = [-2, -2, BASE_SLOT, -3, -3]
    live = {id(m): n for n, m in eng.model.named_modules() if isinstance(m, TenantLayer)}
    names = {full: f"{live[id(eng._layers[m])]}.base.{p}" for full, (m, p) in eng._param_owner.items()}
    try:
        with torch.inference_mode():
            ref = torch.cat([
                _logits(eng.model(**{k: v[i:i + 1] for k, v in enc.items()})) if s == BASE_SLOT else
                _logits(torch.func.functional_call(eng.model, {names[k]: v for k, v in merged[s].items()}, (),
                                                   {k: v[i:i + 1] for k, v in enc.items()}, strict=False))
                for i, s in enumerate(row_slot)]).float()
    except Exception as e:  # noqa: BLE001 - the model itself cannot run
        raise ModelLoadError(f"{eng.architecture} cannot run a forward pass: {type(e).__name__}: {e}") from None
    tol = 1e-3 if eng.dtype == torch.float32 else 5e-2
    err, culprit = math.inf, None
    try:
        for _ in range(8):
            try:
                mixed = _probe_forward(eng, enc, groups, probes)
            except Exception as e:  # noqa: BLE001 - any failure of the mixed batch: find who
                culprit = _culprit(eng, e)
                if culprit is None:
                    logger.info("self-check: the mixed batch fails (%s: %s)", type(e).__name__, e)
                    break
                _split_type(eng, type(culprit))
                continue
            err = _rel_err(mixed, ref)
            break
        if err <= tol:
            eng.self_check_error = err
            logger.debug("self-check passed for %s on the mixed path (relative error %.1e)", eng.architecture, err)
            if skip_padding and "attention_mask" in enc:
                eng.skip_padding = _padding_skippable(eng, groups, probes, g, tol)
            return
        if err < math.inf:
            logger.info("self-check: the mixed batch differs from per-model forwards (relative error %.1e)", err)
        eng.path = "fallback"
        try:
            err = _rel_err(_probe_forward(eng, enc, groups, probes), ref)
        except Exception as e:  # noqa: BLE001
            logger.info("self-check: per-group forwards fail (%s: %s)", type(e).__name__, e)
            err = math.inf
        if not err <= tol:
            eng.path = "fallback-merged"
            err = _rel_err(_probe_forward(eng, enc, groups, probes), ref)
            if not err <= tol:  # pragma: no cover - this is the reference computation itself
                raise ModelLoadError(f"{eng.architecture}: per-group forwards on merged weights differ "
                                     f"from per-model forwards (relative error {err:.2e})")
        eng.self_check_error = err
        logger.warning("%s: mixed batches run one forward per tenant group (%s path); the mixed path "
                       "did not reproduce per-model forwards", eng.architecture, eng.path)
    finally:
        for slot in probes:
            eng._rt.derived.drop(slot)


def _padding_skippable(eng: MultiTenantEngine, groups, probes, g: torch.Generator, tol: float) -> bool:
    """Whether the mixed batch's logits stay the same when its Linear layers skip padding.

    The probe batch is square (as many rows as positions), so that a model whose layers see
    ``(seq_len, batch)`` activations cannot pass by having them taken for ``(batch, seq_len)``;
    its padding holds the tokenizer's pad id, as served batches do.
    """
    B = groups[-1][1].stop
    lengths = [B, 3, B - 2, 2, B - 1][:B]
    vocab = int(getattr(eng.config, "vocab_size", 0) or 100)
    ids = torch.randint(min(5, vocab - 1), min(vocab, 100), (B, B), generator=g)
    mask = torch.zeros(B, B, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    left = getattr(eng.tokenizer, "padding_side", "right") == "left"
    if left:
        mask = mask.flip(1)
    pad_id = getattr(eng.tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(eng.config, "pad_token_id", None) or 0
    ids = ids.masked_fill(mask == 0, int(pad_id))
    enc = {"input_ids": ids.to(eng.device), "attention_mask": mask.to(eng.device)}
    try:
        full = _probe_forward(eng, enc, groups, probes)
        skipped = _probe_forward(eng, enc, groups, probes, packed=True)
    except Exception as e:  # noqa: BLE001 - the padded batch cannot run packed: keep padding
        logger.info("self-check: padding is computed (the packed batch fails: %s: %s)", type(e).__name__, e)
        return False
    err = _rel_err(skipped, full)
    if err <= tol:
        logger.debug("self-check: padding skipped (relative error %.1e against the full batch)", err)
        return True
    logger.info("self-check: %s reads padding positions (relative error %.1e); padding is computed",
                eng.architecture, err)
    return False


def _probe_tenant(eng: MultiTenantEngine, slot: int, g: torch.Generator) -> tuple[Tenant, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, ParamDelta]] = {}
    merged: dict[str, torch.Tensor] = {}
    for full, (mname, pname) in eng._param_owner.items():
        p = getattr(eng._module(mname), pname).detach()
        if not p.is_floating_point():
            continue
        step = 0.05 * float(p.float().std() if p.numel() > 1 else p.float().abs().mean()) + 1e-3
        if p.dim() >= 2:
            signs = torch.randint(0, 256, (math.ceil(p.numel() / 8),), dtype=torch.uint8, generator=g).to(eng.device)
            scale = torch.full((p.shape[0],), step, device=eng.device, dtype=eng.dtype)
            sd = SignDelta(tuple(p.shape), signs, scale, "row")
            d = ParamDelta("sign", sign=sd)
            merged[full] = merged_weight(p, sd, scale)
        else:
            dense = p + step * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            d = ParamDelta("dense", dense=dense)
            merged[full] = dense
        layers.setdefault(mname, {})[pname] = d
    return Tenant(None, slot, layers, 0, None, "", 0), merged


def _probe_forward(eng: MultiTenantEngine, enc, groups, probes, packed: bool = False) -> torch.Tensor:
    """Logits of the probe batch; ``packed``: its Linear layers on the real tokens only."""
    ctx = BatchContext(enc["input_ids"].shape[0], groups, probes)
    if packed:
        ctx.packed = packed_tokens(enc["attention_mask"], ctx)
    with torch.inference_mode():
        return eng._forward_ctx(enc, ctx, strict=True).float()


def _culprit(eng: MultiTenantEngine, e: BaseException) -> nn.Module | None:
    """The innermost model module (not a wrapper, not a leaf, not the root) running when
    ``e`` was raised: the one to run once per tenant group."""
    wrapped = {id(m.base) for m in eng.model.modules() if isinstance(m, (TenantLayer, GroupSplit))}
    ours = {id(m) for m in eng.model.modules()}
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for f in reversed(frames):
        m = f.f_locals.get("self")
        if (isinstance(m, nn.Module) and id(m) in ours and m is not eng.model and id(m) not in wrapped
                and not isinstance(m, (TenantLayer, GroupSplit)) and any(True for _ in m.children())):
            return m
    return None


def _split_type(eng: MultiTenantEngine, cls: type) -> None:
    targets = [(n, m) for n, m in eng.model.named_modules() if type(m) is cls]
    for name, m in reversed(targets):
        _replace_submodule(eng.model, name, GroupSplit(name, m, eng._rt))
        eng.per_group_modules.append(cls.__name__)
    logger.info("self-check: %d %s module(s) run once per tenant group", len(targets), cls.__name__)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return math.inf
    return float((got - ref).abs().max() / (ref.abs().max() + 1e-6))


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
