"""``compare()``: build each variant, check its outputs, then time the variants in interleaved rounds.

Order of work, and why:

1. Build each variant and make its first call, timed together as its start-up (an export, a
   conversion, ``torch.compile``'s compilation on the first call). A variant that cannot be built
   is kept with the reason; one that raises is kept with the exception.
2. Check its outputs against the baseline's with ``numpy.isclose`` before any timing counts: a
   variant that computes something else is not a faster variant. It is reported, not timed.
3. Warm up, then time the variants in rounds: each round runs a block of calls of every variant,
   in a rotating order, so that a machine that gets slower or busier during the run slows every
   variant alike instead of the last one timed. Per call, the wall time and the process's CPU time
   (every thread: the intra-op pools of torch and onnxruntime work for the call too).
4. Memory: the process's peak RSS during a few calls of each variant, read from ``VmHWM`` after
   resetting it (``/proc/self/clear_refs``), and the RSS each variant holds once built.
5. Speed-up: the baseline's p50 over the variant's, with the confidence interval of the gate's
   statistics (a block bootstrap of the calls, widened by the spread between rounds).
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError
from ..gate.stats import Sample, quantile_ratio
from ._memory import peak_rss_since_reset, reset_peak_rss, rss_bytes
from ._result import CompareResult, OutputCheck, Speedup, VariantResult
from ._variants import FRAMEWORKS, Plan, Unavailable, Variant, plan_for

__all__ = ["compare"]

_SOURCE = "compare() argument"
#: Calls per variant at most: the statistics thin longer runs anyway.
_MAX_CALLS = 20_000
#: Calls of each variant during which the peak RSS is read.
_MEMORY_CALLS = 3


@dataclass
class _Built:
    variant: Variant
    result: VariantResult
    call: Callable[[], Any] | None = None
    outputs: list[np.ndarray] = field(default_factory=list)
    wall_ns: list[int] = field(default_factory=list)
    cpu_ns: list[int] = field(default_factory=list)
    round_starts: list[int] = field(default_factory=list)
    per_round: int = 1


def _check_options(rtol: float, atol: float, seconds: float, rounds: int, confidence: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ConfigError(name, value, "a finite number >= 0", _SOURCE)
    if not isinstance(seconds, (int, float)) or not 0.01 <= seconds <= 3600:
        raise ConfigError(
            "seconds", seconds, "seconds of timed calls per variant, from 0.01 to 3600", _SOURCE
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 3 <= rounds <= 1000:
        raise ConfigError("rounds", rounds, "an int from 3 to 1000", _SOURCE)
    if not isinstance(confidence, float) or not 0.5 <= confidence < 1:
        raise ConfigError(
            "confidence", confidence, "a float from 0.5 to 1 (exclusive), such as 0.95", _SOURCE
        )


def _selected(plan: Plan, variants: Sequence[str] | None) -> list[Variant]:
    if variants is None:
        return plan.variants
    known = [v.name for v in plan.variants]
    unknown = [name for name in variants if name not in known]
    if unknown or isinstance(variants, str):
        raise ConfigError(
            "variants",
            variants if isinstance(variants, str) else unknown[0],
            f"a list of {plan.framework} variants: {', '.join(FRAMEWORKS[plan.framework])}",
            _SOURCE,
        )
    # The baseline is always run: it is what the others are checked and timed against.
    return [plan.variants[0], *(v for v in plan.variants[1:] if v.name in variants)]


def _build(variant: Variant) -> _Built:
    """Build ``variant`` and make its first call; never raises (but KeyboardInterrupt)."""
    built = _Built(variant, VariantResult(variant.name, "ok", notes=list(variant.notes)))
    result = built.result
    before = rss_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            call = variant.build()
        except Unavailable as exc:
            result.status, result.reason = "unavailable", str(exc)
            return built
        except Exception as exc:
            result.status, result.reason = "unavailable", f"building it raised {type(exc).__name__}: {exc}"
            return built
        result.build_seconds = time.perf_counter() - start
        start = time.perf_counter()
        try:
            first = call()
        except Exception as exc:
            result.status, result.reason = "failed", f"its first call raised {type(exc).__name__}: {exc}"
            return built
        result.first_call_seconds = time.perf_counter() - start
    if variant.deprecated is not None:
        result.notes.append(_deprecation(variant.deprecated, caught))
    after = rss_bytes()
    result.held_memory_bytes = None if before is None or after is None else max(0, after - before)
    try:
        built.outputs = variant.outputs(first)
    except Exception as exc:
        result.status, result.reason = "failed", f"its output cannot be read: {type(exc).__name__}: {exc}"
        return built
    built.call = call
    return built


def _deprecation(api: str, caught: Sequence[warnings.WarningMessage]) -> str:
    """The library's own deprecation warning for ``api`` (``torch.jit.trace``), if building
    raised one, else a note that says it is deprecated."""
    for warning in caught:
        text = str(warning.message)
        if issubclass(warning.category, (DeprecationWarning, FutureWarning)) and f"`{api}`" in text:
            return f"deprecated: {text} Compared still."
    return f"deprecated: {api} is deprecated upstream. Compared still."


def _aligned(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """``candidate`` in ``reference``'s shape where the two differ only in layout: a trailing axis
    of size 1 (an ONNX regressor's (n, 1)), or a binary classifier's two probability columns
    against one (the positive class, as a Booster gives it)."""
    if candidate.shape == reference.shape:
        return candidate
    if candidate.size == reference.size:
        return candidate.reshape(reference.shape)
    if reference.ndim == 1 and candidate.ndim == 2 and candidate.shape == (reference.shape[0], 2):
        return candidate[:, 1]
    return candidate


def check_outputs(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], rtol: float, atol: float
) -> OutputCheck:
    """Whether ``candidate`` equals ``reference`` to ``numpy.isclose(rtol, atol)``, element by
    element (exactly, for outputs that are not numbers: labels)."""

    def failed(detail: str, compared: int = 0, mismatched: int = 0) -> OutputCheck:
        return OutputCheck(False, rtol, atol, compared, mismatched, None, None, detail)

    if len(reference) != len(candidate):
        return failed(f"{len(candidate)} outputs where the baseline gives {len(reference)}")
    compared = mismatched = 0
    max_abs = max_rel = 0.0
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        cand = _aligned(ref, cand)
        if cand.shape != ref.shape:
            return failed(f"output {i} has shape {cand.shape} where the baseline's has {ref.shape}")
        compared += ref.size
        numeric = ref.dtype.kind in "biufc" and cand.dtype.kind in "biufc"
        if not numeric:
            mismatched += int(np.count_nonzero(ref != cand))
            continue
        ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
        close = np.isclose(cand64, ref64, rtol=rtol, atol=atol, equal_nan=True)
        mismatched += int(close.size - np.count_nonzero(close))
        with np.errstate(invalid="ignore", divide="ignore"):
            diff = np.abs(cand64 - ref64)
            finite = np.isfinite(diff)
            if finite.any():
                max_abs = max(max_abs, float(diff[finite].max()))
                rel = diff[finite] / np.maximum(np.abs(ref64[finite]), np.finfo(np.float64).tiny)
                max_rel = max(max_rel, float(rel.max()))
    detail = None if not mismatched else f"{mismatched} of {compared} values differ beyond the tolerance"
    return OutputCheck(not mismatched, rtol, atol, compared, mismatched, max_abs, max_rel, detail)


def _run_block(built: _Built, calls: int) -> None:
    call = built.call
    assert call is not None
    wall, cpu = built.wall_ns, built.cpu_ns
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    built.round_starts.append(len(wall))
    for _ in range(calls):
        c0 = cpu_clock()
        t0 = clock()
        call()
        t1 = clock()
        c1 = cpu_clock()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)


def _warm_up(built: _Built, seconds: float, rounds: int) -> None:
    """A few calls (at least 3, for 10% of the budget at most), then the calls per round."""
    call = built.call
    assert call is not None
    times: list[float] = []
    deadline = time.perf_counter() + 0.1 * seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    typical = max(float(np.median(times)), 1e-9)
    built.per_round = int(min(max(1, seconds / rounds / typical), _MAX_CALLS // rounds))


def _fail(built: _Built, when: str, exc: Exception) -> None:
    built.result.status, built.result.reason = "failed", f"{when} raised {type(exc).__name__}: {exc}"
    built.call = None


def _measure_memory(built: _Built) -> None:
    call = built.call
    assert call is not None
    if not reset_peak_rss():
        built.result.notes.append("peak RSS not measured: /proc/self/clear_refs cannot be written here")
        return
    before = rss_bytes()
    for _ in range(_MEMORY_CALLS):
        call()
    peak = peak_rss_since_reset()
    if before is not None and peak is not None:
        built.result.peak_rss_bytes = peak
        built.result.call_peak_memory_bytes = max(0, peak - before)


def _summarise(built: _Built) -> None:
    result = built.result
    wall = np.asarray(built.wall_ns, dtype=np.float64) / 1e9
    result.calls = len(wall)
    result.p50_seconds = float(np.quantile(wall, 0.5))
    result.p99_seconds = float(np.quantile(wall, 0.99))
    result.mean_seconds = float(wall.mean())
    result.cpu_per_call_seconds = float(np.mean(built.cpu_ns)) / 1e9


def _sample(built: _Built) -> Sample:
    return Sample(np.asarray(built.wall_ns, dtype=np.float64) / 1e9, tuple(built.round_starts))


def _speedups(timed: list[_Built], confidence: float, rng: np.random.Generator) -> None:
    baseline = _sample(timed[0])
    for built in timed[1:]:
        ratio = quantile_ratio(_sample(built), baseline, 0.5, alpha=(1 - confidence) / 2, rng=rng)
        if not (ratio.point > 0 and math.isfinite(ratio.point)):
            continue
        # The variant's p50 over the baseline's, inverted: its bounds swap.
        known = math.isfinite(ratio.log_error) and ratio.low > 0
        built.result.speedup = Speedup(
            1 / ratio.point, 1 / ratio.high if known else None, 1 / ratio.low if known else None
        )


def _best(variants: list[VariantResult], confidence: float) -> tuple[str, str]:
    """The fastest variant whose speed-up is above 1 at the confidence level; else the baseline."""
    baseline = variants[0]
    faster = [
        v
        for v in variants[1:]
        if v.status == "ok" and v.speedup is not None and v.speedup.low is not None and v.speedup.low > 1
    ]
    if baseline.status != "ok":
        return baseline.name, f"the baseline failed ({baseline.reason}): nothing was timed"
    if not faster:
        return baseline.name, (
            f"No variant is faster than {baseline.name} at the median with {confidence:.0%} confidence."
        )
    best = max(faster, key=lambda v: v.speedup.point if v.speedup is not None else 0.0)
    assert best.speedup is not None
    s = best.speedup
    return best.name, (
        f"{s.point:.3g}x faster than {baseline.name} at the median "
        f"({confidence:.0%} CI {s.low:.3g}-{s.high:.3g}x), with the same outputs."
    )


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _machine_warnings(load_before: float | None) -> list[str]:
    """What about the machine makes the figures less telling: a load above its usable CPUs during
    the run, thread pools with more threads than those CPUs."""
    from ..system.threads import check_oversubscription, usable_cpus

    found = []
    usable = usable_cpus()[0]
    loads = [load for load in (load_before, _load_average()) if load is not None]
    if loads and max(loads) > usable:
        found.append(
            f"The machine was busy: a load average of {max(loads):.1f} on {usable} usable CPU(s). "
            "Figures depend on how the scheduler shared the CPUs, most of all for variants that run "
            "threads: compare again on a quiet machine, with the thread counts you deploy."
        )
    report = check_oversubscription(warn=False)
    if report.oversubscribed:
        found.append(report.message())
    return found


def compare(
    model: Any,
    *inputs: Any,
    variants: Sequence[str] | None = None,
    method: str | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seconds: float = 1.0,
    rounds: int = 10,
    confidence: float = 0.95,
    seed: int = 0,
) -> CompareResult:
    """Compare the ways of running ``model`` on the example ``inputs``.

    The variants depend on the framework (see ``FRAMEWORKS`` and docs/compare.md): for torch,
    eager against ``torch.jit.trace``, ``torch.jit.script``, ``torch.compile`` and onnxruntime; for
    Keras, eager against ``tf.function`` with and without XLA; for scikit-learn, the estimator
    against onnxruntime; for xgboost and lightgbm, the Booster's predict against the in-place
    predictor (xgboost), the scikit-learn wrapper and onnxruntime. ``variants`` keeps only those
    named (the baseline always runs); ``method`` is the scikit-learn method (default:
    ``predict_proba`` where there is one, else ``predict``).

    Outputs are checked against the baseline's with ``numpy.isclose(rtol, atol)`` before timing.
    Each variant is timed for about ``seconds`` over ``rounds`` interleaved rounds. A variant that
    cannot be built, raises or differs is reported with the reason; only a model of no known
    framework, inputs it cannot take or a bad option raise (TypeError, ValueError, ConfigError)::

        result = compare(pipeline, X)
        print(result.table())
        result.best  # "onnxruntime"
    """
    _check_options(rtol, atol, seconds, rounds, confidence)
    load_before = _load_average()
    plan = plan_for(model, inputs, method)
    chosen = _selected(plan, variants)
    rng = np.random.default_rng(seed)

    built = [_build(chosen[0])]
    baseline = built[0]
    for variant in chosen[1:]:
        if baseline.call is None:
            reason = f"the baseline {baseline.variant.name} failed"
            built.append(_Built(variant, VariantResult(variant.name, "not run", reason, list(variant.notes))))
            continue
        candidate = _build(variant)
        if candidate.call is not None:
            check = check_outputs(baseline.outputs, candidate.outputs, rtol, atol)
            candidate.result.check = check
            if not check.passed:
                candidate.result.status, candidate.result.reason = "mismatch", check.detail
                candidate.call = None
        built.append(candidate)

    timed = [b for b in built if b.call is not None]
    for b in list(timed):
        try:
            _warm_up(b, seconds, rounds)
        except Exception as exc:
            _fail(b, "a warm-up call", exc)
    timed = [b for b in timed if b.call is not None]
    gc.collect()
    for r in range(rounds):
        for i in range(len(timed)):
            b = timed[(i + r) % len(timed)]  # a rotating order: no variant is always last
            if b.call is None:
                continue
            try:
                _run_block(b, b.per_round)
            except Exception as exc:
                _fail(b, "a timed call", exc)
    timed = [b for b in timed if b.call is not None]
    for b in list(timed):
        try:
            _measure_memory(b)
        except Exception as exc:
            _fail(b, "a call", exc)
    timed = [b for b in timed if b.call is not None]
    for b in timed:
        _summarise(b)
    if timed and timed[0] is baseline:
        _speedups(timed, confidence, rng)

    results = [b.result for b in built]
    best, reason = _best(results, confidence)
    from ..system.fingerprint import environment, fingerprint

    env = environment()
    env["fingerprint"] = fingerprint(env)
    return CompareResult(
        model=plan.model_name,
        framework=plan.framework,
        framework_version=plan.framework_version,
        method=plan.method,
        inputs=plan.inputs,
        rtol=float(rtol),
        atol=float(atol),
        confidence=confidence,
        seconds_per_variant=float(seconds),
        variants=results,
        best=best,
        best_reason=reason,
        warnings=_machine_warnings(load_before),
        environment=env,
        created_unix=round(time.time(), 3),
    )
