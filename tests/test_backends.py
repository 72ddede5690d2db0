"""Parity: the C backend and the pure-Python backend implement one contract (_native/__init__.pyi).

Each test builds its own Ring, KeyRegistry and Runtime from the backend module under test, so both
run in the same process whatever INFERSCOPE_NO_EXTENSION says.
"""

from __future__ import annotations

import os
import time

import pytest

from inferscope import _purepy
from inferscope._keys import KeyRegistry
from inferscope._records import (
    COUNTER_SLOTS,
    COUNTER_THREAD_CPU,
    CPU_NOT_MEASURED,
    FLAG_ABANDONED,
    MAX_STACK_DEPTH,
    NO_MODEL_KEY,
    STAGE_CPU_EXACT_GAP_NS,
    STAGE_CPU_SAMPLE_EVERY,
    empty_records,
)

from .conftest import BACKENDS, _native, run_python


@pytest.fixture(params=BACKENDS)
def impl(request):
    return request.param


@pytest.fixture
def env(impl):
    registry = KeyRegistry(max_keys=100)
    runtime = impl.Runtime(impl.Ring(1024), registry)
    return runtime, registry


def drain(runtime):
    buf = empty_records(4096)
    n = runtime.ring.drain(buf)
    return buf[:n]


class Owner:
    """Stands for a tracked function: any long-lived object can own entries."""


# -- Ring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 1, 3, 1000, 1 << 27])
def test_ring_rejects_bad_capacity_the_same_way(impl, capacity):
    with pytest.raises(ValueError, match="power of two"):
        impl.Ring(capacity)


def test_ring_round_trip_keeps_fields_and_order(impl):
    ring = impl.Ring(8)
    for i in range(5):
        assert ring.push(i + 2, i % 3, i % 2, 1000 + i, 10 * i, -1 if i % 2 else i)
    assert len(ring) == 5
    out = drain_ring(ring, 16)
    assert out["key"].tolist() == [2, 3, 4, 5, 6]
    assert out["error"].tolist() == [0, 1, 2, 0, 1]
    assert out["flags"].tolist() == [0, 1, 0, 1, 0]
    assert out["start_ns"].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert out["wall_ns"].tolist() == [0, 10, 20, 30, 40]
    assert out["cpu_ns"].tolist() == [0, -1, 2, -1, 4]
    assert out["counters"].tolist() == [[0] * COUNTER_SLOTS] * 5
    assert len(ring) == 0


def drain_ring(ring, size):
    buf = empty_records(size)
    return buf[: ring.drain(buf)]


def test_full_ring_drops_and_counts_never_blocks(impl):
    ring = impl.Ring(4)
    results = [ring.push(1, 0, 0, i, 1, 1) for i in range(10)]
    assert results == [True] * 4 + [False] * 6
    assert ring.dropped == 6
    assert drain_ring(ring, 2)["start_ns"].tolist() == [0, 1]  # a small buffer drains part
    assert ring.push(1, 0, 0, 99, 1, 1)
    assert drain_ring(ring, 16)["start_ns"].tolist() == [2, 3, 99]
    ring.reset()
    assert (ring.dropped, len(ring)) == (0, 0)


def test_ring_wraps_around_many_times(impl):
    ring = impl.Ring(4)
    seen = []
    for lap in range(50):
        for i in range(3):
            assert ring.push(1, 0, 0, lap * 3 + i, 0, 0)
        seen += drain_ring(ring, 8)["start_ns"].tolist()
    assert seen == list(range(150))


def _pending_wakes(fd):
    try:
        return len(os.read(fd, 4096))
    except BlockingIOError:
        return 0


@pytest.mark.parametrize("capacity", [4, 64, 1024])
def test_a_ring_half_full_wakes_its_drainer_once_per_drain(impl, capacity):
    ring = impl.Ring(capacity)
    assert ring.wake_fd == -1
    read, write = os.pipe2(os.O_NONBLOCK)
    try:
        ring.wake_fd = write
        position = 0

        def push(n):
            nonlocal position
            for _ in range(n):
                assert ring.push(1, 0, 0, position, 1, 1)
                position += 1

        for lap in range(3):
            push(capacity // 2 - 1)
            assert _pending_wakes(read) == 0, "woken before the ring was half full"
            push(max(capacity // 8, 1) + 1)  # half full; a producer looks every capacity/8 records
            assert _pending_wakes(read) == 1
            push(capacity - len(ring))  # full: no second byte before a drain
            assert _pending_wakes(read) == 0
            assert len(drain_ring(ring, capacity)) == capacity, lap
        ring.reset()
        assert ring.wake_fd == -1  # reset forgets the drainer (as after fork)
        push(capacity)
        assert _pending_wakes(read) == 0
    finally:
        os.close(read)
        os.close(write)
    with pytest.raises(ValueError, match="wake_fd"):
        ring.wake_fd = -2


def test_ring_push_rejects_out_of_range_fields(impl):
    ring = impl.Ring(4)
    with pytest.raises(OverflowError):
        ring.push(1 << 32, 0, 0, 0, 0, 0)
    with pytest.raises(OverflowError):
        ring.push(1, 1 << 16, 0, 0, 0, 0)


# -- Runtime ------------------------------------------------------------------------------------


def test_enter_exit_records_key_error_and_times(impl, env):
    rt, reg = env
    key = reg.inference_key("m", "1")
    owner = Owner()
    before = impl.monotonic_ns()
    rt.enter(owner, key)
    time.sleep(0.002)
    rt.exit(owner, None)
    rt.enter(owner, key)
    rt.exit(owner, KeyError)
    after = impl.monotonic_ns()
    out = drain(rt)
    assert out["key"].tolist() == [key, key]
    assert out["error"].tolist() == [0, reg.error_id(KeyError)]
    assert reg.error_name(int(out["error"][1])) == "KeyError"
    assert out["wall_ns"][0] >= 2_000_000
    assert before <= out["start_ns"][0] <= out["start_ns"][1] <= after
    assert out["cpu_ns"].tolist() == [-1, -1]  # counters=0: no CPU clock


def test_thread_cpu_counter(env):
    rt, reg = env
    rt.counters = COUNTER_THREAD_CPU
    owner = Owner()
    rt.enter(owner, reg.inference_key("m"))
    end = time.perf_counter() + 0.003
    while time.perf_counter() < end:
        pass
    rt.exit(owner, None)
    out = drain(rt)
    # Other processes may take the CPU meanwhile, so only the bounds are certain.
    assert 0 < out["cpu_ns"][0] <= out["wall_ns"][0] + 1_000_000
    assert out["wall_ns"][0] >= 3_000_000


def test_stages_resolve_paths_through_the_registry(env):
    rt, reg = env
    model = reg.inference_key("m")
    owner = Owner()
    rt.enter(owner, model)
    with rt.stage("pre"), rt.stage("tok"):
        assert rt.current_key() == reg.stage_key(reg.stage_key(model, "pre"), "tok")
    with rt.stage("pre"):
        pass
    rt.exit(owner, None)
    with rt.stage("pre"):
        pass
    out = drain(rt)
    paths = [(reg.info(int(k)).model, reg.info(int(k)).stage) for k in out["key"]]
    assert paths == [("m", "pre/tok"), ("m", "pre"), ("m", "pre"), ("m", None), (None, "pre")]
    assert rt.stage("pre") is rt.stage("pre")
    assert rt.stage("pre").name == "pre"


def test_stage_errors_and_misuse_match(env):
    rt, reg = env
    with pytest.raises(ZeroDivisionError), rt.stage("s"):
        1 / 0
    assert reg.error_name(int(drain(rt)["error"][0])) == "ZeroDivisionError"
    with pytest.raises(ValueError, match="must not be empty"):
        rt.stage("")
    with pytest.raises(ValueError, match="must not contain '/'"):
        rt.stage("a/b")
    with pytest.raises(TypeError, match="did you forget the brackets"):
        rt.stage(print)
    with pytest.raises(TypeError, match="must be a str"):
        rt.stage(3)


def test_out_of_order_exit_closes_the_right_entry(env):
    rt, reg = env
    outer, inner = rt.stage("outer"), rt.stage("inner")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # e.g. a generator suspended inside `inner`
    assert rt.active_depth() == 1
    inner.__exit__(None, None, None)
    assert rt.active_depth() == 0
    keys = [reg.info(int(k)).stage for k in drain(rt)["key"]]
    assert keys == ["outer", "outer/inner"]


def test_exit_without_enter_is_ignored(env):
    rt, _ = env
    rt.exit(Owner(), None)
    rt.stage("never-entered").__exit__(None, None, None)
    assert len(drain(rt)) == 0
    assert rt.active_depth() == 0


def test_depth_overflow_is_counted_and_absorbed(env):
    rt, _ = env
    stages = [rt.stage(f"s{i}") for i in range(MAX_STACK_DEPTH + 5)]
    for s in stages:
        s.__enter__()
    assert rt.depth_dropped == 5
    for s in reversed(stages):
        s.__exit__(None, None, None)
    assert rt.active_depth() == 0
    assert len(drain(rt)) == MAX_STACK_DEPTH


def test_exit_segment_stashes_entries_above_and_enter_reopens_them(env):
    rt, reg = env
    gen_owner = Owner()
    key = reg.inference_key("gen")
    rt.enter(gen_owner, key)
    rt.stage("decode").__enter__()  # the generator body enters a stage, then yields
    start, wall, cpu, stash, trace = rt.exit_segment(gen_owner)
    assert wall >= 0 and cpu == -1 and stash is not None and trace is None  # tracing is off
    assert rt.current_key() == NO_MODEL_KEY  # the consumer sees no open generator stage
    rt.enter(gen_owner, key, stash)
    assert reg.info(rt.current_key()).stage == "decode"
    rt.stage("decode").__exit__(None, None, None)
    assert rt.exit_segment(gen_owner)[3] is None
    rt.record(key, None, FLAG_ABANDONED, start, 5, -1)
    out = drain(rt)
    assert [reg.info(int(k)).stage for k in out["key"]] == ["decode", None]
    assert out["flags"].tolist() == [0, FLAG_ABANDONED]
    assert rt.exit_segment(gen_owner) is None


def test_use_frame_roots_a_context_at_a_key(env):
    import contextvars

    rt, reg = env
    parent = reg.stage_key(reg.inference_key("m"), "infer")

    def work():
        rt.use_frame(parent)
        with rt.stage("shard"):
            return rt.current_key()

    key = contextvars.copy_context().run(work)
    assert reg.info(key).stage == "infer/shard" and reg.info(key).model == "m"
    assert rt.current_key() == NO_MODEL_KEY


def test_fork_generation_discards_entries_opened_before(env):
    rt, reg = env
    owner = Owner()
    rt.enter(owner, reg.inference_key("m"))
    rt.ring.push(1, 0, 0, 0, 0, 0)
    rt.after_fork_in_child()
    assert len(rt.ring) == 0
    rt.exit(owner, None)  # opened by the "parent": never recorded by the child
    with rt.stage("child"):
        pass
    out = drain(rt)
    assert [reg.info(int(k)).stage for k in out["key"]] == ["child"]
    assert reg.info(int(out["key"][0])).model is None


def test_disabled_runtime_records_nothing(env):
    rt, reg = env
    rt.enabled = False
    owner = Owner()
    rt.enter(owner, reg.inference_key("m"))
    with rt.stage("s"):
        pass
    rt.exit(owner, None)
    calls = []
    tracked = rt.track(lambda: calls.append(1) or "r", reg.inference_key("t"))
    assert tracked() == "r" and calls == [1]
    assert len(drain(rt)) == 0


def test_track_wraps_and_records(env):
    rt, reg = env
    key = reg.inference_key("t")
    tracked = rt.track(lambda a, b=1: a + b, key)
    assert tracked(1, b=2) == 3
    with pytest.raises(TypeError):
        tracked()
    assert tracked.inferscope_key == key
    out = drain(rt)
    assert out["key"].tolist() == [key, key]
    assert out["error"].tolist() == [0, reg.error_id(TypeError)]
    with pytest.raises(TypeError, match="callable"):
        rt.track(3, key)


def test_same_operations_give_the_same_records_on_both_backends():
    if _native is None:
        pytest.skip("the C extension is not built")
    results = []
    for impl in (_purepy, _native):
        reg = KeyRegistry()
        rt = impl.Runtime(impl.Ring(256), reg)
        owner = Owner()
        rt.enter(owner, reg.inference_key("m", "v"))
        for name in ("a", "b", "a"):
            with rt.stage(name), rt.stage("x"):
                pass
        try:
            with rt.stage("boom"):
                raise OSError
        except OSError:
            pass
        rt.exit(owner, ValueError, 0)
        out = drain(rt)
        results.append(
            [(reg.info(int(r["key"])).stage, reg.error_name(int(r["error"])), int(r["flags"])) for r in out]
        )
    assert results[0] == results[1]
    assert results[0][-1] == (None, "ValueError", 0)


# -- Robustness of the contract ------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [2, 4, 8, 16])
def test_small_rings_hold_every_slot(impl, capacity):
    ring = impl.Ring(capacity)
    assert [ring.push(1, 0, 0, i, 0, 0) for i in range(capacity + 1)] == [True] * capacity + [False]
    assert drain_ring(ring, capacity)["start_ns"].tolist() == list(range(capacity))
    assert ring.dropped == 1


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda rt: rt.enter(Owner(), 1 << 32), id="enter-key"),
        pytest.param(lambda rt: rt.enter(Owner(), -1), id="enter-negative-key"),
        pytest.param(lambda rt: rt.exit(Owner(), None, 1 << 16), id="exit-flags"),
        pytest.param(lambda rt: rt.exit(Owner(), None, -1), id="exit-negative-flags"),
        pytest.param(lambda rt: rt.record(1 << 32, None, 0, 0, 0, 0), id="record-key"),
        pytest.param(lambda rt: rt.record(2, None, 1 << 16, 0, 0, 0), id="record-flags"),
        pytest.param(lambda rt: rt.use_frame(1 << 32), id="use_frame-key"),
    ],
)
def test_out_of_range_keys_and_flags_raise_instead_of_truncating(env, call):
    """As Ring.push does: key 2**32 must never become key 0, nor flags 2**16 become 0."""
    rt, _ = env
    with pytest.raises(OverflowError):
        call(rt)
    assert len(drain(rt)) == 0
    assert rt.active_depth() == 0


def test_set_tracing_rejects_a_bad_ratio_bound_before_reading_anything_else(env):
    """The bound's OverflowError is raised as is: parent_based is not evaluated with it pending
    (in C that made the error a SystemError once __bool__ ran Python code)."""
    import contextvars

    rt, _ = env
    evaluated = []

    class Truthy:
        def __bool__(self):
            evaluated.append(1)
            return True

    with pytest.raises(OverflowError):
        rt.set_tracing(contextvars.ContextVar("otel"), "span", -1, Truthy())
    assert not rt.tracing
    assert evaluated == []


@pytest.mark.c_only
def test_read_counters_raises_memory_error_when_an_int_cannot_be_made():
    """Every allocation failure inside read_counters() is a MemoryError, never a tuple with a hole."""
    if _native is None:
        pytest.skip("the C extension is not built")
    result = run_python(
        """
        import _testcapi
        from inferscope._native import read_counters
        from inferscope._records import COUNTER_RSS, COUNTER_THREAD_CPU

        mask = COUNTER_THREAD_CPU | COUNTER_RSS
        outcomes = set()
        for start in range(12):
            _testcapi.set_nomemory(start, start + 1)
            try:
                cpu, values = read_counters(mask)
            except MemoryError:
                _testcapi.remove_mem_hooks()
                outcomes.add("MemoryError")
                continue
            _testcapi.remove_mem_hooks()
            assert isinstance(cpu, int) and all(isinstance(v, int) for v in values), values
            outcomes.add("ok")
        print(sorted(outcomes))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['MemoryError', 'ok']"


@pytest.mark.c_only
@pytest.mark.parametrize(
    "kind, calls",
    [("tracked", "obj()"), ("stage", "obj.__enter__()|obj.__exit__(None, None, None)|obj(print)")],
)
def test_a_tracked_call_or_stage_cleared_by_the_gc_raises_instead_of_crashing(kind, calls):
    """tp_clear runs on objects that a finalizer can still reach while the collector breaks a cycle."""
    if _native is None:
        pytest.skip("the C extension is not built")
    result = run_python(
        f"""
        import ctypes
        from inferscope import _native
        from inferscope._keys import KeyRegistry

        registry = KeyRegistry()
        rt = _native.Runtime(_native.Ring(64), registry)
        obj = rt.track(lambda: 1, registry.inference_key("m")) if {kind!r} == "tracked" else rt.stage("s")
        # tp_clear, as the collector calls it (with the GIL held); its offset in PyTypeObject is
        # the same on 3.10 to 3.13.
        tp_clear = ctypes.c_void_p.from_address(id(type(obj)) + 24 * ctypes.sizeof(ctypes.c_void_p))
        assert ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object)(tp_clear.value)(obj) == 0
        for call in {calls!r}.split("|"):
            try:
                eval(call)
            except ValueError as exc:
                assert "cleared by the garbage collector" in str(exc), exc
            else:
                raise AssertionError(call + " did not raise")
        print("raised", repr(obj))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("raised <inferscope")


@pytest.mark.c_only
def test_a_frame_keeps_its_context_alive_so_a_reused_address_never_owns_it():
    """A frame is owned by a Context held by reference: a freed Context's address, reused by a
    copy (CPython keeps a free list of them), must not make the copy the owner."""
    if _native is None:
        pytest.skip("the C extension is not built")
    import contextvars
    import gc

    registry = KeyRegistry()
    rt = _native.Runtime(_native.Ring(64), registry)
    owner = Owner()
    first = contextvars.Context()
    first.run(rt.enter, owner, registry.inference_key("m"))
    copy = first.copy()
    (frame,) = [value for value in copy.values() if isinstance(value, _native.Frame)]
    assert gc.is_tracked(frame) and any(ref is first for ref in gc.get_referents(frame))
    del first
    reused = copy.copy()
    assert reused.run(rt.active_depth) == 0
    assert copy.run(rt.active_depth) == 0


@pytest.mark.c_only
def test_frames_and_their_contexts_are_collected():
    if _native is None:
        pytest.skip("the C extension is not built")
    import contextvars
    import gc

    registry = KeyRegistry()
    rt = _native.Runtime(_native.Ring(64), registry)

    def frames():
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, _native.Frame))

    before = frames()
    for _ in range(200):
        contextvars.Context().run(rt.current_key)
    assert frames() == before


def test_a_busy_stage_reads_the_cpu_clock_on_a_sample_and_inferences_on_every_call(env):
    rt, reg = env
    rt.counters = COUNTER_THREAD_CPU
    assert rt.cpu_sample_every == STAGE_CPU_SAMPLE_EVERY
    rt.cpu_sample_every = 2**31 - 1  # only the rate rule reads
    stage = rt.stage("s")

    def body():
        with stage:
            pass

    tracked = rt.track(body, reg.inference_key("m"))
    calls = 400
    for _ in range(calls):
        tracked()
    out = drain(rt)
    inference_key = reg.inference_key("m")
    inferences = out[out["key"] == inference_key]
    stages = out[out["key"] != inference_key]
    assert len(inferences) == len(stages) == calls  # a stage not read is still recorded
    assert (inferences["cpu_ns"] >= 0).all()  # inferences are always read
    read = stages["cpu_ns"] >= 0
    # A new key is read on every entry until its mean gap falls under the exact gap: from the cap,
    # 40 ms, that takes 22 entries in a tight loop (40 * (15/16)**22 < 10).
    assert read[:_NEW_KEY_READS].all()
    # Then the loop's rate says the key is busy: a stall of this thread adds at most the cap over
    # the weight (2.5 ms) to the mean, so the rest stay unread unless a few stalls come together.
    assert read[_NEW_KEY_READS + 10 :].sum() <= 5
    assert (stages["cpu_ns"][~read] == CPU_NOT_MEASURED).all()
    assert (stages["wall_ns"] > 0).all()


#: The entries of a new key read by the rate rule in a tight loop, less one for rounding.
_NEW_KEY_READS = 21


def test_a_stage_entered_rarely_reads_the_cpu_clock_on_every_entry(env):
    rt, _ = env
    rt.counters = COUNTER_THREAD_CPU
    rt.cpu_sample_every = 2**31 - 1
    for _ in range(3):
        with rt.stage("rare"):
            pass
        time.sleep(STAGE_CPU_EXACT_GAP_NS / 1e9 + 0.015)  # longer than the gap plus a coarse tick
    out = drain(rt)
    assert len(out) == 3 and (out["cpu_ns"] >= 0).all()


def test_a_busy_stage_reads_no_more_of_the_calls_after_a_pause(env):
    """The calls right after a stall are slower than the rest (cold caches, the wait that made the
    stall): a busy key reads them no more often than any other call, so the calls it reads stay a
    random sample. A key whose rate falls for good is read on every entry again."""
    rt, _ = env
    rt.counters = COUNTER_THREAD_CPU
    rt.cpu_sample_every = 2**31 - 1
    stage = rt.stage("s")
    for _ in range(200):  # busy
        with stage:
            pass
    drain(rt)
    for _ in range(3):
        time.sleep(0.03)  # a stall, longer than the exact gap
        for _ in range(51):
            with stage:
                pass
    read = drain(rt)["cpu_ns"] >= 0
    assert len(read) == 153
    # Each stall adds at most the gap cap over the weight (2.5 ms) to a mean gap of about 0.
    assert not read[[0, 51, 102]].any()
    slow = 16
    for _ in range(slow):  # the key's rate falls under ~100 entries a second
        time.sleep(0.03)
        with stage:
            pass
    read = drain(rt)["cpu_ns"] >= 0
    assert len(read) == slow
    # The mean gap climbs from a few ms toward ~30 ms: over 10 ms after 7 entries (30 * (1 -
    # (15/16)**7) > 10), 10 on the coarse clock's shortest 26 ms.
    assert read[10:].all()


def test_every_stage_entry_reads_the_cpu_clock_when_the_sample_is_one(env):
    rt, _ = env
    rt.counters = COUNTER_THREAD_CPU
    rt.cpu_sample_every = 1
    outer, inner = rt.stage("outer"), rt.stage("inner")
    for _ in range(300):
        with outer:
            with inner:
                pass
    out = drain(rt)
    assert len(out) == 600 and (out["cpu_ns"] >= 0).all()


def test_a_sample_of_one_in_n_reads_about_one_entry_in_n(env):
    rt, _ = env
    rt.counters = COUNTER_THREAD_CPU
    rt.cpu_sample_every = 4
    stage = rt.stage("s")
    reads = 0
    for _ in range(3):
        for _ in range(1000):
            with stage:
                pass
        reads += int((drain(rt)["cpu_ns"] >= 0).sum())
    # Binomial(3000, 1/4) is 750 +- 24 (sd); the time rule adds at most a few reads.
    assert 550 <= reads <= 1000


@pytest.mark.parametrize("value", [0, -1, 2**31])
def test_cpu_sample_every_must_be_a_positive_integer(env, value):
    rt, _ = env
    with pytest.raises(ValueError, match="cpu_sample_every"):
        rt.cpu_sample_every = value
    assert rt.cpu_sample_every == STAGE_CPU_SAMPLE_EVERY


def test_cpu_time_never_exceeds_wall_time_for_one_thread(env):
    """Tiny calls are where the clock reads around the window weigh most."""
    rt, reg = env
    rt.counters = COUNTER_THREAD_CPU
    rt.cpu_sample_every = 1  # every stage entry reads the CPU clock, not a sample
    tracked = rt.track(lambda: None, reg.inference_key("tiny"))
    gen_owner = Owner()
    for _ in range(500):
        tracked()
        with rt.stage("s"):
            pass
        rt.enter(gen_owner, reg.inference_key("gen"))
        segment = rt.exit_segment(gen_owner)
        assert 0 <= segment[2] <= segment[1]
    rt.record(reg.inference_key("given"), None, 0, 0, 1_000, 5_000)  # e.g. from an instrumentor
    out = drain(rt)
    assert len(out) == 1001 and out["cpu_ns"][-1] == 1_000
    assert (out["cpu_ns"] >= 0).all()
    assert (out["cpu_ns"] <= out["wall_ns"]).all(), (out["cpu_ns"] - out["wall_ns"]).max()


def test_stage_names_are_capped_in_length_and_a_long_one_is_not_kept(env):
    rt, reg = env
    keys_before = len(reg)
    longest = "s" * 256
    with rt.stage(longest):
        pass
    huge = "x" * 10_000_000
    with pytest.raises(ValueError, match="10000000 characters long; at most 256"):
        rt.stage(huge)
    with pytest.raises(ValueError, match="at most 256"):
        rt.stage(longest + "s")
    assert [reg.info(int(k)).stage for k in drain(rt)["key"]] == [longest]
    assert len(reg) == keys_before + 1
