"""The one exception type whose message is shown to users as is (CLI: one line on stderr, exit 2)."""


class UserError(ValueError):
    """Bad input or an unusable environment: the message names the problem; no traceback is shown."""
