"""track_inference, stage and bind on every kind of callable and context, through the real pipeline.

The whole module runs on whichever backend this process selected; CI runs the suite twice, once
with INFERSCOPE_NO_EXTENSION=1.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import inferscope
from inferscope._runtime import RUNTIME


class ScoringError(Exception):
    pass


def qualified(exc_type: type[BaseException]) -> str:
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


# -- sync functions -----------------------------------------------------------------------------


def test_sync_call_is_counted_timed_and_transparent(snapshot_row):
    @inferscope.track_inference(model="clf", version="2")
    def predict(x: int, *, scale: int = 2) -> int:
        """Doubles."""
        time.sleep(0.002)
        return x * scale

    assert [predict(i, scale=3) for i in range(5)] == [0, 3, 6, 9, 12]
    assert predict.__name__ == "predict"
    assert predict.__doc__ == "Doubles."
    assert inspect.signature(predict) == inspect.signature(predict.__wrapped__)
    assert not inspect.iscoroutinefunction(predict)

    row = snapshot_row("clf")
    assert (row.count, row.errors, row.version) == (5, 0, "2")
    assert 0.002 <= row.p50 < 0.5
    assert row.max >= row.p99 >= row.p50


def test_bare_decorator_defaults_to_qualified_name(snapshot_row):
    @inferscope.track_inference
    def score():
        return 1

    score()
    score()
    assert snapshot_row(score.__qualname__).count == 2
    assert score.__qualname__ == "test_bare_decorator_defaults_to_qualified_name.<locals>.score"


def test_model_name_positionally_and_static_attributes():
    @inferscope.track_inference("ranker", version=7, attributes={"team": "search", "canary": True})
    def rank():
        return "ok"

    assert rank() == "ok"
    row = inferscope.snapshot().row("ranker")
    assert (row.count, row.version) == (1, "7")
    info = inferscope._runtime.REGISTRY.info(rank.inferscope_key)
    assert dict(info.attributes) == {"team": "search", "canary": "true"}


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"model": ""}, TypeError, "non-empty str"),
        ({"model": 3}, TypeError, "non-empty str"),
        ({"version": 1.5}, TypeError, "version"),
        ({"attributes": {"inferscope.model.name": "x"}}, ValueError, "set by inferscope"),
        ({"attributes": {"user": object()}}, TypeError, "'user'"),
        ({"attributes": ["a"]}, TypeError, "must map str to scalars"),
    ],
)
def test_bad_decorator_arguments_are_rejected_at_definition(kwargs, error, text):
    with pytest.raises(error, match=text):
        inferscope.track_inference(**kwargs)


def test_decorating_a_non_callable_is_a_clear_error():
    with pytest.raises(TypeError, match="decorates a callable"):
        inferscope.track_inference(model="m")(42)


def test_exceptions_propagate_unchanged_and_are_counted_by_type():
    raised = ScoringError("bad row")

    @inferscope.track_inference(model="fails")
    def predict(kind):
        if kind == "custom":
            raise raised
        if kind == "builtin":
            raise ValueError("nope")
        return kind

    with pytest.raises(ScoringError) as info:
        predict("custom")
    assert info.value is raised
    with pytest.raises(ValueError, match="nope"):
        predict("builtin")
    predict("fine")

    row = inferscope.snapshot().row("fails")
    assert (row.count, row.errors) == (3, 2)
    assert dict(row.error_types) == {qualified(ScoringError): 1, "ValueError": 1}


def test_recursion_counts_every_level():
    @inferscope.track_inference(model="fact")
    def fact(n):
        return 1 if n <= 1 else n * fact(n - 1)

    assert fact(6) == 720
    assert inferscope.snapshot().row("fact").count == 6


# -- methods ------------------------------------------------------------------------------------


def test_methods_staticmethods_and_classmethods_in_either_order():
    class Model:
        factor = 10

        def __init__(self, bias):
            self.bias = bias

        @inferscope.track_inference(model="method")
        def predict(self, x):
            return x + self.bias

        @inferscope.track_inference(model="static-outer")
        @staticmethod
        def s1(x):
            return x * 2

        @staticmethod
        @inferscope.track_inference(model="static-inner")
        def s2(x):
            return x * 3

        @inferscope.track_inference(model="class-outer")
        @classmethod
        def c1(cls, x):
            return x * cls.factor

        @classmethod
        @inferscope.track_inference(model="class-inner")
        def c2(cls, x):
            return x - cls.factor

    m = Model(5)
    assert m.predict(1) == 6
    assert Model.predict(m, 2) == 7
    assert (m.s1(2), Model.s1(2), m.s2(2), Model.s2(2)) == (4, 4, 6, 6)
    assert (m.c1(2), Model.c1(3), m.c2(20), Model.c2(30)) == (20, 30, 10, 20)
    snap = inferscope.snapshot()
    counts = {
        name: snap.row(name).count
        for name in ("method", "static-outer", "static-inner", "class-outer", "class-inner")
    }
    assert counts == {"method": 2, "static-outer": 2, "static-inner": 2, "class-outer": 2, "class-inner": 2}


def test_default_model_name_of_a_method_is_its_qualified_name():
    class Encoder:
        @inferscope.track_inference
        def encode(self):
            return "e"

    Encoder().encode()
    assert inferscope.snapshot().row(Encoder.encode.__qualname__).count == 1
    assert Encoder.encode.__qualname__.endswith("Encoder.encode")


# -- async --------------------------------------------------------------------------------------


def test_async_function_times_the_awaited_call():
    @inferscope.track_inference(model="async")
    async def predict(x):
        await asyncio.sleep(0.02)
        return x + 1

    assert inspect.iscoroutinefunction(predict)
    coro = predict(1)
    time.sleep(0.05)  # creating the coroutine must not start the clock
    started = time.perf_counter()
    assert asyncio.run(coro) == 2
    elapsed = time.perf_counter() - started
    row = inferscope.snapshot().row("async")
    assert row.count == 1
    # Within the run, whatever a busy machine adds to it (quantiles are within 0.55%).
    assert 0.02 * 0.994 <= row.p50 <= elapsed * 1.006


def test_async_exception_and_cancellation_are_counted():
    @inferscope.track_inference(model="async-fail")
    async def predict(kind):
        if kind == "raise":
            raise ScoringError("x")
        await asyncio.sleep(10)

    async def main():
        with pytest.raises(ScoringError):
            await predict("raise")
        task = asyncio.create_task(predict("hang"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    row = inferscope.snapshot().row("async-fail")
    assert (row.count, row.errors) == (2, 2)
    assert dict(row.error_types) == {qualified(ScoringError): 1, qualified(asyncio.CancelledError): 1}


def test_concurrent_tasks_keep_their_own_stages():
    @inferscope.track_inference(model="fanout")
    async def handle(i):
        with inferscope.stage("infer"):
            await asyncio.sleep(0.001 * (i % 3))
            with inferscope.stage("decode"):
                await asyncio.sleep(0.001)
        return i

    async def main():
        return await asyncio.gather(*(handle(i) for i in range(50)))

    assert asyncio.run(main()) == list(range(50))
    snap = inferscope.snapshot()
    assert snap.row("fanout").count == 50
    assert snap.row("fanout", "infer").count == 50
    assert snap.row("fanout", "infer/decode").count == 50
    assert [r.stage for r in snap.rows if r.model == "fanout"] == [None, "infer", "infer/decode"]


def test_tasks_created_inside_a_stage_attribute_to_it():
    async def shard(n):
        with inferscope.stage("shard"):
            await asyncio.sleep(0)
            return n

    @inferscope.track_inference(model="parent")
    async def predict():
        with inferscope.stage("infer"):
            return sum(await asyncio.gather(*(asyncio.create_task(shard(n)) for n in range(4))))

    assert asyncio.run(predict()) == 6
    snap = inferscope.snapshot()
    assert snap.row("parent", "infer/shard").count == 4
    assert snap.row("parent", "infer").count == 1


# -- generators ---------------------------------------------------------------------------------


def test_generator_is_timed_until_exhaustion_and_stages_nest():
    @inferscope.track_inference(model="stream")
    def tokens(n):
        for i in range(n):
            with inferscope.stage("decode"):
                time.sleep(0.001)
            yield i
        return "done"

    assert inspect.isgeneratorfunction(tokens.__wrapped__)
    consumed = []
    for token in tokens(5):
        with inferscope.stage("send"):  # the consumer's own work between tokens
            consumed.append(token)
    assert consumed == [0, 1, 2, 3, 4]

    gen = tokens(2)
    assert list(gen) == [0, 1]
    snap = inferscope.snapshot()
    row = snap.row("stream")
    assert (row.count, row.abandoned, row.errors) == (2, 0, 0)
    assert snap.row("stream", "decode").count == 7
    assert snap.row(None, "send").count == 5  # never nested under the generator
    assert row.p50 >= 0.002


def test_generator_return_value_send_and_throw_pass_through():
    @inferscope.track_inference(model="coroutine-gen")
    def echo():
        received = yield "ready"
        while True:
            try:
                received = yield f"got {received}"
            except KeyError:
                received = "recovered"

    gen = echo()
    assert next(gen) == "ready"
    assert gen.send(1) == "got 1"
    assert gen.throw(KeyError("k")) == "got recovered"
    gen.close()
    row = inferscope.snapshot().row("coroutine-gen")
    assert (row.count, row.abandoned) == (1, 1)


def test_abandoned_generator_is_counted():
    @inferscope.track_inference(model="abandon")
    def stream():
        with inferscope.stage("decode"):
            yield from range(100)

    for i in stream():
        if i == 3:
            break
    row = inferscope.snapshot().row("abandon")
    assert (row.count, row.abandoned, row.errors) == (1, 1, 0)


def test_generator_yielding_inside_a_stage_does_not_capture_the_consumer():
    @inferscope.track_inference(model="gen-stage")
    def stream():
        with inferscope.stage("decode"):
            yield 1
            yield 2

    @inferscope.track_inference(model="consumer")
    def consume():
        total = 0
        for item in stream():
            with inferscope.stage("post"):
                total += item
        return total

    assert consume() == 3
    snap = inferscope.snapshot()
    assert snap.row("consumer", "post").count == 2
    assert snap.row("gen-stage", "decode").count == 1
    assert {r.stage for r in snap.rows if r.model == "gen-stage"} == {None, "decode"}


def test_generator_error_is_counted():
    @inferscope.track_inference(model="gen-fail")
    def stream():
        yield 1
        raise ScoringError("boom")

    with pytest.raises(ScoringError):
        list(stream())
    row = inferscope.snapshot().row("gen-fail")
    assert (row.count, row.errors) == (1, 1)


def test_async_generator_timed_until_exhaustion_and_abandoned():
    @inferscope.track_inference(model="astream")
    async def tokens(n):
        for i in range(n):
            with inferscope.stage("decode"):
                await asyncio.sleep(0.001)
            yield i

    async def main():
        full = [t async for t in tokens(3)]
        partial = tokens(10)
        first = await partial.__anext__()
        await partial.aclose()
        return full, first

    assert asyncio.run(main()) == ([0, 1, 2], 0)
    snap = inferscope.snapshot()
    row = snap.row("astream")
    assert (row.count, row.abandoned) == (2, 1)
    assert snap.row("astream", "decode").count == 4
    assert row.p50 >= 0.001


# -- stages -------------------------------------------------------------------------------------


def test_stages_nest_into_paths_and_repeat():
    @inferscope.track_inference(model="pipe")
    def predict():
        with inferscope.stage("preprocess"):
            with inferscope.stage("tokenize"):
                pass
            with inferscope.stage("tokenize"):
                pass
        with inferscope.stage("infer"):
            with inferscope.stage("encoder"), inferscope.stage("layer0"):
                pass
        return "ok"

    predict()
    predict()
    snap = inferscope.snapshot()
    paths = {r.stage: r.count for r in snap.rows if r.model == "pipe"}
    assert paths == {
        None: 2,
        "preprocess": 2,
        "preprocess/tokenize": 4,
        "infer": 2,
        "infer/encoder": 2,
        "infer/encoder/layer0": 2,
    }
    assert inferscope.stage("infer") is inferscope.stage("infer")


def test_stage_outside_any_inference_is_recorded_under_no_model():
    with inferscope.stage("warmup"):
        time.sleep(0.001)
    row = inferscope.snapshot().row(None, "warmup")
    assert row.count == 1
    assert row.model is None
    assert row.p50 >= 0.001


def test_stage_exception_is_counted_and_propagates():
    with pytest.raises(ScoringError), inferscope.stage("load"):
        raise ScoringError("disk")
    row = inferscope.snapshot().row(None, "load")
    assert (row.count, row.errors) == (1, 1)


def test_stage_as_decorator_on_sync_and_async():
    @inferscope.stage("featurize")
    def featurize(x):
        """Turns x into features."""
        return [x]

    @inferscope.stage("fetch")
    async def fetch(x):
        await asyncio.sleep(0)
        return x

    @inferscope.track_inference(model="deco")
    def predict(x):
        return featurize(x)

    @inferscope.track_inference(model="adeco")
    async def apredict(x):
        return await fetch(x)

    assert predict(1) == [1]
    assert featurize.__doc__ == "Turns x into features."
    assert asyncio.run(apredict(2)) == 2
    assert inspect.iscoroutinefunction(fetch)
    snap = inferscope.snapshot()
    assert snap.row("deco", "featurize").count == 1
    assert snap.row("adeco", "fetch").count == 1


@pytest.mark.parametrize(
    ("make", "error", "text"),
    [
        (lambda: inferscope.stage(""), ValueError, "must not be empty"),
        (lambda: inferscope.stage("a/b"), ValueError, "nest stages instead"),
        (lambda: inferscope.stage(42), TypeError, "must be a str"),
        (lambda: inferscope.stage(lambda: None), TypeError, "did you forget the brackets"),
        (lambda: inferscope.stage("x")(42), TypeError, "decorates a callable"),
        (lambda: inferscope.stage("x")(lambda: (yield)), TypeError, "generator function"),
    ],
)
def test_stage_misuse_gets_a_helpful_error(make, error, text):
    with pytest.raises(error, match=text):
        make()


def test_bare_stage_decorator_is_caught():
    with pytest.raises(TypeError, match="did you forget the brackets"):

        @inferscope.stage
        def preprocess():
            pass


def test_stack_deeper_than_the_limit_is_dropped_and_counted_not_raised():
    limit = 32
    stages = [inferscope.stage(f"s{i}") for i in range(limit + 8)]

    @inferscope.track_inference(model="deep")
    def deep():
        def nest(i):
            if i == len(stages):
                return "bottom"
            with stages[i]:
                return nest(i + 1)

        return nest(0)

    assert deep() == "bottom"
    snap = inferscope.snapshot()
    assert snap.dropped["stack_depth"] == 9  # 1 inference entry + 40 stages - 32 slots
    assert snap.row("deep").count == 1
    assert len([r for r in snap.rows if r.model == "deep"]) == 1 + limit - 1


# -- threads ------------------------------------------------------------------------------------


def test_threads_record_exact_counts():
    # The drop counter is the process's: earlier tests may have filled a small ring on purpose.
    dropped_before = inferscope.snapshot().dropped.get("ring_full", 0)

    @inferscope.track_inference(model="threaded")
    def predict(x):
        with inferscope.stage("infer"):
            return x

    def worker():
        for i in range(2000):
            predict(i)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = inferscope.snapshot()
    assert snap.row("threaded").count == 8000
    assert snap.row("threaded", "infer").count == 8000
    assert snap.dropped.get("ring_full", 0) == dropped_before


def test_bind_carries_inference_and_stage_into_worker_threads():
    def score(shard):
        with inferscope.stage("score"):
            return shard * 2

    @inferscope.track_inference(model="pooled")
    def predict(pool):
        with inferscope.stage("infer"):
            bound = [pool.submit(inferscope.bind(score), s) for s in range(6)]
            unbound = pool.submit(score, 100)
            return sum(f.result() for f in bound), unbound.result()

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert predict(pool) == (30, 200)
        assert predict(pool) == (30, 200)
    snap = inferscope.snapshot()
    assert snap.row("pooled", "infer/score").count == 12
    assert snap.row(None, "score").count == 2  # without bind, a worker thread is outside the inference


def test_bind_keeps_the_wrapped_function_metadata():
    def work(a, b=2):
        """Adds."""
        return a + b

    bound = inferscope.bind(work)
    assert bound(1) == 3
    assert bound.__name__ == "work" and bound.__doc__ == "Adds."
    assert inspect.signature(bound) == inspect.signature(work)


# -- safety -------------------------------------------------------------------------------------


class _BrokenRegistry:
    def __init__(self, real):
        self.real = real

    def stage_key(self, parent, name):
        raise RuntimeError("registry is broken")

    def error_id(self, exc_type):
        raise RuntimeError("registry is broken")


def test_internal_failures_never_raise_into_user_code():
    real = RUNTIME.registry

    @inferscope.track_inference(model="safe")
    def predict(kind):
        with inferscope.stage("never-seen-before-stage"):
            if kind == "raise":
                raise ScoringError("user error")
            return "user result"

    before = RUNTIME.internal_errors
    RUNTIME.registry = _BrokenRegistry(real)
    try:
        assert predict("ok") == "user result"
        with pytest.raises(ScoringError, match="user error"):
            predict("raise")
    finally:
        RUNTIME.registry = real
    assert RUNTIME.internal_errors > before
    assert RUNTIME.active_depth() == 0
    row = inferscope.snapshot().row("safe")
    assert (row.count, row.errors) == (2, 1)
    assert dict(row.error_types) == {"_OTHER": 1}


def test_disabled_calls_pass_straight_through():
    @inferscope.track_inference(model="off")
    def predict(x):
        with inferscope.stage("s"):
            return x

    settings = inferscope.current_settings()
    inferscope.configure(enabled=False)
    try:
        assert predict(3) == 3
        assert all(r.model != "off" for r in inferscope.snapshot().rows)
    finally:
        inferscope.configure(**_as_arguments(settings))
    predict(4)
    assert inferscope.snapshot().row("off").count == 1


def _as_arguments(settings):
    if settings is None:
        return {}
    fields = ("enabled", "counters", "ring_capacity", "drain_interval_millis", "max_keys")
    return {name: getattr(settings, name) for name in fields}


def test_minimal_counters_skip_cpu_and_default_measures_it():
    @inferscope.track_inference(model="cpu")
    def spin():
        end = time.thread_time() + 0.005  # 5 ms of CPU, however long a busy machine makes it take
        while time.thread_time() < end:
            pass

    settings = inferscope.current_settings()
    try:
        inferscope.configure(counters="minimal")
        spin()
        assert inferscope.snapshot().row("cpu").cpu_seconds is None
        inferscope.configure(counters="default")
        spin()
        row = inferscope.snapshot().row("cpu")
        # CPU time is what the loop burned; wall time is at least that (the ratio is below 1 when
        # other processes take the CPU, so only its upper bound is certain).
        assert row.cpu_seconds is not None and row.cpu_seconds >= 0.005 * 0.99
        assert 0 < row.cpu_ratio <= 1.05
    finally:
        inferscope.configure(**_as_arguments(settings))


def test_cpu_time_separates_waiting_from_working():
    @inferscope.track_inference(model="wait-vs-work")
    def predict():
        with inferscope.stage("wait"):
            time.sleep(0.01)
        with inferscope.stage("work"):
            end = time.thread_time() + 0.01
            while time.thread_time() < end:
                pass

    inferscope.configure(counters="default")
    predict()
    snap = inferscope.snapshot()
    wait, work = snap.row("wait-vs-work", "wait"), snap.row("wait-vs-work", "work")
    # Load on the machine stretches wall time, never a stage's own CPU time: compare CPU seconds.
    assert work.cpu_seconds is not None and work.cpu_seconds >= 0.01 * 0.99
    assert wait.cpu_seconds is not None and wait.cpu_seconds < work.cpu_seconds / 5
    assert wait.cpu_ratio < 0.5 and wait.p50 >= 0.01 * 0.994


def test_wrapped_callable_objects_and_partials():
    class Scorer:
        def __call__(self, x):
            return x + 1

    tracked = inferscope.track_inference(model="callable")(Scorer())
    part = inferscope.track_inference(model="partial")(functools.partial(pow, 2))
    assert tracked(1) == 2
    assert part(10) == 1024
    snap = inferscope.snapshot()
    assert snap.row("callable").count == 1 and snap.row("partial").count == 1
