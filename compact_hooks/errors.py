"""Exceptions a user can cause, each with a message that says what to change."""

from __future__ import annotations


class CompactHooksError(Exception):
    """Base class of every error compact-hooks raises on purpose."""


class ConfigError(CompactHooksError, ValueError):
    """A configuration value is wrong; the message names the key path (``compact_hooks.compressor.bits``)."""

    def __init__(self, key_path: str, message: str) -> None:
        self.key_path = key_path
        super().__init__(f"{key_path}: {message}")


class ProtocolError(CompactHooksError, RuntimeError):
    """Ranks disagree on the wire format (compressor, parameters, version, shape)."""


class CollectiveTimeoutError(CompactHooksError, RuntimeError):
    """A collective did not complete within ``timeout_s`` (a rank died or hangs)."""
