"""The two tenant-keyed caches: merged working weights (whole tenants) and derived constants."""

from __future__ import annotations

from collections import OrderedDict

import torch


class WorkingCache:
    """Merged working weights of whole tenants, bounded by ``budget`` bytes.

    Admission is frequency-aware (TinyLFU-like): the cache counts the rows each tenant served
    (halving all counts every ``window`` rows, so popularity can shift), and a tenant that does
    not fit in the free space only evicts tenants that served fewer rows. Under a popularity
    skew the hot tenants therefore stay resident while the long tail streams through merged on
    the fly; a plain LRU would let every batch's tail evict them.
    """

    def __init__(self, budget: int, window: int = 4096):
        self.budget = int(budget)
        self.window = int(window)
        self._entries: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._reserved: dict[int, int] = {}
        self._freq: dict[int, float] = {}
        self._seen = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejections = 0

    @property
    def used(self) -> int:
        return sum(self._reserved.values())

    def resident(self, slot: int) -> int:
        return sum(t.numel() * t.element_size() for t in self._entries.get(slot, {}).values())

    def record(self, rows: dict[int, int]) -> None:
        """Count one batch: ``rows[slot]`` rows served by each tenant."""
        for slot, n in rows.items():
            self._freq[slot] = self._freq.get(slot, 0.0) + n
        self._seen += sum(rows.values())
        if self._seen >= self.window:
            self._seen //= 2
            self._freq = {k: v / 2 for k, v in self._freq.items() if v >= 1 or k in self._entries}

    def admit(self, slot: int, size: int, pinned: set[int]) -> bool:
        """Reserve ``size`` bytes for ``slot``, evicting only tenants (not in ``pinned``) that
        served fewer rows; False when it does not fit (the caller merges on the fly)."""
        if slot in self._entries:
            self._entries.move_to_end(slot)
            return True
        if size > self.budget:
            return False
        free = self.budget - self.used
        if size > free:
            want = self._freq.get(slot, 0.0)
            # least frequent first, least recently used among equals (dict order is LRU order)
            order = {s: i for i, s in enumerate(self._entries)}
            victims, room = [], free
            for s in sorted((s for s in self._entries if s not in pinned),
                            key=lambda s: (self._freq.get(s, 0.0), order[s])):
                if room >= size or self._freq.get(s, 0.0) >= want:
                    break
                victims.append(s)
                room += self._reserved[s]
            if room < size:
                self.rejections += 1
                return False
            for v in victims:
                self.drop(v)
                self.evictions += 1
        self._entries[slot] = {}
        self._reserved[slot] = size
        return True

    def get(self, slot: int, key: str) -> torch.Tensor | None:
        d = self._entries.get(slot)
        t = d.get(key) if d is not None else None
        if t is None:
            self.misses += 1
        else:
            self.hits += 1
        return t

    def put(self, slot: int, key: str, t: torch.Tensor) -> None:
        d = self._entries.get(slot)
        if d is not None:
            d[key] = t

    def drop(self, slot: int) -> None:
        self._entries.pop(slot, None)
        self._reserved.pop(slot, None)


class DerivedCache:
    """Tensors computed from one tenant's parameters alone (no request data), by key:
    e.g. DeBERTa's relative-position embeddings after each attention layer's projections.
    They are the same on every forward, so a mixed batch computes them once per tenant
    instead of once per tenant per batch. LRU bounded by ``budget`` bytes; dropped with the
    tenant."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self._d: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def get(self, slot: int, key: str) -> torch.Tensor | None:
        t = self._d.get((slot, key))
        if t is not None:
            self._d.move_to_end((slot, key))
        return t

    def put(self, slot: int, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if n > self.budget or (slot, key) in self._d:
            return
        while self.used + n > self.budget and self._d:
            _, old = self._d.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self._d[(slot, key)] = t
        self.used += n

    def drop(self, slot: int) -> None:
        for k in [k for k in self._d if k[0] == slot]:
            t = self._d.pop(k)
            self.used -= t.numel() * t.element_size()
