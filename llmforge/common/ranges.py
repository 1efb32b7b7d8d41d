"""Allowed ranges of numeric config keys, declared once next to each key (``llmforge.core.config.opt(..., ge=0)``).

A :class:`Range` lives in the dataclass field's metadata under ``"range"``; :func:`range_errors` walks a config
instance (nested sections included) and names every value outside its key's range. NaN is never in a range and
+-inf only where a key says ``allow_inf``: a NaN threshold compares False with everything, so it would silently
switch a rule off. A raw mapping without a range (``deepspeed:``) is still refused a NaN or inf anywhere in it.
Kept apart from ``llmforge.core.config`` so the README table and the checks read one definition.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional


def _num(x) -> str:
    if float(x).is_integer() and x > 1 << 16 and (int(x) + 1) & int(x) == 0:  # 4294967295 reads as 2^32-1
        return f"2^{int(x).bit_length()}-1"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval (either end open, closed or absent) plus sentinel values outside it (``also``: e.g. -1 =
    auto). Applies to each item of a list key and each value of a mapping key."""
    lo: Optional[float] = None
    lo_open: bool = False
    hi: Optional[float] = None
    hi_open: bool = False
    also: tuple = ()
    allow_inf: bool = False

    def contains(self, v) -> bool:
        if v in self.also:
            return True
        if math.isnan(v) or (math.isinf(v) and not self.allow_inf):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = "any number"
        return text + "".join(f", or {_num(a)}" for a in self.also)


def field_range(f: dataclasses.Field) -> Optional[Range]:
    return f.metadata.get("range")


_NON_FINITE = {"nan", ".nan", "inf", "+inf", "-inf", ".inf", "+.inf", "-.inf", "infinity", "-infinity"}


def _non_finite(tree: dict, key: str) -> Iterator[str]:
    """A NaN or inf anywhere in a raw mapping, as a number or as the text an override leaves it (``nan``): the
    library it goes to would take it (a NaN gradient_clipping) or fail on it mid-run with a traceback."""
    for k, v in tree.items():
        where = f"{key}.{k}"
        if isinstance(v, dict):
            yield from _non_finite(v, where)
        elif (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, str) and v.lower() in _NON_FINITE):
            yield f"{where}={v!r} is not a finite number: NaN and inf are refused in every key"


def range_errors(cfg, prefix: str = "") -> Iterator[str]:
    """One line per value of ``cfg`` outside its key's range, naming the key, the value and the range. Values of
    None (an optional key left unset) are not checked."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from range_errors(value, key + ".")
            continue
        rng = field_range(f)
        if rng is None and isinstance(value, dict):  # a raw section (deepspeed:): no ranges, but never NaN/inf
            yield from _non_finite(value, key)
        if rng is None or value is None:
            continue
        if isinstance(value, dict):
            items = [(f"{key}[{k!r}]", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(key, value)]
        for where, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                yield f"{where}: expected a number in {rng}, got {v!r}"
            elif not rng.contains(v):
                finite = "a finite number " if isinstance(v, float) and not math.isfinite(v) else ""
                interval = "in " if rng.lo is not None and rng.hi is not None else ""
                yield f"{where}={v!r} is out of range: must be {finite}{interval}{rng}"
