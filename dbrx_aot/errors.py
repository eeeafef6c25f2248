"""The one exception type for user input and bad files."""


class DbrxAotError(Exception):
    """A mistake the user can act on: names the file, key or option and what was expected.

    The CLI prints it as one line and exits with code 2.
    """
