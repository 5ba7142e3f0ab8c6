"""Causal-LM examples: the prompt masked out of the loss, chat data rendered by the tokenizer's template."""

from __future__ import annotations

import math

import pytest

from llmflow_hpo.tasks.causal_lm import IGNORE_INDEX, encode_example, render_chat

WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n"]
WORDS += "what is two plus two ? four . be brief capital of france paris".split()
# ChatML, as SmolLM2-Instruct's template writes it (without its default system turn).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over WORDS that adds a BOS, as Llama's does; ChatML as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_loss_is_on_the_completion_only(tokenizer) -> None:
    got = encode_example(tokenizer, "what is two plus two ?", "four .", max_length=64)
    # hand-checked: <s> what is two plus two ? | four . </s>
    assert got.input_ids == [1, *ids(tokenizer, "what is two plus two ?"), *ids(tokenizer, "four ."), 2]
    assert tokenizer.convert_ids_to_tokens(got.input_ids) == ["<s>", "what", "is", "two", "plus", "two", "?",
                                                              "four", ".", "</s>"]  # fmt: skip
    assert got.labels == [IGNORE_INDEX] * 7 + got.input_ids[7:]  # the prompt (BOS included) is masked
    assert got.prompt_length == 7 and not got.truncated and not got.empty
    kept = encode_example(tokenizer, "what is two plus two ?", "four .", max_length=64, train_on_prompt=True)
    assert kept.labels == kept.input_ids


def test_a_long_example_is_cut_at_the_end_and_one_without_a_completion_is_flagged(tokenizer) -> None:
    cut = encode_example(tokenizer, "what is two plus two ?", "four .", max_length=8)
    assert cut.truncated and not cut.empty and len(cut.input_ids) == len(cut.labels) == 8
    assert cut.labels[-1] == ids(tokenizer, "four")[0]  # "four" still trains; "." and </s> are cut
    gone = encode_example(tokenizer, "what is two plus two ?", "four .", max_length=7)
    assert gone.truncated and gone.empty and set(gone.labels) == {IGNORE_INDEX}


def test_a_completion_that_holds_eos_gets_no_second_one(tokenizer) -> None:
    got = encode_example(tokenizer, "what is two plus two ?", "four . </s>", max_length=64)
    assert got.input_ids[-2:] == [ids(tokenizer, ".")[0], 2]


def test_chat_messages_are_rendered_with_the_tokenizers_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "capital of france ?"},
        {"role": "assistant", "content": "paris ."},
    ]
    prompt, completion = render_chat(tokenizer, messages)
    assert prompt == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\ncapital of france ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert completion == "paris .<|im_end|>\n"  # the answer and its end-of-turn marker: what the model learns
    got = encode_example(tokenizer, prompt, completion, max_length=64)
    learned = [t for t, label in zip(got.input_ids, got.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(learned) == ["paris", ".", "<|im_end|>", "\n", "</s>"]
    # Where the end of turn is the EOS (SmolLM2: <|im_end|>), the turn's own one ends it: no second one after "\n".
    tokenizer.eos_token, saved = "<|im_end|>", tokenizer.eos_token
    try:
        got = encode_example(tokenizer, prompt, completion, max_length=64)
    finally:
        tokenizer.eos_token = saved
    learned = [t for t, label in zip(got.input_ids, got.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(learned) == ["paris", ".", "<|im_end|>", "\n"]


def test_chat_data_the_template_cannot_split_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="last turn must be the assistant"):
        render_chat(tokenizer, [{"role": "user", "content": "four"}])
    tokenizer.chat_template, saved = None, tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="no chat template"):
            render_chat(tokenizer, [{"role": "assistant", "content": "four"}])
    finally:
        tokenizer.chat_template = saved


# ----------------------------------------------------------------------------------------------------
# The registered task on a tiny random Llama (tests/tiny_lm.py) and the quick-start reviews.


def _study(lm_study, changes=None):
    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.data.features import prepare_features

    cfg = load_study_config(lm_study(changes))
    return cfg, prepare_features(cfg, log=lambda _: None)


def test_every_data_shape_is_read_pairs_chats_texts_and_labelled_tsv(tmp_path, tiny_lm_folder) -> None:
    import json

    from llmflow_hpo.config.study import DataConfig, ModelConfig
    from llmflow_hpo.data.splits import load_splits
    from llmflow_hpo.recipe.models import load_tokenizer
    from llmflow_hpo.tasks import get_task

    records = [
        {"prompt": "Review: fine.\nIs this review positive or negative?", "completion": "positive"},
        {"messages": [{"role": "user", "content": "Review: awful."}, {"role": "assistant", "content": "negative"}]},
        {"text": "A plain text to continue."},
    ]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mixed = str(tmp_path / "mixed.jsonl")
    splits = load_splits(DataConfig(format="jsonl", train=mixed, dev=mixed, test=mixed), task="causal-lm")
    assert splits.labels == [] and "train: 1 chats, 1 plain texts, 1 prompt/completion pairs" in splits.report
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm_folder)))
    data = DataConfig(format="jsonl", train="x", max_length=64)
    columns, _ = get_task("causal-lm").tokenize(splits.train, tokenizer, {}, data)
    assert columns["reference"] == ["positive", "negative", None]  # plain text has no answer to generate
    chat = tokenizer.decode(columns["prompt_ids"][1])
    assert chat == "<|im_start|>user\nReview: awful.<|im_end|>\n<|im_start|>assistant\n"  # the template's prompt
    learned = [t for t, label in zip(columns["input_ids"][2], columns["labels"][2], strict=True) if label != -100]
    assert tokenizer.decode(learned) == "A plain text to continue.<|im_end|>"  # all of a plain text trains
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\nit is fine\t1\nit is bad\t0\n")
    sst = str(tmp_path / "sst.tsv")
    tsv = load_splits(DataConfig(format="tsv", train=sst, dev=sst, test=sst, text_column="sentence"), task="causal-lm")
    data = DataConfig(
        format="tsv",
        train="x",
        prompt_template="Review: {text}\nSentiment:",
        label_words={"1": "positive", "0": "negative"},
    )
    columns, _ = get_task("causal-lm").tokenize(tsv.train, tokenizer, {}, data)
    assert tokenizer.decode(columns["prompt_ids"][0]) == "Review: it is fine\nSentiment:"
    assert columns["reference"] == ["positive", "negative"]


def test_dev_loss_is_transformers_own_causal_lm_loss_on_the_completion_tokens(lm_study) -> None:
    import torch

    from llmflow_hpo.recipe.batches import eval_loader
    from llmflow_hpo.recipe.evaluation import evaluate
    from llmflow_hpo.recipe.models import build_model, load_tokenizer
    from llmflow_hpo.recipe.runtime import resolve_runtime
    from llmflow_hpo.tasks import get_task

    cfg, features = _study(lm_study, {"generation": {"examples": 0}})
    torch.manual_seed(0)
    model = build_model(cfg.model, task=cfg.task, labels=[], hidden_dropout=None, attention_dropout=None)
    tokenizer, runtime = load_tokenizer(cfg.model), resolve_runtime(cfg.train)
    loader = eval_loader(features.splits["dev"], cfg.train, runtime, get_task(cfg.task).collator(tokenizer, cfg.data))
    metrics, samples = evaluate(model, loader, features, "dev", runtime, tokenizer=tokenizer, cfg=cfg)
    (batch,) = list(loader)  # 12 examples, one batch: transformers' mean over its completion tokens is the split's
    with torch.no_grad():
        theirs = model(**batch).loss  # shifts the labels itself, skips -100
    assert metrics["loss"] == pytest.approx(float(theirs), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert samples == [] and "label_accuracy" not in metrics  # generation off


def test_packing_keeps_attention_within_each_example_and_counts_examples(lm_study) -> None:
    import torch

    from llmflow_hpo.recipe.models import build_model, load_tokenizer
    from llmflow_hpo.tasks import get_task

    cfg, features = _study(lm_study, {"data": {"packing": True}})
    task, tokenizer = get_task(cfg.task), load_tokenizer(cfg.model)
    rows = [{k: features.splits["dev"][i][k] for k in ("input_ids", "labels")} for i in range(3)]
    packed = task.collator(tokenizer, cfg.data)(rows)
    assert packed["input_ids"].shape[0] == 1 and task.batch_examples(packed) == 3
    torch.manual_seed(0)
    model = build_model(cfg.model, task=cfg.task, labels=[], hidden_dropout=None, attention_dropout=None).eval()
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            assert torch.allclose(together[start : start + len(alone)], alone, atol=1e-5)  # no attention across
            start += len(alone)


def test_a_trial_reports_generation_metrics_and_samples_at_every_evaluation(lm_study) -> None:
    from llmflow_hpo.recipe.train import train_and_evaluate

    cfg, features = _study(lm_study)
    result = train_and_evaluate(cfg, {}, features, seed=0)
    for evaluation in result.history:
        assert {"loss", "perplexity", "exact_match", "token_f1", "rouge_l", "label_accuracy"} <= set(evaluation.metrics)
        assert evaluation.metrics["generated"] == 1.0
        assert len(evaluation.samples) == 2 and set(evaluation.samples[0]) == {"prompt", "reference", "answer"}
        assert evaluation.samples[0]["prompt"].startswith("Review: ")


def test_generation_stops_when_its_time_is_spent(lm_study) -> None:
    from llmflow_hpo.recipe.models import build_model, load_tokenizer
    from llmflow_hpo.tasks.causal_lm import generate

    cfg, features = _study(lm_study)
    model = build_model(cfg.model, task=cfg.task, labels=[], hidden_dropout=None, attention_dropout=None).eval()
    prompts = features.splits["dev"]["prompt_ids"][:4]
    tokenizer = load_tokenizer(cfg.model)
    done = generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2, device="cpu")
    assert all(isinstance(answer, str) for answer in done)
    assert (
        generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2, device="cpu", max_seconds=1e-9)
        == [None] * 4
    )  # nothing reached: scored as empty answers, generated = 0


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"objective": {"metric": "label_accuracy"}, "generation": {"labels": None}}, "generation.labels", "label set"),
        ({"objective": {"metric": "exact_match"}, "generation": {"examples": 0}}, "generation.examples", ">= 1"),
        ({"train": {"class_weighting": "balanced"}}, "train.class_weighting", "not classes"),
        ({"data": {"prompt_template": "no place"}}, "data.prompt_template", "{text}"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens", ">= 1"),
    ],
)
def test_a_causal_lm_config_that_cannot_work_is_refused_by_field(lm_study, changes, field, words) -> None:
    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_study_config(lm_study(changes))
    assert f"{field}: " in str(error.value) and words in str(error.value)
