"""TensorFlow / Keras instrumentation with real small Keras models built in code: counts, per-layer
stages, identical results, training and tracing skipped, errors counted once, exact restoration."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import inferscope
from inferscope._keys import error_type_name

try:
    import keras
    import tensorflow as tf
except ImportError:
    if sys.version_info[:2] != (3, 11):
        # Not a CI failure: TensorFlow is installed for Python 3.11 only in CI (as torch is).
        pytest.skip(
            f"TensorFlow is installed for Python 3.11 only in CI, and this is Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}: skipped, under CI too",
            allow_module_level=True,
        )
    # As tests.instrumentation.missing() does, at module level: skip, or fail under CI.
    message = "TensorFlow is not installed; pip install -e . --group frameworks (Python 3.11: tensorflow-cpu)"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the frameworks are required)", pytrace=False)
    pytest.skip(message, allow_module_level=True)

if keras.backend.backend() != "tensorflow":
    pytest.skip(
        f"Keras runs on the {keras.backend.backend()!r} backend (KERAS_BACKEND); these tests need TensorFlow",
        allow_module_level=True,
    )

from inferscope.instrumentation.tensorflow import (
    PREDICT_METHODS,
    TRAINING_METHODS,
    TensorflowInstrumentor,
    model_identity,
)
from tests.conftest import run_python
from tests.instrumentation import instrumenting

FEATURES, HIDDEN, OUTPUTS = 4, 8, 3


def mlp(name: str = "mlp", seed: int = 0) -> keras.Model:
    """input -> hidden -> out, with names of its own (stage names come from layer names)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(HIDDEN, activation="relu", name="hidden"),
            keras.layers.Dense(OUTPUTS, name="out"),
        ],
        name=name,
    )


def nested(name: str = "nested") -> keras.Model:
    """A functional model whose first layer is a model of its own (``encoder``)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,))
    encoder = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(HIDDEN, name="enc_dense")], name="encoder"
    )
    outputs = keras.layers.Dense(OUTPUTS, name="head")(encoder(inputs))
    return keras.Model(inputs, outputs, name=name)


class Raising(keras.layers.Layer):
    """Raises ``exc`` when run eagerly; passes its input through while Keras traces it for shapes."""

    def __init__(self, exc: BaseException, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exc = exc

    def call(self, x: Any) -> Any:
        if tf.executing_eagerly():
            raise self.exc
        return x


class Boom(Exception):
    pass


class Scorer(keras.Model):
    """A subclassed model without a name of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.first = keras.layers.Dense(HIDDEN, name="scorer_first")
        self.second = keras.layers.Dense(1, name="scorer_second")

    def call(self, x: Any, training: bool = False) -> Any:
        return self.second(self.first(x))


def inputs(rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype("float32")


def rows() -> list[tuple[str | None, str | None, int]]:
    return [(r.model, r.stage, r.count) for r in inferscope.snapshot().rows]


def keras_attributes() -> dict[tuple[type, str], object]:
    """Every attribute the instrumentor may replace: on the class of ``keras.Model``'s MRO that
    defines it (``Layer.__call__``, the TensorFlow trainer's methods)."""
    found: dict[tuple[type, str], object] = {}
    for name in ("__call__", *PREDICT_METHODS, *TRAINING_METHODS):
        owner = next(klass for klass in keras.Model.__mro__ if name in klass.__dict__)
        found[(owner, name)] = owner.__dict__[name]
    return found


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments Keras; teardown always uninstruments."""
    yield from instrumenting(TensorflowInstrumentor)


# --- what counts -----------------------------------------------------------------------------------


def test_calls_and_predictions_are_inferences_with_identical_results(instrument):
    model, x = mlp(), inputs()
    called = model(x).numpy()
    predicted = model.predict(x, verbose=0)
    on_batch = model.predict_on_batch(x)
    instrument()
    for _ in range(3):
        np.testing.assert_array_equal(model(x).numpy(), called)
    for _ in range(2):
        np.testing.assert_array_equal(model.predict(x, verbose=0), predicted)
    np.testing.assert_array_equal(model.predict_on_batch(x), on_batch)
    # predict calls the model inside itself: one inference per predict, and the layers are none.
    assert rows() == [("mlp", None, 6)]
    row = inferscope.snapshot().row("mlp")
    assert (row.version, row.errors) == (None, 0)


def test_stages_at_depth_1_are_the_layers_of_eager_calls(instrument):
    model, x = mlp(), inputs()
    expected = model(x).numpy()
    instrument(stage_depth=1)
    for _ in range(3):
        np.testing.assert_array_equal(model(x).numpy(), expected)
    model.predict(x, verbose=0)  # a graph runs: no Python layer call, no stage
    assert rows() == [("mlp", None, 4), ("mlp", "hidden", 3), ("mlp", "out", 3)]


def test_stages_at_depth_2_nest_under_a_nested_model(instrument):
    model, x = nested(), inputs()
    expected = model(x).numpy()
    instrument(stage_depth=2)
    np.testing.assert_array_equal(model(x).numpy(), expected)
    assert rows() == [
        ("nested", None, 1),
        ("nested", "encoder", 1),
        ("nested", "encoder/enc_dense", 1),
        ("nested", "head", 1),
    ]


def test_a_model_built_on_its_first_instrumented_call_has_its_stages_once(instrument):
    model = Scorer()  # no weights yet: the first call builds the layers
    instrument(stage_depth=1, model_names={model: "scorer"})
    model(inputs())
    model(inputs())
    assert rows() == [("scorer", None, 2), ("scorer", "scorer_first", 2), ("scorer", "scorer_second", 2)]


def test_predict_of_a_model_compiled_to_run_eagerly_has_stages(instrument):
    model, x = mlp(), inputs()
    model.compile(run_eagerly=True)
    expected = model.predict(x, verbose=0)
    instrument(stage_depth=1)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    assert rows() == [("mlp", None, 1), ("mlp", "hidden", 1), ("mlp", "out", 1)]


def test_training_calls_fit_and_evaluate_are_not_recorded(instrument):
    model, x = mlp(), inputs(rows=16)
    y = np.zeros((16, OUTPUTS), "float32")

    class PredictOnEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            model.predict(x, verbose=0)
            model(x)

    instrument(stage_depth=1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True))  # a custom training step
    assert tape.gradient(loss, model.trainable_variables)[0] is not None
    for run_eagerly in (False, True):
        model.compile(optimizer="sgd", loss="mse", run_eagerly=run_eagerly)
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[PredictOnEpochEnd()])
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, validation_split=0.5)
        model.evaluate(x, y, verbose=0)
        model.train_on_batch(x, y)
        model.test_on_batch(x, y)
    assert rows() == []
    model(x, training=False)
    model.predict(x, verbose=0)  # compiled with run_eagerly=True: its layers are stages too
    assert rows() == [("mlp", None, 2), ("mlp", "hidden", 2), ("mlp", "out", 2)]


def test_track_training_records_calls_with_training_true(instrument):
    model, x = mlp(), inputs()
    model.compile(optimizer="sgd", loss="mse")
    instrument(track_training=True)
    model(x, training=True)
    model.fit(x, np.zeros((5, OUTPUTS), "float32"), verbose=0)
    assert rows() == [("mlp", None, 1)]  # nothing inside fit is recorded either way


# TensorFlow's own, while it saves variables: not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
def test_tracing_and_symbolic_calls_are_not_inferences(instrument, tmp_path):
    model, x = mlp(), inputs()
    instrument(stage_depth=1)

    @tf.function
    def serve(batch: Any) -> Any:
        return model(batch)

    expected = model(x).numpy()  # eager: an inference
    np.testing.assert_array_equal(serve(x).numpy(), expected)  # traced once, then a graph runs
    np.testing.assert_array_equal(serve(x).numpy(), expected)
    # Building a functional model around it calls it on symbolic inputs.
    symbolic = keras.Input((FEATURES,))
    keras.Model(symbolic, model(symbolic))
    # Exporting and saving trace the model into graphs.
    model.export(str(tmp_path / "exported"))
    tf.saved_model.save(model, str(tmp_path / "saved"))
    model.save(tmp_path / "mlp.keras")
    assert rows() == [("mlp", None, 1), ("mlp", "hidden", 1), ("mlp", "out", 1)]
    # A model loaded from a .keras file keeps its name.
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "mlp.keras")(x).numpy(), expected)
    assert inferscope.snapshot().row("mlp").count == 2


def test_a_model_with_several_inputs_is_one_inference(instrument):
    left, right = keras.Input((FEATURES,), name="left"), keras.Input((FEATURES,), name="right")
    joined = keras.layers.Concatenate(name="join")([left, right])
    model = keras.Model(
        {"left": left, "right": right}, keras.layers.Dense(1, name="score")(joined), name="pair"
    )
    batch = {"left": inputs(seed=2), "right": inputs(seed=3)}
    expected = model(batch).numpy()
    instrument(stage_depth=1)
    np.testing.assert_array_equal(model(batch).numpy(), expected)
    np.testing.assert_array_equal(model.predict(batch, verbose=0), model.predict_on_batch(batch))
    assert rows() == [("pair", None, 3), ("pair", "join", 1), ("pair", "score", 1)]


def test_a_raising_model_counts_one_error_and_the_exception_passes_unchanged(instrument):
    exc = Boom("bad input")
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(HIDDEN, name="first"), Raising(exc, name="boom")],
        name="raising",
    )
    with pytest.raises(Boom) as uninstrumented:
        model(inputs())
    instrument(stage_depth=1)
    with pytest.raises(Boom) as caught:
        model(inputs())
    # Keras raises a copy with the call's arguments in its message; that copy passes unchanged.
    assert str(caught.value) == str(uninstrumented.value)
    assert "bad input" in str(caught.value)
    with pytest.raises(ValueError):
        model.predict_on_batch(np.zeros((2, FEATURES + 1), "float32"))  # the wrong width
    snap = inferscope.snapshot()
    row = snap.row("raising")
    assert (row.count, row.errors) == (2, 2)
    assert row.error_types == {error_type_name(Boom): 1, error_type_name(ValueError): 1}
    assert snap.row("raising", "first").errors == 0  # the stage before the raise
    assert snap.row("raising", "boom").errors == 1


def test_a_wrong_input_shape_is_one_error_of_the_inference(instrument):
    model = mlp()
    instrument(stage_depth=1)
    with pytest.raises(ValueError):
        model(np.zeros((2, FEATURES + 1), "float32"))
    row = inferscope.snapshot().row("mlp")
    assert (row.count, row.errors) == (1, 1)


def test_a_base_exception_closes_the_entry_and_passes_through(instrument):
    model = keras.Sequential(
        [keras.Input((FEATURES,)), Raising(KeyboardInterrupt(), name="interrupt")], name="interrupted"
    )
    instrument()
    with pytest.raises(KeyboardInterrupt):
        model(inputs())
    assert inferscope.snapshot().row("interrupted").errors == 1  # the fixture checks nothing is left open


def test_inside_a_tracked_inference_the_model_is_part_of_it(instrument):
    model, x = mlp(), inputs()
    instrument(stage_depth=1)

    @inferscope.track_inference(model="service")
    def serve(batch: np.ndarray) -> np.ndarray:
        with inferscope.stage("infer"):
            first = model(batch).numpy()
            model.predict(batch, verbose=0)
            return first

    serve(x)
    assert rows() == [
        ("service", None, 1),
        ("service", "infer", 1),
        ("service", "infer/hidden", 1),
        ("service", "infer/out", 1),
    ]


def test_calls_in_threads_are_counted_each(instrument):
    model, x = mlp(), inputs()
    model(x)  # built before the threads start
    instrument(stage_depth=1)

    def work() -> None:
        for _ in range(5):
            model(x)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = inferscope.snapshot()
    assert snap.row("mlp").count == 20
    assert snap.row("mlp", "out").count == 20


# --- which models, and their names ----------------------------------------------------------------


def test_layers_alone_are_not_models_by_default(instrument):
    instrument()
    layer = keras.layers.Dense(2, name="alone")
    layer(inputs())
    keras.layers.ReLU()(inputs())
    assert rows() == []


def test_the_default_name_is_the_given_name_else_the_class(instrument):
    given, auto, subclassed = mlp(name="fraud"), keras.Sequential([keras.layers.Dense(2)]), Scorer()
    assert model_identity(auto)[0].name == "Sequential"  # "sequential_N": numbered by the process
    assert model_identity(subclassed)[0].name == "Scorer"
    instrument()
    given(inputs())
    auto(inputs())
    subclassed(inputs())
    assert rows() == [("Scorer", None, 1), ("Sequential", None, 1), ("fraud", None, 1)]


def test_models_selects_objects_even_inside_unselected_models(instrument):
    model = nested()
    encoder = model.get_layer("encoder")
    instrument(models=[encoder], stage_depth=1)
    model(inputs())
    mlp()(inputs())  # not selected
    assert rows() == [("encoder", None, 1), ("encoder", "enc_dense", 1)]


def test_models_by_keras_name_or_class_name_and_a_chosen_layer(instrument):
    layer = keras.layers.Dense(2, name="lonely")
    instrument(models=["fraud", "Scorer", layer])
    mlp(name="fraud")(inputs())
    mlp(name="other")(inputs())
    Scorer()(inputs())
    layer(inputs())  # a plain layer counts when chosen
    assert rows() == [("Scorer", None, 1), ("fraud", None, 1), ("lonely", None, 1)]


def test_model_names_by_object_keras_name_and_callable(instrument):
    first, second, third = mlp(name="first"), mlp(name="second"), Scorer()
    instrument(
        model_names={first: ("fraud", "3"), "second": "churn"},
    )
    first(inputs())
    second(inputs())
    third(inputs())
    assert [(r.model, r.version, r.count) for r in inferscope.snapshot().rows] == [
        ("Scorer", None, 1),
        ("churn", None, 1),
        ("fraud", "3", 1),
    ]


def test_model_names_callable(instrument):
    model = Scorer()
    instrument(model_names=lambda m: ("scorer", 2) if isinstance(m, Scorer) else None)
    model(inputs())
    mlp(name="plain")(inputs())
    assert [(r.model, r.version) for r in inferscope.snapshot().rows] == [("plain", None), ("scorer", "2")]


def test_the_version_comes_from_the_inferscope_version_attribute(instrument, caplog):
    model, named, invalid = mlp(name="versioned"), mlp(name="other"), mlp(name="invalid")
    model.inferscope_version = 5
    named.inferscope_version = "2024-06"
    invalid.inferscope_version = 1.5
    instrument(model_names={named: "ranker"})
    with caplog.at_level(logging.WARNING):
        model(inputs())
        named(inputs())
        invalid(inputs())
    assert "inferscope_version" in caplog.text
    assert [(r.model, r.version) for r in inferscope.snapshot().rows] == [
        ("invalid", None),
        ("ranker", "2024-06"),
        ("versioned", "5"),
    ]


# --- instrumentation itself ------------------------------------------------------------------------


def test_uninstrument_restores_the_originals_by_identity(instrument):
    before = keras_attributes()
    assert {name for _, name in before} == {"__call__", *PREDICT_METHODS, *TRAINING_METHODS}
    instrumentor = instrument(stage_depth=1)
    assert {(klass, name) for klass, name, _ in instrumentor.patched} == set(before)
    for klass, name, original in instrumentor.patched:
        assert original is before[(klass, name)]
        assert klass.__dict__[name] is not original
    instrumentor.uninstrument()
    after = keras_attributes()
    assert all(after[key] is value for key, value in before.items())
    assert instrumentor.patched == []
    model = mlp()
    model(inputs())
    model.predict(inputs(), verbose=0)
    assert rows() == []
    instrumentor.instrument()  # for the fixture's teardown


def test_instrument_twice_is_idempotent(instrument, caplog):
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        TensorflowInstrumentor().instrument(stage_depth=3)
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    mlp()(inputs())
    assert rows() == [("mlp", None, 1)]  # the first options hold: no stages


def test_a_failing_model_names_callable_is_counted_and_the_call_goes_through(instrument):
    def broken(model: Any) -> Any:
        raise RuntimeError("naming failed")

    model, x = mlp(), inputs()
    expected = model(x).numpy()
    instrument(model_names=broken)
    np.testing.assert_array_equal(model(x).numpy(), expected)
    assert rows() == [("mlp", None, 1)]  # the default name


def test_invalid_options_are_rejected():
    before = keras_attributes()
    with pytest.raises(TypeError, match="stage_depth"):
        TensorflowInstrumentor().instrument(stage_depth=-1)
    with pytest.raises(TypeError, match="stage_depth"):
        TensorflowInstrumentor().instrument(stage_depth=True)
    with pytest.raises(TypeError, match="track_training"):
        TensorflowInstrumentor().instrument(track_training="no")
    with pytest.raises(TypeError, match="did you mean 'stage_depth'"):
        TensorflowInstrumentor().instrument(stages_depth=1)
    after = keras_attributes()
    assert all(after[key] is value for key, value in before.items())  # nothing was patched


def test_dependencies_are_met():
    from inferscope.instrumentation.tensorflow import package

    dependencies = tuple(TensorflowInstrumentor().instrumentation_dependencies())
    assert dependencies[0] == package._instruments_keras
    assert dependencies[1] in package._instruments_any
    assert TensorflowInstrumentor()._check_dependency_conflicts() is None


# --- Keras imported after instrument() (fresh interpreters) -----------------------------------------

_PATCHED_NAMES = repr(sorted({"__call__", *PREDICT_METHODS, *TRAINING_METHODS}))


def test_instrument_imports_nothing_and_patches_keras_when_the_application_imports_it():
    result = run_python(
        f"""
        import sys
        from inferscope.instrumentation.tensorflow import TensorflowInstrumentor

        instrumentor = TensorflowInstrumentor()
        instrumentor.instrument(stage_depth=1)
        assert "keras" not in sys.modules and "tensorflow" not in sys.modules
        assert instrumentor.patched == []

        import numpy as np
        import tensorflow as tf  # imports Keras, from inside TensorFlow's own __init__

        import inferscope

        assert sorted(name for _, name, _ in instrumentor.patched) == {_PATCHED_NAMES}
        model = tf.keras.Sequential(
            [tf.keras.Input((2,)), tf.keras.layers.Dense(1, name="late_dense")], name="late"
        )
        model(np.zeros((1, 2), "float32"))
        model.predict(np.zeros((1, 2), "float32"), verbose=0)
        print([(r.model, r.stage, r.count) for r in inferscope.snapshot().rows])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[('late', None, 2), ('late', 'late_dense', 1)]"


def test_uninstrumented_before_keras_is_imported_nothing_is_patched():
    result = run_python(
        """
        from inferscope.instrumentation.tensorflow import TensorflowInstrumentor

        instrumentor = TensorflowInstrumentor()
        instrumentor.instrument()
        instrumentor.uninstrument()

        import keras  # the hook runs, and does nothing

        assert instrumentor.patched == []
        assert not any(
            hasattr(klass.__dict__.get(name), "__inferscope_original__")
            for klass in keras.Model.__mro__
            for name in ("__call__", "predict", "fit")
        )
        print("untouched")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "untouched"
