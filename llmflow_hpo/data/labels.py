"""The label rules of a study's data: a part of each label, a map that renames or merges, labels to drop, and a
fixed label order (``data.label_separator``/``label_part``, ``label_regex``, ``label_map``, ``drop_labels``,
``labels``).

A rule works on one label: a text's label, or a NER tag's entity type (the ``PER`` of ``B-PER``); each task
says which (``BaseTask.relabel``). The order is: the part (by separator, or the regular expression's first
group), then the map, then the drop. Nothing is changed without the task's report counting it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LabelRules"]


@dataclass(frozen=True)
class LabelRules:
    """What ``data:`` says to do with each label; ``LabelRules.of(data)`` reads it from a ``DataConfig``."""

    separator: str | None = None
    part: int = 0
    regex: re.Pattern[str] | None = None
    mapping: dict[str, str] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    order: tuple[str, ...] | None = None

    @classmethod
    def of(cls, data: Any) -> LabelRules:
        return cls(
            separator=data.label_separator,
            part=data.label_part,
            regex=re.compile(data.label_regex) if data.label_regex else None,
            mapping=dict(data.label_map),
            drop=frozenset(data.drop_labels),
            order=tuple(data.labels) if data.labels else None,
        )

    @property
    def changes(self) -> bool:
        """Whether any rule changes labels (the fixed order only checks them)."""
        return bool(self.separator or self.regex or self.mapping or self.drop)

    def apply(self, label: str) -> str | None:
        """The label after the rules, or None when it is dropped. Raises ValueError for a label that the part
        rule cannot take a part of."""
        if self.separator:
            parts = label.split(self.separator)
            if not -len(parts) <= self.part < len(parts):
                raise ValueError(
                    f"label {label!r} has {len(parts)} part(s) split by {self.separator!r}; "
                    f"data.label_part {self.part} is not one of them"
                )
            label = parts[self.part]
        if self.regex is not None:
            match = self.regex.search(label)
            if match is None:
                raise ValueError(f"label {label!r} does not match data.label_regex {self.regex.pattern!r}")
            label = match.group(1) if self.regex.groups else match.group(0)
        label = self.mapping.get(label, label)
        return None if label in self.drop else label

    def unknown(self, labels: Sequence[str]) -> list[str]:
        """The labels outside the fixed order (none without one), sorted."""
        if self.order is None:
            return []
        return sorted(set(labels) - set(self.order))
