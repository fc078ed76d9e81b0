"""Settings read from the environment: the machine's, never stored with the data."""

from __future__ import annotations

import os


def count(name: str, default: int, zero_means: str) -> int:
    """A non-negative integer from ``$name`` (``default`` when unset); a clear
    ``ValueError`` naming the variable otherwise."""
    value = os.environ.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer") from None
    if number < 0:
        raise ValueError(f"${name} must be >= 0 (0 = {zero_means})")
    return number
