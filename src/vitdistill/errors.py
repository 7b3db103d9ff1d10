"""Errors a user can act on.

Anything raised as :class:`UserError` is printed by the CLI as a single line (no traceback):
it means the input was wrong (a recipe key, a path, a mismatched teacher), not that vitdistill
is broken.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(UserError):
    """A recipe or override is invalid; the message names the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class RecipeWarning(UserWarning):
    """A recipe value that is valid but has no effect (e.g. ``augment.scale`` without rrc crops);
    the CLI prints it as one line."""


def short_reason(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to a paragraph)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.split(". ")[0][:160]
