"""The two backends mean the same thing: where a stage is recorded when work moves between asyncio
tasks, threads, ``bind()`` and generators.

Both backends run in this one process: each test builds a Ring, a KeyRegistry and a Runtime of
the backend under test and drives them through the same code that ``track_inference`` uses. The
rule is the contextvars one: a task, or a copied context, belongs to what was open when it was
created (copied), whatever its creator does afterwards; a thread belongs to nothing unless bound.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from inferscope import tracking
from inferscope._keys import KeyRegistry
from inferscope._records import empty_records

from .conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    impl = request.param
    registry = KeyRegistry()
    return impl.Runtime(impl.Ring(1024), registry), registry


def recorded(runtime, registry):
    """The (model, stage path) of every record, in the order they were recorded."""
    buf = empty_records(1024)
    n = runtime.ring.drain(buf)
    return [(registry.info(int(k)).model, registry.info(int(k)).stage) for k in buf[:n]["key"]]


def inference(runtime, registry, func, model="m"):
    """``func`` tracked as a coroutine inference of ``model``, as @track_inference does it."""
    return tracking._track_coroutine(func, registry.inference_key(model), runtime)


# -- asyncio tasks ------------------------------------------------------------------------------


def test_a_task_belongs_to_the_stage_open_when_it_was_created(backend):
    rt, reg = backend

    async def child():
        with rt.stage("x"):
            await asyncio.sleep(0)

    async def body():
        with rt.stage("preprocess"):
            task = asyncio.ensure_future(child())
        with rt.stage("infer"):
            await task

    asyncio.run(inference(rt, reg, body)())
    assert sorted(recorded(rt, reg), key=str) == sorted(
        [("m", "preprocess/x"), ("m", "preprocess"), ("m", "infer"), ("m", None)], key=str
    )


def test_a_task_that_outlives_its_inference_still_belongs_to_it(backend):
    rt, reg = backend
    started = []

    async def child():
        await asyncio.sleep(0)  # the inference returns before the first stage opens
        with rt.stage("late"):
            started.append(1)

    async def body():
        with rt.stage("spawn"):
            return asyncio.ensure_future(child())

    async def main():
        task = await inference(rt, reg, body)()
        await task

    asyncio.run(main())
    assert started == [1]
    assert recorded(rt, reg) == [("m", "spawn"), ("m", None), ("m", "spawn/late")]


def test_a_task_created_outside_any_inference_belongs_to_none(backend):
    rt, reg = backend

    async def child():
        with rt.stage("x"):
            pass

    async def body(task_holder):
        await task_holder[0]

    async def main():
        holder = [asyncio.ensure_future(child())]
        await inference(rt, reg, body)(holder)

    asyncio.run(main())
    assert sorted(recorded(rt, reg), key=str) == sorted([(None, "x"), ("m", None)], key=str)


def test_tasks_of_tasks_and_gather_nest_by_creation(backend):
    rt, reg = backend

    async def leaf(name):
        with rt.stage(name):
            await asyncio.sleep(0)

    async def branch():
        with rt.stage("branch"):
            inner = asyncio.ensure_future(leaf("inner"))
        await inner

    async def body():
        with rt.stage("fan"):
            await asyncio.gather(branch(), leaf("direct"))

    asyncio.run(inference(rt, reg, body)())
    assert sorted(recorded(rt, reg), key=str) == sorted(
        [
            ("m", "fan/branch/inner"),
            ("m", "fan/branch"),
            ("m", "fan/direct"),
            ("m", "fan"),
            ("m", None),
        ],
        key=str,
    )


# -- threads and bind() -------------------------------------------------------------------------


def test_a_plain_thread_belongs_to_no_inference(backend):
    rt, reg = backend

    def work():
        with rt.stage("worker"):
            pass

    owner = object()
    rt.enter(owner, reg.inference_key("m"))
    with rt.stage("infer"):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(10)
    rt.exit(owner, None)
    assert sorted(recorded(rt, reg), key=str) == sorted(
        [(None, "worker"), ("m", "infer"), ("m", None)], key=str
    )


def test_a_copied_context_run_in_a_thread_belongs_to_what_was_open_at_the_copy(backend):
    rt, reg = backend
    owner = object()
    rt.enter(owner, reg.inference_key("m"))
    with rt.stage("copied"):
        ctx = contextvars.copy_context()
    with rt.stage("later"):
        pass
    rt.exit(owner, None)

    def work():
        with rt.stage("worker"):
            pass

    thread = threading.Thread(target=ctx.run, args=(work,))
    thread.start()
    thread.join(10)
    assert recorded(rt, reg) == [("m", "copied"), ("m", "later"), ("m", None), ("m", "copied/worker")]


def test_bind_carries_the_stage_open_when_bound_into_pool_threads(backend):
    rt, reg = backend

    def shard(i):
        with rt.stage("shard"):
            return i * 2

    owner = object()
    rt.enter(owner, reg.inference_key("m"))
    with ThreadPoolExecutor(2) as pool:
        with rt.stage("infer"):
            bound = tracking._bind(rt, shard)
            results = list(pool.map(bound, range(3)))
        after = pool.submit(bound, 5).result(10)  # the stage has closed: still where it was bound
    rt.exit(owner, None)
    assert results == [0, 2, 4] and after == 10
    assert sorted(recorded(rt, reg), key=str) == sorted(
        [("m", "infer/shard")] * 4 + [("m", "infer"), ("m", None)], key=str
    )


# -- generators ---------------------------------------------------------------------------------


def test_a_plain_generator_runs_in_its_consumer_context(backend):
    rt, reg = backend

    def items():
        for i in range(2):
            with rt.stage("produce"):
                pass
            yield i

    owner = object()
    rt.enter(owner, reg.inference_key("m"))
    gen = items()
    with rt.stage("first"):
        next(gen)
    with rt.stage("second"):
        next(gen)
    rt.exit(owner, None)
    assert recorded(rt, reg) == [
        ("m", "first/produce"),
        ("m", "first"),
        ("m", "second/produce"),
        ("m", "second"),
        ("m", None),
    ]


def test_a_tracked_generator_consumed_in_tasks_and_threads_keeps_its_stages(backend):
    rt, reg = backend

    def items():
        for name in ("a", "b", "c"):
            with rt.stage(name):
                yield name

    gen = tracking._track_generator(items, reg.inference_key("gen"), rt)()

    async def consume_one():
        with rt.stage("consumer"):
            return next(gen)

    async def main():
        first = await asyncio.ensure_future(consume_one())
        second = next(gen)
        return first, second

    assert asyncio.run(main()) == ("a", "b")
    thread_items = []
    thread = threading.Thread(target=lambda: thread_items.extend(gen))
    thread.start()
    thread.join(10)
    assert thread_items == ["c"]
    # A stage the generator yielded inside closes when the generator resumes and leaves it.
    assert recorded(rt, reg) == [
        (None, "consumer"),
        ("gen", "a"),
        ("gen", "b"),
        ("gen", "c"),
        ("gen", None),
    ]
