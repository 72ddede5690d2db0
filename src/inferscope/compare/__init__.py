"""``inferscope compare``: which way of running a model is fastest, with the same outputs.

Given a model and an example input, :func:`compare` builds the variants its framework offers
(TorchScript, ``torch.compile``, ONNX Runtime, XLA, a Booster's in-place predictor), checks that
each gives the baseline's outputs, times them in interleaved rounds, and names the fastest one
whose speed-up holds at the confidence level. See docs/compare.md::

    from inferscope.compare import compare

    result = compare(model, example_batch)
    print(result.table())
    result.best, result.variant("onnxruntime").speedup

The result is also JSON (``result.to_json()``, :func:`load`) and a report section
(:func:`report_section`, or :func:`section_html` for a page rendered on the server).
"""

from ._result import (
    COMPARE_FORMAT,
    CompareResult,
    OutputCheck,
    Speedup,
    VariantResult,
    load,
    report_section,
    section_html,
)
from ._run import compare
from ._variants import FRAMEWORKS, framework_of

__all__ = [
    "COMPARE_FORMAT",
    "FRAMEWORKS",
    "CompareResult",
    "OutputCheck",
    "Speedup",
    "VariantResult",
    "compare",
    "framework_of",
    "load",
    "report_section",
    "section_html",
]
