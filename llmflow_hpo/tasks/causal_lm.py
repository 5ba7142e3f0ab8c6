"""Causal-LM fine-tuning (instruction / SFT data, chats, or plain text): the ``causal-lm`` task.

Reads JSON Lines (a ``prompt`` and a ``completion``, a chat ``messages``, or a ``text``), CSV/TSV texts with
labels (generative classification: the prompt is ``data.prompt_template`` of the text, the completion is the
label's word of ``data.label_words``), or plain text lines (continued training). The model is
``AutoModelForCausalLM``; the loss is the shifted next-token cross-entropy on the completion's tokens.
Dev is scored by its loss (``perplexity`` beside it) and, for examples with a reference answer, by answers
generated greedily at each evaluation (``generation:``): ``exact_match``, ``token_f1``, ``rouge_l`` and, with a
label set, ``label_accuracy``. A few prompts with their answers go with each evaluation (``samples``).

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
counted; one with no completion token left inside ``max_length`` is dropped and counted (it trains on nothing).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow_hpo.errors import DataError
from llmflow_hpo.tasks.base import IGNORE_INDEX, BaseTask, Cleaner, ScoredFeatures, json_field
from llmflow_hpo.tasks.metrics import GENERATION_METRICS, generation_metrics
from llmflow_hpo.tasks.text_classification import TextExample

__all__ = ["IGNORE_INDEX", "CausalLM", "EncodedExample", "LMExample", "encode_example", "generate", "render_chat"]


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


# ----------------------------------------------------------------------------------------------------
# Examples as read.


@dataclass(frozen=True)
class LMExample:
    """One causal-LM example: a prompt and its completion, a chat (``messages``: (role, content) turns, the
    last the assistant's), or a plain text (no prompt, ``completion`` only, no reference answer)."""

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None
    plain: bool = False

    def cleaned(self, clean: Cleaner, source: str, number: int) -> LMExample | None:
        """Called by ``data.clean.clean_examples``. The text is kept as written (newlines and runs of spaces
        are part of what a language model learns); an example whose completion is blank is dropped."""
        if not self.completion.strip():
            clean.count("empty")
            return None
        return self


def _messages(path: str | Path, at: str, name: str, value: object) -> tuple[tuple[str, str], ...]:
    where = f"{at}: field {name!r}"
    if not isinstance(value, list) or not value:
        raise DataError(path, f"{where} must be a non-empty list of {{role, content}} turns")
    turns = []
    for turn in value:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise DataError(path, f"{where}: every turn must be an object with string role and content, got {turn!r}")
        turns.append((turn["role"], turn["content"]))
    if turns[-1][0] != "assistant":
        raise DataError(
            path, f"{where}: the last turn must be the assistant's (the answer to learn), not {turns[-1][0]!r}"
        )
    return tuple(turns)


def _string(path: str | Path, where: str, record: dict, name: str) -> str:
    value = json_field(path, where, record, name)
    if not isinstance(value, str):
        raise DataError(path, f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------
# The task.


class CausalLM(BaseTask):
    """Next-token prediction on completions (SFT), chats or plain text; scored by dev loss and generation."""

    name = "causal-lm"
    formats = ("jsonl", "csv", "tsv", "lines", "text", "json", "parquet", "arrow", "hf-disk")
    unit = "example"
    label_field = "data.completion_field"
    stratify = False
    metrics = ("loss", "perplexity", *GENERATION_METRICS)
    default_metric = "loss"
    model_card_class = "AutoModelForCausalLM"
    scoring_columns = ("prompt_ids", "reference")
    labelled = False
    peft_task_type = "CAUSAL_LM"

    def format_problem(self, format: str) -> str:
        return (
            "causal-lm reads jsonl, json, parquet, arrow or hf-disk (prompt/completion, messages or text), csv, tsv "
            "or lines (text and label), or text"
        )

    def check_config(self, cfg: Any) -> list[tuple[str, str]]:
        problems = super().check_config(cfg)
        d = cfg.data
        rules = {"label_separator": d.label_separator, "label_regex": d.label_regex, "label_map": d.label_map,
                 "drop_labels": d.drop_labels, "labels": d.labels}  # fmt: skip
        problems += [
            (f"data.{name}", "causal-lm learns completions, not labels; give each label's words in data.label_words")
            for name, value in rules.items()
            if value
        ]
        if d.tag_scheme != "IOB2":
            problems.append(("data.tag_scheme", "applies to token-classification only; remove it"))
        if cfg.train.class_weighting != "none":
            problems.append(("train.class_weighting", "causal-lm predicts tokens, not classes; use none"))
        metric = cfg.objective.metric
        if metric in GENERATION_METRICS and cfg.generation.examples == 0:
            problems.append(
                ("generation.examples", f"objective.metric {metric} is scored on generated answers; give >= 1")
            )
        if metric == "label_accuracy" and not (cfg.generation.labels or cfg.data.label_words):
            problems.append(
                (
                    "generation.labels",
                    "objective.metric label_accuracy needs a label set; give it (or data.label_words)",
                )
            )
        if cfg.data.format == "text" and metric in GENERATION_METRICS:
            problems.append(
                ("objective.metric", "plain text has no reference answers to score; use loss or perplexity")
            )
        if "{text}" not in cfg.data.prompt_template:
            problems.append(("data.prompt_template", "must hold {text}, where each example's text goes"))
        g = cfg.generation
        for name, ok, need in (
            ("examples", g.examples >= 0, ">= 0 (0 turns generation off)"),
            ("max_new_tokens", g.max_new_tokens >= 1, ">= 1"),
            ("max_seconds", g.max_seconds > 0, "> 0"),
            ("samples", g.samples >= 0, ">= 0"),
        ):
            if not ok:
                problems.append((f"generation.{name}", f"got {getattr(g, name)}; must be {need}"))
        return problems

    # ------------------------------------------------------------------ reading

    def record_example(self, path: str | Path, where: str, record: dict, fields: Mapping[str, str]) -> LMExample:
        """A chat when the record has the messages field, else a prompt and completion when it has the prompt
        field, else a plain text (the text field)."""
        if fields["messages"] in record:
            turns = _messages(path, where, fields["messages"], record[fields["messages"]])
            return LMExample(prompt="", completion=turns[-1][1], messages=turns)
        if fields["prompt"] in record:
            prompt = _string(path, where, record, fields["prompt"])
            return LMExample(prompt=prompt, completion=_string(path, where, record, fields["completion"]))
        if fields["text"] in record:
            return LMExample(prompt="", completion=_string(path, where, record, fields["text"]), plain=True)
        found = ", ".join(sorted(record)) or "none"
        raise DataError(
            path,
            f"{where}: none of the fields {fields['messages']!r}, {fields['prompt']!r} (with "
            f"{fields['completion']!r}) or {fields['text']!r} (fields found: {found}); set data.messages_field, "
            "data.prompt_field or data.text_column",
        )

    def line_example(self, path: str | Path, number: int, line: str) -> LMExample:
        return LMExample(prompt="", completion=line, plain=True)

    def example_labels(self, example: Any) -> Sequence[str]:
        return ()

    def label_set(self, examples: list, order: Sequence[str] | None = None) -> list[str]:
        return []

    def summary(self, splits: Any) -> list[str]:
        lines = []
        for name in ("train", "dev", "test"):
            kinds = Counter(_kind(example) for example in getattr(splits, name))
            lines.append(f"{name}: " + ", ".join(f"{kinds[k]} {k}" for k in sorted(kinds)))
        return lines

    # ------------------------------------------------------------------ features

    def tokenize(
        self, examples: list, tokenizer: Any, label_ids: Mapping[str, int], data: Any
    ) -> tuple[dict[str, list], list[str]]:
        """Input ids and labels (the prompt masked, ``encode_example``), and for scoring each example's prompt
        ids and reference answer (None for plain text). Examples with no completion token left are dropped."""
        columns: dict[str, list] = {
            "input_ids": [],
            "attention_mask": [],
            "labels": [],
            "prompt_ids": [],
            "reference": [],
        }
        truncated = dropped = 0
        for example in examples:
            prompt, completion, reference = _prompt_and_completion(example, tokenizer, data)
            encoded = encode_example(
                tokenizer, prompt, completion, max_length=data.max_length, train_on_prompt=data.train_on_prompt
            )
            if encoded.empty:
                dropped += 1
                continue
            truncated += encoded.truncated
            columns["input_ids"].append(encoded.input_ids)
            columns["attention_mask"].append([1] * len(encoded.input_ids))
            columns["labels"].append(encoded.labels)
            columns["prompt_ids"].append(encoded.input_ids[: encoded.prompt_length] if reference is not None else [])
            columns["reference"].append(reference)
        report = []
        if truncated:
            report.append(
                f"{truncated} of {len(examples)} examples truncated to data.max_length={data.max_length} tokens "
                "(the end of the completion is cut)"
            )
        if dropped:
            report.append(
                f"{dropped} of {len(examples)} examples dropped: the prompt fills data.max_length={data.max_length} "
                "tokens, no completion token is left to learn"
            )
        return columns, report

    # ------------------------------------------------------------------ model and predictions

    def model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def head_config(self, labels: list[str]) -> dict[str, Any]:
        # The language-model head predicts the vocabulary. No key-value cache in training and evaluation: without
        # it, a packed batch's position ids keep each example's attention within itself (transformers' masks
        # look for packed sequences only then); generation asks for the cache.
        return {"use_cache": False}

    def batch_examples(self, batch: Mapping[str, Any]) -> int:
        """A packed batch is one row of several examples, each starting at position 0."""
        if "position_ids" in batch:
            return int((batch["position_ids"] == 0).sum())
        return len(batch["labels"])

    def loss_inputs(self, logits: Any, labels: Any) -> tuple[Any, Any]:
        """The logit at position t predicts the token at t + 1."""
        return logits[:, :-1], labels[:, 1:]

    def collator(self, tokenizer: Any, data: Any) -> Any:
        if data.packing:
            from transformers import DataCollatorWithFlattening

            return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        return _Pad(_pad_id(tokenizer))

    def batch_predictions(self, logits: Any, labels: Any) -> list:
        return []  # nothing per example: scored by the loss and by generated answers (evaluate_more)

    def score(self, features: ScoredFeatures, split: str, predictions: list) -> dict[str, float]:
        return {}

    def evaluate_more(
        self, model: Any, tokenizer: Any, features: ScoredFeatures, split: str, runtime: Any, cfg: Any, loss: float
    ) -> tuple[dict[str, float], list[dict[str, str]]]:
        """``perplexity`` (exp of the loss), and the generated answers' metrics: on the first
        ``generation.examples`` dev examples with a reference (every test one), within ``generation.max_seconds``
        on dev; the answers not reached count as empty, and ``generated`` is the share that was."""
        metrics = {"perplexity": math.exp(min(loss, 80.0))}
        g = cfg.generation
        ds = features.splits[split]
        rows = [i for i, reference in enumerate(ds["reference"]) if reference is not None]
        if split == "dev":
            rows = rows[: g.examples]
        if not rows or g.examples == 0:
            return metrics, []
        picked = ds.select(rows)  # the columns of the generated examples, read once
        prompts, references = picked["prompt_ids"], picked["reference"]
        answers = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=g.max_new_tokens,
            batch_size=cfg.train.eval_batch_size,
            device=runtime.device,
            max_seconds=g.max_seconds if split == "dev" else None,
        )
        labels = g.labels or sorted(set(cfg.data.label_words.values())) or None
        metrics.update(generation_metrics(references, [a or "" for a in answers], labels))
        metrics["generated"] = sum(a is not None for a in answers) / len(answers)
        samples = [
            {"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r, "answer": a or ""}
            for p, r, a in list(zip(prompts, references, answers, strict=True))[: g.samples]
        ]
        return metrics, samples

    # ------------------------------------------------------------------ deployment

    onnx_runtime = False  # answers are generated token by token: the PyTorch model's generate

    def parse_input(self, value: Any, data: Any) -> Any:
        """A prompt (``str``; with a model trained on csv/tsv texts, the text that ``data.prompt_template``
        wraps), or a chat so far (a list of ``{role, content}`` turns) to answer."""
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("the prompt is empty")
            if data.format in ("csv", "tsv"):
                return TextExample(text=value, label="")
            return LMExample(prompt=value, completion="")
        if isinstance(value, list) and value:
            turns = _messages("request", 0, "messages", [*value, {"role": "assistant", "content": ""}])
            return LMExample(prompt="", completion="", messages=turns)
        raise ValueError(f"expected a prompt or a list of chat turns, got {type(value).__name__}")

    def example_input(self, example: Any, data: Any) -> Any:
        return example

    def predict(
        self, engine: Any, inputs: list, tokenizer: Any, data: Any, labels: list[str], options: Any
    ) -> list[dict[str, Any]]:
        """Greedy answers of at most ``options.max_new_tokens`` tokens to the prompts as training renders them
        (template, chat template); a prompt longer than ``options.max_length`` keeps its last tokens."""
        prompts = [_prompt_and_completion(i, tokenizer, data)[0] for i in inputs]
        ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"])[-options.max_length :] for p in prompts]
        answers = generate(
            engine.model,
            tokenizer,
            ids,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
            device=engine.device,
        )
        return [{"prompt": p, "completion": a or ""} for p, a in zip(prompts, answers, strict=True)]

    def gold(self, example: Any, data: Any) -> str | None:
        if isinstance(example, LMExample):
            return None if example.plain else example.completion
        return data.label_words.get(example.label, example.label)

    def prediction_metrics(self, gold: list, predictions: list[dict[str, Any]], cfg: Any) -> dict[str, float]:
        """The generation metrics of the answers to the examples with a reference answer."""
        pairs = [(g, p["completion"]) for g, p in zip(gold, predictions, strict=True) if g is not None]
        if not pairs:
            return {}
        labels = cfg.generation.labels or sorted(set(cfg.data.label_words.values())) or None
        return generation_metrics([g for g, _ in pairs], [a for _, a in pairs], labels)


def _kind(example: Any) -> str:
    if isinstance(example, LMExample):
        return "plain texts" if example.plain else ("chats" if example.messages else "prompt/completion pairs")
    return "labelled texts"


def _prompt_and_completion(example: Any, tokenizer: Any, data: Any) -> tuple[str, str, str | None]:
    """The prompt and completion strings to encode, and the reference answer (None: plain text)."""
    if isinstance(example, LMExample) and example.plain:
        return "", example.completion, None
    if isinstance(example, LMExample) and example.messages:
        messages = [{"role": role, "content": content} for role, content in example.messages]
        return (*_render(tokenizer, messages), example.completion)
    if isinstance(example, LMExample):
        prompt, completion = example.prompt, example.completion
    else:  # a labelled text of a csv/tsv file (text_classification.TextExample)
        prompt = data.prompt_template.replace("{text}", example.text)
        completion = data.label_words.get(example.label, example.label)
    if data.chat_template:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return (*_render(tokenizer, turns), completion)
    return prompt, completion, completion


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    from llmflow_hpo.errors import ConfigError

    try:
        return render_chat(tokenizer, messages)
    except ValueError as e:
        raise ConfigError(f"data.chat_template: {e}") from None


def _pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (many causal LMs have no pad token; the
    padded positions are masked out of attention and loss either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


class _Pad:
    """Right-pads a batch: input ids with the pad id, the attention mask with 0, labels with IGNORE_INDEX.
    (transformers' DataCollatorForSeq2Seq does this too, but needs the tokenizer to have a pad token.)"""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows], dtype=torch.long)
            for key, value in fill.items()
        }


# ----------------------------------------------------------------------------------------------------
# Generation.


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: Any,
    max_seconds: float | None = None,
) -> list[str | None]:
    """Greedy answers to ``prompts`` (token ids), decoded without special tokens and stripped, in their order.

    Prompts are taken longest first in left-padded batches (``model.generate``, greedy, at most
    ``max_new_tokens`` each). With ``max_seconds``, generation stops when that time is spent (transformers'
    ``max_time`` within a batch): the answers not reached are None. Greedy decoding draws no random number."""
    import torch

    pad = _pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str | None] = [None] * len(prompts)
    started = time.perf_counter()
    for first in range(0, len(order), batch_size):
        left = None if max_seconds is None else max_seconds - (time.perf_counter() - started)
        if left is not None and left <= 0:
            break
        batch = order[first : first + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            max_time=left,
            use_cache=True,
        )
        for row, index in enumerate(batch):
            answers[index] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers
