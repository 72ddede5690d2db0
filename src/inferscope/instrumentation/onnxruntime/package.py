"""The onnxruntime versions this instrumentation supports, in any of its distributions (the CPU
package or the CUDA one)."""

_instruments_onnxruntime = "onnxruntime >= 1.16"
_instruments_onnxruntime_gpu = "onnxruntime-gpu >= 1.16"

_instruments: tuple[str, ...] = ()
_instruments_any: tuple[str, ...] = (_instruments_onnxruntime, _instruments_onnxruntime_gpu)
