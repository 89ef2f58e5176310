"""Metadata filters of a search: the conditions an item's metadata (the manifest's columns at build
time, `cbir.bundle.items`) must meet for a search to return it. A filter is a list of conditions that
must all hold; an item without the condition's field never meets it.

The condition syntax of `cbir search --filter`, the UI and `parse_condition`:

    country=fr              Equals: the value is exactly this text (also `==`)
    tag in cat,dog          OneOf: the value is one of these texts (comma-separated)
    year>=2010  year<2020   NumberRange: the value is a number in this range (>=, >, <=, <)
    taken<2020-01-01        DateRange: the value is an ISO 8601 date or datetime in this range

A range bound that reads as a number makes a number range; otherwise it must be an ISO 8601 date
(`2020-01-31`) or datetime (`2020-01-31T12:00`, `...Z`, `...+02:00`; no zone = UTC). A date bound
stands for the whole day: `taken<=2020-01-31` keeps 2020-01-31T23:00, `taken>2020-01-31` starts
on February 1st. On the wire a filter is `cbir.v1.Filter` (`from_proto`, `to_proto`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from cbir.errors import InvalidRequest
from cbir.v1 import common_pb2

if TYPE_CHECKING:
    import numpy as np

SYNTAX = "field=value, field in a,b,c, field>=number (or >, <=, <), field<2020-01-31 (an ISO date or datetime)"


class FilterError(InvalidRequest):
    """A filter that cannot be understood, or that names a field the bundle's items lack."""


@dataclass(frozen=True)
class Equals:
    field: str
    value: str

    def __str__(self) -> str:
        return f"{self.field}={self.value}"


@dataclass(frozen=True)
class OneOf:
    field: str
    values: frozenset[str]

    def __str__(self) -> str:
        return f"{self.field} in {','.join(sorted(self.values))}"


@dataclass(frozen=True)
class _Range:
    """Bounds as given (text; None = unbounded); exclusive bounds are > and < instead of >= and <=."""

    field: str
    low: str | None = None
    high: str | None = None
    low_exclusive: bool = False
    high_exclusive: bool = False

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{self.field}{'>' if self.low_exclusive else '>='}{self.low}")
        if self.high is not None:
            parts.append(f"{self.field}{'<' if self.high_exclusive else '<='}{self.high}")
        return " and ".join(parts)

    def holds(self, values: np.ndarray) -> np.ndarray:
        """Whether each value (a number, or a POSIX timestamp for dates; NaN never holds) is in the range."""
        import numpy as np  # here, not at the top: the gateway parses filters, and its image has no numpy

        values = np.asarray(values, dtype=np.float64)
        keep = np.ones(values.shape, dtype=bool)
        if self.low is not None:
            threshold, strict = self._lower()
            keep &= values > threshold if strict else values >= threshold
        if self.high is not None:
            threshold, strict = self._upper()
            keep &= values < threshold if strict else values <= threshold
        return keep

    def _lower(self) -> tuple[float, bool]:
        """(threshold, strict) of the lower bound."""
        return as_number(self.low), self.low_exclusive

    def _upper(self) -> tuple[float, bool]:
        return as_number(self.high), self.high_exclusive


@dataclass(frozen=True)
class NumberRange(_Range):
    pass


@dataclass(frozen=True)
class DateRange(_Range):
    """A datetime bound is a moment; a date bound is its whole day [midnight, next midnight): `>= d` from its
    start, `> d` from its end, `<= d` before its end, `< d` before its start."""

    def _lower(self) -> tuple[float, bool]:
        start, end = _moment(self.low)
        if start == end:
            return start, self.low_exclusive
        return (end if self.low_exclusive else start), False

    def _upper(self) -> tuple[float, bool]:
        start, end = _moment(self.high)
        if start == end:
            return end, self.high_exclusive
        return (start if self.high_exclusive else end), True


Condition = Equals | OneOf | NumberRange | DateRange
Filter = tuple[Condition, ...]  # every condition must hold; () = no filter


# ------------------------------------------------------------------------------------------ values


def as_number(text: str) -> float:
    """The number a metadata value or bound reads as; NaN when it is not a finite number."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def as_timestamp(text: str) -> float:
    """The POSIX time an ISO 8601 date (its midnight) or datetime (no zone = UTC) reads as; NaN when it is neither."""
    try:
        return _moment(text)[0]
    except ValueError:
        return math.nan


def _moment(text: str) -> tuple[float, float]:
    """(start, end) POSIX times of an ISO date (the day: end = next midnight) or datetime (start = end);
    ValueError when the text is neither."""
    text = text.strip()
    if not text or not text[0].isdigit():
        raise ValueError(text)
    if len(text) <= 10 and "T" not in text and ":" not in text:
        day = date.fromisoformat(text)
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return start.timestamp(), (start + timedelta(days=1)).timestamp()
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp(), moment.timestamp()


# ------------------------------------------------------------------------------------------ parsing

_ONE_OF = re.compile(r"^\s*(?P<field>[^<>=!]+?)\s+in\s+(?P<values>.*)$", re.IGNORECASE | re.DOTALL)
_COMPARISON = re.compile(r"^\s*(?P<field>[^<>=!]+?)\s*(?P<op>>=|<=|==|!=|=|<|>)\s*(?P<value>.*?)\s*$", re.DOTALL)


def parse_condition(text: str) -> Condition:
    """One condition in the CLI syntax (module docstring); FilterError saying what is wrong and how to write it."""
    match = _ONE_OF.match(text)
    if match:
        values = [v.strip() for v in match["values"].split(",") if v.strip()]
        if not values:
            raise FilterError(f"filter {text!r} lists no values after 'in': write e.g. {match['field'].strip()} in a,b")
        return _checked(OneOf(match["field"].strip(), frozenset(values)))
    match = _COMPARISON.match(text)
    if not match:
        raise FilterError(f"filter {text!r} is not a condition; write one of: {SYNTAX}")
    field, op, value = match["field"].strip(), match["op"], match["value"]
    if op == "!=":
        raise FilterError(f"filter {text!r}: != is not supported; write one of: {SYNTAX}")
    if not value:
        raise FilterError(f"filter {text!r} has no value after {op}; write one of: {SYNTAX}")
    if op in ("=", "=="):
        return _checked(Equals(field, value))
    kind = NumberRange if not math.isnan(as_number(value)) else DateRange
    if op.startswith(">"):
        return _checked(kind(field, low=value, low_exclusive=op == ">"))
    return _checked(kind(field, high=value, high_exclusive=op == "<"))


def parse_filter(conditions: str | Iterable[str]) -> Filter:
    """A filter from conditions in the CLI syntax: a list of them, or one text with conditions separated by ';'
    or new lines (what the UI's filter box takes). Blank parts are ignored."""
    parts = re.split(r"[;\n]", conditions) if isinstance(conditions, str) else list(conditions)
    return tuple(parse_condition(part) for part in parts if part.strip())


def _checked(condition: Condition) -> Condition:
    """The condition if it makes sense; FilterError saying why not."""
    if not condition.field:
        raise FilterError(f"filter condition without a field name; write one of: {SYNTAX}")
    if isinstance(condition, OneOf) and not condition.values:
        raise FilterError(f"filter on {condition.field!r}: 'in' needs at least one value")
    if isinstance(condition, _Range):
        if condition.low is None and condition.high is None:
            raise FilterError(f"filter on {condition.field!r}: a range needs a lower or an upper bound (or both)")
        if isinstance(condition, NumberRange):
            bounds = [b for b in (condition.low, condition.high) if b is not None]
            bad = [b for b in bounds if math.isnan(as_number(b))]
            if bad:
                raise FilterError(f"filter on {condition.field!r}: {bad[0]!r} is not a number")
            low, high = (as_number(b) if b is not None else None for b in (condition.low, condition.high))
        else:
            low, high = (_date_bound(condition.field, b) for b in (condition.low, condition.high))
        if low is not None and high is not None and low > high:
            raise FilterError(f"filter {condition}: the lower bound is above the upper one, so nothing can match")
    return condition


def _date_bound(field: str, text: str | None) -> float | None:
    if text is None:
        return None
    stamp = as_timestamp(text)
    if math.isnan(stamp):
        raise FilterError(
            f"filter on {field!r}: {text!r} is neither a number nor an ISO 8601 date (2020-01-31) or datetime "
            "(2020-01-31T12:00:00, optionally with Z or +02:00)"
        )
    return stamp


# ------------------------------------------------------------------------------------------ the wire


def from_proto(message: common_pb2.Filter) -> Filter:
    """The filter a request carries (() when it has none); FilterError for a condition that makes no sense."""
    conditions = []
    for i, wire in enumerate(message.conditions):
        field, kind = wire.field.strip(), wire.WhichOneof("test")
        if not field:
            raise FilterError(f"filter condition {i + 1} has no field name")
        if kind == "equals":
            conditions.append(_checked(Equals(field, wire.equals)))
        elif kind == "one_of":
            conditions.append(_checked(OneOf(field, frozenset(wire.one_of.values))))
        elif kind in ("number", "date"):
            bounds = wire.number if kind == "number" else wire.date
            range_type = NumberRange if kind == "number" else DateRange
            conditions.append(_checked(range_type(
                field, low=bounds.min or None, high=bounds.max or None,
                low_exclusive=bounds.min_exclusive, high_exclusive=bounds.max_exclusive,
            )))
        else:
            raise FilterError(f"filter condition {i + 1} (on {field!r}) sets no test: set equals, one_of, number or date")
    return tuple(conditions)


def to_proto(conditions: Filter) -> common_pb2.Filter:
    message = common_pb2.Filter()
    for condition in conditions:
        wire = message.conditions.add(field=condition.field)
        if isinstance(condition, Equals):
            wire.equals = condition.value
        elif isinstance(condition, OneOf):
            wire.one_of.values.extend(sorted(condition.values))
        else:
            bounds = wire.number if isinstance(condition, NumberRange) else wire.date
            bounds.min, bounds.max = condition.low or "", condition.high or ""
            bounds.min_exclusive, bounds.max_exclusive = condition.low_exclusive, condition.high_exclusive
    return message


def describe(conditions: Filter) -> str:
    """The filter in the CLI syntax, conditions joined by '; '."""
    return "; ".join(str(c) for c in conditions)
