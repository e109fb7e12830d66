"""argparse types that refuse out-of-range values with a one-line usage error (exit code 2)
instead of failing later with a traceback or a misleading result."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(kind: Callable[[str], float], text: str, ok: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def port(text: str) -> int:
    return _number(int, text, lambda v: 0 <= v <= 65535, "a port number 0-65535")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a number > 0 (inf: no limit)")


def fraction(text: str) -> float:
    """A sparsity: 0 <= s < 1 (1 would leave nothing to multiply)."""
    return _number(float, text, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")


def list_of(kind: Callable[[str], object]) -> Callable[[str], list]:
    """A comma-separated list, each item parsed by `kind`."""

    def parse(text: str) -> list:
        try:
            return [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
