"""cProfile split by stage: what ``inferscope profile`` runs.

The calls run on the calling thread, twice over: once with one profiler around each whole call, and
once with one profiler per stage path, enabled only while that stage is the innermost one open (and
one for the inference's own code outside any stage). Only one profiler can be enabled at a time
(from Python 3.12 cProfile is exclusive), so entering a stage disables its parent's profiler and
leaving it enables the parent's again.

Stages are seen through ``inferscope.stage``: :func:`install_stage_switch` replaces it with a
function that returns the same stages, wrapped so that entering and leaving one switches the
profiler. It must run before the module that opens the stages is imported (a module that did
``from inferscope import stage`` keeps what it imported), which the command does. Stages that
framework instrumentors open (a Pipeline's steps, a torch module's forward) do not go through
``inferscope.stage``: their time is counted in the stage around them.

Example::

    install_stage_switch()
    from mypkg.serving import predict          # imported after the switch
    run = profile_calls(predict, [((batch,), {})], repeat=50)
    print(run.render())
"""

from __future__ import annotations

import cProfile
import os
import pstats
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._runtime import REGISTRY, RUNTIME

Call = tuple[tuple[Any, ...], Mapping[str, Any]]

__all__ = [
    "FunctionCost",
    "ProfileRun",
    "StageProfile",
    "install_stage_switch",
    "profile_calls",
    "uninstall_stage_switch",
]

#: Label of the profile of the inference's own code, outside every stage.
OUTSIDE_STAGES = "(outside stages)"
#: Label of the profile of the whole call.
WHOLE_CALL = "(whole call)"

_THIS_PACKAGE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class FunctionCost:
    """One function of a profile, as pstats counts it: calls (primitive ones apart from recursive
    ones), time in its own code (``tottime``) and with what it called (``cumtime``), seconds."""

    name: str
    filename: str
    line: int
    calls: int
    primitive_calls: int
    tottime: float
    cumtime: float

    @property
    def label(self) -> str:
        """``name (file:line)``, or the name alone for a built-in."""
        if self.filename == "~" or not self.filename:
            return self.name
        return f"{self.name} ({_short_path(self.filename)}:{self.line})"


@dataclass(frozen=True)
class StageProfile:
    """The profile of one stage path (or of the whole call, or of the code outside stages)."""

    stage: str
    #: How often the stage was entered (calls, for the whole call).
    entries: int
    #: Cumulative seconds of the functions the stage's own code called while it was open.
    seconds: float
    top: tuple[FunctionCost, ...]
    stats: pstats.Stats = field(repr=False, compare=False)
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "entries": self.entries,
            "seconds": round(self.seconds, 6),
            "pstats": self.path,
            "top": [
                {
                    "function": f.label,
                    "calls": f.calls,
                    "tottime": round(f.tottime, 6),
                    "cumtime": round(f.cumtime, 6),
                }
                for f in self.top
            ],
        }


@dataclass(frozen=True)
class ProfileRun:
    """What :func:`profile_calls` measured: the whole call, then each stage path, then the code
    outside every stage."""

    model: str
    calls: int
    whole: StageProfile
    stages: tuple[StageProfile, ...]

    def render(self) -> str:
        """The text ``inferscope profile`` prints."""
        lines = [f"model {self.model}: {self.calls} profiled call(s) on one thread"]
        for profile in (self.whole, *self.stages):
            lines.append("")
            what = (
                "stage " + profile.stage
                if profile.stage not in (WHOLE_CALL, OUTSIDE_STAGES)
                else profile.stage
            )
            lines.append(
                f"{what}: {profile.entries} entr{'y' if profile.entries == 1 else 'ies'}, "
                f"{profile.seconds * 1e3:.3f} ms in the calls it made"
            )
            lines.append(
                f"  {'ncalls':>10} {'tottime ms':>11} {'cumtime ms':>11}  function (top by cumulative time)"
            )
            for f in profile.top:
                calls = str(f.calls) if f.calls == f.primitive_calls else f"{f.calls}/{f.primitive_calls}"
                lines.append(f"  {calls:>10} {f.tottime * 1e3:>11.3f} {f.cumtime * 1e3:>11.3f}  {f.label}")
            if profile.path:
                lines.append(f"  saved: {profile.path}")
        lines.append("")
        lines.append("Open a .pstats file with `python -m pstats FILE` or `snakeviz FILE`.")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "calls": self.calls,
            "whole": self.whole.to_json(),
            "stages": [s.to_json() for s in self.stages],
        }


class _Switch:
    """The profiler of the innermost open stage, switched as stages open and close on the thread
    that runs the calls (stages of other threads are left alone)."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.profiles: dict[str | None, cProfile.Profile] = {}
        self.entries: dict[str | None, int] = {}
        self._stack: list[cProfile.Profile] = []

    def begin(self) -> None:
        self._push(None)

    def end(self) -> None:
        while self._stack:
            self._stack.pop().disable()

    def _push(self, stage: str | None) -> None:
        if self._stack:
            self._stack[-1].disable()
        profile = self.profiles.get(stage)
        if profile is None:
            profile = self.profiles[stage] = cProfile.Profile()
        self.entries[stage] = self.entries.get(stage, 0) + 1
        self._stack.append(profile)
        profile.enable()

    def entered(self) -> None:
        if self.thread != threading.get_ident() or not self._stack:
            return
        key = RUNTIME.current_key()
        try:
            info = REGISTRY.info(key)
        except (IndexError, KeyError):
            info = None
        self._push(info.stage if info is not None and info.kind == "stage" else None)

    def exited(self) -> None:
        if self.thread != threading.get_ident() or len(self._stack) < 2:
            return
        self._stack.pop().disable()
        self._stack[-1].enable()


_SWITCH: _Switch | None = None


class _SwitchedStage:
    """A stage that switches the profiler as it opens and closes; otherwise the stage itself."""

    __slots__ = ("_stage",)

    def __init__(self, stage: Any) -> None:
        self._stage = stage

    @property
    def name(self) -> str:
        return str(self._stage.name)

    def __repr__(self) -> str:
        return repr(self._stage)

    def __enter__(self) -> _SwitchedStage:
        self._stage.__enter__()
        switch = _SWITCH
        if switch is not None:
            switch.entered()
        return self

    def __exit__(self, *exc: Any) -> Any:
        switch = _SWITCH
        if switch is not None:
            switch.exited()
        return self._stage.__exit__(*exc)

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:
        from ..tracking import _decorate_stage

        return _decorate_stage(self, func)  # type: ignore[no-any-return]


_ORIGINAL_STAGE: Callable[..., Any] | None = None


def _switched_stage(name: str, /, **kwargs: Any) -> Any:
    assert _ORIGINAL_STAGE is not None
    return _SwitchedStage(_ORIGINAL_STAGE(name, **kwargs))


def install_stage_switch() -> None:
    """Make ``inferscope.stage`` return stages that switch the profiler; idempotent."""
    global _ORIGINAL_STAGE
    import inferscope

    from .. import tracking

    if _ORIGINAL_STAGE is None:
        _ORIGINAL_STAGE = tracking.stage
    inferscope.stage = tracking.stage = _switched_stage  # type: ignore[assignment]


def uninstall_stage_switch() -> None:
    """Give ``inferscope.stage`` back."""
    global _ORIGINAL_STAGE
    import inferscope

    from .. import tracking

    if _ORIGINAL_STAGE is not None:
        inferscope.stage = tracking.stage = _ORIGINAL_STAGE  # type: ignore[assignment]
        _ORIGINAL_STAGE = None


def profile_calls(
    func: Callable[..., Any],
    calls: Sequence[Call],
    *,
    warmup: int = 1,
    repeat: int = 1,
    top: int = 15,
    output_dir: str | os.PathLike[str] | None = None,
) -> ProfileRun:
    """Profile ``func`` over ``calls`` (``repeat`` times each, after ``warmup`` unprofiled calls):
    one profile of the whole call and one per stage path, saved as ``.pstats`` under
    ``output_dir`` when given. ``func`` is tracked (``track_inference``) if it is not already, so
    that its stages have paths. An exception of ``func`` propagates."""
    global _SWITCH
    from ..tracking import track_inference

    if not hasattr(func, "inferscope_key"):
        func = track_inference(func)
    model = _model_of(func)
    runs = [c for _ in range(repeat) for c in calls]
    for args, kwargs in list(calls)[:warmup]:
        func(*args, **kwargs)

    whole = cProfile.Profile()
    for args, kwargs in runs:
        whole.enable()
        try:
            func(*args, **kwargs)
        finally:
            whole.disable()

    switch = _Switch()
    switch.thread = threading.get_ident()
    _SWITCH = switch
    try:
        for args, kwargs in runs:
            switch.begin()
            try:
                func(*args, **kwargs)
            finally:
                switch.end()
    finally:
        _SWITCH = None

    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
    whole_profile = _summarise(WHOLE_CALL, len(runs), whole, top, output_dir, "whole-call")
    stages = []
    for stage in sorted(switch.profiles, key=lambda s: (s is None, s or "")):
        label = OUTSIDE_STAGES if stage is None else stage
        filename = "outside-stages" if stage is None else "stage-" + _file_part(stage)
        stages.append(
            _summarise(label, switch.entries[stage], switch.profiles[stage], top, output_dir, filename)
        )
    return ProfileRun(model, len(runs), whole_profile, tuple(stages))


def _model_of(func: Any) -> str:
    try:
        return str(REGISTRY.info(int(func.inferscope_key)).model)
    except Exception:
        return str(getattr(func, "__qualname__", func))


def _file_part(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage.replace("/", "__"))


def _summarise(
    label: str,
    entries: int,
    profile: cProfile.Profile,
    top: int,
    output_dir: str | os.PathLike[str] | None,
    filename: str,
) -> StageProfile:
    profile.create_stats()
    stats = pstats.Stats(profile)
    path = None
    if output_dir is not None:
        path = os.path.join(os.fspath(output_dir), filename + ".pstats")
        stats.dump_stats(path)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    costs = [
        FunctionCost(name, filename_, line, nc, cc, tt, ct)
        for (filename_, line, name), (cc, nc, tt, ct, callers) in raw.items()
        if not _own(filename_, name, callers)
    ]
    costs.sort(key=lambda f: (-f.cumtime, -f.tottime, f.name))
    # The time of the calls made while the profile was on: the cumulative time of the functions
    # called from the stage's own code (its own lines are not a call the profiler sees).
    seconds = sum(
        ct
        for (filename_, _, name), (_, _, _, ct, callers) in raw.items()
        if not _own(filename_, name) and not any(not _own(f, n) for f, _, n in callers)
    )
    return StageProfile(label, entries, seconds, tuple(costs[:top]), stats, path)


def _own(filename: str, name: str, callers: Any = None) -> bool:
    """The switch's own frames, what only they called, and the profiler's enable/disable: not the
    user's cost."""
    if filename.startswith(_THIS_PACKAGE) or "_lsprof.Profiler" in name:
        return True
    return bool(callers) and all(_own(f, n) for f, _, n in callers)


def _short_path(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at + len(marker) :]
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith(".." + os.sep + "..") else relative
