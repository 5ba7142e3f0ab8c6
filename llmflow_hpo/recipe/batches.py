"""The batches of a run: the training order (seeded, length-grouped, able to start mid-epoch) and the
evaluation loaders (longest first, off the global RNG).

Reproducibility: the training order comes from a generator seeded with the trial's seed, and the
evaluation loaders own their generators too, so evaluating never draws from the global torch RNG.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from llmflow_hpo.config.study import TrainConfig
from llmflow_hpo.recipe.runtime import Runtime
from llmflow_hpo.tasks import TASKS

__all__ = ["EpochSampler", "ModelInputs", "by_length", "eval_loader", "lengths", "train_loader"]

# The columns no model takes: those the tasks' ``score`` reads (``BaseTask.scoring_columns``), of every task
# (a split's dataset does not say which task made it).
_SCORING_COLUMNS = frozenset(column for task in TASKS.values() for column in task.scoring_columns)


class EpochSampler(torch.utils.data.Sampler[int]):
    """The training order of an epoch, drawn from the loader's generator, able to start mid-epoch.

    Without ``lengths``: the order of ``DataLoader(shuffle=True, generator=g)`` (one permutation per
    epoch, and a second, unused one at the end of the epoch, as RandomSampler draws). With ``lengths``:
    the Hugging Face Trainer's length grouping (``get_length_grouped_indices``: a permutation cut into
    groups of 50 batches, each sorted by length, the longest batch first), so a batch holds examples of
    similar length and dynamic padding pads little. ``skip`` drops the first examples of the next epoch
    drawn: the ones a resumed run had already trained on.
    """

    def __init__(
        self, n: int, generator: torch.Generator, lengths: list[int] | None = None, batch_size: int = 1
    ) -> None:
        self.n = n
        self.generator = generator
        self.lengths = lengths
        self.batch_size = batch_size
        self.skip = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        if self.lengths is not None:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        else:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        skip, self.skip = self.skip, 0
        yield from order[skip:]
        torch.randperm(self.n, generator=self.generator)


class ModelInputs(torch.utils.data.Dataset):
    """The columns the model takes (not the word-level gold tags), read row by row from the cached dataset.

    A plain view rather than ``Dataset.remove_columns``: no fingerprinting (hashing) work per trial.
    """

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.columns = [c for c in ds.column_names if c not in _SCORING_COLUMNS]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[index]
        return {c: row[c] for c in self.columns}


def lengths(ds: Any) -> list[int]:
    """Each example's length in tokens (what dynamic padding pads to)."""
    return [len(ids) for ids in ds["input_ids"]]


def by_length(ds: Any) -> list[int]:
    """Evaluation order: longest first (a memory error shows at once), so each batch pads little."""
    sizes = lengths(ds)
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])


def train_loader(ds: Any, hp: TrainConfig, runtime: Runtime, collate: Any, seed: int) -> DataLoader:
    """The training loader of a run; its sampler (an ``EpochSampler``) and generator carry the order.

    ``collate`` is the task's collator (``tasks.BaseTask.collator``), as for ``eval_loader``.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = EpochSampler(len(ds), generator, lengths(ds) if hp.group_by_length else None, hp.batch_size)
    return DataLoader(
        ModelInputs(ds),
        batch_size=hp.batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=generator,  # the loader draws its base seed from it each epoch, as with shuffle=True
        pin_memory=runtime.pin_memory,
    )


def eval_loader(ds: Any, hp: TrainConfig, runtime: Runtime, collate: Any) -> DataLoader:
    """A dev or test loader: longest examples first, with a generator of its own (off the global RNG)."""
    return DataLoader(
        ModelInputs(ds),
        batch_size=hp.eval_batch_size,
        sampler=by_length(ds),
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),  # keeps evaluation off the global RNG
        pin_memory=runtime.pin_memory,
    )
