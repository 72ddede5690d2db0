"""The TensorFlow and Keras versions this instrumentation supports. TensorFlow comes as either of two
distributions (``tensorflow``, or ``tensorflow-cpu``, which has no CUDA support; both provide the
``tensorflow`` module).

TensorFlow 2.18 is the first release that installs beside inferscope: earlier ones require
protobuf < 5, and the OTLP exporters inferscope depends on (opentelemetry-proto >= 1.30) require
protobuf >= 5. It requires Keras >= 3.5, whose ``Layer.__call__`` and ``TensorFlowTrainer`` methods
are what the instrumentation wraps. Tested with TensorFlow 2.18.1 / Keras 3.5.0 and TensorFlow
2.21.0 / Keras 3.15.1."""

_instruments_keras = "keras >= 3.5"
_instruments_tensorflow = "tensorflow >= 2.18"
_instruments_tensorflow_cpu = "tensorflow-cpu >= 2.18"

_instruments: tuple[str, ...] = (_instruments_keras,)
_instruments_any: tuple[str, ...] = (_instruments_tensorflow, _instruments_tensorflow_cpu)
