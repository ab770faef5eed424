"""Real multi-process runs for tests: see :func:`compact_hooks.launcher.local.run_ranks`."""

from compact_hooks.launcher.local import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
