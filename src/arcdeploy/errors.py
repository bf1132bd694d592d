"""The one exception type the CLI turns into a one-line message."""


class ArcdeployError(Exception):
    """A user-facing failure: the message names the file and the problem, in one line."""
