"""One base model + a pool of packed 1-bit deltas -> one batched forward for mixed fine-tunes.

How a batch runs
----------------
Every row of a batch names a tenant (a registered delta) or the base. Before the forward the
engine computes *groups*: ``(slot, row_indices)`` per tenant present. Every parameter-bearing
module of the base model is wrapped once (:class:`TenantLayer`, its class chosen by the module's
exact type); in the forward a wrapper

* returns the plain base output when the whole batch is base-only,
* for embeddings, gathers ``E_base[ids] + α[ids] ⊙ sign(Δ)[ids]`` straight from the packed
  signs (only the bytes of the looked-up rows are touched, the table is never unpacked),
* for every other layer type, runs each group with that tenant's *working weights*:
  ``W_t = W_base + α ⊙ sign(Δ_t)`` for 1-bit tensors, the tenant's own dense tensors (biases,
  norms, heads), the base tensor otherwise. Layer types are handled by a registry of
  functional kernels (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.LayerNorm``) with a generic
  ``torch.func.functional_call`` fallback for any other module.
* on CPU in float32, where the optional compiled kernel builds (:mod:`.cpu_kernel`), the 1-bit
  Linear/Conv1D weights of all tenant groups of a layer run in one fused call instead: per tile
  of output features each group's merged rows are rebuilt from the packed bits in cache and
  multiplied right away, so no ``W_t`` is ever materialised and the base weight is read once
  per layer, not once per tenant (same values as the merged path; faster than even cached
  merged weights on the 2-core benchmark machine).
* on CUDA with the optional Triton kernels (:mod:`.triton_kernel`), every Linear/Conv1D and
  embedding runs all groups of the batch in one launch: the base product plus each group's
  ``α ⊙ sign(Δ)`` unpacked from the packed bits in the kernel, no merged weight on the device
  (``triton_kernel=False`` or ``BITDELTA_TRITON=0``: the stacked ``baddbmm`` path instead).

Everything that is not a parameterised module (attention, activations, pooling) runs once for
the whole batch. Heads may differ per tenant (``num_labels``, label names, problem type): the
logits are padded to the widest head in the batch and cut per row afterwards. A batch of one
tenant alone takes a fast path decided once per batch (each layer runs that tenant's weights,
cached merged weights where the cache admits the tenant).

Parameters read outside a module's ``forward`` (DeBERTa's relative-position table): reading a
wrapped layer's parameter gives the running batch's value, in a mixed batch a
:class:`GroupedValue` (one part per tenant group) that layers and tensor operations apply part
by part; a module whose code combines it with per-row data runs once per group
(:class:`GroupSplit`). The start-up self-check finds those modules and picks the engine's
``path``: ``"mixed"``, or ``"fallback"`` (one forward per tenant group) where no set of such
modules makes a mixed batch exact.

Memory tiers
------------
* pool: per tenant the packed signs (1 bit/weight), scales and dense tensors; always resident.
* working-weight cache: merged ``W_t`` tensors of hot tenants, bounded by ``cache_bytes``. A
  tenant is admitted whole (all its layers) or not at all, so a cyclic sweep over layers cannot
  thrash it, and only in place of tenants that served fewer rows recently (frequency-aware
  admission, see :class:`WorkingCache`); tenants that are not admitted are merged layer by
  layer on the fly (transient memory only) — correct, just slower. With the fused CPU kernel
  only tenants with a large group in the batch (``fused_max_tokens``) are admitted and run on
  merged weights; small groups run fused and never touch the cache.

Thread safety: pool mutations and forwards are serialised by one lock; validation of a new
artifact (the slow part of a registration) runs outside it, so a registration never blocks
serving for long, and a failed registration leaves the pool untouched.
"""

from .cache import DerivedCache, WorkingCache
from .context import BatchContext, GroupedValue, NeedsSplitError, _Runtime  # noqa: F401 - _Runtime for tests
from .engine import FUSED_MAX_TOKENS, MultiTenantEngine
from .kernels import Kernel, _generic_kernel, _kernel_for, register_kernel  # noqa: F401 - private names for tests
from .layers import EmbeddingLayer, GroupSplit, LinearLayer, TenantLayer, wrap
from .tenants import BASE_SLOT, ParamDelta, Prediction, Tenant, TenantInfo, merged_weight

__all__ = [
    "BASE_SLOT", "FUSED_MAX_TOKENS", "BatchContext", "DerivedCache", "EmbeddingLayer", "GroupSplit",
    "GroupedValue", "Kernel", "LinearLayer", "MultiTenantEngine", "NeedsSplitError", "ParamDelta",
    "Prediction", "Tenant", "TenantInfo", "TenantLayer", "WorkingCache", "merged_weight",
    "register_kernel", "wrap",
]
