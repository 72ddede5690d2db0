"""inferscope's pytest plugin: the ``inferscope_bench`` fixture, a performance gate (docs/ci.md).

::

    def test_fraud_model(inferscope_bench, canonical_batch):
        result = inferscope_bench(model.predict, canonical_batch)
        result.assert_p99_below(0.150)
        result.assert_no_regression(max_increase=0.10)

pytest loads this module (entry point ``pytest11``) into every run of a user who installs
inferscope, so it lives outside the ``inferscope`` package, whose import configures the pipeline
and loads numpy and OpenTelemetry: here only options are declared, and ``inferscope.gate`` is
imported when the fixture is first used.

A regression fails the test. An inconclusive check (the budget ran out before the interval left the
tolerance) and a missing baseline are reported as skips by default, never as failures:
``--inferscope-inconclusive=fail`` makes them fail, ``=pass`` lets them pass with a note in the
summary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from inferscope.gate import BenchResult, StoredBaseline, Verdict

__all__ = ["InferscopeBench"]

_INCONCLUSIVE_POLICIES = ("skip", "fail", "pass")
_DEFAULT_BUDGET_SECONDS = 3.0
_DEFAULT_BASELINE_DIR = ".inferscope/baselines"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("inferscope", "inferscope performance gate (docs/ci.md)")
    group.addoption(
        "--inferscope-save-baseline",
        action="store_true",
        default=False,
        help="save each inferscope_bench run as its test's baseline instead of comparing with it",
    )
    group.addoption(
        "--inferscope-baseline-dir",
        default=None,
        metavar="DIR",
        help="where baselines are kept, one JSON file per test (default: the inferscope_baseline_dir "
        f"ini setting, else {_DEFAULT_BASELINE_DIR} under the root directory)",
    )
    group.addoption(
        "--inferscope-budget",
        default=None,
        metavar="SECONDS",
        help="measuring time per benchmark, extra samples for an undecided check included "
        f"(default: the inferscope_budget ini setting, else {_DEFAULT_BUDGET_SECONDS:g})",
    )
    group.addoption(
        "--inferscope-inconclusive",
        default=None,
        metavar="POLICY",
        help="what an inconclusive check or a missing baseline does to its test: skip (default), fail "
        "or pass",
    )
    group.addoption(
        "--inferscope-markdown",
        default=None,
        metavar="FILE",
        help="write a Markdown summary of the benchmarks (appended when FILE is $GITHUB_STEP_SUMMARY)",
    )
    group.addoption(
        "--inferscope-json",
        default=None,
        metavar="FILE",
        help="write the benchmarks' figures and verdicts as JSON",
    )
    parser.addini("inferscope_baseline_dir", f"where baselines are kept (default {_DEFAULT_BASELINE_DIR})")
    parser.addini(
        "inferscope_budget", f"measuring time per benchmark in seconds (default {_DEFAULT_BUDGET_SECONDS:g})"
    )
    parser.addini(
        "inferscope_inconclusive", "skip (default), fail or pass: the fate of an inconclusive check"
    )


class _Settings:
    """The plugin's options, checked once at start-up."""

    def __init__(self, config: pytest.Config) -> None:
        def option(name: str, ini: str) -> tuple[str, str | None]:
            value = config.getoption(name)
            if value is not None:
                return f"--{name.replace('_', '-')}", value
            from_ini = config.getini(ini)
            return (ini, from_ini) if from_ini else (ini, None)

        where, budget = option("inferscope_budget", "inferscope_budget")
        try:
            self.budget_seconds = float(budget) if budget is not None else _DEFAULT_BUDGET_SECONDS
        except ValueError:
            self.budget_seconds = -1.0
        if not 0.05 <= self.budget_seconds <= 3600:
            raise pytest.UsageError(
                f"{where}={budget}: expected a number of seconds from 0.05 to 3600 "
                "(the measuring time per benchmark)"
            )
        where, policy = option("inferscope_inconclusive", "inferscope_inconclusive")
        self.inconclusive = (policy or "skip").strip().lower()
        if self.inconclusive not in _INCONCLUSIVE_POLICIES:
            raise pytest.UsageError(f"{where}={policy}: expected one of {', '.join(_INCONCLUSIVE_POLICIES)}")
        where, directory = option("inferscope_baseline_dir", "inferscope_baseline_dir")
        base = Path(directory) if directory else Path(_DEFAULT_BASELINE_DIR)
        self.baseline_dir = base if base.is_absolute() else Path(config.rootpath) / base
        if self.baseline_dir.exists() and not self.baseline_dir.is_dir():
            raise pytest.UsageError(f"{where}={directory}: {self.baseline_dir} exists and is not a directory")
        self.save = bool(config.getoption("inferscope_save_baseline"))
        self.reports: list[tuple[str, Path]] = []
        for kind, name in (("markdown", "inferscope_markdown"), ("json", "inferscope_json")):
            path = config.getoption(name)
            if path is not None:
                target = Path(path)
                if target.is_dir():
                    raise pytest.UsageError(
                        f"--{name.replace('_', '-')}={path}: is a directory, expected a file"
                    )
                self.reports.append((kind, target))
        self.results: list[BenchResult] = []


_SETTINGS = pytest.StashKey[_Settings]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SETTINGS] = _Settings(config)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or not settings.results:
        return
    from inferscope.gate.report import write_report

    for kind, path in settings.reports:
        try:
            write_report(path, settings.results, kind=kind)
        except OSError as error:
            terminalreporter.write_line(
                f"inferscope: cannot write the {kind} report to {path}: {error}", red=True
            )
            continue
        terminalreporter.write_line(f"inferscope: {kind} report written to {path}")
    saved = sorted({str(r.baseline_path) for r in settings.results if r.saving and r.baseline_path})
    if saved:
        terminalreporter.write_line(
            f"inferscope: {len(saved)} baseline file(s) saved under {settings.baseline_dir}"
        )


class InferscopeBench:
    """The ``inferscope_bench`` fixture: call it with a function and its arguments.

    ``inferscope_bench(func, *args, **kwargs)`` benchmarks ``func(*args, **kwargs)``;
    ``inferscope_bench.run(func, args, kwargs, model=..., items=..., calls=...)`` names the model
    (to use the baseline as a production anchor), gives the items per call, or cycles over several
    calls' arguments. Each returns an ``inferscope.gate.BenchResult``.
    """

    def __init__(self, request: pytest.FixtureRequest, settings: _Settings) -> None:
        self._request = request
        self._settings = settings
        self.results: list[BenchResult] = []
        self._baselines: dict[str, StoredBaseline] | None = None

    @property
    def baseline_path(self) -> Path:
        """This test's baseline file."""
        from inferscope.gate.store import baseline_file_name

        return self._settings.baseline_dir / baseline_file_name(self._request.node.nodeid)

    def __call__(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> BenchResult:
        return self.run(func, args, kwargs)

    def run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
        model: str | None = None,
        items: float | None = None,
        budget_seconds: float | None = None,
    ) -> BenchResult:
        from inferscope.gate.result import INITIAL_SHARE, BenchResult
        from inferscope.gate.runner import BenchRunner

        node_id = self._request.node.nodeid
        name = model or (node_id if not self.results else f"{node_id}#{len(self.results) + 1}")
        budget = budget_seconds if budget_seconds is not None else self._settings.budget_seconds
        runner = BenchRunner(
            func,
            calls if calls is not None else [(tuple(args), kwargs or {})],
            model=name,
            budget_seconds=budget,
            items=items,
        )
        baseline = None if self._settings.save else self._load_baselines().get(name)
        # Saving measures the whole budget at once; a check measures more only when it must.
        runner.measure(1.0 if self._settings.save or baseline is None else INITIAL_SHARE)
        result = BenchResult(
            runner,
            name=name,
            baseline=baseline,
            baseline_path=self.baseline_path,
            saving=self._settings.save,
            on_inconclusive=self._inconclusive,
        )
        self.results.append(result)
        self._settings.results.append(result)
        return result

    def _load_baselines(self) -> dict[str, StoredBaseline]:
        if self._baselines is None:
            from inferscope.baseline import BaselineFormatError
            from inferscope.gate.store import read_baselines

            path = self.baseline_path
            try:
                self._baselines = read_baselines(path) if path.exists() else {}
            except (OSError, BaselineFormatError) as error:
                pytest.fail(f"inferscope: cannot read the baseline {path}: {error}", pytrace=False)
        return self._baselines

    def _inconclusive(self, message: str, verdict: Verdict | None) -> None:
        policy = self._settings.inconclusive
        text = f"inferscope {message}"
        if policy == "fail":
            pytest.fail(text, pytrace=False)
        elif policy == "skip":
            pytest.skip(text)
        else:
            self._request.node.add_report_section("call", "inferscope", text)

    def save(self) -> None:
        """Write this test's runs as its baseline file."""
        from inferscope.gate.store import StoredBaseline, write_baselines

        runs = [r for r in self.results if r.run.windows]
        if runs:
            write_baselines(self.baseline_path, [StoredBaseline.of_run(r.run) for r in runs])


@pytest.fixture
def inferscope_bench(request: pytest.FixtureRequest) -> Iterator[InferscopeBench]:
    """Benchmark a function with inferscope and check it against its baseline (docs/ci.md)."""
    settings = request.config.stash[_SETTINGS]
    bench = InferscopeBench(request, settings)
    yield bench
    if settings.save and bench.results:
        bench.save()
