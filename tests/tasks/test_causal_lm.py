"""Causal-LM examples: the prompt masked out of the loss, chat data rendered by the tokenizer's template."""

from __future__ import annotations

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
