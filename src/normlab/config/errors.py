"""The error a config check raises, and how any error reaches the user: one line.

Its own module so that every check (validate, preflight, resume) can raise it without importing
the others.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line meant for the user."""


def one_line(error: BaseException) -> str:
    """The error as one line for the user: a ConfigError as it is, others with their type."""
    # Hydra wraps errors raised while instantiating (e.g. a bad model option): report the cause.
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    if isinstance(error, ConfigError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
