"""argparse `type=` helpers that check a flag's value at parse time, shared by the command modules.

A value out of range (or not a number) is an argparse error: exit code 2 and a message naming the flag and
the allowed range, e.g. `ckl serve: error: argument --top-k: expected an integer >= 1, got '0'`. Torch-free,
so `ckl COMMAND --help` stays cheap.
"""

import argparse
import math

MAX_PORT = 65_535
MAX_SEED = 2**64 - 1  # torch.manual_seed takes at most 64 bits


def seed_number(text: str) -> int:
    """A random seed: an integer from 0 to 2**64 - 1 (what torch's generators accept)."""
    return _int_in_range(text, 0, MAX_SEED)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_in_range(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (for flags where 0 means something: none, or skip)."""
    return _int_in_range(text, 0)


def port_number(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    return _int_in_range(text, 0, MAX_PORT)


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, intervals)."""
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1, both ends included (a rate such as an exact-match threshold)."""
    value = _float(text)
    if not 0 <= value <= 1:  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number > 0 and < 1, both ends excluded (a share of which neither none nor all is usable)."""
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number > 0 and < 1, got {text!r}")
    return value


def _float(text: str) -> float:
    """`text` as a float; NaN (which no range check passes) when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _int_in_range(text: str, low: int, high: int | None = None) -> int:
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
    return value
