"""scikit-learn instrumentation with real estimators: counts, stages, nothing counted twice,
identical results, exact restoration."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import inferscope
from tests.instrumentation import instrumenting, require
from tests.instrumentation.apps.models import fitted_pipeline, training_data

require("sklearn")

from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from inferscope.instrumentation.sklearn import (  # noqa: E402
    TRACKED_METHODS,
    UNTRACKED_METHODS,
    SklearnInstrumentor,
)

N = 7


def _estimator_attributes() -> dict[tuple[type, str], object]:
    """Every attribute the instrumentor may replace, on every estimator class and its MRO."""
    classes: set[type] = set()
    stack: list[type] = [BaseEstimator]
    while stack:
        cls = stack.pop()
        if cls not in classes:
            classes.add(cls)
            stack.extend(type.__subclasses__(cls))
    found: dict[tuple[type, str], object] = {}
    for cls in classes:
        for klass in cls.__mro__:
            for name in (*TRACKED_METHODS, *UNTRACKED_METHODS, "__init_subclass__"):
                if name in klass.__dict__:
                    found[(klass, name)] = klass.__dict__[name]
    return found


@pytest.fixture
def fitted() -> tuple[Pipeline, np.ndarray]:
    """A fitted Pipeline and inputs, built before any instrumentation."""
    pipe, x = fitted_pipeline()
    return pipe, x


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments scikit-learn; teardown always uninstruments."""
    yield from instrumenting(SklearnInstrumentor)


def models_in_snapshot() -> set[str | None]:
    return {row.model for row in inferscope.snapshot().rows}


def test_pipeline_is_one_inference_with_a_stage_per_step(fitted, instrument):
    pipe, x = fitted
    expected = pipe.predict(x)
    instrument()
    for _ in range(N):
        assert np.array_equal(pipe.predict(x), expected)
    snap = inferscope.snapshot()
    assert snap.row("Pipeline").count == N
    assert snap.row("Pipeline").errors == 0
    for step in ("scaler", "pca", "clf"):
        assert snap.row("Pipeline", step).count == N
    # The steps' own calls are stages of the pipeline's inference, never inferences of their own.
    assert models_in_snapshot() == {"Pipeline"}
    assert {row.stage for row in snap.rows} == {None, "scaler", "pca", "clf"}


def test_every_inference_method_counts_once_and_returns_the_same(fitted, instrument):
    pipe, x = fitted
    expected = {
        "predict_proba": pipe.predict_proba(x),
        "predict_log_proba": pipe.predict_log_proba(x),
        "decision_function": pipe.decision_function(x),
        "transform": pipe[:-1].transform(x),
    }
    features = pipe[:-1]
    instrument()
    assert np.array_equal(pipe.predict_proba(x), expected["predict_proba"])
    assert np.array_equal(pipe.predict_log_proba(x), expected["predict_log_proba"])
    assert np.array_equal(pipe.decision_function(x), expected["decision_function"])
    assert np.array_equal(features.transform(x), expected["transform"])
    snap = inferscope.snapshot()
    # predict_log_proba calls predict_proba, and decision_function backs both: still one each.
    assert snap.row("Pipeline").count == 4
    assert snap.row("Pipeline", "clf").count == 3
    assert snap.row("Pipeline", "scaler").count == 4
    assert models_in_snapshot() == {"Pipeline"}


def test_score_samples_of_a_single_estimator(instrument):
    from sklearn.ensemble import IsolationForest

    x, _ = training_data()
    forest = IsolationForest(n_estimators=10, random_state=0).fit(x)
    expected = forest.score_samples(x)
    instrument()
    assert np.array_equal(forest.score_samples(x), expected)
    assert inferscope.snapshot().row("IsolationForest").count == 1
    assert models_in_snapshot() == {"IsolationForest"}


def test_training_and_evaluation_are_not_inferences(instrument):
    x, y = training_data()
    instrument()
    pipe = Pipeline(
        [("scaler", StandardScaler()), ("pca", PCA(n_components=4)), ("clf", LogisticRegression())]
    )
    pipe.fit(x, y)  # fit_transform of the steps, transform inside TransformerMixin.fit_transform
    pipe.score(x, y)  # calls the steps' transform and the classifier's predict
    StandardScaler().fit_transform(x)
    assert models_in_snapshot() == set()
    pipe.predict(x)
    assert inferscope.snapshot().row("Pipeline").count == 1


def test_inner_estimators_of_meta_estimators_are_not_counted(instrument):
    from sklearn.ensemble import RandomForestClassifier, VotingClassifier
    from sklearn.model_selection import GridSearchCV

    x, y = training_data()
    instrument()
    # n_jobs=2: the trees predict in joblib worker threads, where no context says "inside a forest".
    forest = RandomForestClassifier(n_estimators=8, n_jobs=2, random_state=0).fit(x, y)
    voting = VotingClassifier([("lr", LogisticRegression()), ("rf", forest)], voting="soft").fit(x, y)
    search = GridSearchCV(
        Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression())]), {"clf__C": [0.1, 1.0]}, cv=2
    ).fit(x, y)
    assert models_in_snapshot() == set()  # all that fitting and cross-validation recorded nothing
    forest.predict(x)
    voting.predict(x)
    search.predict(x)
    snap = inferscope.snapshot()
    assert models_in_snapshot() == {"RandomForestClassifier", "VotingClassifier", "GridSearchCV"}
    assert snap.row("RandomForestClassifier").count == 1
    assert snap.row("VotingClassifier").count == 1
    assert snap.row("GridSearchCV").count == 1
    # The best Pipeline inside the search still shows its steps, under the search's inference.
    assert snap.row("GridSearchCV", "scaler").count == 1
    assert snap.row("GridSearchCV", "clf").count == 1


def test_classes_created_after_instrument_are_covered_and_restored(instrument):
    x, y = training_data()
    instrumentor = instrument()

    class Doubler(TransformerMixin, BaseEstimator):
        def fit(self, x, y=None):
            return self

        def transform(self, x):
            return x * 2

    class Inner(ClassifierMixin, BaseEstimator):
        def fit(self, x, y):
            self.classes_ = np.unique(y)
            return self

        def predict(self, x):
            return (x[:, 0] > 0).astype(int)

    class Outer(ClassifierMixin, BaseEstimator):
        """A user meta-estimator: its inner model is called from user code, not scikit-learn's."""

        def __init__(self, inner=None):
            self.inner = inner

        def fit(self, x, y):
            self.inner.fit(x, y)
            return self

        def predict(self, x):
            return self.inner.predict(x)

    # Our wrapper is outermost: scikit-learn's set_output wrapping of transform is inside it.
    wrapped = Doubler.__dict__["transform"]
    assert wrapped.__inferscope_original__.__code__.co_filename.endswith("_set_output.py")
    wrapped_predict = Outer.__dict__["predict"]
    assert np.array_equal(Doubler().fit(x).transform(x), x * 2)
    outer = Outer(Inner()).fit(x, y)
    assert np.array_equal(outer.predict(x), (x[:, 0] > 0).astype(int))
    snap = inferscope.snapshot()
    assert snap.row("Doubler").count == 1
    assert snap.row("Outer").count == 1
    assert models_in_snapshot() == {"Doubler", "Outer"}

    instrumentor.uninstrument()
    assert Doubler.__dict__["transform"] is wrapped.__inferscope_original__
    assert Outer.__dict__["predict"] is wrapped_predict.__inferscope_original__
    instrumentor.instrument()  # for the fixture's teardown


def test_uninstrument_restores_every_original_by_identity(instrument):
    before = _estimator_attributes()
    instrumentor = instrument()
    during = _estimator_attributes()
    replaced = [key for key, value in during.items() if before.get(key) is not value]
    assert (Pipeline, "predict") in replaced
    assert (StandardScaler, "transform") in replaced
    assert (LogisticRegression, "predict_proba") in replaced
    assert len(replaced) == len(instrumentor.patched)
    for klass, name, original in instrumentor.patched:
        assert before[(klass, name)] is original

    instrumentor.uninstrument()
    after = _estimator_attributes()
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert instrumentor.patched == []
    instrumentor.instrument()  # for the fixture's teardown


def test_available_if_keeps_following_the_final_step(instrument):
    from sklearn.svm import SVC

    x, y = training_data()
    instrument()
    pipe = Pipeline([("scaler", StandardScaler()), ("svc", SVC())]).fit(x, y)
    assert hasattr(pipe, "decision_function")
    assert not hasattr(pipe, "predict_proba")
    assert not hasattr(pipe, "transform")  # the final step has no transform


def test_instrument_twice_is_idempotent(fitted, instrument, caplog):
    pipe, x = fitted
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        instrumentor.instrument()
        SklearnInstrumentor().instrument()  # the same singleton
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    pipe.predict(x)
    assert inferscope.snapshot().row("Pipeline").count == 1
    assert inferscope.snapshot().row("Pipeline", "clf").count == 1


def test_model_names_by_object_alias_and_callable(fitted, instrument):
    pipe, x = fitted
    other, _ = fitted_pipeline(seed=1)
    scaler = StandardScaler().fit(x)
    instrument(
        model_names={pipe: ("fraud", 3), "StandardScaler": "features"},
        attributes={"team": "risk"},
    )
    pipe.predict(x)
    other.predict(x)
    scaler.transform(x)
    snap = inferscope.snapshot()
    fraud = snap.row("fraud")
    assert (fraud.count, fraud.version) == (1, "3")
    assert snap.row("fraud", "clf").version == "3"
    assert snap.row("Pipeline").count == 1  # the other pipeline keeps the default name
    assert snap.row("features").count == 1
    key = inferscope._runtime.REGISTRY
    assert any(info.model == "fraud" and dict(info.attributes) == {"team": "risk"} for info in key.infos())


def test_model_names_callable_and_models_filter(fitted, instrument):
    pipe, x = fitted
    other, _ = fitted_pipeline(seed=1)
    names = {id(pipe): "first"}
    instrument(models=[pipe], model_names=lambda est: names.get(id(est)))
    pipe.predict(x)
    other.predict(x)  # not one of the models: passes through
    assert models_in_snapshot() == {"first"}


def test_a_failing_model_names_callable_never_breaks_the_call(fitted, instrument):
    pipe, x = fitted

    def broken(est):
        raise RuntimeError("naming failed")

    from inferscope import _pipeline

    errors_before = _pipeline.DRAINER.errors
    instrument(model_names=broken)
    pipe.predict(x)
    assert inferscope.snapshot().row("Pipeline").count == 1
    assert _pipeline.DRAINER.errors == errors_before + 1  # counted as inferscope.sdk.errors


def test_inside_a_tracked_inference_the_steps_are_stages_of_it(fitted, instrument):
    pipe, x = fitted
    instrument()

    @inferscope.track_inference(model="service")
    def serve(batch):
        with inferscope.stage("infer"):
            return pipe.predict(batch)

    serve(x)
    snap = inferscope.snapshot()
    assert models_in_snapshot() == {"service"}
    assert snap.row("service").count == 1
    assert snap.row("service", "infer/scaler").count == 1
    assert snap.row("service", "infer/clf").count == 1


def test_a_nested_pipeline_nests_its_stages_also_for_a_pipeline_subclass(instrument: Any) -> None:
    x, y = training_data()

    class Preprocessing(Pipeline):  # type: ignore[misc]
        """A Pipeline subclass: the instrumentor tells Pipelines by class, subclasses included."""

    prep = Preprocessing([("scaler", StandardScaler()), ("pca", PCA(n_components=4))])
    pipe = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(x, y)
    expected = pipe.predict(x)
    instrument()
    for _ in range(2):  # the second call takes the cached answers
        assert np.array_equal(pipe.predict(x), expected)
    snap = inferscope.snapshot()
    assert models_in_snapshot() == {"Pipeline"}
    assert {row.stage for row in snap.rows} == {None, "prep", "prep/scaler", "prep/pca", "clf"}
    assert all(row.count == 2 for row in snap.rows)


def test_a_failing_pipeline_class_check_never_breaks_a_step_call(
    fitted: tuple[Pipeline, np.ndarray], instrument: Any
) -> None:
    from inferscope import _pipeline

    pipe, x = fitted
    expected = pipe.predict(x)
    instrumentor = instrument()
    pipe.predict(x)  # the Pipeline's own entry is cached: the next call opens its scope

    class Exploding(type):
        def __subclasscheck__(cls, subclass: type) -> bool:
            raise RuntimeError("broken subclass check")

    state = instrumentor._state
    state.pipeline = Exploding("Exploding", (), {})
    state.pipeline_classes.clear()  # the steps' classes are looked up again, and the check raises
    errors_before = _pipeline.DRAINER.errors
    assert np.array_equal(pipe.predict(x), expected)
    assert _pipeline.DRAINER.errors > errors_before  # counted as inferscope.sdk.errors
    snap = inferscope.snapshot()
    assert snap.row("Pipeline").count == 2
    assert snap.row("Pipeline", "clf").count == 2  # the steps are still stages


def test_stages_can_be_turned_off(fitted, instrument):
    pipe, x = fitted
    instrument(stages=False)
    pipe.predict(x)
    snap = inferscope.snapshot()
    assert [(row.model, row.stage) for row in snap.rows] == [("Pipeline", None)]


def test_errors_pass_through_unchanged_and_are_counted(instrument):
    from sklearn.exceptions import NotFittedError

    x, _ = training_data()
    instrument()
    with pytest.raises(NotFittedError):
        LogisticRegression().predict(x)
    row = inferscope.snapshot().row("LogisticRegression")
    assert (row.count, row.errors) == (1, 1)
    assert row.error_types == {"sklearn.exceptions.NotFittedError": 1}


def test_an_exception_is_raised_once_whatever_the_path(instrument):
    from inferscope import _pipeline

    calls = []

    class Failing(BaseEstimator):
        def fit(self, x, y=None):
            self.fitted_ = True
            return self

        def predict(self, x):
            calls.append(1)
            raise ValueError("bad batch")

        def transform(self, x):
            calls.append(1)
            raise ValueError("bad batch")

    x, _ = training_data()
    errors_before = _pipeline.DRAINER.errors
    excluded, tracked = Failing().fit(x), Failing().fit(x)
    pipe = Pipeline([("scaler", StandardScaler()), ("bad", Failing())]).fit(x)
    instrument(models=[tracked, pipe])
    for call in (excluded.predict, tracked.predict, pipe.predict, pipe.transform):
        calls.clear()
        with pytest.raises(ValueError, match="bad batch"):
            call(x)
        assert calls == [1], call
    assert _pipeline.DRAINER.errors == errors_before  # none of that was our failure
    snap = inferscope.snapshot()
    assert (snap.row("Failing").count, snap.row("Failing").errors) == (1, 1)
    assert (snap.row("Pipeline").count, snap.row("Pipeline").errors) == (2, 2)
    assert snap.row("Pipeline", "bad").errors == 2


def test_unknown_option_is_a_helpful_error():
    with pytest.raises(TypeError, match="did you mean 'model_names'"):
        SklearnInstrumentor()._instrument(model_name={})
    with pytest.raises(TypeError, match="stages must be True or False"):
        SklearnInstrumentor()._instrument(stages="yes")
    assert SklearnInstrumentor().patched == []


def test_dependencies_come_from_package_py():
    from inferscope.instrumentation.sklearn import package

    assert tuple(SklearnInstrumentor().instrumentation_dependencies()) == package._instruments
    assert SklearnInstrumentor()._check_dependency_conflicts() is None
