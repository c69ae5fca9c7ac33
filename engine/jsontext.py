"""JSON text in and out without losing a number: RawJson, dumps, loads_exact, jsonb_text.

Records carry numerics and json documents as :class:`RawJson` (their exact
text); :func:`dumps` writes them, and Decimals and ints past 64 bits, as
exact JSON numbers. :func:`loads_exact` reads JSON for filters and user
functions without turning big or long numbers into floats. :func:`jsonb_text`
prints a value as Postgres prints it once stored as jsonb, for keys that SQL
must compute the same way.
"""

from __future__ import annotations

import functools
import json
import math
import re
from decimal import Decimal
from typing import Any

import orjson


class RawJson:
    """A JSON text emitted verbatim: numeric digits, a json/jsonb document.

    Equal when the texts are equal, hashable, ``str()`` gives the text, so it can
    take part in group keys and comparisons. :func:`dumps` writes it unchanged.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return type(other) is RawJson and other.text == self.text

    def __hash__(self) -> int:
        return hash((RawJson, self.text))

    def __repr__(self) -> str:
        return f"RawJson({self.text!r})"

    def __str__(self) -> str:
        return self.text

    @property
    def value(self) -> Any:
        """The parsed Python value (numbers may lose digits; for filters, not output)."""
        return orjson.loads(self.text)


def json_default(obj: Any) -> Any:
    """``orjson`` ``default=`` hook: :class:`RawJson` and finite Decimals as raw JSON numbers."""
    if type(obj) is RawJson:
        return orjson.Fragment(obj.text)
    if isinstance(obj, Decimal) and obj.is_finite():
        return orjson.Fragment(str(obj))
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj: Any, option: int = 0) -> bytes:
    """``orjson.dumps`` that understands :class:`RawJson` and Decimal (use it for every record), and
    ints past 64 bits, which orjson refuses (a numeric(30) key, a user's annotation)."""
    try:
        return orjson.dumps(obj, default=json_default, option=option)
    except orjson.JSONEncodeError:
        return orjson.dumps(_big_ints_raw(obj), default=json_default, option=option)


def _big_ints_raw(obj: Any) -> Any:
    if type(obj) is int and not -(2 ** 63) <= obj < 2 ** 64:
        return orjson.Fragment(str(obj))
    if isinstance(obj, dict):
        return {k: _big_ints_raw(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_big_ints_raw(v) for v in obj]
    return obj


def jsonb_text(value: Any) -> str:
    """``value`` as Postgres prints it once stored as jsonb (``jsonb::text``).

    Numbers as numeric prints them (all digits, no exponent, scale kept),
    ``", "`` and ``": "`` between items, object keys in jsonb's order (shorter
    first, then bytewise; the last of duplicates wins), strings escaped as
    Postgres escapes them.
    """
    if type(value) is RawJson:
        value = json.loads(value.text, parse_float=Decimal)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is str:
        return _jsonb_string(value)
    if type(value) is int:
        return str(value)
    if isinstance(value, float | Decimal):
        number = Decimal(orjson.dumps(value).decode()) if isinstance(value, float) else value
        if not number.is_finite():
            raise ValueError(f"{value} has no JSON form")
        return format(number.copy_abs() if number.is_zero() else number, "f")  # numeric has no -0
    if isinstance(value, dict):
        items = sorted({str(k): v for k, v in value.items()}.items(), key=lambda kv: jsonb_key(kv[0]))
        return "{" + ", ".join(f"{_jsonb_string(k)}: {jsonb_text(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
    return _jsonb_string(str(value))


def jsonb_key(key: str) -> tuple[int, bytes]:
    """The sort key of jsonb's object key order: shorter keys first, then bytewise."""
    encoded = key.encode()
    return len(encoded), encoded


@functools.lru_cache(maxsize=1024)
def jsonb_key_order(keys: tuple[str, ...]) -> tuple[int, ...] | None:
    """Indexes of ``keys`` in jsonb's key order, or None when they are in that order already.

    Records are built in this order because jsonb_in sorts every object's keys
    and its sort is fast on sorted input: measured, the state backend spent
    ~5% of its capture time in that sort, and ingest ran ~8% faster without it.
    """
    order = tuple(sorted(range(len(keys)), key=lambda i: jsonb_key(keys[i])))
    return None if order == tuple(range(len(keys))) else order


def in_jsonb_order(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its keys in jsonb's order (the same dict when they are already)."""
    keys = tuple(record)
    order = jsonb_key_order(keys)
    if order is None:
        return record
    return {keys[i]: record[keys[i]] for i in order}


_JSONB_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                  "\t": "\\t"}


def _jsonb_string(text: str) -> str:
    """A JSON string as Postgres's escape_json writes it."""
    return '"' + "".join(_JSONB_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " else c) for c in text) + '"'


# What could make jsonb refuse JSON that json accepted: a \u0000 or surrogate escape, a long exponent
# or run of digits (only a pre-filter: a suspect text is parsed to decide)
_JSONB_SUSPECT = re.compile(r"\\u(?:0000|[dD][89a-fA-F])|\d[eE][+-]?\d{4,}|\d{1001}")
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")  # NUL, or half of a UTF-16 surrogate pair


def jsonb_refuses(json_text: str) -> bool:
    """Whether jsonb may refuse JSON text that the json type takes.

    jsonb holds no NUL character (a ``\\u0000`` escape), no lone UTF-16
    surrogate escape, and no number that numeric input refuses (see
    :func:`_numeric_fits`). Cheap for the usual text; only a suspect one is parsed.
    """
    if _JSONB_SUSPECT.search(json_text) is None:
        return False
    try:
        value = json.loads(json_text, parse_float=_numeric_number)
    except (ValueError, RecursionError):
        return True
    return _holds_bad_string(value)


def _numeric_fits(number: Decimal) -> bool:
    """Whether numeric input takes the number on every server we support: an exponent within
    ±1000 (PostgreSQL 15 takes more, older servers do not) and at most 16383 digits after the point."""
    scale = -number.as_tuple().exponent  # type: ignore[operator]
    return number.is_finite() and -1000 <= number.adjusted() <= 1000 and scale <= 16383


def _numeric_number(text: str) -> Decimal:
    number = Decimal(text)
    if not _numeric_fits(number):
        raise ValueError(f"{text[:20]} is out of numeric's range")
    return number


def _holds_bad_string(value: Any) -> bool:
    if isinstance(value, str):
        return _BAD_CHARACTER.search(value) is not None
    if isinstance(value, dict):
        return any(_holds_bad_string(k) or _holds_bad_string(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_bad_string(v) for v in value)
    return False


_LONG_NUMBER = re.compile(r"\d(?:\.?\d){15,}|\d[eE][+-]?\d{3,}")  # 16+ digits, or an exponent past 99


def _exact_float(text: str) -> float | Decimal:
    f = float(text)
    if math.isfinite(f) and Decimal(repr(f)) == Decimal(text):
        return f
    return Decimal(text)


def loads_exact(text: str) -> Any:
    """JSON text -> Python values without losing a number, for filters and user functions.

    Ints of any size stay ints; a number no float holds exactly (more than ~16
    digits, beyond ±1e308) becomes a Decimal; other numbers are floats, as
    orjson gives them (orjson would turn the first into floats and refuse
    ``1e400``). ValueError when the text is not JSON or nests too deeply.
    """
    if not _LONG_NUMBER.search(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # e.g. deeper than orjson's 1024 levels: the careful parser below decides
    try:
        return json.loads(text, parse_float=_exact_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
