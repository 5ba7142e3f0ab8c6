"""Causal-LM (instruction / SFT) examples as token ids and labels: the building blocks of the causal-LM task.

Not a registered task yet (``tasks.TASKS`` has none for causal-LM): issue 16 builds the task on these.

An example is a prompt and a completion. Chat data (``messages``) is rendered with the tokenizer's own chat
template (``apply_chat_template``): the prompt is every turn before the last, with the template's generation
prompt (the assistant's turn header), and the completion is what the template writes for the last (assistant)
turn, end-of-turn marker included, taken as the rest of the rendered conversation. That holds for any template
that renders a conversation as its turns in order (ChatML, Llama's, ...); one that does not is refused by name.

The ids are the prompt's (the tokenizer's special tokens included, a BOS where it adds one), then the
completion's (none added), then the EOS token where the completion does not hold it already (SmolLM2's EOS is
ChatML's ``<|im_end|>``, which ends the assistant's turn, followed by the template's newline). The loss is on
the completion only: the prompt's labels are -100 (``train_on_prompt`` keeps them). The prompt and completion
are tokenized apart and concatenated, as TRL's SFTTrainer does for prompt-completion data, so a token never
straddles the boundary and the mask is exact. An example longer than ``max_length`` is cut at the end and
flagged ``truncated``; one with no completion token left inside ``max_length`` is flagged ``empty`` (it would
train on nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["IGNORE_INDEX", "EncodedExample", "encode_example", "render_chat"]

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' causal-LM loss) ignores


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens of the prompt (at most len(input_ids))
    truncated: bool  # cut at max_length
    empty: bool  # no completion token left to train on


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
    """The prompt and the completion of a conversation whose last turn is the assistant's answer."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("messages: the last turn must be the assistant's (the completion to learn)")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("messages: the tokenizer has no chat template; give prompt/completion fields instead")
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "messages: the chat template does not render the conversation as its earlier turns followed by the "
            "last one; give prompt/completion fields instead"
        )
    return prompt, full[len(prompt) :]


def encode_example(
    tokenizer: Any, prompt: str, completion: str, *, max_length: int, train_on_prompt: bool = False
) -> EncodedExample:
    """``prompt`` + ``completion`` as ids, the prompt's labels masked unless ``train_on_prompt`` (see above)."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in completion_ids:  # a chat turn ends with it, then the template's newline
        completion_ids.append(eos)
    ids = prompt_ids + completion_ids
    labels = (prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + completion_ids
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return EncodedExample(
        input_ids=ids,
        labels=labels,
        prompt_length=min(len(prompt_ids), max_length),
        truncated=truncated,
        empty=len(prompt_ids) >= max_length,
    )
