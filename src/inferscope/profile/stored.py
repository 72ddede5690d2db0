"""The sampled profiles the flight recorder holds, matched to the regressions they explain, for
``inferscope status`` and ``inferscope report``.

A profile belongs to a regression of the same model, version and stage when it began at or after
the regression's start: the first such one is the sampling its opening started (or, when the rate
limit had just sampled that stage for an earlier regression, none is shown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["profile_lines", "profile_of", "profiles_of"]


def profiles_of(recorder: Any, service: str, model: str) -> list[dict[str, Any]]:
    """The stored profiles of a model, oldest first; none when the recorder has no such table."""
    if recorder is None or not hasattr(recorder, "profiles"):
        return []
    return list(reversed(recorder.profiles(service=service, model=model)))


def profile_of(profiles: Sequence[Mapping[str, Any]], regression: Mapping[str, Any]) -> dict[str, Any] | None:
    """The profile of ``regression`` (a ``regression_to_json`` dict) among ``profiles`` (oldest
    first), as ``{"started_unix", "seconds", "attribution", "samples", "top"}``, or None."""
    for row in profiles:
        if (
            row["version"] == regression.get("version")
            and row["stage"] == regression.get("stage")
            and row["started_unix"] >= float(regression["since"]) - 1e-6
        ):
            payload = row["payload"]
            return {
                "started_unix": row["started_unix"],
                "seconds": payload.get("seconds"),
                "attribution": payload.get("attribution"),
                "samples": payload.get("samples", 0),
                "top": list(payload.get("top") or []),
            }
    return None


_ATTRIBUTION = {
    "stage": "stacks inside the stage",
    "inference": "stacks inside the inference",
    "model": "the stage was not seen in the stacks: stacks of the model's threads",
    "none": "no stack of the model was seen",
}


def profile_lines(profile: Mapping[str, Any], *, top: int = 5, indent: str = "      ") -> list[str]:
    """The lines ``inferscope status`` prints under a regression."""
    head = (
        f"{indent}sampled for {profile.get('seconds') or 0:.0f} s, {profile.get('samples', 0)} samples "
        f"({_ATTRIBUTION.get(str(profile.get('attribution')), profile.get('attribution'))})"
    )
    lines = [head]
    for entry in list(profile.get("top") or [])[:top]:
        lines.append(
            f"{indent}  {entry['share']:>5.0%} ({entry['self_share']:>4.0%} in itself)  {entry['function']}"
        )
    return lines
