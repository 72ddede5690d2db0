"""lightgbm instrumentation with real small models trained in code: Boosters and the scikit-learn
API, each call counted once whichever instrumentors are on, identical results, exact restoration."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import inferscope
from inferscope._keys import error_type_name
from tests.instrumentation import instrumenting, instrumenting_in_order, require, sorted_rows

lgb = require("lightgbm")
require("sklearn")

from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import inferscope.instrumentation.lightgbm as lightgbm_instrumentation  # noqa: E402
from inferscope.instrumentation.lightgbm import (  # noqa: E402
    BOOSTER_METHODS,
    ESTIMATOR_METHODS,
    LightGBMInstrumentor,
)
from inferscope.instrumentation.sklearn import SklearnInstrumentor  # noqa: E402

ROWS = 48
#: Which instrumentors are on, in the order they are instrumented.
COMBINATIONS = [("lightgbm",), ("sklearn",), ("sklearn", "lightgbm"), ("lightgbm", "sklearn")]
INSTRUMENTORS = {"lightgbm": LightGBMInstrumentor, "sklearn": SklearnInstrumentor}


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    return x, y


PARAMS = {"num_leaves": 4, "min_data_in_leaf": 5, "num_threads": 1, "verbose": -1, "deterministic": True}
ESTIMATOR_PARAMS = {"n_estimators": 4, "num_leaves": 4, "min_child_samples": 5, "n_jobs": 1, "verbose": -1}


def booster(seed: int = 0, rounds: int = 4) -> Any:
    x, y = data(seed)
    return lgb.train({**PARAMS, "objective": "binary", "seed": seed}, lgb.Dataset(x, label=y), rounds)


def classifier(seed: int = 0) -> Any:
    x, y = data(seed)
    return lgb.LGBMClassifier(**ESTIMATOR_PARAMS, random_state=seed).fit(x, y)


def regressor(seed: int = 0) -> Any:
    x, y = data(seed)
    return lgb.LGBMRegressor(**ESTIMATOR_PARAMS, random_state=seed).fit(x, y)


def hash_name(model: Any) -> str:
    return "lightgbm-" + hashlib.sha256(model.model_to_string().encode()).hexdigest()[:12]


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments lightgbm; teardown always uninstruments."""
    yield from instrumenting(LightGBMInstrumentor)


@pytest.fixture
def instrumented() -> Iterator[Any]:
    """``instrumented(*names)`` instruments those frameworks in that order; teardown uninstruments
    them in the reverse order."""
    yield from instrumenting_in_order(INSTRUMENTORS)


def test_booster_predict_is_an_inference_named_by_hash(instrument):
    model = booster()
    x, _ = data()
    expected = model.predict(x)
    expected_raw = model.predict(x, raw_score=True)
    instrument()
    for _ in range(3):
        assert np.array_equal(model.predict(x), expected)
    assert np.array_equal(model.predict(x, raw_score=True), expected_raw)
    row = inferscope.snapshot().row(hash_name(model))
    assert (row.count, row.version, row.errors) == (4, None, 0)
    assert sorted_rows() == [(hash_name(model), None, 4)]


def test_the_hash_name_is_stable_across_save_and_load_and_differs_between_models(tmp_path, instrument):
    model, other = booster(seed=0), booster(seed=1, rounds=5)
    path = tmp_path / "model.txt"
    model.save_model(path)
    loaded = lgb.Booster(model_file=str(path))
    from_string = lgb.Booster(model_str=model.model_to_string())
    x, _ = data()
    instrument()
    for each in (model, loaded, from_string, other):
        each.predict(x)
    assert hash_name(model) == hash_name(loaded) == hash_name(from_string) != hash_name(other)
    assert sorted_rows() == sorted([(hash_name(model), None, 3), (hash_name(other), None, 1)])


def test_the_hash_is_computed_once_per_booster_and_not_for_named_ones(instrument, monkeypatch):
    digests: list[Any] = []
    original = lightgbm_instrumentation.booster_digest

    def counting(model: Any) -> str | None:
        digests.append(model)
        return original(model)

    monkeypatch.setattr(lightgbm_instrumentation, "booster_digest", counting)
    hashed, named, selected = booster(0), booster(1), booster(2)
    x, _ = data()
    instrument(model_names={named: "fraud"})
    for _ in range(3):
        hashed.predict(x)
        named.predict(x)
    assert digests == [hashed]
    LightGBMInstrumentor().uninstrument()
    LightGBMInstrumentor().instrument(models=[selected], model_names={selected: "scorer"})
    selected.predict(x)
    hashed.predict(x)  # not one of the models: no hash needed either
    assert digests == [hashed]
    assert inferscope.snapshot().row("scorer").count == 1


@pytest.mark.parametrize("on", COMBINATIONS, ids="+".join)
def test_the_scikit_learn_api_counts_once_whichever_instrumentors_are_on(on, instrumented):
    clf, reg = classifier(), regressor()
    x, _ = data()
    expected = (clf.predict(x), clf.predict_proba(x), clf.decision_function(x), reg.predict(x))
    instrumented(*on)
    for _ in range(2):
        # LGBMClassifier.predict calls predict_proba, which calls LGBMModel.predict, which calls
        # Booster.predict: one inference.
        assert np.array_equal(clf.predict(x), expected[0])
        assert np.array_equal(clf.predict_proba(x), expected[1])
        assert np.array_equal(clf.decision_function(x), expected[2])
        assert np.array_equal(reg.predict(x), expected[3])
    assert sorted_rows() == [("LGBMClassifier", None, 6), ("LGBMRegressor", None, 2)]


@pytest.mark.parametrize("on", COMBINATIONS, ids="+".join)
@pytest.mark.filterwarnings("ignore:The argument 'eval_set' is deprecated")  # lightgbm >= 4.7
def test_training_records_nothing(on, instrumented):
    x, y = data()
    instrumented(*on)
    calls: list[int] = []

    def feval(predt: np.ndarray, dataset: Any) -> tuple[str, float, bool]:
        calls.append(1)
        return "mean", float(np.mean(predt)), False

    train = lgb.Dataset(x, label=y)
    model = lgb.train(
        {**PARAMS, "objective": "binary"},
        train,
        6,
        valid_sets=[train],
        feval=feval,
        callbacks=[lgb.early_stopping(3, verbose=False)],
    )
    assert calls
    model.refit(x, y)  # predicts leaves, through lightgbm's internal predictor
    lgb.LGBMClassifier(**ESTIMATOR_PARAMS).fit(x, y, eval_set=[(x, y)])
    lgb.LGBMRanker(**ESTIMATOR_PARAMS).fit(x, y, group=[ROWS // 2, ROWS // 2])
    assert sorted_rows() == []


@pytest.mark.parametrize("on", [("sklearn", "lightgbm"), ("lightgbm", "sklearn")], ids="+".join)
def test_scikit_learn_evaluation_is_not_inference_when_its_instrumentor_is_on(on, instrumented):
    clf = classifier()
    x, y = data()
    instrumented(*on)
    clf.score(x, y)
    cross_val_score(lgb.LGBMClassifier(**ESTIMATOR_PARAMS), x, y, cv=2)
    assert sorted_rows() == []


@pytest.mark.parametrize("on", [("sklearn", "lightgbm"), ("lightgbm", "sklearn")], ids="+".join)
def test_in_a_pipeline_the_estimator_is_a_stage_when_scikit_learn_is_instrumented(on, instrumented):
    x, y = data()
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", lgb.LGBMClassifier(**ESTIMATOR_PARAMS))])
    pipe.fit(x, y)
    expected = pipe.predict(x)
    instrumented(*on)
    assert np.array_equal(pipe.predict(x), expected)
    assert sorted_rows() == [("Pipeline", None, 1), ("Pipeline", "clf", 1), ("Pipeline", "scaler", 1)]


def test_in_a_pipeline_the_estimator_is_an_inference_without_scikit_learn(instrument):
    x, y = data()
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", lgb.LGBMClassifier(**ESTIMATOR_PARAMS))])
    pipe.fit(x, y)
    instrument()
    pipe.predict(x)
    assert sorted_rows() == [("LGBMClassifier", None, 1)]


def test_inside_a_tracked_inference_calls_are_part_of_it(instrument):
    model, clf = booster(), classifier()
    x, _ = data()
    instrument()

    @inferscope.track_inference(model="service")
    def serve(batch: np.ndarray) -> Any:
        with inferscope.stage("infer"):
            return model.predict(batch) + clf.predict_proba(batch)[:, 1]

    serve(x)
    assert sorted_rows() == [("service", None, 1), ("service", "infer", 1)]


def test_model_names_by_object_alias_hash_and_callable(instrument):
    first, second, third = booster(0), booster(1), booster(2)
    clf, reg = classifier(), regressor()
    x, _ = data()
    instrument(
        model_names={
            first: ("fraud", 3),
            hash_name(second): "churn",
            "LGBMClassifier": ("ranker", "2"),
        },
        attributes={"team": "risk"},
    )
    for model in (first, second, third):
        model.predict(x)
    clf.predict(x)
    reg.predict(x)
    snap = inferscope.snapshot()
    assert (snap.row("fraud").version, snap.row("churn").version, snap.row("ranker").version) == (
        "3",
        None,
        "2",
    )
    assert snap.row(hash_name(third)).count == 1
    assert snap.row("LGBMRegressor").count == 1
    infos = inferscope._runtime.REGISTRY.infos()
    assert any(info.model == "fraud" and dict(info.attributes) == {"team": "risk"} for info in infos)


def test_models_filter_and_a_naming_callable(instrument):
    first, second = booster(0), booster(1)
    clf, reg = classifier(), regressor()
    x, _ = data()
    names = {id(first): "first", id(reg): "reg"}
    instrument(models=[first, "LGBMRegressor"], model_names=lambda model: names.get(id(model)))
    for model in (first, second):
        model.predict(x)
    clf.predict(x)
    reg.predict(x)
    assert sorted_rows() == [("first", None, 1), ("reg", None, 1)]


def test_errors_pass_through_unchanged_and_are_counted(instrument):
    model = booster()
    x, _ = data()
    instrument()
    with pytest.raises(lgb.basic.LightGBMError) as caught:
        model.predict(x[:, :2])  # the model has 4 features
    row = inferscope.snapshot().row(hash_name(model))
    assert (row.count, row.errors) == (1, 1)
    assert row.error_types == {error_type_name(type(caught.value)): 1}


def test_an_unfitted_estimator_raises_as_usual(instrument):
    from sklearn.exceptions import NotFittedError

    x, _ = data()
    instrument()
    with pytest.raises(NotFittedError):
        lgb.LGBMClassifier().predict(x)
    assert inferscope.snapshot().row("LGBMClassifier").errors == 1


def _originals() -> dict[tuple[type, str], object]:
    from lightgbm.sklearn import LGBMClassifier, LGBMModel

    found: dict[tuple[type, str], object] = {
        (lgb.Booster, name): lgb.Booster.__dict__[name] for name in BOOSTER_METHODS
    }
    for cls in (LGBMModel, LGBMClassifier):
        for name in ESTIMATOR_METHODS:
            if name in cls.__dict__:
                found[(cls, name)] = cls.__dict__[name]
    return found


def test_uninstrument_restores_the_originals_by_identity(instrument):
    from lightgbm.sklearn import LGBMClassifier, LGBMModel

    before = _originals()
    assert (LGBMModel, "predict") in before
    assert (LGBMClassifier, "decision_function") in before
    instrumentor = instrument()
    during = _originals()
    assert all(during[key] is not value for key, value in before.items())
    assert {(klass, name): original for klass, name, original in instrumentor.patched} == before
    instrumentor.uninstrument()
    after = _originals()
    assert all(after[key] is value for key, value in before.items())
    assert lgb.Booster.predict is before[(lgb.Booster, "predict")]
    booster().predict(data()[0])
    assert sorted_rows() == []
    instrumentor.instrument()  # for the fixture's teardown


def test_with_scikit_learn_on_first_only_boosters_are_patched_and_all_is_restored():
    before = _originals()
    sklearn_instrumentor, lightgbm_instrumentor = SklearnInstrumentor(), LightGBMInstrumentor()
    sklearn_instrumentor.instrument()
    try:
        lightgbm_instrumentor.instrument()
        assert {(klass, name) for klass, name, _ in lightgbm_instrumentor.patched} == {
            (lgb.Booster, name) for name in BOOSTER_METHODS
        }
        # Whichever is uninstrumented first, the originals come back.
        sklearn_instrumentor.uninstrument()
        lightgbm_instrumentor.uninstrument()
    finally:
        sklearn_instrumentor.uninstrument()
        lightgbm_instrumentor.uninstrument()
    after = _originals()
    assert all(after[key] is value for key, value in before.items())


def test_instrument_twice_is_idempotent(instrument, caplog):
    model = booster()
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        LightGBMInstrumentor().instrument()
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    model.predict(data()[0])
    assert sorted_rows() == [(hash_name(model), None, 1)]


def test_a_failing_model_names_callable_never_breaks_the_call(instrument):
    from inferscope import _pipeline

    model = booster()

    def broken(obj: Any) -> str:
        raise RuntimeError("naming failed")

    errors_before = _pipeline.DRAINER.errors
    instrument(model_names=broken)
    model.predict(data()[0])
    assert sorted_rows() == [(hash_name(model), None, 1)]
    assert _pipeline.DRAINER.errors == errors_before + 1


def test_dependencies_come_from_package_py():
    from inferscope.instrumentation.lightgbm import package

    assert tuple(LightGBMInstrumentor().instrumentation_dependencies()) == package._instruments
    assert LightGBMInstrumentor()._check_dependency_conflicts() is None
