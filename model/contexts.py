"""How a document longer than one injection is cut: consecutive contexts of at most the window's tokens.
The server (serving/state.py) and the retention evaluation (monitoring/retention.py) cut alike."""

from collections.abc import Sequence


def split_contexts(ids: Sequence[int], size: int) -> list[list[int]]:
    """Token ids in consecutive contexts of at most `size` tokens (none for an empty text)."""
    if size < 1:
        raise ValueError(f"a context holds at least one token, got size {size}")
    return [list(ids[start : start + size]) for start in range(0, len(ids), size)]
