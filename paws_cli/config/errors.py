"""The settings error type, in a module of its own so that every part of settings resolution can raise it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A settings problem the user must fix; the message says which key, value and source."""
