"""YAML files of the study: read with bounds, and ``--set KEY=VALUE`` overrides applied to the raw mapping.

A missing file, text that is not UTF-8, a syntax error, an alias bomb, deep nesting or a key given twice
becomes a one-line ConfigError naming the file (and the line). Both the study config and the search-space
file are read here; what their keys mean is ``study``'s and ``hyperparameters``' business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmflow_hpo.errors import ConfigError

__all__ = ["YAML_MAX_BYTES", "YAML_MAX_DEPTH", "YAML_MAX_VALUES", "apply_overrides", "parse_yaml", "read_yaml"]

# A study config or a search space holds tens of values; these bounds are far above any real one, and far
# below what makes an alias bomb ("billion laughs") or a deeply nested file costly (or a RecursionError).
YAML_MAX_VALUES = 10_000
YAML_MAX_DEPTH = 50
YAML_MAX_BYTES = 1 << 20


class _YamlRefused(yaml.YAMLError):
    def __init__(self, mark: Any, problem: str) -> None:
        super().__init__(problem)
        self.problem_mark, self.problem = mark, problem


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts every value an alias would repeat, and refuses (never expands) a document
    of more than YAML_MAX_VALUES values or YAML_MAX_DEPTH levels; an alias to its own enclosing node too."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases counted as copies

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise _YamlRefused(event.start_mark, f"alias *{event.anchor} refers to a value that contains it")
            self._aliases += 1
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _YamlRefused(mark, f"nested more than {YAML_MAX_DEPTH} levels deep; a config is a few levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
            _refuse_repeated_keys(node)
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        self._sizes[id(node)] = size
        if size > YAML_MAX_VALUES:
            how = " once its aliases are expanded (an alias bomb?)" if self._aliases else ""
            raise _YamlRefused(node.start_mark, f"more than {YAML_MAX_VALUES} values{how}; a config holds a few dozen")
        return node


def _refuse_repeated_keys(node: yaml.MappingNode) -> None:
    """A key given twice in one mapping: YAML keeps the last silently, so a fix made above is lost below."""
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if (key.tag, key.value) in seen:
                line = seen[key.tag, key.value]
                raise _YamlRefused(key.start_mark, f"key {key.value!r} given twice (also on line {line}); keep one")
            seen[key.tag, key.value] = key.start_mark.line + 1


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with bounds: a YAMLError for an alias bomb, a recursive alias or deep nesting."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_text(path: Path, data: bytes) -> str:
    """The text of a YAML file, or a ConfigError that says how to save it (UTF-8)."""
    if len(data) > YAML_MAX_BYTES:
        raise ConfigError(
            f"{path}: more than {YAML_MAX_BYTES >> 20} MiB, far too large for a study config or search space "
            "(a few KB); is it the right file?"
        )
    for bom, name in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if data.startswith(bom):
            raise ConfigError(f"{path}: the file is {name} text; save it as UTF-8")
    if b"\x00" in data[:8192]:
        raise ConfigError(
            f"{path}: not a YAML text file (it holds NUL bytes: binary data or UTF-16?); save it as UTF-8 text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing file, a syntax error, text that is not UTF-8 or an alias bomb becomes a
    one-line ConfigError."""
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/zero, a pipe: would never end
        raise ConfigError(f"{path}: not a regular file; give the path of a YAML file")
    try:
        with path.open("rb") as f:
            data = f.read(YAML_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:  # a name the file system cannot take (a lone surrogate, a NUL)
        raise ConfigError(f"{str(path)!a}: not a usable file name") from None
    text = _yaml_text(path, data)
    try:
        return parse_yaml(text)
    except yaml.reader.ReaderError as e:  # a control character: its position, not a mark
        line = text[: e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(
            f"{path}: line {line}: invalid YAML: control character U+{code:04X} is not allowed; remove it"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {reason}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a raw config mapping."""
    problems: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{source} {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
            continue
        try:
            value = parse_yaml(text) if text.strip() else None
        except _YamlRefused as e:
            problems.append(f"{source} {key}: {e.problem}")
            continue
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{source} {key}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw
