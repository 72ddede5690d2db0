"""``inferscope demo --tax``: a small service whose cost is changed for real, and what the detector names.

A numpy scoring service (``preprocess``, an OpenBLAS matrix product in ``infer``, ``postprocess``)
runs under a steady load with one-second windows. Once its anchor is taken, causes are injected one
after another, each for real: CPU-hog processes beside it, a slower library path, a step that grows
every second, larger inputs, and a leak. After each, the demo prints the regressions that
``inferscope.regressions()`` opened, with the cause the detector named and its evidence, then waits
for them to close. Nothing is scripted on the detector's side: what it prints is what it found.

The same service and injectors drive the scenario tests (tests/scenarios/).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..tracking import stage, track_inference

__all__ = ["MODEL", "PHASES", "CpuHogs", "Phase", "TaxService", "run_load", "run_tax_demo"]

MODEL = "tax-demo"
#: A busy loop that ends when its parent does, so that no hog outlives the service.
_HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(20000))\n"


class TaxService:
    """A small scoring service whose cost can be changed while it runs.

    ``blas_threads`` limits OpenBLAS for the whole process (0: its default, one thread per core);
    ``library_path`` picks how ``infer`` multiplies (``"blas"``: OpenBLAS through ``@``;
    ``"einsum"``: numpy's own loops, the same result many times slower); ``extra_rounds`` adds
    rounds of work to ``preprocess``; ``items`` is the rows per request (reported as the input
    size); ``leak_bytes`` is what ``postprocess`` keeps of every call.
    """

    def __init__(
        self,
        seed: int = 11,
        features: int = 128,
        hidden: int = 384,
        model: str = MODEL,
        blas_threads: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        if blas_threads > 0:
            _limit_blas_threads(blas_threads)
        self.features = features
        self.w1 = rng.normal(size=(features, hidden)) / np.sqrt(features)
        self.w2 = rng.normal(size=(hidden, 16)) / np.sqrt(hidden)
        self.items = 16
        self.library_path = "blas"
        self.extra_rounds = 0
        self.leak_bytes = 0
        self.leaked: list[np.ndarray] = []
        self.predict: Callable[[np.ndarray], np.ndarray] = track_inference(model=model, version="1")(
            self._predict
        )

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        from ..windows import set_input_size

        set_input_size(len(batch))
        with stage("preprocess"):
            x = (batch - batch.mean(axis=0)) / (batch.std(axis=0) + 1e-6)
            for _ in range(self.extra_rounds):
                x = np.tanh(x * 1.01)  # preprocessing creep: one more feature transform per round
        with stage("infer"):
            if self.library_path == "einsum":
                hidden = np.einsum("ij,jk->ik", x, self.w1, optimize=False)
            else:
                hidden = x @ self.w1
            logits = np.maximum(hidden, 0.0) @ self.w2
        with stage("postprocess"):
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores = exp / exp.sum(axis=1, keepdims=True)
            if self.leak_bytes:
                self.leaked.append(np.ones(self.leak_bytes // 8))  # a cache that is never evicted
            return np.asarray(scores[:, 0])

    def batch(self, rng: np.random.Generator) -> np.ndarray:
        """One request's input: ``items`` rows of features."""
        return rng.normal(size=(self.items, self.features))


def _limit_blas_threads(count: int) -> None:
    """Limit BLAS to ``count`` threads in this process (through threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(count, user_api="blas")


def run_load(
    service: TaxService, stop: threading.Event, *, pause_seconds: float = 0.002, seed: int = 0
) -> int:
    """Call the service until ``stop`` is set, with a short pause between calls; returns the calls."""
    rng = np.random.default_rng(seed)
    calls = 0
    while not stop.is_set():
        service.predict(service.batch(rng))
        calls += 1
        stop.wait(pause_seconds)
    return calls


class CpuHogs:
    """``count`` busy-looping processes beside this one, while the context is open.

    >>> with CpuHogs(2):  # doctest: +SKIP
    ...     time.sleep(5)
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> CpuHogs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for _ in range(self.count):
            self._processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", _HOG],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def stop(self) -> None:
        processes, self._processes = self._processes, []
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@dataclass
class Phase:
    """One injected cause: what it does, how to start it, advance it every second, and undo it."""

    name: str
    what: str
    start: Callable[[TaxService], None]
    stop: Callable[[TaxService], None]
    tick: Callable[[TaxService, float], None] = field(default=lambda service, elapsed: None)


def _hog_count() -> int:
    return max(3, 3 * (os.cpu_count() or 1))


_HOGS: list[CpuHogs] = []


def _start_hogs(service: TaxService) -> None:
    hogs = CpuHogs(_hog_count())
    hogs.start()
    _HOGS.append(hogs)


def _stop_hogs(service: TaxService) -> None:
    while _HOGS:
        _HOGS.pop().stop()


def _set(**values: object) -> Callable[[TaxService], None]:
    def apply(service: TaxService) -> None:
        for name, value in values.items():
            setattr(service, name, value)

    return apply


def _grow(service: TaxService, elapsed: float) -> None:
    service.extra_rounds = 2 + int(elapsed * 2)


def _stop_leak(service: TaxService) -> None:
    service.leak_bytes = 0
    service.leaked.clear()


PHASES = (
    Phase(
        "contention",
        f"{_hog_count()} CPU-hog processes run beside the service",
        _start_hogs,
        _stop_hogs,
    ),
    Phase(
        "slower library path",
        "infer multiplies with numpy's einsum loops instead of OpenBLAS",
        _set(library_path="einsum"),
        _set(library_path="blas"),
    ),
    Phase(
        "growing step",
        "preprocess gains two rounds of feature work every second",
        _set(extra_rounds=2),
        _set(extra_rounds=0),
        _grow,
    ),
    Phase("larger inputs", "requests carry 4x the rows", _set(items=64), _set(items=16)),
    Phase("leak", "postprocess keeps 256 KiB of every call", _set(leak_bytes=256 * 1024), _stop_leak),
)


def _key(r: object) -> tuple[object, ...]:
    return (
        getattr(r, "model", None),
        getattr(r, "stage", None),
        getattr(r, "metric", None),
        getattr(r, "since", None),
    )


@contextlib.contextmanager
def _load(service: TaxService) -> Iterator[threading.Event]:
    stop = threading.Event()
    worker = threading.Thread(target=run_load, args=(service, stop), name="tax-demo-load", daemon=True)
    worker.start()
    try:
        yield stop
    finally:
        stop.set()
        worker.join(timeout=10)


def run_tax_demo(
    *, window_seconds: float = 1.0, baseline_seconds: float = 8.0, sustain_seconds: float = 3.0
) -> int:
    """Run the demo; returns 0 (what the detector found is printed, not judged)."""
    import inferscope

    from ..detector import Regression, describe, regressions

    directory = tempfile.mkdtemp(prefix="inferscope-tax-demo-")
    inferscope.configure(
        window_seconds=window_seconds,
        baseline_seconds=baseline_seconds,
        regression_sustain_seconds=sustain_seconds,
        counters="thread_cpu,python_heap",
        recorder=os.path.join(directory, "recorder.sqlite"),
    )
    # The demo prints each regression itself: the log records would say it twice. One BLAS thread
    # keeps the service's own cost steady on a small, shared machine.
    logging.getLogger("inferscope.regression").setLevel(logging.ERROR)
    service = TaxService(blas_threads=1)
    print(
        f"inferscope demo --tax: windows of {window_seconds:g} s, anchor over the first "
        f"{baseline_seconds:g} s, a regression must last {sustain_seconds:g} s"
    )
    print(f"flight recorder: {directory}/recorder.sqlite\n")
    seen: set[tuple[object, ...]] = set()
    inject_limit = sustain_seconds + 8 * window_seconds
    recover_limit = sustain_seconds + 10 * window_seconds
    try:
        with _load(service):
            print(f"taking the anchor of {MODEL} ({baseline_seconds:g} s of steady load) ...")
            time.sleep(baseline_seconds + 2 * window_seconds)
            for phase in PHASES:
                print(f"\n== {phase.name}: {phase.what}")
                started = time.monotonic()
                phase.start(service)
                opened: list[Regression] = []
                try:
                    while time.monotonic() - started < inject_limit:
                        time.sleep(window_seconds / 2)
                        phase.tick(service, time.monotonic() - started)
                        opened = [r for r in regressions() if r.active and _key(r) not in seen]
                        if opened and time.monotonic() - started >= sustain_seconds + 5 * window_seconds:
                            break
                finally:
                    phase.stop(service)
                seen.update(_key(r) for r in opened)
                if not opened:
                    print(f"   the detector named nothing within {inject_limit:g} s")
                for r in opened:
                    print(f"   named: {describe(r)}")
                waited = time.monotonic()
                while any(r.active for r in regressions()) and time.monotonic() - waited < recover_limit:
                    time.sleep(window_seconds / 2)
                still = [r for r in regressions() if r.active]
                print(
                    f"   undone; {len(still)} regression(s) still open" if still else "   undone; all closed"
                )
    finally:
        _stop_hogs(service)
    print("\nevery regression of the run (inferscope.regressions()):")
    for r in regressions():
        print(f"   {'active' if r.active else 'closed'} {describe(r)}")
    print(
        "\nthe same from another shell, while it runs: inferscope status --recorder "
        f"{directory}/recorder.sqlite"
    )
    return 0
