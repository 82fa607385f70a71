"""The layer wrappers: one per parameter-bearing module, its class chosen once at wrap time by type."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernel as cpu_kernel_mod
from ..packing import unpack_sign_rows
from .context import (
    BatchContext,
    GroupedValue,
    _group_results,
    _has_grouped,
    _part,
    _Runtime,
    _simple_repr,
    _unwrap,
)
from .kernels import Conv1D, _kernel_for
from .tenants import BASE_SLOT, ParamDelta, Tenant, merged_weight


class TenantLayer(nn.Module):
    """Wraps one parameter-bearing module; applies each row's tenant parameters.

    The generic wrapper runs the module's kernel (:data:`_KERNELS`, by exact type, else
    ``functional_call``) with each group's parameters; a module with children runs once per
    group with the running context narrowed to that group, so its wrapped children apply that
    group's tenant. Subclasses specialise embeddings and Linear-like layers (:func:`wrap`).
    """

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__()
        self.name = name
        self.base = base
        self._rt = rt
        self.kernel = _kernel_for(base)
        self.param_names = [n for n, _ in base.named_parameters(recurse=False)]
        self._keys = {p: f"{name}.{p}" for p in self.param_names}
        self._nested = any(True for _ in base.children())

    def __getattr__(self, name: str):
        # code that reads e.g. ``layer.weight`` directly sees the running batch's value of it:
        # the base's, the one tenant's, or a GroupedValue when the batch mixes tenants
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules["base"]
            if name in self._keys:
                ctx = self._rt.ctx
                if ctx is not None and not ctx.base_only:
                    return self._read_param(name, ctx)
            return getattr(base, name)

    def _read_param(self, pname: str, ctx: BatchContext):
        base_p = getattr(self._modules["base"], pname)
        if ctx.single is not None:
            d = ctx.single.layers.get(self.name)
            return base_p if d is None or pname not in d else self._param(ctx.single, pname, d[pname], ctx)
        if not any(pname in t.layers.get(self.name, ()) for t in ctx.tenants.values()):
            return base_p
        parts = []
        for slot, _ in ctx.groups:
            d = ctx.tenants[slot].layers.get(self.name, {}).get(pname) if slot != BASE_SLOT else None
            parts.append(base_p if d is None else self._param(ctx.tenants[slot], pname, d, ctx))
        return GroupedValue(parts, self._keys[pname], self._rt)

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is None or ctx.base_only:
            return self.base(*args, **kwargs)
        t = ctx.single
        if t is not None:
            d = t.layers.get(self.name)
            if _has_grouped(args, kwargs):
                return self._on_grouped(ctx, args, kwargs)
            return self.base(*args, **kwargs) if d is None else self._one(t, d, ctx, args, kwargs)
        if not any(self.name in t.layers for t in ctx.tenants.values()):
            if _has_grouped(args, kwargs):
                return self._on_grouped(ctx, args, kwargs)
            return self.base(*args, **kwargs)
        if _has_grouped(args, kwargs) or not self._batched(args[0] if args else None, ctx.batch_size):
            return self._on_grouped(ctx, args, kwargs)
        return self._mixed(ctx, args, kwargs)

    @staticmethod
    def _batched(x, B: int) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B

    # -- one group ------------------------------------------------------------------------
    def _one(self, t: Tenant, d: dict, ctx: BatchContext, args, kwargs):
        """The whole input through tenant ``t``'s parameters (``d``: its deltas here)."""
        return self.kernel(self.base, self._params(t, d, ctx), args, kwargs)

    def _group_out(self, slot: int, ctx: BatchContext, args, kwargs):
        t = ctx.tenants.get(slot)
        d = t.layers.get(self.name) if t is not None else None
        if d is None:
            return self.base(*args, **kwargs)
        return self._one(t, d, ctx, args, kwargs)

    def _on_grouped(self, ctx: BatchContext, args, kwargs):
        """Input without a batch axis (a GroupedValue or a tensor shared by all rows): the
        output differs per group, a GroupedValue (cached per tenant when the input was derived
        from parameters alone)."""
        gvs = [a for a in (*args, *kwargs.values()) if isinstance(a, GroupedValue)]
        key = None
        if gvs and all(v.key is not None for v in gvs):
            described = [a.key if isinstance(a, GroupedValue) else _simple_repr(a) for a in (*args, *kwargs.values())]
            if all(x is not None for x in described):
                key = f"{self.name}({','.join(described)}{','.join(kwargs)})"
        parts = []
        for g, (slot, _) in enumerate(ctx.groups):
            y = self._rt.derived.get(slot, key) if key is not None else None
            if y is None:
                sub = ctx.narrow(g) if len(ctx.groups) > 1 else ctx
                y = self._in_context(sub, lambda: self._group_out(
                    slot, sub, tuple(_unwrap(_part(a, g)) for a in args),
                    {k: _unwrap(_part(v, g)) for k, v in kwargs.items()}))
                if key is not None and isinstance(y, torch.Tensor):
                    self._rt.derived.put(slot, key, y)
            parts.append(y)
        return _group_results(parts, key, self._rt)

    def _in_context(self, sub: BatchContext, fn):
        rt = self._rt
        outer = rt.ctx
        rt.ctx = sub
        try:
            return fn()
        finally:
            rt.ctx = outer

    # -- mixed batch ----------------------------------------------------------------------
    def _mixed(self, ctx: BatchContext, args, kwargs):
        B = ctx.batch_size
        outs = []
        for g, (slot, rows) in enumerate(ctx.groups):
            sub_args = tuple(_take_rows(a, rows, B) for a in args)
            sub_kwargs = {k: _take_rows(v, rows, B) for k, v in kwargs.items()}
            if self._nested:  # wrapped children must see this group alone
                y = self._in_context(ctx.narrow(g), lambda: self._group_out(slot, ctx.narrow(g), sub_args, sub_kwargs))
            else:
                y = self._group_out(slot, ctx, sub_args, sub_kwargs)
            outs.append((rows, y))
        return _scatter_rows(outs, B)

    # -- parameters of one tenant for this layer -------------------------------------------
    def _group_params(self, slot: int, ctx: BatchContext) -> dict[str, torch.Tensor]:
        """This layer's parameters for one group: the base's for base rows and for tenants
        that leave the layer alone, else the tenant's (:meth:`_params`)."""
        t = ctx.tenants.get(slot)
        d = t.layers.get(self.name) if t is not None else None
        if d is None:
            return {n: getattr(self.base, n) for n in self.param_names}
        return self._params(t, d, ctx)

    def _params(self, t: Tenant, d: dict[str, ParamDelta], ctx: BatchContext) -> dict[str, torch.Tensor]:
        base = self.base
        return {p: getattr(base, p) if p not in d else self._param(t, p, d[p], ctx) for p in self.param_names}

    # -- Triton tables (CUDA; bitdelta_core.triton_kernel), used by Linear-like and embedding layers
    def _triton_table(self):
        """This layer's device table of the tenants' delta addresses (written once per tenant)."""
        base = self.base
        return self._rt.triton.LayerTable(self._rt.triton_tables, base.weight.detach(),
                                          getattr(base, "bias", None), self._triton_entry)

    def _triton_entry(self, tenant: Tenant):
        """This layer's table entry for a tenant: its 1-bit weight and bias (``None``: the base's),
        or ``"dense"`` for a replacement weight (heads), which the kernel does not cover."""
        d = tenant.layers.get(self.name, {})
        wd, bd = d.get("weight"), d.get("bias")
        if (wd is not None and wd.kind != "sign") or (bd is not None and bd.kind != "dense"):
            return "dense"
        if wd is None and bd is None:
            return None
        tk = self._rt.triton
        bias = getattr(self.base, "bias", None) if bd is None else bd.dense
        if wd is None:
            return tk.DeltaGroup(0, 0, bias=bias)
        return tk.DeltaGroup(0, 0, wd.sign.signs, wd.sign.scale, wd.index, bias)

    def _triton_rows(self, ctx: BatchContext) -> list[int]:
        """Each group's table row, computed once per forward and shared by every layer."""
        rows = ctx.plans.get("rows")
        if rows is None:
            tables = self._rt.triton_tables
            rows = ctx.plans["rows"] = [tables.row(None if slot == BASE_SLOT else ctx.tenants[slot])
                                        for slot, _ in ctx.groups]
        return rows

    def _param(self, t: Tenant, pname: str, d: ParamDelta, ctx: BatchContext) -> torch.Tensor:
        if d.kind == "dense":
            return d.dense
        cache = self._rt.cache
        key = self._keys[pname]
        admitted = t.slot in ctx.admitted
        w = cache.get(t.slot, key) if admitted else None
        if w is None:
            w = merged_weight(getattr(self.base, pname).detach(), d.sign, d.sign.scale, d.index)
            if admitted:
                cache.put(t.slot, key, w)
        return w


class LinearLayer(TenantLayer):
    """``nn.Linear`` and GPT-2 ``Conv1D`` (exact types): groups write straight into their rows
    of one output; 1-bit weights run through the compiled fused kernel where it applies, all
    groups of the batch in one call; on CUDA the one-launch Triton kernel when the engine has
    it, else the stacked batched-matmul path."""

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__(name, base, rt)
        self.conv = type(base) is not nn.Linear  # Conv1D: weight (in, out)
        w = base.weight
        # rows of the packed signs start on a byte: Linear (out, in) needs in % 8 == 0, Conv1D
        # (in, out) out % 8 == 0; the kernel reads the base weight in place (contiguous fp32)
        self.fused = (rt.kernel is not None and w.dim() == 2 and w.shape[1] % 8 == 0
                      and w.dtype == torch.float32 and w.is_contiguous())
        self.width = w.shape[1 if self.conv else 0]
        self._w = w.detach()  # the base weight as the kernel reads it (shares its storage)
        # every group of a batch in one Triton launch (CUDA), when the engine runs the kernels
        self._table = self._triton_table() if rt.triton is not None and w.dim() == 2 else None

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is not None and ctx.packed is not None and len(args) == 1 and not kwargs:
            x = args[0]
            if (type(x) is torch.Tensor and x.dim() == 3 and x.shape[0] == ctx.batch_size
                    and x.shape[1] == ctx.packed.seq_len):
                y = self._packed(x, ctx)
                if y is not None:
                    return y
        return super().forward(*args, **kwargs)

    def _packed(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """The layer on the batch's real tokens only (:class:`PackedTokens`): read in place by
        the compiled kernel (:meth:`_fused_packed`), else gathered into one matrix; each group's
        span runs through its weights, and the output's padding positions are zero. None where
        the groups' outputs differ in width (the padded path runs)."""
        p = ctx.packed
        y = self._fused_packed(x, ctx)
        if y is not None:
            return y
        xp = p.gather(x)
        if ctx.base_only or ctx.single is not None or not any(self.name in t.layers for t in ctx.tenants.values()):
            yp = super().forward(xp)  # one set of weights for every token: the ordinary dispatch
        else:
            yp = self._grouped_linear(xp, ctx, p.spans)
            if yp is None:
                return None
        return p.scatter(yp, x.shape[0])

    def _fused_packed(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """The real tokens through the compiled kernel in place on the padded grid, every group
        in one call (the kernel reads and writes their rows by position and zeroes the padding's):
        no gathered copy of the input, no scatter of the output. None where a group does not take
        the kernel here (base rows, a tenant that leaves the layer alone or brings its own weight,
        a group on cached merged weights)."""
        if not self.fused or x.dtype != torch.float32:
            return None
        p = ctx.packed
        entries = []
        for (slot, _), (s, e) in zip(ctx.groups, p.spans):
            t = ctx.tenants.get(slot)
            f = self._fused_entry(slot, t.layers.get(self.name) if t is not None else None, ctx)
            if f is None:
                return None
            entries.append((s, e, *f))
        K = x.shape[-1]
        out = x.new_empty((*x.shape[:-1], self.width))
        cpu_kernel_mod.signed_linear_groups(self._rt.kernel, x.reshape(-1, K).contiguous(), out.view(-1, self.width),
                                            self._w, entries, transposed=self.conv, rows=p.index, zero_rows=p.pad)
        return out

    def _one(self, t, d, ctx, args, kwargs):
        if len(args) != 1 or kwargs:
            return self.kernel(self.base, self._params(t, d, ctx), args, kwargs)
        x = args[0]
        if self._table is not None and len(ctx.groups) == 1 and ctx.groups[0][0] == t.slot:
            y = self._triton_forward(x, ctx)
            if y is not None:
                return y
        f = self._fused_entry(t.slot, d, ctx)
        if f is not None:
            K = x.shape[-1]
            out = x.new_empty((*x.shape[:-1], self.width))
            cpu_kernel_mod.signed_linear_groups(self._rt.kernel, x.reshape(-1, K).contiguous(),
                                                out.view(-1, self.width), self._w,
                                                [(0, x.numel() // K, *f)], transposed=self.conv)
            return out
        wd, bd = d.get("weight"), d.get("bias")
        w = self.base.weight if wd is None else self._param(t, "weight", wd, ctx)
        b = self.base.bias if bd is None else self._param(t, "bias", bd, ctx)
        if not self.conv:
            return F.linear(x, w, b)
        y = x.reshape(-1, x.shape[-1]) @ w if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], w.shape[1])

    def _fused_entry(self, slot: int, d: dict[str, ParamDelta] | None, ctx: BatchContext):
        """(signs, scale, index, bias) of group ``slot`` (``d``: its tenant's deltas here) for the
        fused kernel, or None where the group does not take it: no kernel for this layer, a
        group on cached merged weights, base rows or a tenant that leaves the layer alone
        (``d`` None), a dense weight, a bias stored as 1-bit, no stored row."""
        if not self.fused or d is None or slot in ctx.admitted:
            return None
        wd, bd = d.get("weight"), d.get("bias")
        if (wd is not None and wd.kind == "sign" and (bd is None or bd.kind == "dense")
                and (wd.index is None or wd.index.numel())):
            return wd.sign.signs, wd.sign.scale, wd.index, self.base.bias if bd is None else bd.dense
        return None

    def _mixed(self, ctx, args, kwargs):
        if len(args) == 1 and not kwargs:
            x = args[0]
            y = None
            if self._table is not None:
                y = self._triton_forward(x, ctx)
            if y is None and ctx.pad_index is not None:
                y = self._stacked(x, ctx)
            if y is None:
                y = self._grouped_linear(x, ctx)
            if y is not None:
                return y
        return super()._mixed(ctx, args, kwargs)

    def _grouped_linear(self, x: torch.Tensor, ctx: BatchContext,
                        spans: list[tuple[int, int]] | None = None) -> torch.Tensor | None:
        """Each group's ``x_g W_gᵀ + b_g`` (Conv1D: ``x_g W_g + b_g``) written straight into its
        rows of one output (no concatenation pass); tenants with a 1-bit weight go through the
        compiled fused kernel when the layer has it. ``spans``: each group's rows of ``x``
        flattened to a matrix (default: its batch rows' tokens). None when the groups' output
        widths differ (heads)."""
        conv, width = self.conv, self.width
        for slot, _ in ctx.groups:
            d = ctx.tenants[slot].layers.get(self.name, {}).get("weight") if slot != BASE_SLOT else None
            if d is not None and d.kind == "dense" and d.dense.shape[1 if conv else 0] != width:
                return None
        K = x.shape[-1]
        if spans is None:
            per_row = x[0].numel() // K  # tokens per batch row
            spans = [(rows.start * per_row, rows.stop * per_row) for _, rows in ctx.groups]
        x2 = x.reshape(-1, K)
        out = x.new_empty((*x.shape[:-1], width))
        o2 = out.view(-1, width)
        fused = []
        for (slot, _), (s, e) in zip(ctx.groups, spans):
            t = ctx.tenants.get(slot)
            d = t.layers.get(self.name) if t is not None else None
            f = self._fused_entry(slot, d, ctx)
            if f is not None:
                fused.append((s, e, *f))
                continue
            p = self._params(t, d, ctx) if d is not None else {n: getattr(self.base, n) for n in self.param_names}
            w, b = p["weight"], p.get("bias")
            w = w if conv else w.t()
            if b is None:
                torch.mm(x2[s:e], w, out=o2[s:e])
            else:
                torch.addmm(b, x2[s:e], w, out=o2[s:e])
        if fused:
            cpu_kernel_mod.signed_linear_groups(self._rt.kernel, x2.contiguous(), o2, self._w, fused,
                                                transposed=conv)
        return out

    # -- Triton path (CUDA; bitdelta_core.triton_kernel) -----------------------------------
    def _triton_forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """The layer for every group in one Triton launch (:mod:`.triton_kernel`): the base weight
        plus each group's ``α ⊙ sign(Δ)`` unpacked in the kernel, no merged weight. Per layer the
        host only launches: the tenants' delta addresses sit in the layer's device table (written
        once per tenant) and the forward's tile plan is shared by all layers. None (the other
        paths run) where the kernel does not apply: another dtype, an input not per batch row."""
        if not isinstance(x, torch.Tensor):
            return None
        tk = self._rt.triton
        rows = self._triton_rows(ctx)
        table = self._table
        table.sync()
        if table.dense_rows and not table.dense_rows.isdisjoint(rows):
            return self._triton_groups(x, ctx)  # tenants with their own weight here (heads)
        w = table.weight
        K, width = x.shape[-1] if x.dim() else 0, self.width
        if x.dtype != w.dtype or K != w.shape[0 if self.conv else 1] or x.numel() == 0:
            return None
        M = x.numel() // K
        B = ctx.batch_size
        if len(ctx.groups) == 1:  # the whole input is one group, whatever its leading dims
            per_row = None
        elif x.dim() >= 2 and x.shape[0] == B:
            per_row = M // B  # tokens per batch row
        else:
            return None
        key = ("plan", per_row, M)
        plan = ctx.plans.get(key)
        if plan is None:
            spans = [(0, M)] if per_row is None else [(sl.start * per_row, sl.stop * per_row) for _, sl in ctx.groups]
            plan = ctx.plans[key] = tk.make_plan(spans, x.device, rows)
        x2 = x.reshape(-1, K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        out = x.new_empty((*x.shape[:-1], width))
        tk.launch_linear(x2, w, out.view(-1, width), table.table, plan, transposed=self.conv,
                         has_bias=getattr(self.base, "bias", None) is not None)
        return out

    def _triton_groups(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """:meth:`_triton_forward` for a layer where some tenants bring their own dense weight
        (classification heads): the kernel runs the other groups, those tenants an ordinary GEMM
        on their rows. None for heads of different widths (the other paths run)."""
        tk = self._rt.triton
        w = self.base.weight.detach()
        B = ctx.batch_size
        conv, width = self.conv, self.width
        K = x.shape[-1] if x.dim() else 0
        if x.dtype != w.dtype or K != w.shape[0 if conv else 1] or x.numel() == 0:
            return None
        if len(ctx.groups) == 1:
            spans = [(0, x.numel() // K)]
        elif x.dim() >= 2 and x.shape[0] == B:
            per_row = x[0].numel() // K
            spans = [(sl.start * per_row, sl.stop * per_row) for _, sl in ctx.groups]
        else:
            return None
        bias = getattr(self.base, "bias", None)
        groups, dense = [], []
        for (slot, _), (s, e) in zip(ctx.groups, spans):
            entry = None if slot == BASE_SLOT else self._triton_entry(ctx.tenants[slot])
            if entry == "dense":
                d = ctx.tenants[slot].layers[self.name]
                wd, bd = d.get("weight"), d.get("bias")
                if wd is None or wd.kind != "dense" or wd.dense.shape != w.shape:
                    return None
                dense.append((s, e, wd.dense, bias if bd is None else bd.dense))
                groups.append(tk.DeltaGroup(s, s, bias=bias))
            else:
                g = entry or tk.DeltaGroup(s, e, bias=bias)
                g.start, g.end = s, e
                groups.append(g)
        x2 = x.reshape(-1, K)
        out = x.new_empty((*x.shape[:-1], width))
        o2 = out.view(-1, width)
        tk.grouped_linear(x2, w, groups, transposed=conv, out=o2)
        for s, e, wt, b in dense:
            wt = wt if conv else wt.t()
            if b is None:
                torch.mm(x2[s:e], wt, out=o2[s:e])
            else:
                torch.addmm(b, x2[s:e], wt, out=o2[s:e])
        return out

    def _stacked(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """All groups in one (b)addbmm over zero-padded groups; None if weights differ in shape."""
        ws, bs = [], []
        for slot, _ in ctx.groups:
            p = self._group_params(slot, ctx)
            ws.append(p["weight"])
            bs.append(p.get("bias"))
        if len({tuple(w.shape) for w in ws}) != 1 or len({b is None for b in bs}) != 1:
            return None
        G = len(ws)
        g_idx, r_idx = ctx.pad_index
        xp = x.new_zeros((G, ctx.rmax, *x.shape[1:]))
        xp[g_idx, r_idx] = x
        W = torch.stack(ws)
        if not self.conv:  # (G, out, in) -> (G, in, out); Conv1D is already (in, out)
            W = W.transpose(1, 2)
        xf = xp.reshape(G, -1, x.shape[-1])
        y = torch.bmm(xf, W) if bs[0] is None else torch.baddbmm(torch.stack(bs).unsqueeze(1), xf, W)
        return y.reshape(G, ctx.rmax, *x.shape[1:-1], W.shape[-1])[g_idx, r_idx]


class EmbeddingLayer(TenantLayer):
    """``nn.Embedding`` (exact type): ``E_base[ids] + α[ids] ⊙ sign(Δ)[ids]`` gathered straight
    from the packed signs; only the bytes of the looked-up rows are read (with the Triton
    kernels: every row of the batch in one launch)."""

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__(name, base, rt)
        self._table = self._triton_table() if rt.triton is not None and base.max_norm is None else None

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is None or ctx.base_only or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return super().forward(*args, **kwargs)
        ids = args[0]
        t = ctx.single
        if t is not None:
            d = t.layers.get(self.name, {}).get("weight")
            if d is not None and self._table is not None:
                out = self._triton_forward(ids, ctx)
                if out is not None:
                    return out
            out = F.embedding(ids, self.base.weight, self.base.padding_idx)
            return out if d is None else self._add_delta(out, ids, d)
        if not any(self.name in t.layers for t in ctx.tenants.values()):
            return self.base(ids)
        B = ctx.batch_size
        if ids.dim() == 0 or ids.shape[0] not in (1, B):
            return self._on_grouped(ctx, args, kwargs)  # ids shared by all rows, not per row
        if self._table is not None:
            out = self._triton_forward(ids, ctx)
            if out is not None:
                return out
        if ids.shape[0] != B:  # (1, L) positions: the same for every row, each row's table
            ids = ids.expand(B, *ids.shape[1:])
        out = F.embedding(ids, self.base.weight, self.base.padding_idx)
        for slot, rows in ctx.groups:
            if slot == BASE_SLOT:
                continue
            d = ctx.tenants[slot].layers.get(self.name, {}).get("weight")
            if d is not None:
                out[rows] = self._add_delta(out[rows], ids[rows], d)
        return out

    def _one(self, t, d, ctx, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and "weight" in d:
            ids = args[0]
            return self._add_delta(F.embedding(ids, self.base.weight, self.base.padding_idx), ids, d["weight"])
        return super()._one(t, d, ctx, args, kwargs)

    def _triton_forward(self, ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """Every batch row's lookup in one Triton launch, each row reading its group's table row
        (:func:`.triton_kernel.launch_embedding`); None where the kernel does not apply (ids not
        per batch row, a tenant with a dense table here)."""
        B = ctx.batch_size
        if ids.dim() < 1 or ids.shape[0] not in (1, B) or ids.is_floating_point():
            return None
        rows = self._triton_rows(ctx)
        table = self._table
        table.sync()
        if table.dense_rows and not table.dense_rows.isdisjoint(rows):
            return None
        trow = ctx.plans.get("rows_per_batch_row")
        if trow is None:
            per_row = [r for r, (_, sl) in zip(rows, ctx.groups) for _ in range(sl.stop - sl.start)]
            trow = ctx.plans["rows_per_batch_row"] = self._rt.triton.metadata_tensor(per_row, ids.device, torch.int32)
        if ids.shape[0] != B:
            ids = ids.expand(B, *ids.shape[1:])
        return self._rt.triton.launch_embedding(ids, table.weight, table.table, trow)

    def _add_delta(self, out: torch.Tensor, ids: torch.Tensor, d: ParamDelta) -> torch.Tensor:
        m = self.base
        if d.kind == "dense":
            return F.embedding(ids, d.dense, m.padding_idx)
        scale = d.sign.scale
        if d.index is not None:  # stored rows only: find each id's position, 0 scale if absent
            if not d.index.numel():
                return out
            pos = torch.searchsorted(d.index, ids.contiguous()).clamp_(max=d.index.numel() - 1)
            scale = torch.where(d.index[pos] == ids, scale[pos], 0)
            ids = pos
        else:
            scale = scale[ids]
        signs = unpack_sign_rows(d.sign.signs, m.embedding_dim, ids, out.dtype)
        return torch.addcmul(out, signs, scale.unsqueeze(-1))


def wrap(name: str, module: nn.Module, rt: _Runtime) -> TenantLayer:
    """The wrapper for one parameter-bearing module, chosen by its exact type."""
    cls = _WRAPPERS.get(type(module), TenantLayer)
    return cls(name, module, rt)


_WRAPPERS: dict[type, type[TenantLayer]] = {nn.Linear: LinearLayer, nn.Embedding: EmbeddingLayer}
if Conv1D is not None:
    _WRAPPERS[Conv1D] = LinearLayer


class GroupSplit(nn.Module):
    """Runs a (parameter-free) module once per tenant group, the running context narrowed to
    that group: for modules whose code combines per-tenant values read outside a layer's
    ``forward`` with per-row data (DeBERTa's disentangled attention). Chosen by the start-up
    self-check; everything outside such modules still runs once for the whole batch."""

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__()
        self.name = name
        self.base = base
        self._rt = rt

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is None or len(ctx.groups) == 1:
            return self.base(*args, **kwargs)
        return _run_per_group(self.base, self._rt, ctx, args, kwargs)


def _run_per_group(fn, rt: _Runtime, ctx: BatchContext, args, kwargs):
    B = ctx.batch_size
    outs = []
    for g, (_, rows) in enumerate(ctx.groups):
        sub_args = tuple(_part(_take_rows(a, rows, B), g) for a in args)
        sub_kwargs = {k: _part(_take_rows(v, rows, B), g) for k, v in kwargs.items()}
        rt.ctx = ctx.narrow(g)
        try:
            outs.append((rows, fn(*sub_args, **sub_kwargs)))
        finally:
            rt.ctx = ctx
    return _scatter_rows(outs, B)


def _take_rows(a, rows: slice, B: int):
    if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == B:
        return a[rows]
    return a


def _scatter_rows(outs: list[tuple[slice, Any]], B: int):
    """Concatenate the groups' outputs (groups are consecutive slices), padding the last dim
    to the widest (heads of different ``num_labels``)."""
    first = outs[0][1]
    if isinstance(first, GroupedValue):
        return GroupedValue([y.parts[0] for _, y in outs], first.key, first._rt)
    if isinstance(first, dict):
        return type(first)(**{k: _scatter_rows([(r, y[k]) for r, y in outs], B) for k in first.keys()})
    if isinstance(first, (tuple, list)):
        return type(first)(_scatter_rows([(r, y[i]) for r, y in outs], B) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        return first
    ys = [y for _, y in outs]
    if first.dim() >= 2:
        width = max(y.shape[-1] for y in ys)
        ys = [y if y.shape[-1] == width else F.pad(y, (0, width - y.shape[-1])) for y in ys]
    return torch.cat(ys, dim=0)


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
