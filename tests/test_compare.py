"""``inferscope compare`` with real small models built in code: every variant built, checked against
the baseline, timed or listed with the reason; the JSON, the table, the report section and the
command line. No timing is asserted: only what the run guarantees."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest

from inferscope import ConfigError
from inferscope.cli import main
from inferscope.cli.compare import load_inputs
from inferscope.compare import (
    FRAMEWORKS,
    CompareResult,
    compare,
    framework_of,
    load,
    report_section,
    section_html,
)
from inferscope.compare._memory import peak_rss_since_reset, reset_peak_rss, rss_bytes
from inferscope.compare._run import _machine_warnings, check_outputs

from ._output import run

#: Short runs: these tests check what is measured and reported, not how fast anything is.
QUICK = {"seconds": 0.05, "rounds": 3}
ROWS, FEATURES = 48, 4


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, FEATURES))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    return x, y


def sklearn_pipeline() -> Any:
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = data()
    return Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression())]).fit(x, y)


def needs_onnx() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skl2onnx")


def assert_timed(result: CompareResult, name: str) -> None:
    """The variant was checked and timed, and its figures are consistent with each other."""
    v = result.variant(name)
    assert v.status == "ok", (v.status, v.reason)
    assert v.calls >= QUICK["rounds"]
    assert v.p50_seconds is not None and v.p99_seconds is not None
    assert 0 < v.p50_seconds <= v.p99_seconds
    assert v.cpu_per_call_seconds is not None and v.cpu_per_call_seconds >= 0
    assert v.build_seconds is not None and v.first_call_seconds is not None
    assert v.startup_seconds == v.build_seconds + v.first_call_seconds
    if name != result.baseline.name:
        assert v.check is not None and v.check.passed and v.check.mismatched == 0
        s = v.speedup
        assert s is not None and s.low is not None and s.high is not None
        assert 0 < s.low <= s.point <= s.high
        # The point is the ratio of the p50s the result reports.
        assert s.point == pytest.approx(result.baseline.p50_seconds / v.p50_seconds)


# --- scikit-learn --------------------------------------------------------------------------------


def test_a_pipeline_is_compared_with_onnxruntime_after_its_outputs_are_checked():
    needs_onnx()
    pipe = sklearn_pipeline()
    x, _ = data(1)
    result = compare(pipe, x, **QUICK)
    assert result.framework == "sklearn" and result.model == "Pipeline"
    assert result.method == "predict_proba"  # the default where there is one
    assert [v.name for v in result.variants] == list(FRAMEWORKS["sklearn"])
    assert_timed(result, "sklearn")
    assert_timed(result, "onnxruntime")
    onnx = result.variant("onnxruntime")
    assert onnx.check is not None and onnx.check.compared == ROWS * 2  # both probability columns
    assert (onnx.check.rtol, onnx.check.atol) == (1e-4, 1e-5)
    assert any("skl2onnx" in note for note in onnx.notes)
    assert result.best in ("sklearn", "onnxruntime")
    assert result.environment["fingerprint"]


def test_a_variant_that_differs_beyond_the_tolerance_is_reported_and_not_timed():
    needs_onnx()
    pipe = sklearn_pipeline()
    x, _ = data(1)
    # ONNX runs in float32 and scikit-learn in float64: their probabilities differ in the last
    # digits, which a tolerance of zero does not allow.
    result = compare(pipe, x, rtol=0.0, atol=0.0, **QUICK)
    onnx = result.variant("onnxruntime")
    assert onnx.status == "mismatch"
    assert onnx.check is not None and not onnx.check.passed
    assert 0 < onnx.check.mismatched <= onnx.check.compared == ROWS * 2
    assert onnx.check.max_abs_diff is not None and 0 < onnx.check.max_abs_diff < 1e-4
    assert onnx.calls == 0 and onnx.p50_seconds is None and onnx.speedup is None
    assert result.best == "sklearn"
    assert "beyond the tolerance" in (onnx.reason or "")


def test_predict_compares_labels_exactly():
    needs_onnx()
    x, _ = data(1)
    result = compare(sklearn_pipeline(), x, method="predict", **QUICK)
    assert result.method == "predict"
    onnx = result.variant("onnxruntime")
    assert onnx.status == "ok" and onnx.check is not None and onnx.check.compared == ROWS


def test_a_model_the_converter_cannot_convert_is_listed_with_the_reason():
    pytest.importorskip("skl2onnx")
    from sklearn.base import BaseEstimator

    class Doubler(BaseEstimator):  # an estimator of the application's own: skl2onnx has no converter
        def fit(self, x: Any, y: Any = None) -> Doubler:
            return self

        def predict(self, x: Any) -> Any:
            return np.asarray(x).sum(axis=1) * 2

    x, _ = data()
    result = compare(Doubler().fit(x), x, **QUICK)
    assert result.variant("sklearn").status == "ok"
    onnx = result.variant("onnxruntime")
    assert onnx.status == "unavailable"
    assert "skl2onnx cannot convert" in (onnx.reason or "")
    assert result.best == "sklearn"


def test_a_converter_that_is_not_installed_is_named_with_how_to_install_it(monkeypatch):
    x, _ = data(1)
    pipe = sklearn_pipeline()
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # what `import skl2onnx` meets when it is absent
    result = compare(pipe, x, **QUICK)
    onnx = result.variant("onnxruntime")
    assert onnx.status == "unavailable" and onnx.calls == 0
    assert "needs skl2onnx, which is not installed (pip install skl2onnx)" in (onnx.reason or "")
    assert result.variant("sklearn").status == "ok" and result.best == "sklearn"


def test_a_baseline_that_raises_runs_nothing_else():
    from sklearn.base import BaseEstimator

    class Broken(BaseEstimator):
        def predict(self, x: Any) -> Any:
            raise RuntimeError("model file missing")

    x, _ = data()
    result = compare(Broken(), x, **QUICK)
    assert result.baseline.status == "failed"
    assert "RuntimeError: model file missing" in (result.baseline.reason or "")
    assert result.variant("onnxruntime").status == "not run"
    assert result.best == "sklearn"


# --- xgboost and lightgbm ------------------------------------------------------------------------


def test_an_xgboost_booster_against_its_inplace_predictor_and_onnx():
    xgb = pytest.importorskip("xgboost")
    pytest.importorskip("onnxmltools")
    x, y = data()
    params = {"max_depth": 2, "nthread": 1, "objective": "binary:logistic", "seed": 0}
    booster = xgb.train(params, xgb.DMatrix(x, label=y), 4)
    result = compare(booster, x, **QUICK)
    assert result.framework == "xgboost"
    assert result.baseline.name == "Booster.predict"
    assert_timed(result, "Booster.inplace_predict")
    assert_timed(result, "onnxruntime")  # probabilities (n, 2), checked by the positive column
    wrapper = result.variant("sklearn wrapper")
    assert wrapper.status == "unavailable" and "XGBClassifier" in (wrapper.reason or "")


def test_an_xgboost_classifier_adds_its_scikit_learn_wrapper():
    xgb = pytest.importorskip("xgboost")
    x, y = data()
    clf = xgb.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1, random_state=0).fit(x, y)
    result = compare(clf, x, variants=["sklearn wrapper"], **QUICK)
    assert [v.name for v in result.variants] == ["Booster.predict", "sklearn wrapper"]
    assert_timed(result, "sklearn wrapper")
    assert "XGBClassifier.predict_proba" in result.variant("sklearn wrapper").notes


def test_a_lightgbm_classifier_against_its_booster_and_onnx():
    lgb = pytest.importorskip("lightgbm")
    pytest.importorskip("onnxmltools")
    x, y = data()
    clf = lgb.LGBMClassifier(n_estimators=4, num_leaves=4, min_child_samples=5, n_jobs=1, verbose=-1)
    result = compare(clf.fit(x, y), x, **QUICK)
    assert result.framework == "lightgbm"
    assert [v.name for v in result.variants] == list(FRAMEWORKS["lightgbm"])
    assert_timed(result, "Booster.predict")
    assert_timed(result, "sklearn wrapper")
    assert_timed(result, "onnxruntime")


def test_a_lightgbm_regressor_booster_lists_the_wrapper_it_cannot_build():
    lgb = pytest.importorskip("lightgbm")
    pytest.importorskip("onnxmltools")
    x, _ = data()
    params = {
        "num_leaves": 4,
        "min_data_in_leaf": 5,
        "num_threads": 1,
        "verbose": -1,
        "objective": "regression",
    }
    booster = lgb.train(params, lgb.Dataset(x, label=x[:, 0]), 4)
    result = compare(booster, x, **QUICK)
    assert "LGBMClassifier or LGBMRegressor" in (result.variant("sklearn wrapper").reason or "")
    assert_timed(result, "onnxruntime")  # its (n, 1) output checked against the Booster's (n,)


# --- torch and Keras -----------------------------------------------------------------------------


def torch_mlp() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return model, torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def test_torchscript_variants_are_compared_and_their_deprecation_is_said():
    model, x = torch_mlp()
    result = compare(model, x, variants=["torch.jit.trace", "torch.jit.script"], **QUICK)
    assert result.framework == "torch" and result.baseline.name == "eager"
    for name in ("torch.jit.trace", "torch.jit.script"):
        assert_timed(result, name)
        assert any(note.startswith("deprecated:") and name in note for note in result.variant(name).notes)


def test_a_numpy_input_is_given_to_torch_in_the_model_dtype():
    model, x = torch_mlp()
    result = compare(model, x.numpy().astype(np.float64), variants=[], **QUICK)
    assert result.inputs[0]["dtype"] == "torch.float32" and result.inputs[0]["shape"] == [5, 8]
    assert_timed(result, "eager")


@pytest.mark.expensive  # torch.compile's first call compiles for tens of seconds; the export, seconds
def test_every_torch_variant_with_compile_start_up_reported_apart():
    pytest.importorskip("onnxscript")
    model, x = torch_mlp()
    result = compare(model, x, **QUICK)
    assert [v.name for v in result.variants] == list(FRAMEWORKS["torch"])
    for v in result.variants:
        assert_timed(result, v.name)
    compiled = result.variant("torch.compile")
    assert compiled.first_call_seconds is not None and compiled.first_call_seconds > 0
    assert any("exported with torch.onnx.export" in n for n in result.variant("onnxruntime").notes)


@pytest.mark.expensive  # importing TensorFlow takes seconds
def test_keras_eager_against_tf_function_and_xla():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras does not run on TensorFlow here")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    result = compare(model, x, **QUICK)
    assert result.framework == "keras"
    for name in FRAMEWORKS["keras"]:
        assert_timed(result, name)


# --- the checks, the options, the outputs --------------------------------------------------------


def test_outputs_are_aligned_only_where_the_layout_differs():
    probabilities = np.array([0.2, 0.9, 0.5])
    two_columns = np.stack([1 - probabilities, probabilities], axis=1).astype(np.float32)
    assert check_outputs([probabilities], [two_columns], 1e-6, 1e-7).passed  # the positive column
    assert check_outputs([probabilities], [probabilities[:, None]], 0, 0).passed  # (n, 1) as (n,)
    off = check_outputs([probabilities], [probabilities + np.array([0, 0, 1e-3])], 1e-4, 1e-5)
    assert not off.passed and off.mismatched == 1 and off.max_abs_diff == pytest.approx(1e-3)
    labels = check_outputs([np.array(["a", "b"])], [np.array(["a", "c"])], 1.0, 1.0)
    assert not labels.passed and labels.mismatched == 1  # labels compare exactly, whatever the tolerance
    shape = check_outputs([np.zeros((3, 3))], [np.zeros((3, 2))], 1.0, 1.0)
    assert not shape.passed and "shape" in (shape.detail or "")
    assert not check_outputs([np.zeros(3)], [np.zeros(3), np.zeros(3)], 1.0, 1.0).passed


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"rtol": -1.0}, "rtol"),
        ({"atol": float("nan")}, "atol"),
        ({"seconds": 0.0}, "seconds"),
        ({"rounds": 2}, "rounds"),
        ({"confidence": 1.0}, "confidence"),
        ({"variants": ["torch.compile"]}, "variants"),
        ({"method": "fit"}, "method"),
    ],
)
def test_bad_options_raise_config_error_naming_the_setting(options, setting):
    x, _ = data()
    with pytest.raises(ConfigError) as caught:
        compare(sklearn_pipeline(), x, **options)
    assert caught.value.setting == setting
    assert "accepted:" in str(caught.value)


def test_a_method_is_for_scikit_learn_models_only():
    xgb = pytest.importorskip("xgboost")
    x, y = data()
    booster = xgb.train({"max_depth": 2, "nthread": 1}, xgb.DMatrix(x, label=y), 2)
    with pytest.raises(ConfigError, match="method"):
        compare(booster, x, method="predict")


def test_what_is_not_a_model_or_has_no_input_is_a_type_error():
    with pytest.raises(TypeError, match="not a model it knows"):
        compare(lambda x: x, np.zeros(3))
    assert framework_of(object()) is None
    with pytest.raises(TypeError, match="example input"):
        compare(sklearn_pipeline())


def test_the_result_round_trips_through_json_and_renders_as_a_section(tmp_path):
    x, _ = data(1)
    result = compare(sklearn_pipeline(), x, **QUICK)
    path = tmp_path / "compare.json"
    path.write_text(result.to_json())
    loaded = load(str(path))
    assert loaded.to_dict() == json.loads(result.to_json())
    assert loaded.best == result.best and loaded.variants == result.variants
    section = report_section(json.loads(path.read_text()))
    assert section == report_section(result)
    assert [row[0] for row in section["rows"]] == [v.name for v in result.variants]
    assert all(len(row) == len(section["columns"]) for row in section["rows"])
    assert section["notes"][0].startswith(f"Best: {result.best}.")
    json.dumps(section)  # JSON-ready as it is
    table = result.table()
    assert all(v.name in table for v in result.variants) and "rtol=0.0001" in table
    with pytest.raises(ValueError, match="not an inferscope compare result"):
        CompareResult.from_dict({"kind": "something else"})
    # As HTML, every text escaped: a note may quote a library's message.
    result.variants[1].notes.append("<script>alert(1)</script> & more")
    page = section_html(result)
    assert page.count("<tr>") == len(result.variants) + 1 and "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page


def test_a_load_above_the_usable_cpus_is_a_warning_of_the_result():
    busy = _machine_warnings(load_before=1e6)  # as if the load had been that high before the run
    assert any("The machine was busy: a load average of 1000000.0" in w for w in busy)
    quiet = _machine_warnings(load_before=0.0)
    assert len(busy) == len(quiet) + int(not any("busy" in w for w in quiet))


def test_the_peak_rss_is_reset_and_read_back():
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs cannot be written here")
    before = rss_bytes()
    assert before is not None
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, every page touched
    del block
    peak = peak_rss_since_reset()
    assert peak is not None and peak - before >= 48 * 1024 * 1024
    assert reset_peak_rss()
    after = peak_rss_since_reset()
    assert after is not None and after < peak


# --- the command line and the example ------------------------------------------------------------

MODULE = """
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

def make():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4))
    return Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression())]).fit(x, x[:, 0] > 0)

class Registry:
    fraud = make()
"""


@pytest.fixture
def model_module(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    name = f"compare_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def cli(*argv: str) -> int:
    return main(["compare", *argv, "--seconds", "0.05", "--rounds", "3"])


def test_the_command_compares_a_model_named_by_module_and_attribute(model_module, tmp_path, capsys):
    needs_onnx()
    np.save(tmp_path / "batch.npy", data(1)[0])
    out = tmp_path / "compare.json"
    assert cli(f"{model_module}:make", "--data", "batch.npy", "--json", "--output", str(out)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["framework"] == "sklearn"
    assert [v["status"] for v in printed["variants"]] == ["ok", "ok"]
    assert load(str(out)).best == printed["best"]
    # A dotted attribute; the table by default.
    assert cli(f"{model_module}:Registry.fraud", "--data", "batch.npy", "--variants", "onnxruntime") == 0
    table = capsys.readouterr().out
    assert table.startswith("inferscope compare: Pipeline.predict_proba") and "Best: " in table


def test_the_data_file_gives_the_example_inputs_as_inferscope_bench_reads_them(tmp_path):
    x = data(1)[0]
    np.save(tmp_path / "one.npy", x)
    np.savez(tmp_path / "two.npz", x, x > 0)
    (tmp_path / "calls.jsonl").write_text(
        "\n" + json.dumps([x.tolist(), 3]) + "\n" + json.dumps([[0.0]]) + "\n"
    )
    [one] = load_inputs(str(tmp_path / "one.npy"))
    np.testing.assert_array_equal(one, x)
    first, second = load_inputs(str(tmp_path / "two.npz"))  # in the order they were saved
    np.testing.assert_array_equal(first, x)
    np.testing.assert_array_equal(second, x > 0)
    line, number = load_inputs(str(tmp_path / "calls.jsonl"))  # the first call's arguments
    np.testing.assert_allclose(line, x)
    assert number == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope_module_xyz:model", "--data", "batch.npy"], "cannot import"),
        (["{module}:missing", "--data", "batch.npy"], "has no attribute"),
        (["{module}", "--data", "batch.npy"], "MODULE:ATTRIBUTE"),
        (["{module}:make", "--data", "batch.txt"], ".npy, .npz, .jsonl"),
        (["{module}:make", "--data", "keywords.jsonl"], "positional arguments"),
        (["{module}:make", "--data", "absent.npy"], "cannot read"),
        (["{module}:make", "--data", "batch.npy", "--variants", "torch.compile"], "variants"),
    ],
)
def test_the_command_exits_2_on_a_bad_argument(model_module, tmp_path, capsys, argv, message):
    np.save(tmp_path / "batch.npy", data(1)[0])
    (tmp_path / "batch.txt").write_text("1 2 3\n")
    (tmp_path / "keywords.jsonl").write_text(json.dumps({"x": [[0.0] * 4]}) + "\n")
    assert cli(*(a.format(module=model_module) for a in argv)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.expensive  # a fresh interpreter; docs/compare.md runs the example's pipeline in the core suite
def test_the_example_compares_a_pipeline(tmp_path):
    needs_onnx()
    out = tmp_path / "compare.json"
    table = run("examples/compare_variants.py", "--seconds", "0.05", "--output", str(out))
    assert "onnxruntime" in table and "Best: " in table
    result = load(str(out))
    assert result.model == "Pipeline" and result.variant("onnxruntime").status == "ok"
