"""Durations: one module, two grammars, each named for whose text it reads.

- :func:`parse` reads the durations of an ElastiService (``spec.activator.holdTimeout``,
  ``retryInterval``, ``enabledPeriod.duration``): exactly what the CRD's pattern admits,
  ``^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$``. The controller and the activator both use it, so neither
  accepts what the API server would refuse, nor refuses what it stored.
- :func:`parse_go` reads what Istio writes (route ``timeout``, ``retries.perTryTimeout``): Go's
  ``time.ParseDuration``, signs, ``0``, ``.5s`` and ``us``/``ns`` included.
"""

from __future__ import annotations

import re
from fractions import Fraction

ELASTI_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"  # as in crds/elastiservice.yaml
_ELASTI = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_ELASTI_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}

_GO_UNITS = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "\u00b5s": Fraction(1, 10**6),  # Go accepts both micro signs
    "\u03bcs": Fraction(1, 10**6),
    "ms": Fraction(1, 10**3),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
_GO_COMPONENT = re.compile("([0-9]*)(?:[.]([0-9]*))?(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def _decimal(whole: str, frac: str) -> Fraction:
    return Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)


def parse(text: str) -> float:
    """Seconds in an ElastiService duration (``60s``, ``100ms``, ``1m30s``, ``1.5h``); ValueError for
    anything the CRD's pattern refuses (``0``, ``.5s``, ``500us``, spaces, signs)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 60s, 100ms, 1m30s)")
    total, pos = Fraction(0), 0
    while pos < len(text):
        m = _ELASTI.match(text, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r} (use e.g. 60s, 100ms, 1m30s)")
        whole, _, frac = m.group(1).partition(".")
        total += _decimal(whole, frac) * _ELASTI_UNITS[m.group(2)]
        pos = m.end()
    return float(total)


def parse_go(s: str) -> float:
    """Seconds in a Go duration as Istio writes timeouts ("60s", "1.5s", "100ms", "1m30s", "2h", "0")."""
    if not isinstance(s, str):
        raise ValueError(f"not a duration: {s!r}")
    text = s
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"not a duration: {s!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(text):
        m = _GO_COMPONENT.match(text, pos)
        if m is None or not (m.group(1) or m.group(2)):
            raise ValueError(f"not a duration: {s!r}")
        total += _decimal(m.group(1), m.group(2) or "") * _GO_UNITS[m.group(3)]
        pos = m.end()
    return float(sign * total)
