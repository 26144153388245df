"""The one exception type users see as a single line and exit code 2, and the number check that raises it wherever a
number enters (the CLI, a pipeline call, a config, a prompt file)."""
from __future__ import annotations

import math
from typing import Optional


class UnguideError(Exception):
    """Bad input or an unusable file: the message names the problem and the fix."""


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None, integer: bool = False,
                 above: Optional[float] = None):
    """``value`` as an int (``integer``) or a float, refused unless it is finite and within ``[low, high]`` (and
    strictly above ``above``): NaN or a negative step count must never reach a sampler."""
    kind = "a whole number" if integer else "a finite number"
    try:
        if integer:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
        else:
            number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UnguideError(f"{name} must be {kind} (got {value!r})") from None
    if not integer and not math.isfinite(number):
        raise UnguideError(f"{name} must be {kind} (got {value!r})")
    if low is not None and number < low:
        raise UnguideError(f"{name} must be at least {low:g} (got {value!r})")
    if high is not None and number > high:
        raise UnguideError(f"{name} must be at most {high:g} (got {value!r})")
    if above is not None and number <= above:
        raise UnguideError(f"{name} must be above {above:g} (got {value!r})")
    return number
