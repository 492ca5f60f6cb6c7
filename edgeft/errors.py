"""The one exception type users see: the CLI prints it as a single line and exits 2."""


class EdgeftError(Exception):
    """A problem with the user's input or environment, worded for the user."""

    exit_code = 2
