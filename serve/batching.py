"""Dynamic batching of classification requests across fine-tunes.

Requests (each: one fine-tune name, a few inputs) wait in a queue; a single worker task takes the
first one, then keeps adding requests until one of the limits would be exceeded:

* ``max_batch_size`` rows (inputs) in the forward,
* ``max_batch_tokens``: rows x longest row, i.e. the padded tokens the forward really computes,
* ``max_wait_s`` after the first request was taken.

A request that alone exceeds a limit runs alone (it was already admitted by the request limits).
The request that does not fit is carried over as the first of the next batch, so order is kept.
The batch runs in a worker thread (the event loop keeps accepting requests meanwhile) through
``run_batch(items) -> list[result | BaseException]``; exceptions are delivered per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)


@dataclass
class BatchItem:
    model: str
    inputs: list
    tokens: list[int]  # token count per input (after truncation)
    return_all_scores: bool = False
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    encodings: list | None = None  # the inputs' token ids (MultiTenantEngine.encode), when known

    @property
    def rows(self) -> int:
        return len(self.inputs)

    @property
    def longest(self) -> int:
        return max(self.tokens) if self.tokens else 0


@dataclass(frozen=True)
class BatchStats:
    rows: int
    requests: int
    models: int
    padded_tokens: int
    wait_s: float  # queueing time of the oldest request
    run_s: float


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list[BatchItem]], Sequence[Any]], *, max_batch_size: int,
                 max_batch_tokens: int, max_wait_s: float,
                 on_batch: Callable[[BatchStats], None] | None = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[BatchItem] | None = None
        self._carry: BatchItem | None = None
        self._task: asyncio.Task | None = None

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._carry = None
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="bitdelta-batcher")

    async def submit(self, item: BatchItem) -> Any:
        """Queue ``item`` and wait for its result (raises the exception its batch gave it)."""
        self._ensure_started()
        item.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(item)
        return await item.future

    def _fits(self, rows: int, longest: int, item: BatchItem) -> bool:
        r = rows + item.rows
        return r <= self.max_batch_size and r * max(longest, item.longest) <= self.max_batch_tokens

    async def _collect(self) -> list[BatchItem]:
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch = [first]
        rows, longest = first.rows, first.longest
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            if not self._fits(rows, longest, item):
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
            longest = max(longest, item.longest)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            batch = [b for b in batch if not b.future.cancelled()]
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.run_batch, batch)
            except BaseException as e:  # noqa: BLE001 - delivered to every waiter
                results = [e] * len(batch)
                if isinstance(e, asyncio.CancelledError):
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(e)
                    raise
            run_s = time.perf_counter() - t0
            for item, res in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(res, BaseException):
                    item.future.set_exception(res)
                else:
                    item.future.set_result(res)
            if self.on_batch is not None:
                rows = sum(b.rows for b in batch)
                try:
                    self.on_batch(BatchStats(
                        rows=rows, requests=len(batch), models=len({b.model for b in batch}),
                        padded_tokens=rows * max(b.longest for b in batch),
                        wait_s=t0 - min(b.enqueued for b in batch), run_s=run_s))
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    logger.exception("batch metrics callback failed")


__all__ = ["MicroBatcher", "BatchItem", "BatchStats"]
