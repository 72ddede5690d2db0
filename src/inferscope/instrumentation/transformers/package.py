"""The transformers versions this instrumentation supports.

torch is required too: pipelines and ``generate()`` run PyTorch models (transformers 5 supports no
other framework), and a pipeline's streamed output is transformers' ``PipelineIterator``, which is
built on ``torch.utils.data``."""

_instruments: tuple[str, ...] = ("transformers >= 4.40", "torch >= 2.3")
_instruments_any: tuple[str, ...] = ()
