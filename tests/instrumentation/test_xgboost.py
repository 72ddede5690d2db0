"""xgboost instrumentation with real small models trained in code: Boosters and the scikit-learn
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

xgb = require("xgboost")
require("sklearn")

from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import inferscope.instrumentation.xgboost as xgboost_instrumentation  # noqa: E402
from inferscope.instrumentation.sklearn import SklearnInstrumentor  # noqa: E402
from inferscope.instrumentation.xgboost import (  # noqa: E402
    BOOSTER_METHODS,
    ESTIMATOR_METHODS,
    XGBoostInstrumentor,
)

ROWS = 48
#: Which instrumentors are on, in the order they are instrumented.
COMBINATIONS = [("xgboost",), ("sklearn",), ("sklearn", "xgboost"), ("xgboost", "sklearn")]
INSTRUMENTORS = {"xgboost": XGBoostInstrumentor, "sklearn": SklearnInstrumentor}


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    return x, y


def booster(seed: int = 0, rounds: int = 4) -> Any:
    x, y = data(seed)
    params = {"max_depth": 2, "nthread": 1, "objective": "binary:logistic", "seed": seed}
    return xgb.train(params, xgb.DMatrix(x, label=y), rounds)


def classifier(seed: int = 0) -> Any:
    x, y = data(seed)
    return xgb.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1, random_state=seed).fit(x, y)


def regressor(seed: int = 0) -> Any:
    x, y = data(seed)
    return xgb.XGBRegressor(n_estimators=4, max_depth=2, n_jobs=1, random_state=seed).fit(x, y)


def hash_name(model: Any) -> str:
    return "xgboost-" + hashlib.sha256(model.save_raw("ubj")).hexdigest()[:12]


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments xgboost; teardown always uninstruments."""
    yield from instrumenting(XGBoostInstrumentor)


@pytest.fixture
def instrumented() -> Iterator[Any]:
    """``instrumented(*names)`` instruments those frameworks in that order; teardown uninstruments
    them in the reverse order."""
    yield from instrumenting_in_order(INSTRUMENTORS)


def test_booster_predict_and_inplace_predict_are_inferences_named_by_hash(instrument):
    model = booster()
    x, _ = data()
    expected = model.predict(xgb.DMatrix(x))
    expected_inplace = model.inplace_predict(x)
    instrument()
    for _ in range(3):
        assert np.array_equal(model.predict(xgb.DMatrix(x)), expected)
    for _ in range(2):
        assert np.array_equal(model.inplace_predict(x), expected_inplace)
    row = inferscope.snapshot().row(hash_name(model))
    assert (row.count, row.version, row.errors) == (5, None, 0)
    assert sorted_rows() == [(hash_name(model), None, 5)]


def test_the_hash_name_is_stable_across_save_and_load_and_differs_between_models(tmp_path, instrument):
    model, other = booster(seed=0), booster(seed=1)
    path = tmp_path / "model.json"  # a different format than the one hashed
    model.save_model(path)
    loaded = xgb.Booster(model_file=str(path))
    x, _ = data()
    instrument()
    model.inplace_predict(x)
    loaded.inplace_predict(x)
    other.inplace_predict(x)
    assert hash_name(model) == hash_name(loaded) != hash_name(other)
    assert sorted_rows() == sorted([(hash_name(model), None, 2), (hash_name(other), None, 1)])


def test_the_version_is_the_booster_version_attribute(tmp_path, instrument):
    model = booster()
    model.set_attr(version="3")
    path = tmp_path / "model.ubj"
    model.save_model(path)
    loaded = xgb.Booster(model_file=str(path))  # the attribute is saved with the model
    clf = classifier()
    clf.get_booster().set_attr(version="5")
    x, _ = data()
    instrument()
    loaded.inplace_predict(x)
    clf.predict(x)
    assert inferscope.snapshot().row(hash_name(model)).version == "3"
    assert inferscope.snapshot().row("XGBClassifier").version == "5"


def test_the_hash_is_computed_once_per_booster_and_not_for_named_ones(instrument, monkeypatch):
    digests: list[Any] = []
    original = xgboost_instrumentation.booster_digest

    def counting(model: Any) -> str | None:
        digests.append(model)
        return original(model)

    monkeypatch.setattr(xgboost_instrumentation, "booster_digest", counting)
    hashed, named, selected = booster(0), booster(1), booster(2)
    x, _ = data()
    instrument(model_names={named: "fraud"})
    for _ in range(3):
        hashed.inplace_predict(x)
        named.inplace_predict(x)
    assert digests == [hashed]
    instrument_options: dict[str, Any] = {"models": [selected], "model_names": {selected: "scorer"}}
    XGBoostInstrumentor().uninstrument()
    XGBoostInstrumentor().instrument(**instrument_options)
    selected.inplace_predict(x)
    hashed.inplace_predict(x)  # not one of the models: no hash needed either
    assert digests == [hashed]
    assert inferscope.snapshot().row("scorer").count == 1


@pytest.mark.parametrize("on", COMBINATIONS, ids="+".join)
def test_the_scikit_learn_api_counts_once_whichever_instrumentors_are_on(on, instrumented):
    clf, reg = classifier(), regressor()
    x, _ = data()
    expected = (clf.predict(x), clf.predict_proba(x), reg.predict(x))
    instrumented(*on)
    for _ in range(2):
        assert np.array_equal(clf.predict(x), expected[0])
        assert np.array_equal(clf.predict_proba(x), expected[1])
        assert np.array_equal(reg.predict(x), expected[2])
    # The Booster calls inside (inplace_predict, or predict on a DMatrix) are part of each call.
    assert sorted_rows() == [("XGBClassifier", None, 4), ("XGBRegressor", None, 2)]


@pytest.mark.parametrize("on", COMBINATIONS, ids="+".join)
def test_training_records_nothing(on, instrumented):
    x, y = data()
    instrumented(*on)
    calls: list[int] = []

    def custom_metric(predt: np.ndarray, dtrain: Any) -> tuple[str, float]:
        calls.append(1)  # xgboost predicts (Booster.predict, from its own code) to evaluate this
        return "mean", float(np.mean(predt))

    dtrain = xgb.DMatrix(x, label=y)
    xgb.train(
        {"max_depth": 2, "nthread": 1, "objective": "binary:logistic"},
        dtrain,
        6,
        evals=[(dtrain, "train")],
        custom_metric=custom_metric,
        early_stopping_rounds=3,
        verbose_eval=False,
    )
    assert calls
    xgb.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1, early_stopping_rounds=2).fit(
        x, y, eval_set=[(x, y)], verbose=False
    )
    xgb.XGBRanker(n_estimators=2, max_depth=2, n_jobs=1).fit(x, y, qid=np.repeat([0, 1], ROWS // 2))
    assert sorted_rows() == []


@pytest.mark.parametrize("on", [("sklearn", "xgboost"), ("xgboost", "sklearn")], ids="+".join)
def test_scikit_learn_evaluation_is_not_inference_when_its_instrumentor_is_on(on, instrumented):
    clf = classifier()
    x, y = data()
    instrumented(*on)
    clf.score(x, y)
    cross_val_score(xgb.XGBClassifier(n_estimators=2, max_depth=2, n_jobs=1), x, y, cv=2)
    assert sorted_rows() == []


@pytest.mark.parametrize("on", [("sklearn", "xgboost"), ("xgboost", "sklearn")], ids="+".join)
def test_in_a_pipeline_the_estimator_is_a_stage_when_scikit_learn_is_instrumented(on, instrumented):
    x, y = data()
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", xgb.XGBClassifier(n_estimators=3, n_jobs=1))])
    pipe.fit(x, y)
    expected = pipe.predict(x)
    instrumented(*on)
    assert np.array_equal(pipe.predict(x), expected)
    assert sorted_rows() == [("Pipeline", None, 1), ("Pipeline", "clf", 1), ("Pipeline", "scaler", 1)]


def test_in_a_pipeline_the_estimator_is_an_inference_without_scikit_learn(instrument):
    x, y = data()
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", xgb.XGBClassifier(n_estimators=3, n_jobs=1))])
    pipe.fit(x, y)
    instrument()
    pipe.predict(x)
    assert sorted_rows() == [("XGBClassifier", None, 1)]


def test_inside_a_tracked_inference_calls_are_part_of_it(instrument):
    model, clf = booster(), classifier()
    x, _ = data()
    instrument()

    @inferscope.track_inference(model="service")
    def serve(batch: np.ndarray) -> Any:
        with inferscope.stage("infer"):
            return model.inplace_predict(batch) + clf.predict_proba(batch)[:, 1]

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
            "XGBClassifier": ("ranker", "2"),
        },
        attributes={"team": "risk"},
    )
    for model in (first, second, third):
        model.inplace_predict(x)
    clf.predict(x)
    reg.predict(x)
    snap = inferscope.snapshot()
    assert (snap.row("fraud").version, snap.row("churn").version, snap.row("ranker").version) == (
        "3",
        None,
        "2",
    )
    assert snap.row(hash_name(third)).count == 1
    assert snap.row("XGBRegressor").count == 1
    infos = inferscope._runtime.REGISTRY.infos()
    assert any(info.model == "fraud" and dict(info.attributes) == {"team": "risk"} for info in infos)


def test_models_filter_and_a_naming_callable(instrument):
    first, second = booster(0), booster(1)
    clf, reg = classifier(), regressor()
    x, _ = data()
    names = {id(first): "first", id(reg): "reg"}
    instrument(models=[first, "XGBRegressor"], model_names=lambda model: names.get(id(model)))
    for model in (first, second):
        model.inplace_predict(x)
    clf.predict(x)
    reg.predict(x)
    assert sorted_rows() == [("first", None, 1), ("reg", None, 1)]


def test_errors_pass_through_unchanged_and_are_counted(instrument):
    model = booster()
    x, _ = data()
    instrument()
    with pytest.raises(ValueError) as caught:
        model.inplace_predict(x[:, :2])  # the model has 4 features
    row = inferscope.snapshot().row(hash_name(model))
    assert (row.count, row.errors) == (1, 1)
    assert row.error_types == {error_type_name(type(caught.value)): 1}


def test_an_unfitted_estimator_raises_as_usual(instrument):
    from sklearn.exceptions import NotFittedError

    x, _ = data()
    instrument()
    with pytest.raises(NotFittedError):
        xgb.XGBClassifier().predict(x)
    assert inferscope.snapshot().row("XGBClassifier").errors == 1


def _originals() -> dict[tuple[type, str], object]:
    from xgboost.sklearn import XGBClassifier, XGBModel, XGBRanker

    found: dict[tuple[type, str], object] = {
        (xgb.Booster, name): xgb.Booster.__dict__[name] for name in BOOSTER_METHODS
    }
    for cls in (XGBModel, XGBClassifier, XGBRanker):
        for name in ESTIMATOR_METHODS:
            if name in cls.__dict__:
                found[(cls, name)] = cls.__dict__[name]
    return found


def test_uninstrument_restores_the_originals_by_identity(instrument):
    from xgboost.sklearn import XGBClassifier, XGBModel

    before = _originals()
    assert (XGBModel, "predict") in before
    assert (XGBClassifier, "predict_proba") in before
    instrumentor = instrument()
    during = _originals()
    assert all(during[key] is not value for key, value in before.items())
    assert {(klass, name): original for klass, name, original in instrumentor.patched} == before
    instrumentor.uninstrument()
    after = _originals()
    assert all(after[key] is value for key, value in before.items())
    assert xgb.Booster.predict is before[(xgb.Booster, "predict")]
    model = booster()
    model.inplace_predict(data()[0])
    assert sorted_rows() == []
    instrumentor.instrument()  # for the fixture's teardown


def test_with_scikit_learn_on_first_only_boosters_are_patched_and_all_is_restored():
    before = _originals()
    sklearn_instrumentor, xgboost_instrumentor = SklearnInstrumentor(), XGBoostInstrumentor()
    sklearn_instrumentor.instrument()
    try:
        xgboost_instrumentor.instrument()
        assert {(klass, name) for klass, name, _ in xgboost_instrumentor.patched} == {
            (xgb.Booster, name) for name in BOOSTER_METHODS
        }
        # Whichever is uninstrumented first, the originals come back.
        sklearn_instrumentor.uninstrument()
        xgboost_instrumentor.uninstrument()
    finally:
        sklearn_instrumentor.uninstrument()
        xgboost_instrumentor.uninstrument()
    after = _originals()
    assert all(after[key] is value for key, value in before.items())


def test_instrument_twice_is_idempotent(instrument, caplog):
    model = booster()
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        XGBoostInstrumentor().instrument()
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    model.inplace_predict(data()[0])
    assert sorted_rows() == [(hash_name(model), None, 1)]


def test_a_failing_model_names_callable_never_breaks_the_call(instrument):
    from inferscope import _pipeline

    model = booster()

    def broken(obj: Any) -> str:
        raise RuntimeError("naming failed")

    errors_before = _pipeline.DRAINER.errors
    instrument(model_names=broken)
    model.inplace_predict(data()[0])
    assert sorted_rows() == [(hash_name(model), None, 1)]
    assert _pipeline.DRAINER.errors == errors_before + 1


def test_dependencies_name_the_installed_distribution():
    from inferscope.instrumentation.xgboost import package

    dependencies = tuple(XGBoostInstrumentor().instrumentation_dependencies())
    assert len(dependencies) == 1
    assert dependencies[0] in package._instruments_any
    assert XGBoostInstrumentor()._check_dependency_conflicts() is None


def test_a_booster_loaded_from_bytes_is_named_by_its_hash(instrument):
    model = booster()
    loaded = xgb.Booster()
    loaded.load_model(bytearray(model.save_raw("ubj")))
    instrument()
    loaded.inplace_predict(data()[0])
    assert sorted_rows() == [(hash_name(model), None, 1)]
