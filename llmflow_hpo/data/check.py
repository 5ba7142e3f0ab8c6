"""The data check of ``validate``: the first examples of every split's source read as the search will read
them, every problem found in one line (a wrong column, a missing field, an unknown label, an empty split).

Each source is read, cleaned and relabelled up to ``limit`` examples; a source's first problem is its line,
and the other sources are still read, so that all of them are reported at once, before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmflow_hpo.data.clean import clean_examples
from llmflow_hpo.data.labels import LabelRules
from llmflow_hpo.data.read import read_file
from llmflow_hpo.data.splits import split_sources
from llmflow_hpo.errors import ConfigError, DataError
from llmflow_hpo.tasks import get_task

__all__ = ["DataCheck", "check_data"]


@dataclass
class DataCheck:
    """What ``check_data`` found: problems (each one line, naming the field and the file) and notes."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_data(data: Any, *, task: str, limit: int | None = 1000) -> DataCheck:
    """Read the first ``limit`` examples (None: all) of each source of ``data`` (a ``DataConfig``)."""
    spec = get_task(task)
    rules = LabelRules.of(data)
    found = DataCheck()
    try:
        sources = split_sources(data)
    except DataError as error:
        found.problems.append(f"data.train: {error}")
        return found
    splits_of: dict = {}  # a source that serves several splits (one file as dev and test) is read once
    for name, source in sources.items():
        splits_of.setdefault(source, []).append(name)
    for source, names in splits_of.items():
        where = ", ".join(f"data.{name}" + (f" (data.splits.{name})" if source.split else "") for name in names)
        try:
            examples = read_file(source.path, task=spec, data=data, split=source.split, limit=limit)
            cleaned, _ = clean_examples(examples, source=source.name, normalize_unicode=data.normalize_unicode)
            kept, lines = spec.relabel(cleaned, rules, data, str(source.path))
        except (DataError, ConfigError) as error:
            found.problems.append(f"{where}: {error}")
            continue
        part = f"the first {limit}" if limit is not None and len(examples) >= limit else "all"
        if not kept:
            found.problems.append(f"{where}: {source}: the split is empty: no example is left of {part} read")
            continue
        found.notes.append(f"{where}: {source}: {len(examples)} {spec.unit}(s) read ({part}), {len(kept)} kept")
        found.notes.extend(f"{where}: {line}" for line in lines)
    return found
