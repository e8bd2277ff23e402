"""The one exception type for user-facing failures.

The CLI prints the message of a :class:`HimapError` on one line and exits non-zero without a
traceback; any other exception is a bug and keeps its traceback.
"""


class HimapError(Exception):
    """A failure the user can act on: bad input, a missing file, an incompatible export.

    The message names the file, flag, graph or tensor concerned and says what was expected.
    """
