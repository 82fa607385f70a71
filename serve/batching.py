"""Continuous batching of classification requests across fine-tunes.

Requests (each: one fine-tune name, a few inputs) wait in a queue. One worker task runs batches
back to back: the moment the engine is free it takes every request queued so far (oldest first)
and runs them as one batch, within the limits

* ``max_batch_size`` rows (inputs) in the forward,
* ``max_batch_tokens``: rows x longest row, i.e. the padded tokens the forward really computes.

A request that arrives at an idle engine runs at once, and requests that arrive while a batch
runs form the next one (so the batch size follows the load). One short hold keeps batches whole
under steady load (``refill_wait_s``): the clients a batch has just answered often send their next
request within a few milliseconds, and a round that starts without them splits the load into
two half batches that alternate from then on (at 8 clients, forwards of 4 rows: a small batch
costs much more per row than a full one on a CPU). So after a batch of R requests, the next
round waits for as many requests as were queued then plus R, until at most ``refill_wait_s``
or half that batch's run time (whichever is shorter: a fast forward waits little) after the
batch ended; a round whose first request comes later than that starts at once, so a lone
client never waits. Holding only pays when the answered clients do come back (a closed loop):
with open-loop traffic every hold runs to its deadline and delays the queue, so the batcher
keeps a moving score of how often at least half of them came back during a hold, stops holding
while that score is below one half, and tries again every ``REFILL_PROBE_EVERY``-th batch.

An optional ``max_wait_s`` holds any batch that is not full open for more requests; it only
pays when requests arrive in bursts shorter than one forward.

Tokenization is batched too: requests queue with their raw inputs, and the worker tokenizes
every new request of a round in one call (``encode``), in the same worker thread as the forward,
so the event loop never tokenizes and a request is tokenized once. A request that alone exceeds
a limit runs alone (the request limits admitted it). Requests that do not fit are carried over, in
order, to the next round. The batch runs through ``run_batch(items) -> list[result | BaseException]``;
exceptions, also those of ``encode``, are delivered per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)


@dataclass
class BatchItem:
    model: str
    inputs: list
    tokens: list[int] | None = None  # token count per input (after truncation), once encoded
    return_all_scores: bool = False
    truncate: bool = True
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    encodings: list | None = None  # the inputs' token ids (MultiTenantEngine.encode), once encoded
    error: BaseException | None = None  # set by ``encode`` when this request cannot be tokenized

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
    run_s: float  # tokenization of the round's new requests + the forward


Encoder = Callable[[list[BatchItem]], None]

# the refill hold after a batch is at most this share of that batch's run time
REFILL_SHARE = 0.5
# while holds do not pay (the answered clients do not come back), one batch in this many holds
REFILL_PROBE_EVERY = 16


class MicroBatcher:
    """``submit(item)`` and await the result; see the module docstring for the policy.

    ``encode(items)`` (optional) fills ``tokens``/``encodings`` of items that have none, or sets
    ``item.error``; it runs in the worker thread right before the forward. Items submitted with
    ``tokens`` already set skip it.
    """

    def __init__(self, run_batch: Callable[[list[BatchItem]], Sequence[Any]], *, max_batch_size: int,
                 max_batch_tokens: int, max_wait_s: float = 0.0, refill_wait_s: float = 0.0,
                 encode: Encoder | None = None, on_batch: Callable[[BatchStats], None] | None = None):
        self.run_batch = run_batch
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.refill_wait_s = refill_wait_s
        # after a batch: (until when, how many requests, how many it answered) the next round
        # waits for (refill_wait_s); a moving score of holds that got half their clients back
        self._refill: tuple[float, int, int] | None = None
        self._refill_score = 1.0
        self._since_hold = 0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[BatchItem] | None = None
        self._carry: deque[BatchItem] = deque()
        self._task: asyncio.Task | None = None

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._carry = deque()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="bitdelta-batcher")

    async def submit(self, item: BatchItem) -> Any:
        """Queue ``item`` and wait for its result (raises the exception its batch gave it)."""
        self._ensure_started()
        item.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(item)
        return await item.future

    # -- one round: take what is queued, tokenize the new requests, run what fits ----------------
    async def _take(self) -> list[BatchItem]:
        """The carried-over requests plus everything queued now (at least one request)."""
        if not self._carry:
            self._carry.append(await self._queue.get())
            if self.max_wait_s > 0:
                await self._hold(time.perf_counter() + self.max_wait_s)
        while True:
            try:
                self._carry.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        if self._refill is not None:
            deadline, want, answered = self._refill
            self._refill = None
            if time.perf_counter() < deadline:  # else the engine went idle: nothing was held
                await self._hold(deadline, want)
                back = len(self._carry) - (want - answered)  # requests beyond those queued at the end
                hit = back >= max(1.0, answered / 2)
                self._refill_score = 0.7 * self._refill_score + 0.3 * hit
        pending = [it for it in self._carry if not it.future.cancelled()]
        self._carry.clear()
        return pending

    async def _hold(self, deadline: float, want: int | None = None) -> None:
        """Take queued requests until ``deadline``, the batch is full, or (``want``) that many
        requests are held."""
        rows = sum(it.rows for it in self._carry)
        while rows < self.max_batch_size and (want is None or len(self._carry) < want):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            try:
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                return
            self._carry.append(item)
            rows += item.rows

    def _split(self, pending: list[BatchItem]) -> tuple[list[BatchItem], list[BatchItem]]:
        """(the batch, the rest): oldest first, stopping at the first request that does not fit."""
        batch: list[BatchItem] = []
        rows = longest = 0
        for i, it in enumerate(pending):
            r, lg = rows + it.rows, max(longest, it.longest)
            if batch and (r > self.max_batch_size or r * lg > self.max_batch_tokens):
                return batch, pending[i:]
            batch.append(it)
            rows, longest = r, lg
        return batch, []

    def _round(self, pending: list[BatchItem]) -> tuple[list[BatchItem], list[Any], list[BatchItem]]:
        """Worker thread: encode, choose the batch, run it -> (batch, results, carried over)."""
        new = [it for it in pending if it.tokens is None and it.error is None]
        if new and self.encode is not None:
            self.encode(new)
        failed = [it for it in pending if it.error is not None]
        ok = [it for it in pending if it.error is None]
        batch, rest = self._split(ok)
        results = list(self.run_batch(batch)) if batch else []
        return failed + batch, [it.error for it in failed] + results, rest

    async def _loop(self) -> None:
        while True:
            pending = await self._take()
            if not pending:
                continue
            t0 = time.perf_counter()
            try:
                done, results, rest = await asyncio.to_thread(self._round, pending)
            except BaseException as e:  # noqa: BLE001 - delivered to every waiter
                for item in pending:
                    if not item.future.done():
                        item.future.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            end = time.perf_counter()
            run_s = end - t0
            self._carry.extendleft(reversed(rest))
            if self.refill_wait_s > 0 and done:
                if self._refill_score >= 0.5 or self._since_hold >= REFILL_PROBE_EVERY:
                    hold = min(self.refill_wait_s, REFILL_SHARE * run_s)
                    self._refill = (end + hold, len(self._carry) + self._queue.qsize() + len(done), len(done))
                    self._since_hold = 0
                else:
                    self._since_hold += 1
            for item, res in zip(done, results):
                if item.future.done():
                    continue
                if isinstance(res, BaseException):
                    item.future.set_exception(res)
                else:
                    item.future.set_result(res)
            ran = [it for it in done if it.error is None]
            if self.on_batch is not None and ran:
                rows = sum(b.rows for b in ran)
                try:
                    self.on_batch(BatchStats(
                        rows=rows, requests=len(ran), models=len({b.model for b in ran}),
                        padded_tokens=rows * max(b.longest for b in ran),
                        wait_s=t0 - min(b.enqueued for b in ran), run_s=run_s))
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    logger.exception("batch metrics callback failed")


__all__ = ["MicroBatcher", "BatchItem", "BatchStats"]
