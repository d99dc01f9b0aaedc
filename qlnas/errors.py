"""The one exception type for bad user input: the CLI prints its message as one line."""


class UserError(Exception):
    """Bad input (file, field or value) that the user can fix; no traceback is shown."""
