"""The one exception type whose message is shown to users as is (CLI: one line on stderr, exit 2)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or an unusable environment: the message names the problem; no traceback is shown.

    `param` names the request field at fault and `code` is a machine-readable reason, for the HTTP
    error body (both None when the fault is not a request field's)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code
