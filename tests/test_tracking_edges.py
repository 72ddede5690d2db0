"""Edges of tracking that must hold on both backends: misuse refused at decoration, nothing
recorded left uncounted, and numbers that cannot be (CPU above wall for one thread)."""

from __future__ import annotations

import asyncio
import gc

import pytest

import inferscope


def test_decorating_a_class_is_refused_with_a_clear_error():
    class Model:
        def predict(self, x):
            return x

    with pytest.raises(TypeError, match=r"not the class .*Model: decorate the method .*Model\.predict"):
        inferscope.track_inference(Model)
    with pytest.raises(TypeError, match="not the class"):
        inferscope.track_inference(model="m")(Model)
    assert isinstance(Model(), Model)  # the class is left as it was


def test_stages_inside_abandoned_generators_are_counted_as_abandoned(snapshot_row):
    @inferscope.track_inference(model="gen-abandoned")
    def stream():
        with inferscope.stage("body"):
            yield 1
            yield 2

    for run in range(4):
        gen = stream()
        next(gen)
        if run == 0:
            assert list(gen) == [2]  # exhausted
        elif run == 1:
            gen.close()
        else:
            del gen  # collected while suspended
            gc.collect()
    inference, body = snapshot_row("gen-abandoned"), snapshot_row("gen-abandoned", "body")
    assert (inference.count, inference.abandoned, inference.errors) == (4, 3, 0)
    assert (body.count, body.abandoned, body.errors) == (4, 3, 0)


def test_stages_inside_abandoned_async_generators_are_counted_as_abandoned(snapshot_row):
    @inferscope.track_inference(model="agen-abandoned")
    async def stream():
        with inferscope.stage("body"):
            yield 1
            yield 2

    async def main():
        for _ in range(3):
            agen = stream()
            await agen.__anext__()
            await agen.aclose()

    asyncio.run(main())
    inference, body = snapshot_row("agen-abandoned"), snapshot_row("agen-abandoned", "body")
    assert (inference.count, inference.abandoned, inference.errors) == (3, 3, 0)
    assert (body.count, body.abandoned, body.errors) == (3, 3, 0)


def test_a_plain_stage_closed_by_generator_exit_is_abandoned_not_an_error(snapshot_row):
    def stream():
        with inferscope.stage("untracked-body"):
            yield 1
            yield 2

    gen = stream()
    next(gen)
    gen.close()
    row = snapshot_row(None, "untracked-body")
    assert (row.count, row.abandoned, row.errors) == (1, 1, 0)
