"""The one exception type users see as a single line and exit code 2."""


class UnguideError(Exception):
    """Bad input or an unusable file: the message names the problem and the fix."""
