"""Configuration files: YAML in, checked values out, errors that say `file:line: key: message`.

Both files the exporter reads, the main configuration and the `--web.config.file`, go through
this one reader, so they accept the same YAML (merge keys, anchors, quoting) and word the same
mistakes the same way. What each file means stays with its own module; this one only knows how
to read.

Theory of operation:

1. `read_config_file` reads the text (UTF-8, with or without a byte-order mark) and
   `Reader.compose` turns it into PyYAML's node tree, never into Python objects. A syntax error
   names the line PyYAML stopped at.
2. Reading costs bounded time and memory whatever the file holds (see "Limits" below): the
   file's size is checked before it is parsed, and the composer counts what it builds.
3. Nodes remember their line, so every error can point at it. A node's Python value is built
   only when a parser asks for it (`Reader.plain`), by the safe constructor; tagged collections
   (`!!python/object/apply:...`) are refused, never built.
4. A mapping is read by `mapping` (`Reader.entries` at the top of a section): merge keys (`<<`)
   are expanded first and keys written next to them win, as YAML says; then a key given twice
   and a key the schema does not know are errors, the latter with the nearest valid key as a
   hint. A null where a mapping is expected is an empty mapping, so `tls_server_config:` with
   nothing under it is the same as leaving it out.
5. A section's schema is data: a table of `Field`s, each a parser and a default written as YAML
   text, exactly as an operator would write it in the file. `Reader.section` takes each field
   from the file, else from an inherited section, else from its default, and keeps where each
   value came from (`Setting`) for the checks that span several fields.
6. Parsers raise `Invalid` with a message only (plus, for an element inside the value, its
   node and key suffix such as `[2]`); the reader adds the file, the line and the key path and
   raises the file's own `ConfigError` subclass. A parser may also answer `UNSET`: the key then
   counts as not given, for formats where a null or blank value means "use the default".

Limits. A configuration is a few KiB: a /16 CIDR block or a port range is one line. Anything
far beyond that is a mistake or an attack, and must cost an error, not the process:

- `MAX_FILE_BYTES` (1 MiB): a larger file is refused before parsing; at most one byte more than
  the limit is ever read. PyYAML reads about 0.3 MiB/s of dense YAML, so the worst file that
  passes (a flow list of 130,000 port ranges) costs about 3 s and 110 MB; 1 MiB still holds
  tens of thousands of targets written one per line.
- `MAX_DEPTH` (50 levels of nested lists and mappings): PyYAML's composer recurses once per
  level, so a file of 500 `[` would otherwise end in a RecursionError. The loader counts the
  depth as it composes and stops at the node that goes too deep.
- `MAX_ALIAS_EXPANSION` (1,000,000): an alias (`*name`) shares its anchor's node instead of
  copying it, so composing stays linear, but whatever walks the tree afterwards sees every
  repetition: nine levels of nine aliases each (a few hundred bytes) stand for 387 million
  values. While composing, each alias adds the size of what it stands for (its nodes plus the
  characters of its scalars) to a running total; the alias that takes the total past the limit
  is refused with its line. An alias to a collection that contains the alias itself
  (`&a [*a]`) is refused too: it would stand for an infinite value.
- Every value quoted in a message is cut to `SHOWN_CHARACTERS` (see `exporter.portsets.show`),
  so an error about a huge value stays one short line.

Whatever the input, the reader raises the file's `ConfigError` and nothing else: values the
constructor cannot build (an integer of 5,000 digits, a 13th month) are `Invalid` like any
other bad value.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml
from yaml.constructor import SafeConstructor

from exporter.durations import format_duration, parse_duration
from exporter.portsets import clip, show

# See "Limits" in the module docstring.
MAX_FILE_BYTES: Final = 1024 * 1024
MAX_DEPTH: Final = 50
MAX_ALIAS_EXPANSION: Final = 1_000_000
# The longest message a ConfigError carries; longer ones are cut (quoted values are cut much
# shorter; this only catches text from elsewhere, such as a YAML tag in a PyYAML message).
_MAX_MESSAGE: Final = 1000


class ConfigError(Exception):
    """An invalid configuration. `str()` is one line: `file:line: key.path: message`."""

    def __init__(
        self, message: str, *, path: str, line: int | None = None, key: str | None = None
    ) -> None:
        self.message = clip(message, _MAX_MESSAGE)
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class Invalid(Exception):
    """A bad value. The reader adds the file, the line and the key path.

    `node` and `suffix` point below the value being parsed (`[2]` for a list element,
    `.alice` for a key of a mapping); without them the error points at the value itself.
    """

    def __init__(self, message: str, node: yaml.Node | None = None, suffix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.suffix = suffix


_T = TypeVar("_T")


# A parser's answer for "not given": the section then takes the default.
UNSET: Final = object()

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


def line_of(node: yaml.Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def is_null_node(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def describe(value: object) -> str:
    """What a value is, for "expected X, got Y" messages: `string 'x'`, `integer 5`, `a list`.

    The value itself is cut short (`show`): a message never carries a whole huge value."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, str):
        return f"string {show(value)}"
    if isinstance(value, int):
        return f"integer {show(value)}"
    if isinstance(value, float):
        return f"number {show(value)}"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def unknown_key_message(name: str, allowed: Collection[str]) -> str:
    """The error for a key not in `allowed`, with the nearest valid one when there is one."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (valid keys: {', '.join(sorted(allowed))})"


def key_suffix(name: str) -> str:
    """`.name` for a key path, the name cut short: a key path is shown in every message."""
    return "." + clip(name)


def _join(key: str, suffix: str) -> str | None:
    """The key path of `suffix` below `key`; None for the top level itself."""
    return (key + suffix).removeprefix(".") or None


# --- the reader --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key of a section: how to parse it, its default as YAML text, what it is for."""

    parse: Parser
    default: str
    help: str


@dataclass(frozen=True)
class Setting:
    value: Any
    node: yaml.Node | None  # None: not given in the file (the default, or inherited unset)
    key: str  # key path where it was set


class _LimitExceeded(yaml.YAMLError):
    """Raised by `_BoundedLoader` when the document goes past one of the limits."""

    def __init__(self, message: str, mark: Any) -> None:  # a yaml Mark (two classes), or None
        super().__init__(message)
        self.message = message
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader with its composer bounded in depth and in alias expansion.

    `_expanded` is the size of the document as if every alias were written out, counted as the
    events arrive: a new node adds itself (1, plus its characters for a scalar), an alias adds
    the size its anchor had when the anchor's node was complete. `_aliased` is the part that
    aliases added: what the file stands for beyond what is written in it. It only grows, so
    the alias that takes it past the limit is the one reported.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._aliased = 0
        self._sizes: dict[int, int] = {}  # id(anchored node) -> its expanded size

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise _LimitExceeded(
                    f"alias *{clip(str(event.anchor))} refers to a collection that contains it"
                    " (a recursive alias stands for an infinite value)",
                    event.start_mark,
                )
            self._expanded += size
            self._aliased += size
            if self._aliased > MAX_ALIAS_EXPANSION:
                raise _LimitExceeded(
                    f"alias *{clip(str(event.anchor))}: the aliases of this file stand for more"
                    f" than {MAX_ALIAS_EXPANSION:,} values and characters (aliases nested in"
                    " aliases multiply: write the values out instead)",
                    event.start_mark,
                )
            return node
        collection = isinstance(event, yaml.CollectionStartEvent)
        if collection:
            if self._depth >= MAX_DEPTH:
                raise _LimitExceeded(
                    f"lists and mappings nested more than {MAX_DEPTH} levels deep",
                    event.start_mark,
                )
            self._depth += 1
        before = self._expanded
        self._expanded += 1
        if isinstance(event, yaml.ScalarEvent):
            self._expanded += len(event.value)
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._depth -= 1
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._sizes[id(node)] = self._expanded - before
        return node


@functools.cache
def _default_node(text: str) -> yaml.Node:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    assert node is not None, text
    return node


@dataclass(frozen=True)
class Reader:
    """One file being read: its name for messages, its directory for relative paths, and the
    `ConfigError` subclass its errors are raised as."""

    path: str  # as the caller gave it, for messages
    base_dir: Path  # absolute directory of the file
    error_type: type[ConfigError] = ConfigError
    constructor: SafeConstructor = field(default_factory=SafeConstructor, compare=False)

    @classmethod
    def for_file(cls, path: str | Path, error_type: type[ConfigError] = ConfigError) -> Reader:
        shown = os.fspath(path)
        return cls(shown, Path(os.path.abspath(Path(shown).parent)), error_type)

    def error(self, node: yaml.Node | None, key: str | None, message: str) -> ConfigError:
        return self.error_type(message, path=self.path, line=line_of(node), key=key)

    def where(self, node: yaml.Node | None) -> str:
        line = line_of(node)
        return self.path if line is None else f"{self.path}:{line}"

    def resolve(self, text: str) -> Path:
        """A path from the file: `~` expanded, relative to the file's directory, normalized."""
        return Path(os.path.abspath(self.base_dir / os.path.expanduser(text)))

    def compose(self, text: str, *, with_context: bool = True) -> yaml.Node | None:
        """The node tree of `text`; None for an empty document. `with_context` adds what the
        parser was in the middle of to a syntax error (`while parsing a flow sequence, line 3`).
        The limits of the module docstring apply (text given directly is held to the same size
        as a file).
        """
        if len(text) > MAX_FILE_BYTES:
            raise self.error_type(_TOO_LARGE, path=self.path)
        loader: _BoundedLoader | None = None
        try:
            loader = _BoundedLoader(text)
            return loader.get_single_node()
        except _LimitExceeded as exc:
            line = None if exc.mark is None else exc.mark.line + 1
            raise self.error_type(exc.message, path=self.path, line=line) from None
        except RecursionError:
            # MAX_DEPTH keeps the composer far from the interpreter's limit; this only
            # answers a caller that was already deep in its own stack.
            line = None
            if loader is not None and loader.check_event():
                line = loader.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
            raise self.error_type("nested too deeply to read", path=self.path, line=line) from None
        except yaml.YAMLError as exc:
            line, message = None, str(exc)
            if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
                line, message = exc.problem_mark.line + 1, exc.problem or "invalid YAML"
                if with_context and exc.context:
                    at = f", line {exc.context_mark.line + 1}" if exc.context_mark else ""
                    message += f" ({exc.context}{at})"
            elif isinstance(exc, yaml.reader.ReaderError):
                line = text.count("\n", 0, exc.position) + 1
                message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
            raise self.error_type(f"invalid YAML: {message}", path=self.path, line=line) from None
        finally:
            if loader is not None:
                loader.dispose()

    def plain(self, node: yaml.Node, depth: int = 0) -> object:
        """The Python value of a node, for the value parsers. Raises Invalid."""
        if depth > MAX_DEPTH:
            # Only trees composed elsewhere get here: `compose` refuses them first.
            raise Invalid(f"nested more than {MAX_DEPTH} levels deep", node)
        if isinstance(node, yaml.ScalarNode):
            # YAML 1.1 reads 1:30 as the base-60 integer 90 and 1:2:3:4:5:6:7:8 as an integer
            # too; in a configuration such a value is a typo or an IPv6 address, never a number.
            if node.tag in (_INT_TAG, _FLOAT_TAG) and ":" in node.value:
                return node.value
            try:
                return self.constructor.construct_object(node)
            except yaml.constructor.ConstructorError as exc:
                raise Invalid(exc.problem or "cannot read this value", node) from exc
            except (ValueError, OverflowError) as exc:
                # The value matched the pattern of its type but cannot be built: an integer
                # past Python's conversion limit (4,300 digits), a timestamp with month 13.
                if node.tag == _INT_TAG:
                    raise Invalid(
                        f"integer too long to read (more than {sys.get_int_max_str_digits()}"
                        " digits)",
                        node,
                    ) from None
                raise Invalid(f"cannot read this value: {clip(str(exc))}", node) from None
        if node.tag not in (_SEQ_TAG, _MAP_TAG):
            # Tagged collections (!!python/object/apply:...) are never built, only refused.
            raise Invalid(f"unsupported YAML tag {show(node.tag)}", node)
        if isinstance(node, yaml.SequenceNode):
            return [self.plain(child, depth + 1) for child in node.value]
        if isinstance(node, yaml.MappingNode):
            return {
                str(self.plain(key, depth + 1)): self.plain(value, depth + 1)
                for key, value in node.value
            }
        raise Invalid("unsupported YAML node", node)

    def kind(self, node: yaml.Node) -> str:
        """What a node holds, for "expected X, got Y" messages."""
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        try:
            return describe(self.plain(node))
        except Invalid:
            return f"a value tagged {show(node.tag)}"

    def value(self, parse: Callable[[yaml.Node, Reader], _T], node: yaml.Node, key: str) -> _T:
        """`parse(node)`, with its Invalid turned into this file's error at `key`."""
        try:
            return parse(node, self)
        except Invalid as exc:
            raise self.error(exc.node or node, _join(key, exc.suffix), exc.message) from None

    def entries(
        self, node: yaml.Node, key: str, allowed: Collection[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """`mapping` of the section at `key` ("" for the top level)."""
        return self.value(lambda n, r: mapping(n, r, allowed), node, key)

    def section(
        self,
        entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
        key: str,
        fields: Mapping[str, Field],
        inherited: Mapping[str, Setting] | None = None,
    ) -> dict[str, Setting]:
        """Parse the entries of a mapping against `fields`; keys not given (or UNSET) come
        from `inherited`, else from the field's default (None when that is UNSET too)."""
        settings: dict[str, Setting] = {}
        for name, spec in fields.items():
            path = f"{key}.{name}" if key else name
            if name in entries:
                value_node = entries[name][1]
                parsed = self.value(spec.parse, value_node, path)
                if parsed is not UNSET:
                    settings[name] = Setting(parsed, value_node, path)
                    continue
            if inherited is not None:
                settings[name] = inherited[name]
            else:
                default = spec.parse(_default_node(spec.default), self)
                settings[name] = Setting(None if default is UNSET else default, None, path)
        return settings


# --- mappings ----------------------------------------------------------------------------------


def _merged_pairs(node: yaml.MappingNode, depth: int = 0) -> list[tuple[yaml.Node, yaml.Node]]:
    """The (key, value) pairs contributed by `<<` merge keys; later pairs win.

    A chain of merges (`b: &b {<<: *a}`, `c: &c {<<: *b}`, ...) is nested in depth without
    being nested in the text, so the depth is bounded here; cycles cannot occur, since
    `compose` refuses recursive aliases. The pairs are at most the expanded size of the
    document, which `compose` bounds.
    """
    if depth > MAX_DEPTH:
        raise Invalid(f"<< merges nested more than {MAX_DEPTH} levels deep", node)
    pairs: list[tuple[yaml.Node, yaml.Node]] = []
    for key, value in node.value:
        if key.tag != _MERGE_TAG:
            continue
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        # In a merged sequence, earlier mappings take precedence: add them last.
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise Invalid("<< must merge a mapping or a list of mappings", source)
            pairs.extend(_merged_pairs(source, depth + 1))
            pairs.extend((k, v) for k, v in source.value if k.tag != _MERGE_TAG)
    return pairs


def _key_name(node: yaml.Node, as_written: bool) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        return None
    return node.value if as_written or node.tag == _STR_TAG else None


def mapping(
    node: yaml.Node,
    reader: Reader,
    allowed: Collection[str] | None,
    *,
    keys_as_written: bool = False,
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """name -> (key node, value node) of a mapping, merge keys expanded; a null is empty.

    `allowed` None: any key. `keys_as_written`: a key is the text the operator wrote (a user
    named `yes` or `1234` is that name, not a boolean or a number); otherwise keys must be
    strings. Raises Invalid, with the key's suffix (`.name`) for an error about one key.
    """
    if is_null_node(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise Invalid(f"expected a mapping, got {reader.kind(node)}", node)
    found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in _merged_pairs(node):
        name = _key_name(key_node, keys_as_written)
        if name is not None:
            found[name] = (key_node, value_node)
    own: set[str] = set()
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        name = _key_name(key_node, keys_as_written)
        if name is None:
            raise Invalid(f"keys must be strings, got {reader.kind(key_node)}", key_node)
        if name in own:
            first = line_of(found[name][0])
            raise Invalid(
                f"duplicate key (first given on line {first})", key_node, key_suffix(name)
            )
        own.add(name)
        found[name] = (key_node, value_node)
    if allowed is not None:
        for name, (key_node, _) in found.items():
            if name not in allowed:
                raise Invalid(unknown_key_message(name, allowed), key_node, key_suffix(name))
    return found


# --- value parsers -----------------------------------------------------------------------------

Parser = Callable[[yaml.Node, Reader], Any]


def nested(parse: Parser, node: yaml.Node, reader: Reader, suffix: str) -> Any:
    """`parse` a node inside the value being parsed (a list element, a mapping's value): its
    errors point at that node, `suffix` (`[2]`, `.alice`) added to the key path."""
    try:
        return parse(node, reader)
    except Invalid as exc:
        raise Invalid(exc.message, exc.node or node, suffix + exc.suffix) from None


def value(check: Callable[[object], Any]) -> Parser:
    """A parser for a plain value: `check` gets the Python value and raises ValueError."""

    def parse(node: yaml.Node, reader: Reader) -> Any:
        try:
            return check(reader.plain(node))
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    return parse


def optional(parser: Parser) -> Parser:
    """`parser`, or None for a null."""

    def parse(node: yaml.Node, reader: Reader) -> Any:
        return None if is_null_node(node) else parser(node, reader)

    return parse


def _range_message(low: str, high: str | None, got: str) -> str:
    if high is None:
        return f"must be at least {low}, got {got}"
    return f"must be between {low} and {high}, got {got}"


def _show_number(value: float) -> str:
    """A bound as an operator would write it: 1000000, 0.5."""
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return f"{value:g}"


def integer(minimum: int, maximum: int | None = None) -> Parser:
    """An integer in [minimum, maximum] (no upper bound when maximum is None)."""

    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            high = None if maximum is None else str(maximum)
            raise ValueError(_range_message(str(minimum), high, show(value)))
        return value

    return value(check)


def number(minimum: float, maximum: float | None = None) -> Parser:
    """A finite number in [minimum, maximum], as a float."""

    def check(value: object) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected a number, got {describe(value)}")
        # Compared before any conversion: float() of a 400-digit integer overflows.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        if value < minimum or (maximum is not None and value > maximum):
            high = None if maximum is None else _show_number(maximum)
            raise ValueError(_range_message(_show_number(minimum), high, show(value)))
        return float(value)

    return value(check)


def duration(
    *, positive: bool = False, minimum: float | None = None, maximum: float | None = None
) -> Parser:
    """Seconds, written as `30s`, `5m`, `1h30m` or a plain number (see exporter.durations).

    `positive` refuses 0; `minimum` and `maximum` bound the value, and the message states the
    range in the same units (`must be between 1s and 365d, got '1ms'`).
    """

    def check(written: object) -> float:
        seconds = parse_duration(written)
        low = 0.0 if minimum is None else minimum
        if (minimum is not None and seconds < minimum) or (
            maximum is not None and seconds > maximum
        ):
            high = None if maximum is None else format_duration(maximum)
            raise ValueError(_range_message(format_duration(low), high, show(written)))
        if positive and seconds <= 0:
            raise ValueError(f"must be longer than 0s, got {show(written)}")
        return seconds

    return value(check)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe(value)}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    return value


boolean: Final[Parser] = value(_boolean)
string: Final[Parser] = value(_string)


def string_list(check: Callable[[str], object] | None = None) -> Parser:
    """A list of non-empty strings as a tuple. `check` may refuse an element by raising
    ValueError; the error then points at that element."""

    def check_element(item: object) -> str:
        if not isinstance(item, str) or not item:
            raise ValueError(f"expected a string, got {describe(item)}")
        if check is not None:
            check(item)
        return item

    element = value(check_element)

    def parse(node: yaml.Node, reader: Reader) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise Invalid(f"expected a list of strings, got {reader.kind(node)}")
        return tuple(
            nested(element, child, reader, f"[{index}]") for index, child in enumerate(node.value)
        )

    return parse


# --- files -------------------------------------------------------------------------------------


_TOO_LARGE: Final = (
    f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, the most a configuration file may hold"
    " (a CIDR block or a port range is one line: real configurations are a few KiB)"
)


def read_config_file(path: str | Path, error: type[ConfigError] = ConfigError) -> tuple[str, str]:
    """(path as shown in messages, text) of a YAML file; `error` says why it cannot be read.

    At most MAX_FILE_BYTES + 1 bytes are read: a larger file is refused before any parsing.
    """
    shown = os.fspath(path)
    try:
        with open(shown, "rb") as source:
            data = source.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", path=shown) from None
    if len(data) > MAX_FILE_BYTES:
        raise error(_TOO_LARGE, path=shown)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error("not valid UTF-8", path=shown, line=line) from None
    # As text mode would: one line ending, so that positions count lines the same way.
    return shown, text.replace("\r\n", "\n").replace("\r", "\n")
