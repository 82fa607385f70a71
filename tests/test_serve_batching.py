"""serve.batching without Ray: limits (rows, padded tokens, wait), order, per-request errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.batching import BatchItem, MicroBatcher


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


class Recorder:
    def __init__(self, fail_model=None, delay=0.0):
        self.batches: list[list[str]] = []
        self.fail_model = fail_model
        self.delay = delay
        self.threads = set()

    def __call__(self, items):
        import time

        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.batches.append([f"{it.model}:{it.inputs[0]}" for it in items])
        return [ValueError(f"bad {it.model}") if it.model == self.fail_model else [x.upper() for x in it.inputs]
                for it in items]


def _item(model, text, rows=1, tokens=4):
    return BatchItem(model, [text] * rows, [tokens] * rows)


async def _submit_all(b, items, stagger=0.0):
    async def one(i, it):
        await asyncio.sleep(stagger * i)
        return await b.submit(it)

    return await asyncio.gather(*(one(i, it) for i, it in enumerate(items)), return_exceptions=True)


def test_concurrent_requests_share_a_batch_and_results_route_back():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000, max_wait_s=0.05)
    items = [_item(f"m{i % 3}", f"t{i}") for i in range(10)]
    out = _run(_submit_all(b, items))
    assert out == [[f"T{i}"] for i in range(10)]
    assert len(rec.batches) < 10  # batched
    assert sorted(x for batch in rec.batches for x in batch) == sorted(f"m{i % 3}:t{i}" for i in range(10))
    assert "MainThread" not in rec.threads  # the forward runs off the event loop


@pytest.mark.parametrize("max_rows,max_tokens,rows,tokens", [(4, 10_000, 1, 4), (64, 24, 2, 4), (3, 10_000, 2, 4)],
                         ids=["rows", "padded-tokens", "multi-row-requests"])
def test_limits_respected_and_order_kept(max_rows, max_tokens, rows, tokens):
    rec = Recorder(delay=0.01)
    b = MicroBatcher(rec, max_batch_size=max_rows, max_batch_tokens=max_tokens, max_wait_s=0.05)
    items = [_item("m", f"t{i}", rows=rows, tokens=tokens) for i in range(9)]
    out = _run(_submit_all(b, items))
    assert out == [[f"T{i}"] * rows for i in range(9)]
    for batch in rec.batches:
        n = len(batch) * rows
        assert n <= max(max_rows, rows) and n * tokens <= max(max_tokens, rows * tokens)
    flat = [x for batch in rec.batches for x in batch]
    assert flat == [f"m:t{i}" for i in range(9)]  # FIFO, the carried-over request starts the next batch


def test_oversized_request_runs_alone():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=4, max_batch_tokens=16, max_wait_s=0.05)
    big = _item("m", "big", rows=8, tokens=8)  # 64 padded tokens > budget, 8 rows > max
    out = _run(_submit_all(b, [_item("m", "a"), big, _item("m", "b")]))
    assert out[1] == ["BIG"] * 8
    assert ["m:big"] in rec.batches


def test_errors_are_delivered_per_request():
    rec = Recorder(fail_model="bad")
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000, max_wait_s=0.05)
    out = _run(_submit_all(b, [_item("ok", "a"), _item("bad", "b"), _item("ok", "c")]))
    assert out[0] == ["A"] and out[2] == ["C"]
    assert isinstance(out[1], ValueError) and "bad" in str(out[1])


def test_crashing_batch_function_fails_its_requests_only():
    calls = []

    def run(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [[x.upper() for x in it.inputs] for it in items]

    b = MicroBatcher(run, max_batch_size=64, max_batch_tokens=10_000, max_wait_s=0.0)

    async def go():
        first = await asyncio.gather(b.submit(_item("m", "a")), return_exceptions=True)
        second = await b.submit(_item("m", "b"))  # the worker survived the crash
        return first, second

    first, second = _run(go())
    assert isinstance(first[0], RuntimeError) and second == ["B"]


def test_stats_callback():
    seen = []
    b = MicroBatcher(Recorder(), max_batch_size=64, max_batch_tokens=10_000, max_wait_s=0.05, on_batch=seen.append)
    _run(_submit_all(b, [_item("x", "a", rows=2, tokens=3), _item("y", "b", rows=1, tokens=7)]))
    assert sum(s.rows for s in seen) == 3 and sum(s.requests for s in seen) == 2
    if len(seen) == 1:
        assert seen[0].models == 2 and seen[0].padded_tokens == 3 * 7


# ---- continuous batching: no fixed wait, batched tokenization --------------------------------
def test_a_request_at_an_idle_engine_runs_at_once():
    import time

    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000)  # max_wait_s = 0

    async def go():
        t0 = time.perf_counter()
        out = await b.submit(_item("m", "a"))
        return out, time.perf_counter() - t0

    out, took = _run(go())
    assert out == ["A"] and took < 0.5


def test_requests_arriving_during_a_forward_form_the_next_batch():
    rec = Recorder(delay=0.2)
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000)

    async def go():
        first = asyncio.ensure_future(b.submit(_item("m", "first")))
        await asyncio.sleep(0.05)  # the first forward is running now
        rest = [asyncio.ensure_future(b.submit(_item("m", f"t{i}"))) for i in range(5)]
        return await asyncio.gather(first, *rest)

    out = _run(go())
    assert out[0] == ["FIRST"] and out[1:] == [[f"T{i}"] for i in range(5)]
    assert rec.batches == [["m:first"], [f"m:t{i}" for i in range(5)]]


def test_new_requests_are_tokenized_in_one_call_per_round_and_errors_stay_per_request():
    calls = []

    def encode(items):
        calls.append([it.inputs[0] for it in items])
        for it in items:
            if it.inputs[0] == "bad":
                it.error = ValueError("cannot tokenize 'bad'")
            else:
                it.tokens = [len(x) for x in it.inputs]

    rec = Recorder(delay=0.1)
    b = MicroBatcher(rec, encode=encode, max_batch_size=64, max_batch_tokens=10_000)

    async def go():
        first = asyncio.ensure_future(b.submit(BatchItem("m", ["first"])))
        await asyncio.sleep(0.03)
        rest = [asyncio.ensure_future(b.submit(BatchItem("m", [t]))) for t in ("x", "bad", "y")]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    out = _run(go())
    assert out[0] == ["FIRST"] and out[1] == ["X"] and out[3] == ["Y"]
    assert isinstance(out[2], ValueError) and "bad" in str(out[2])
    assert calls == [["first"], ["x", "bad", "y"]]  # one call per round, every new request in it
    assert rec.batches == [["m:first"], ["m:x", "m:y"]]


def test_items_over_the_token_budget_are_carried_over_in_order_after_encoding():
    def encode(items):
        for it in items:
            it.tokens = [10] * it.rows

    rec = Recorder(delay=0.05)
    b = MicroBatcher(rec, encode=encode, max_batch_size=64, max_batch_tokens=30)  # 3 rows of 10 tokens

    async def go():
        first = asyncio.ensure_future(b.submit(BatchItem("m", ["first"])))
        await asyncio.sleep(0.02)
        rest = [asyncio.ensure_future(b.submit(BatchItem("m", [f"t{i}"]))) for i in range(7)]
        return await asyncio.gather(first, *rest)

    out = _run(go())
    assert out == [["FIRST"]] + [[f"T{i}"] for i in range(7)]
    assert [x for batch in rec.batches for x in batch] == ["m:first"] + [f"m:t{i}" for i in range(7)]
    assert all(len(batch) <= 3 for batch in rec.batches)


def _closed_loop(b, clients: int, requests: int, think_s: float, late: set[int], late_s: float):
    """``clients`` loops of ``requests`` requests each, the next one ``think_s`` after an answer;
    clients in ``late`` start ``late_s`` late (during the first forward)."""
    async def client(c):
        if c in late:
            await asyncio.sleep(late_s)
        for k in range(requests):
            await b.submit(_item("m", f"c{c}r{k}"))
            await asyncio.sleep(think_s)

    async def go():
        await asyncio.gather(*(client(c) for c in range(clients)))

    _run(go())


@pytest.mark.parametrize("refill_s", [0.0, 0.15], ids=["no-refill", "refill"])
def test_refill_keeps_batches_whole_under_a_closed_loop(refill_s):
    """Eight clients that answer within a few ms, half of them one forward late: without the
    refill hold the two halves alternate in batches of 4 for good; with it the answered clients
    are waited for and every later batch holds all eight."""
    rec = Recorder(delay=0.05)
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000, refill_wait_s=refill_s)
    _closed_loop(b, clients=8, requests=5, think_s=0.005, late={4, 5, 6, 7}, late_s=0.02)
    sizes = [len(x) for x in rec.batches]
    assert sum(sizes) == 40
    if refill_s:
        assert sizes[:2] == [4, 8] and set(sizes[1:-1]) == {8}, sizes  # the last round may be short
    else:
        assert max(sizes) == 4 and len(sizes) == 10, sizes


def test_refill_hold_is_bounded_and_a_late_client_runs_at_once():
    """A batch of two whose clients do not both come back: the next round waits at most the
    refill time; a request that reaches an idle engine after that runs at once."""
    import time

    rec = Recorder(delay=0.3)  # half a forward (0.15 s) is longer than the refill time: 0.1 s bounds the hold
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000, refill_wait_s=0.1)

    async def go():
        await asyncio.gather(b.submit(_item("m", "a")), b.submit(_item("m", "b")))  # one batch of two
        t0 = time.perf_counter()
        await b.submit(_item("m", "c"))  # only one client comes back: held for the second, <= 0.1 s
        held = time.perf_counter() - t0 - 0.3
        await asyncio.sleep(0.2)  # past the refill time: an idle engine
        t0 = time.perf_counter()
        await b.submit(_item("m", "d"))
        return held, time.perf_counter() - t0 - 0.3

    held, alone = _run(go())
    assert rec.batches == [["m:a", "m:b"], ["m:c"], ["m:d"]]
    assert 0.05 < held < 0.1 + 0.1, held  # waited (most of) the refill time, not more
    assert alone < 0.05, alone


def test_refill_hold_is_at_most_half_a_forward():
    """A fast forward holds the next round for at most half its run time, however long the
    refill time allows."""
    import time

    rec = Recorder(delay=0.04)
    b = MicroBatcher(rec, max_batch_size=64, max_batch_tokens=10_000, refill_wait_s=5.0)

    async def go():
        await asyncio.gather(b.submit(_item("m", "a")), b.submit(_item("m", "b")))
        t0 = time.perf_counter()
        await b.submit(_item("m", "c"))  # the second client never comes back
        return time.perf_counter() - t0 - 0.04

    held = _run(go())
    assert held < 0.02 + 0.05, held


def test_refill_hold_stops_when_answered_clients_do_not_come_back():
    """Open-loop traffic: every batch is followed by new requests that arrived during it, never
    by the clients it answered. The first holds run to their deadline; after two misses the
    batcher stops holding (the next round starts at once) until its next probe."""
    import time

    loop_box, marks, fired = {}, [], []

    def run_batch(items):
        marks.append(("start", time.perf_counter()))
        if len(fired) < 12:  # four new requests arrive during every forward
            fired.append(1)
            loop_box["loop"].call_soon_threadsafe(lambda: [loop_box["spawn"](f"r{len(fired)}x{i}") for i in range(4)])
        time.sleep(0.1)
        marks.append(("end", time.perf_counter()))
        return [[x.upper() for x in it.inputs] for it in items]

    b = MicroBatcher(run_batch, max_batch_size=64, max_batch_tokens=10_000, refill_wait_s=0.2)  # hold <= 0.05 s

    async def go():
        loop_box["loop"] = asyncio.get_running_loop()
        tasks = []
        loop_box["spawn"] = lambda text: tasks.append(asyncio.ensure_future(b.submit(_item("m", text))))
        await b.submit(_item("m", "first"))
        for _ in range(200):  # bounded: until every spawned request is answered
            await asyncio.sleep(0.05)
            if len(fired) == 12 and tasks and all(t.done() for t in tasks):
                break
        return [t.result() for t in tasks]

    out = _run(go())
    assert len(out) == 48
    starts = [t for k, t in marks if k == "start"]
    ends = [t for k, t in marks if k == "end"]
    gaps = [s - e for e, s in zip(ends, starts[1:])]
    assert len(gaps) >= 10, gaps
    assert all(g > 0.035 for g in gaps[:2]), gaps  # held to the deadline twice (nobody came back)
    assert all(g < 0.03 for g in gaps[2:10]), gaps  # then no hold until the probe (every 16th batch)
