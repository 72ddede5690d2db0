"""transformers instrumentation with real tiny models built from a config (no download): pipeline
calls and their stages, streamed inputs, generate() with its token timings, composition with the
torch instrumentor, identical results, exact restoration."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import inferscope
from inferscope._keys import error_type_name
from tests.instrumentation import instrumenting, missing, sorted_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure nothing tries

if sys.version_info[:2] != (3, 11):
    # Not a CI failure: torch (which transformers needs) is installed for Python 3.11 only here.
    pytest.importorskip("torch", reason="torch is installed for Python 3.11 only on these machines")
    pytest.importorskip("transformers")
try:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
except ImportError as exc:
    missing("torch or transformers", f"pip install -e . --group frameworks ({exc})")

from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Pipeline,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    pipeline,
)
from transformers.generation.utils import GenerationMixin
from transformers.pipelines.pt_utils import PipelineIterator

from inferscope.instrumentation.torch import TorchInstrumentor
from inferscope.instrumentation.transformers import PIPELINE_STAGES, TransformersInstrumentor

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "good", "bad", "movie", "is", "a"]
PAD, EOS = 0, 3
NEW_TOKENS = 5


# --- tiny models, built from a config -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A word-level fast tokenizer over WORDS, built in memory."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def bert(num_labels: int = 2, **config: Any) -> Any:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        **config,
    )
    return BertForSequenceClassification(cfg).eval()


def gpt2() -> Any:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(WORDS),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def classifier(tokenizer: Any) -> Any:
    return pipeline("text-classification", model=bert(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def lm() -> Any:
    return gpt2()


def prompt(*rows: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows or [[5, 6]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def greedy(**options: Any) -> dict[str, Any]:
    """Exactly NEW_TOKENS new tokens, deterministically."""
    return {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **options}


class Texts(Dataset):  # type: ignore[type-arg]
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments transformers; teardown always uninstruments."""
    yield from instrumenting(TransformersInstrumentor)


def stage_rows(model: str) -> list[tuple[str | None, int]]:
    return [(stage, count) for name, stage, count in sorted_rows() if name == model]


BERT = "BertForSequenceClassification"
GPT2 = "GPT2LMHeadModel"
TEXTS = ["hello world", "good movie", "bad", "a movie is a movie"]


# --- pipelines -------------------------------------------------------------------------------------


def test_a_call_is_one_inference_with_three_stages_and_the_same_result(instrument, classifier):
    expected = [classifier(text) for text in TEXTS]
    instrument()
    assert [classifier(text) for text in TEXTS] == expected
    assert stage_rows(BERT) == [(None, 4), ("infer", 4), ("postprocess", 4), ("preprocess", 4)]
    snap = inferscope.snapshot()
    assert snap.row(BERT).errors == 0
    stages = sum(snap.row(BERT, stage).mean for stage in PIPELINE_STAGES.values())
    assert stages <= snap.row(BERT).mean


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_forward_pass_of_a_pipeline_on_cuda_measures_its_device_time(instrument, tokenizer):
    on_gpu = pipeline("text-classification", model=bert(), tokenizer=tokenizer, device="cuda")
    instrument()
    for text in TEXTS:
        on_gpu(text)
    snap = inferscope.snapshot()
    assert snap.row(BERT, "infer").gpu_count == len(TEXTS)
    assert snap.row(BERT, "infer").gpu_seconds > 0
    assert snap.row(BERT, "preprocess").gpu_count == 0


def test_a_list_is_one_inference_and_its_stages_count_per_item_or_batch(instrument, classifier):
    expected = classifier(TEXTS)
    instrument()
    assert classifier(TEXTS) == expected
    assert classifier(TEXTS, batch_size=3) == classifier(TEXTS, batch_size=3)
    # 3 calls; preprocess and postprocess per item; infer per item, then per batch of 3 (2, twice).
    assert stage_rows(BERT) == [(None, 3), ("infer", 4 + 2 + 2), ("postprocess", 12), ("preprocess", 12)]


def test_a_generator_input_streams_one_inference_per_item(instrument, classifier):
    expected = list(classifier(text for text in TEXTS))
    instrument()
    stream = classifier(text for text in TEXTS)
    assert isinstance(stream, PipelineIterator)  # exactly what transformers returns
    assert stage_rows(BERT) == []  # the call made an iterator: no inference yet
    results = []
    slept = 0.0
    started = time.perf_counter()
    for result in stream:
        results.append(result)
        before = time.perf_counter()
        time.sleep(0.05)  # the consumer's time is not the model's
        slept += time.perf_counter() - before
    elapsed = time.perf_counter() - started
    assert results == expected
    assert stage_rows(BERT) == [(None, 4), ("infer", 4), ("postprocess", 4), ("preprocess", 4)]
    row = inferscope.snapshot().row(BERT)
    # The inferences and the consumer's sleeps take turns on one thread: had a sleep been charged
    # to an inference, the inferences' total would exceed the time the loop spent outside sleeps.
    assert row.mean * row.count <= elapsed - slept


def test_a_dataset_input_streams_with_batches(instrument, classifier):
    expected = list(classifier(Texts(TEXTS), batch_size=2))
    instrument()
    assert list(classifier(Texts(TEXTS), batch_size=2)) == expected
    # The first item of each batch runs the batch's forward.
    assert stage_rows(BERT) == [(None, 4), ("infer", 2), ("postprocess", 4), ("preprocess", 4)]


def test_a_stream_consumed_inside_an_open_inference_is_part_of_it(instrument, classifier):
    instrument()
    stream = classifier(text for text in TEXTS[:2])

    @inferscope.track_inference(model="batch-job")
    def consume() -> list[Any]:
        with inferscope.stage("infer"):
            return list(stream)

    consume()
    assert sorted_rows() == [
        ("batch-job", None, 1),
        ("batch-job", "infer", 1),
        ("batch-job", "infer/infer", 2),
        ("batch-job", "infer/postprocess", 2),
        ("batch-job", "infer/preprocess", 2),
    ]


def test_inside_a_tracked_inference_the_pipeline_adds_its_stages(instrument, classifier):
    instrument()

    @inferscope.track_inference(model="service")
    def serve(text: str) -> Any:
        with inferscope.stage("infer"):
            return classifier(text)

    serve("hello")
    assert sorted_rows() == [
        ("service", None, 1),
        ("service", "infer", 1),
        ("service", "infer/infer", 1),
        ("service", "infer/postprocess", 1),
        ("service", "infer/preprocess", 1),
    ]


def test_a_chunk_pipeline_has_a_preprocess_stage_per_chunk(instrument, tokenizer):
    labels = {"contradiction": 0, "neutral": 1, "entailment": 2}
    model = bert(num_labels=3, label2id=labels, id2label={i: label for label, i in labels.items()})
    zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=tokenizer)
    candidates = ["good", "bad", "movie"]
    expected = zero_shot("hello world", candidate_labels=candidates)
    instrument()
    assert zero_shot("hello world", candidate_labels=candidates) == expected
    # One chunk (premise, hypothesis) per candidate label: one preprocess and one forward each.
    assert stage_rows(BERT) == [(None, 1), ("infer", 3), ("postprocess", 1), ("preprocess", 3)]


class Boom(Exception):
    pass


def test_a_pipeline_class_defined_later_is_instrumented_and_its_errors_counted_once(instrument, tokenizer):
    instrumentor = instrument()
    exc = Boom("bad output")

    class Scoring(Pipeline):
        """Defined after instrument(), overriding __call__ and a step that calls its base's."""

        def _sanitize_parameters(
            self, **kwargs: Any
        ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            return {}, {}, kwargs

        def __call__(self, inputs: Any, **kwargs: Any) -> Any:
            return super().__call__(inputs, **kwargs)

        def preprocess(self, text: str) -> Any:
            return self.tokenizer(text, return_tensors="pt")

        def _forward(self, inputs: Any) -> Any:
            return self.model(**inputs).logits

        def postprocess(self, logits: Any, fail: bool = False) -> Any:
            if fail:
                raise exc
            return logits.argmax(-1).item()

    class Scoring2(Scoring):
        def preprocess(self, text: str) -> Any:
            return super().preprocess(text.lower())  # one stage, not two

    assert not hasattr(Scoring.__dict__["postprocess"], "__inferscope_original__")
    scorer = Scoring2(model=bert(), tokenizer=tokenizer)  # its classes are wrapped now
    assert {(Scoring, "postprocess"), (Scoring2, "preprocess")} <= {
        (k, n) for k, n, _ in instrumentor.patched
    }
    assert scorer("HELLO world") == scorer("hello world")
    with pytest.raises(Boom) as caught:
        scorer("hello", fail=True)
    assert caught.value is exc
    assert stage_rows(BERT) == [(None, 3), ("infer", 3), ("postprocess", 3), ("preprocess", 3)]
    snap = inferscope.snapshot()
    assert (snap.row(BERT).errors, snap.row(BERT, "postprocess").errors) == (1, 1)
    assert snap.row(BERT).error_types == {error_type_name(Boom): 1}
    assert snap.row(BERT, "infer").errors == 0


def test_concurrent_calls_in_threads_are_counted_each(instrument, classifier):
    instrument()

    def work() -> None:
        for text in TEXTS:
            classifier(text)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stage_rows(BERT) == [(None, 16), ("infer", 16), ("postprocess", 16), ("preprocess", 16)]


# --- generate() ------------------------------------------------------------------------------------


def test_generate_records_the_first_token_and_each_next_token(instrument, lm):
    expected = lm.generate(**prompt(), **greedy())
    instrument()
    for _ in range(2):
        assert torch.equal(lm.generate(**prompt(), **greedy()), expected)
    assert stage_rows(GPT2) == [
        (None, 2),
        ("generate", 2),
        ("generate/first_token", 2),
        ("generate/next_token", 2 * (NEW_TOKENS - 1)),
    ]
    snap = inferscope.snapshot()
    tokens = snap.row(GPT2, "generate/first_token").mean * 2 + snap.row(GPT2, "generate/next_token").mean * 8
    assert 0 < tokens <= snap.row(GPT2, "generate").mean * 2 <= snap.row(GPT2).mean * 2


def test_a_batch_and_beam_search_count_one_next_token_per_step(instrument, lm):
    batch = prompt([5, 6], [7, 8])
    expected = (lm.generate(**batch, **greedy()), lm.generate(**prompt(), **greedy(num_beams=2)))
    instrument()
    assert torch.equal(lm.generate(**batch, **greedy()), expected[0])
    assert torch.equal(lm.generate(**prompt(), **greedy(num_beams=2)), expected[1])
    assert inferscope.snapshot().row(GPT2, "generate/next_token").count == 2 * (NEW_TOKENS - 1)


class CountingCriteria(StoppingCriteria):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_the_callers_stopping_criteria_are_kept_and_never_changed(instrument, lm):
    expected = lm.generate(**prompt(), **greedy())
    instrument()
    counting = CountingCriteria()
    criteria = StoppingCriteriaList([counting])
    assert torch.equal(lm.generate(**prompt(), stopping_criteria=criteria, **greedy()), expected)
    # Positionally: generate(inputs, generation_config, logits_processor, stopping_criteria).
    ids = prompt()["input_ids"]
    assert torch.equal(lm.generate(ids, None, None, criteria, **greedy()), expected)
    assert criteria == [counting]
    assert counting.calls == 2 * NEW_TOKENS
    assert inferscope.snapshot().row(GPT2, "generate/next_token").count == 2 * (NEW_TOKENS - 1)


def test_a_text_generation_pipeline_nests_generate_under_infer(instrument, lm, tokenizer):
    generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    expected = generator("hello world", **greedy())
    instrument()
    assert generator("hello world", **greedy()) == expected
    assert stage_rows(GPT2) == [
        (None, 1),
        ("infer", 1),
        ("infer/generate", 1),
        ("infer/generate/first_token", 1),
        ("infer/generate/next_token", NEW_TOKENS - 1),
        ("postprocess", 1),
        ("preprocess", 1),
    ]


def test_with_the_torch_instrumentor_nothing_is_counted_twice(instrument, classifier, lm):
    torch_instrumentor = TorchInstrumentor()
    instrument()
    torch_instrumentor.instrument(stage_depth=1)
    try:
        classifier("hello world")
        lm.generate(**prompt(), **greedy())
    finally:
        torch_instrumentor.uninstrument()
    # The modules run inside the open inferences: their submodules are stages, never inferences.
    assert sorted_rows() == [
        (BERT, None, 1),
        (BERT, "infer", 1),
        (BERT, "infer/bert", 1),
        (BERT, "infer/classifier", 1),
        (BERT, "infer/dropout", 1),
        (BERT, "postprocess", 1),
        (BERT, "preprocess", 1),
        (GPT2, None, 1),
        (GPT2, "generate", 1),
        (GPT2, "generate/first_token", 1),
        (GPT2, "generate/lm_head", NEW_TOKENS),
        (GPT2, "generate/next_token", NEW_TOKENS - 1),
        (GPT2, "generate/transformer", NEW_TOKENS),
    ]


# --- identity --------------------------------------------------------------------------------------


def test_the_default_name_is_the_name_or_path_and_a_local_directory_its_last_part(
    instrument, tokenizer, tmp_path: Path
):
    hub = bert()
    hub.config._name_or_path = "acme/sentiment-tiny"
    bert().save_pretrained(tmp_path / "sentiment-local")
    local = BertForSequenceClassification.from_pretrained(tmp_path / "sentiment-local").eval()
    instrument()
    pipeline("text-classification", model=hub, tokenizer=tokenizer)("hello")
    pipeline("text-classification", model=local, tokenizer=tokenizer)("hello")
    assert [(r.model, r.version) for r in inferscope.snapshot().rows if r.stage is None] == [
        ("acme/sentiment-tiny", None),
        ("sentiment-local", None),
    ]


def test_model_names_by_pipeline_by_model_by_task_and_by_callable(instrument, tokenizer, lm):
    first, second, third = (pipeline("text-classification", model=bert(), tokenizer=tokenizer) for _ in "123")
    generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    instrument(
        model_names={first: ("sentiment", "3"), second.model: "by-model", "text-generation": "writer"},
    )
    first("hello")
    second("hello")
    third("hello")
    generator("hello", **greedy())
    lm.generate(**prompt(), **greedy())  # the model alone: not the task's alias
    assert [(r.model, r.version, r.count) for r in inferscope.snapshot().rows if r.stage is None] == [
        (BERT, None, 1),
        (GPT2, None, 1),
        ("by-model", None, 1),
        ("sentiment", "3", 1),
        ("writer", None, 1),
    ]


def test_model_names_callable_sees_the_pipeline_then_its_model(instrument, classifier, lm):
    seen: list[type] = []

    def name(obj: Any) -> Any:
        seen.append(type(obj))
        return ("generator", 7) if isinstance(obj, GenerationMixin) else None

    instrument(model_names=name)
    classifier("hello")
    lm.generate(**prompt(), **greedy())
    assert seen == [type(classifier), type(classifier.model), type(lm)]
    assert [(r.model, r.version) for r in inferscope.snapshot().rows if r.stage is None] == [
        (BERT, None),
        ("generator", "7"),
    ]


def test_the_version_comes_from_the_inferscope_version_attribute(instrument, tokenizer):
    model = bert()
    model.inferscope_version = 4
    named = bert()
    named.inferscope_version = "2024-06"
    instrument(model_names={named: "ranker"})
    pipeline("text-classification", model=model, tokenizer=tokenizer)("hello")
    pipeline("text-classification", model=named, tokenizer=tokenizer)("hello")
    assert [(r.model, r.version) for r in inferscope.snapshot().rows if r.stage is None] == [
        (BERT, "4"),
        ("ranker", "2024-06"),
    ]


def test_models_selects_pipelines_or_their_models(instrument, classifier, tokenizer, lm):
    other = pipeline("text-classification", model=bert(), tokenizer=tokenizer)
    generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    instrument(models=[classifier, lm])
    classifier("hello")
    other("hello")  # neither it nor its model is selected
    generator("hello", **greedy())  # its model is
    lm.generate(**prompt(), **greedy())
    assert [(r.model, r.count) for r in inferscope.snapshot().rows if r.stage is None] == [
        (BERT, 1),
        (GPT2, 2),
    ]


def test_models_by_task(instrument, classifier, lm, tokenizer):
    instrument(models=["text-generation"])
    classifier("hello")
    pipeline("text-generation", model=lm, tokenizer=tokenizer)("hello", **greedy())
    assert [(r.model, r.count) for r in inferscope.snapshot().rows if r.stage is None] == [(GPT2, 1)]


def test_a_failing_model_names_callable_is_reported_and_the_call_goes_through(instrument, classifier):
    def broken(obj: Any) -> Any:
        raise RuntimeError("no name")

    expected = classifier("hello")
    instrument(model_names=broken)
    assert classifier("hello") == expected
    assert inferscope.snapshot().row(BERT).count == 1  # the default name


# --- instrumentation itself ------------------------------------------------------------------------


def _pipeline_attributes() -> dict[tuple[type, str], object]:
    """Every attribute the instrumentor may replace, on every pipeline class and its MRO."""
    classes: set[type] = set()
    stack: list[type] = [Pipeline]
    while stack:
        cls = stack.pop()
        if cls not in classes:
            classes.add(cls)
            stack.extend(type.__subclasses__(cls))
    found: dict[tuple[type, str], object] = {
        (PipelineIterator, "__next__"): PipelineIterator.__dict__["__next__"],
        (GenerationMixin, "generate"): GenerationMixin.__dict__["generate"],
    }
    for cls in classes:
        for klass in cls.__mro__:
            for name in ("__init__", "__call__", *PIPELINE_STAGES):
                if name in klass.__dict__:
                    found[(klass, name)] = klass.__dict__[name]
    return found


def test_uninstrument_restores_every_original_by_identity(instrument, classifier, lm, tokenizer):
    before = _pipeline_attributes()
    instrumentor = instrument()
    assert Pipeline.__dict__["__call__"] is not before[(Pipeline, "__call__")]

    class Later(type(classifier)):  # type: ignore[misc]
        def postprocess(self, *args: Any, **kwargs: Any) -> Any:
            return super().postprocess(*args, **kwargs)

    Later(model=bert(), tokenizer=tokenizer)("hello")  # patched at its first instance
    assert (Later, "postprocess") in {(klass, name) for klass, name, _ in instrumentor.patched}
    later_original = next(o for k, n, o in instrumentor.patched if (k, n) == (Later, "postprocess"))
    for klass, name, original in instrumentor.patched:
        assert before.get((klass, name), later_original) is original
    instrumentor.uninstrument()
    assert instrumentor.patched == []
    assert _pipeline_attributes() == {**before, (Later, "postprocess"): later_original}
    assert all(_pipeline_attributes()[key] is value for key, value in before.items())
    assert Later.__dict__["postprocess"] is later_original
    before_rows = sorted_rows()
    classifier("hello")
    list(classifier(text for text in TEXTS))
    lm.generate(**prompt(), **greedy())
    assert sorted_rows() == before_rows
    instrumentor.instrument()  # for the fixture's teardown


def test_instrument_twice_is_idempotent(instrument, classifier, caplog):
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        TransformersInstrumentor().instrument(models=[])
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    classifier("hello")
    assert inferscope.snapshot().row(BERT).count == 1  # the first options hold


def test_unknown_options_are_rejected():
    with pytest.raises(TypeError, match="did you mean 'models'"):
        TransformersInstrumentor().instrument(modles=[])
    assert not TransformersInstrumentor().active


def test_dependencies_are_met():
    from inferscope.instrumentation.transformers import package

    assert tuple(TransformersInstrumentor().instrumentation_dependencies()) == package._instruments
    assert TransformersInstrumentor()._check_dependency_conflicts() is None
    assert transformers.__version__
