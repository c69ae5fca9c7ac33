"""A YAML tree that keeps line numbers, and typed reads that report at them.

PyYAML's constructed objects forget where a value came from. We compose the
nodes ourselves into ``_Map``/``_Seq``/``_Scalar`` with lines (resolving
``<<`` merges), substitute ``${VAR}`` and ``${VAR:-default}`` inside scalar
values after parsing -- so a variable can never inject YAML structure and
line numbers stay exact -- and read mappings through ``_Obj``, whose typed
accessors report every problem as file:line. Nothing here knows what a
source, endpoint or sink is; ``parse`` does.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import yaml

from ..errors import ConfigError


# ====================================================================== env substitution


_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def substitute(text: str, env: Mapping[str, str], problem: Callable[[str], None]) -> str:
    """Expand ${VAR} and ${VAR:-default} (default also when VAR is empty); $${ is a literal ${.

    Problems (unset variable, malformed reference) are reported by name only:
    a variable's value may be a secret.
    """
    def repl(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "$${":
            return "${"
        if m.group(1) is None:
            problem("malformed variable reference: write ${NAME} or ${NAME:-default} "
                    "(and $${ for a literal ${)")
            return whole
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            problem(f"environment variable {name} is not set: set it, or give a default "
                    f"with ${{{name}:-default}}")
            return ""
        return value

    return _ENV_REF.sub(repl, text)


# ====================================================================== YAML tree with lines

_UNSET: Any = object()


@dataclass
class _Scalar:
    text: str  # after substitution
    line: int
    tag: str
    implicit: bool  # plain scalar: its type is re-resolved from the substituted text
    py: Any = _UNSET  # set when built from Python values (the CLI)
    broken: bool = False  # substitution failed (already reported): no second error for it


class _Map(dict[str, Any]):
    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}


class _Seq(list[Any]):
    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line


_Node = _Scalar | _Map | _Seq
_CONSTRUCTOR = yaml.SafeLoader("")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _BadValue(Exception):
    pass


def _resolve(s: _Scalar) -> Any:
    """The Python value of a scalar: YAML 1.1 typing for plain scalars, str for quoted ones."""
    if s.py is not _UNSET:
        return s.py
    tag = _CONSTRUCTOR.resolve(yaml.ScalarNode, s.text, (True, False)) if s.implicit else s.tag
    ctor = _CONSTRUCTOR.yaml_constructors.get(tag)
    if ctor is None:
        raise _BadValue(f"unsupported YAML tag {tag}")
    try:
        value = ctor(_CONSTRUCTOR, yaml.ScalarNode(tag, s.text))
    except (yaml.YAMLError, ValueError, TypeError):
        raise _BadValue(f"cannot read the value as {tag.rsplit(':', 1)[-1]}") from None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        raise _BadValue("binary values are not supported")
    return value


def _is_null(s: _Scalar) -> bool:
    if s.py is not _UNSET:
        return s.py is None
    return s.implicit and s.text in ("", "~", "null", "Null", "NULL")


class _Loader(yaml.SafeLoader):
    """Composes nodes (not objects) and remembers which nodes carry an &anchor."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.anchored: set[int] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        anchor = None if isinstance(event, yaml.AliasEvent) else getattr(event, "anchor", None)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self.anchored.add(id(node))
        return node


class _Report:
    """Collects every error and warning of one file, each prefixed with file:line."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[str] = []

    def _at(self, line: int, msg: str) -> str:
        return f"{self.filename}:{line}: {msg}" if line else f"{self.filename}: {msg}"

    def error(self, line: int, msg: str) -> None:
        self.errors.append((line, self._at(line, msg)))

    def warn(self, line: int, msg: str) -> None:
        self.warnings.append(self._at(line, msg))

    def raise_if_errors(self) -> None:
        if self.errors:
            n = len(self.errors)
            ordered = [msg for _, msg in sorted(self.errors, key=lambda e: e[0])]
            raise ConfigError(f"{n} problem{'s' if n > 1 else ''} in {self.filename}:\n" + "\n".join(ordered))


class _Builder:
    """Turns composed YAML nodes into _Map/_Seq/_Scalar with lines, resolving << merges."""

    def __init__(self, report: _Report, env: Mapping[str, str]) -> None:
        self.report = report
        self.env = env

    def build(self, node: yaml.Node, stack: tuple[int, ...] = ()) -> _Node:
        line = node.start_mark.line + 1
        if id(node) in stack:
            self.report.error(line, "recursive alias: a node cannot contain itself")
            return _Scalar("", line, "tag:yaml.org,2002:null", False)
        stack = (*stack, id(node))
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, line)
        if isinstance(node, yaml.SequenceNode):
            seq = _Seq(line)
            seq.extend(self.build(item, stack) for item in node.value)
            return seq
        assert isinstance(node, yaml.MappingNode)
        return self._mapping(node, line, stack)

    def _scalar(self, node: yaml.ScalarNode, line: int) -> _Scalar:
        problems: list[str] = []
        text = substitute(node.value, self.env, problems.append)
        if "\x00" in text:  # YAML allows "\0"; Postgres text does not, and apply would fail mid-way
            problems.append("contains a NUL character (\\0), which Postgres cannot store")
        for msg in problems:
            self.report.error(line, msg)
        implicit = node.style is None and node.tag == _CONSTRUCTOR.resolve(
            yaml.ScalarNode, node.value, (True, False))
        return _Scalar(text, line, node.tag, implicit, broken=bool(problems))

    def _mapping(self, node: yaml.MappingNode, line: int, stack: tuple[int, ...]) -> _Map:
        out = _Map(line)
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged += value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        # Earlier merge sources win over later ones; explicit keys win over all.
        for source in reversed(merged):
            if not isinstance(source, yaml.MappingNode):
                self.report.error(source.start_mark.line + 1, "<< must merge a mapping (an &anchor of one)")
                continue
            built = self._mapping(source, source.start_mark.line + 1, (*stack, id(source)))
            out.update(built)
            out.key_lines.update(built.key_lines)
        explicit: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.report.error(key_line, "mapping keys must be plain strings")
                continue
            key = str(key_node.value)
            if key in explicit:
                self.report.error(key_line, f"duplicate key {key!r} (first at line {explicit[key]})")
                continue
            explicit[key] = key_line
            out[key] = self.build(value_node, stack)
            out.key_lines[key] = key_line
        return out


def _from_python(value: Any, line: int = 0) -> _Node:
    """The same tree from Python values: the CLI builds specs through the YAML validators."""
    if isinstance(value, Mapping):
        m = _Map(line)
        for k, v in value.items():
            m[str(k)] = _from_python(v, line)
            m.key_lines[str(k)] = line
        return m
    if isinstance(value, list | tuple):
        s = _Seq(line)
        s.extend(_from_python(v, line) for v in value)
        return s
    return _Scalar("" if value is None else str(value), line, "", False, py=value)


def _plain(node: _Node) -> Any:
    """A subtree as plain JSON-able Python values (annotations)."""
    if isinstance(node, _Map):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, _Seq):
        return [_plain(v) for v in node]
    return _resolve(node)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Obj:
    """One mapping being read: typed accessors that report errors at the key's line.

    Every key read is recorded; ``finish`` reports the rest as unknown keys.
    """

    def __init__(self, report: _Report, node: _Map, what: str) -> None:
        self.report = report
        self.node = node
        self.what = what
        self.used: set[str] = set()
        self.ok = True

    # ------------------------------------------------------------ plumbing

    def line(self, key: str | None = None) -> int:
        if key is not None and key in self.node.key_lines:
            return self.node.key_lines[key]
        return self.node.line

    def err(self, key: str | None, msg: str) -> None:
        self.ok = False
        node = self.node.get(key) if key is not None else None
        if isinstance(node, _Scalar) and node.broken:
            return  # its substitution problem is the error to fix
        where = f"{self.what}: {key}" if key else self.what
        self.report.error(self.line(key), f"{where}: {msg}")

    def raw(self, key: str) -> _Node | None:
        """The node under key, or None when absent or null."""
        self.used.add(key)
        node = self.node.get(key)
        return None if isinstance(node, _Scalar) and _is_null(node) else node

    def has(self, key: str) -> bool:
        return self.raw(key) is not None

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def ignore_with_warning(self, key: str, why: str) -> None:
        if self.raw(key) is not None:
            self.report.warn(self.line(key), f"{self.what}: {key} is ignored: {why}")

    def unsupported(self, key: str, why: str, allowed: Callable[[_Node], bool] | None = None) -> None:
        node = self.raw(key)
        if node is not None and not (allowed and allowed(node)):
            self.err(key, f"not supported yet by pgsink: {why}")

    def finish(self) -> None:
        known = set(self.used)
        for key in self.node:
            if key not in known:
                self.ok = False
                self.report.error(self.line(key), f"{self.what}: unknown key {key!r}{_suggest(key, known)}")

    # ------------------------------------------------------------ typed values

    def _scalar(self, key: str, node: _Node, kind: str) -> _Scalar | None:
        if not isinstance(node, _Scalar):
            self.err(key, f"must be {kind}, not a {'list' if isinstance(node, _Seq) else 'mapping'}")
            return None
        return node

    def str(self, key: str, *, required: bool = False, default: str | None = None,
            choices: Iterable[str] | None = None, secret: bool = False) -> str | None:
        node = self.raw(key)
        if node is None:
            if required:
                self.err(key, "is required")
            return default
        s = self._scalar(key, node, "a string")
        if s is None:
            return default
        if s.py is not _UNSET:
            value = s.py if isinstance(s.py, str) else json.dumps(s.py) if isinstance(s.py, bool) else str(s.py)
        else:
            value = s.text
        if choices is not None and value not in choices:
            shown = "the value" if secret else repr(value)
            self.err(key, f"{shown} is not one of {', '.join(choices)}")
            return default
        return value

    def int(self, key: str, *, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        node = self.raw(key)
        if node is None:
            return default
        s = self._scalar(key, node, "an integer")
        if s is None:
            return default
        try:
            value = _resolve(s)
        except _BadValue as e:
            self.err(key, str(e))
            return default
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(key, f"must be an integer, got {s.text!r}")
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.err(key, f"must be {bounds}, got {value}")
            return default
        return value

    def bool(self, key: str, default: bool | None) -> bool | None:
        node = self.raw(key)
        if node is None:
            return default
        s = self._scalar(key, node, "true or false")
        if s is None:
            return default
        try:
            value = _resolve(s)
        except _BadValue:
            value = s.text
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.err(key, f"must be true or false, got {s.text!r}")
            return default
        return value

    def strs(self, key: str) -> list[str] | None:
        node = self.raw(key)
        if node is None:
            return None
        if isinstance(node, _Scalar):
            self.err(key, "must be a list of strings")
            return None
        if isinstance(node, _Map):
            self.err(key, "must be a list of strings, not a mapping")
            return None
        out = []
        for item in node:
            if not isinstance(item, _Scalar):
                self.report.error(getattr(item, "line", self.line(key)), f"{self.what}: {key}: items must be strings")
                self.ok = False
                continue
            out.append(item.text if item.py is _UNSET else str(item.py))
        return out

    def obj(self, key: str, *, required: bool = False) -> _Obj | None:
        node = self.raw(key)
        if node is None:
            if required:
                self.err(key, "is required")
            return None
        if not isinstance(node, _Map):
            self.err(key, "must be a mapping")
            return None
        return _Obj(self.report, node, f"{self.what}: {key}")

    def seq(self, key: str) -> _Seq | None:
        node = self.raw(key)
        if node is None:
            return None
        if not isinstance(node, _Seq):
            self.err(key, "must be a list")
            return None
        return node

    def mapping_value(self, key: str) -> dict[str, Any] | None:
        node = self.raw(key)
        if node is None:
            return None
        if not isinstance(node, _Map):
            self.err(key, "must be a mapping")
            return None
        try:
            return _plain(node)  # type: ignore[no-any-return]
        except _BadValue as e:
            self.err(key, str(e))
            return None
