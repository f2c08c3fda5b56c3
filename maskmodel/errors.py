"""The one exception type a user can cause.

Anything raised as :class:`UserError` is printed by the job entrypoints as a
single sentence with a non-zero exit, never as a traceback: its message must
name the thing that is wrong and the likely fix.
"""


class UserError(Exception):
    """A failure caused by input, configuration or environment, not by a bug."""
