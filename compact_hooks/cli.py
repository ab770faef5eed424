"""The ``compact-hooks`` command: parses the command line, runs the chosen subcommand, reports errors.

Each subcommand declares its arguments with ``add_parser(subparsers)`` in a light module (argparse
and the standard library only) and names its handler with :class:`Handler`, which imports the module
that does the work only when the command runs. So ``compact-hooks --help``, ``--version``, a
subcommand's ``--help`` and usage errors load neither torch nor diffusers.

Exit codes: 0 done; 2 a usage error (argparse: unknown flag, bad value); 1 an error the user can fix
(:data:`USER_ERRORS`), reported as one line ``compact-hooks: error: <message>`` (and a
``compact-hooks: hint:`` line when the exception carries a ``hint``); with ``--debug`` or
``COMPACT_HOOKS_DEBUG=1`` (for launchers such as torchrun) the traceback is shown instead. Any other
exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

# subcommand -> "module" whose add_parser(subparsers) declares it, or "module:function"
SUBCOMMANDS = {
    "compressors": "compact_hooks.catalog",
    "configs": "compact_hooks.configs",
    "bench": "compact_hooks.bench",
    "run": "compact_hooks.cli_diffusers:add_run_parser",
    "launch": "compact_hooks.launcher.launch",
    "report": "compact_hooks.bench.report",
    "train-tiny": "compact_hooks.cli_diffusers:add_train_tiny_parser",
}
TOP_FLAGS = ("--debug", "-V", "--version")
DEBUG_ENV = "COMPACT_HOOKS_DEBUG"
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def resolve(target: str, default: str = "add_parser") -> Any:
    """``"package.module:name"`` -> that object, importing the module (``"package.module"``: its ``default``)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name or default)


class Handler:
    """A subcommand's handler named ``"module:function"``: the module is imported when the command runs."""

    def __init__(self, target: str) -> None:
        if ":" not in target:
            raise ValueError(f"Handler takes 'module:function', got {target!r}")
        self.target = target

    def __call__(self, args: argparse.Namespace) -> Any:
        return resolve(self.target)(args)

    def __repr__(self) -> str:
        return f"Handler({self.target!r})"


def module_doc(name: str) -> str:
    """The docstring of module ``name``, read from its source without importing the module or its own
    package (``compact_hooks.integrations.diffusers`` imports diffusers): a light parser's description."""
    package, _, leaf = name.rpartition(".")
    spec = importlib.util.find_spec(package)  # imports the packages above `package` only
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, f"{leaf}.py")
        if path.is_file():
            return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False) or ""
    return ""


def version() -> str:
    """The installed distribution's version (``compact_hooks.__version__`` when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("compact-hooks")
    except metadata.PackageNotFoundError:
        from compact_hooks import __version__

        return __version__


class _Version(argparse.Action):
    """``-V`` / ``--version``: looks the version up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="print 'compact-hooks VERSION' and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        print(f"compact-hooks {version()}")
        parser.exit()


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compact-hooks",
        description="Compressed residual collectives for parallel diffusion inference.",
        epilog="Exit codes: 0 done, 1 an error to fix (one line; --debug for the traceback), 2 a usage error.")
    parser.add_argument("-V", "--version", action=_Version)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also {DEBUG_ENV}=1, e.g. under torchrun)")
    return parser


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of ``compact-hooks``; with ``command``, only that subcommand is declared (with ``""``, none:
    enough for ``--version`` and a missing command)."""
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [command] if command in SUBCOMMANDS else [] if command == "" else list(SUBCOMMANDS)
    for name in names:
        resolve(SUBCOMMANDS[name])(sub)
    return parser


def _command_word(argv: Sequence[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def debug_requested(args: Optional[argparse.Namespace] = None) -> bool:
    """``--debug`` or ``COMPACT_HOOKS_DEBUG`` set to anything but empty, 0, false, no or off."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return env or bool(getattr(args, "debug", False))


def is_user_error(exc: BaseException) -> bool:
    """An error the user causes and fixes (bad config, missing file, bad value, missing extra)."""
    from compact_hooks.errors import CompactHooksError

    if isinstance(exc, ImportError):
        return "pip install" in str(exc)  # a missing optional dependency, named with its extra
    return isinstance(exc, (CompactHooksError, ValueError, FileNotFoundError, NotADirectoryError,
                            IsADirectoryError, PermissionError))


def _rank_tag() -> str:
    """``"[rank N] "`` on rank N > 0 of a multi-rank launch, else ``""``."""
    world = next((os.environ[v] for v in WORLD_VARS if v in os.environ), "1")
    rank = next((os.environ[v] for v in RANK_VARS if v in os.environ), "0")
    return f"[rank {rank}] " if world.isdigit() and int(world) > 1 and rank != "0" else ""


def report_error(exc: BaseException, stream: Optional[TextIO] = None) -> None:
    """``compact-hooks: error: <message>`` (and ``compact-hooks: hint: <hint>``) on ``stream`` (stderr)."""
    stream = sys.stderr if stream is None else stream
    message = str(exc).strip() or type(exc).__name__
    text = f"compact-hooks: error: {_rank_tag()}{message}\n"
    hint = getattr(exc, "hint", None)
    if hint:
        text += f"compact-hooks: hint: {hint}\n"
    stream.write(text)  # one write: the lines of ranks sharing a pipe do not interleave
    stream.flush()


def dispatch(args: argparse.Namespace) -> int:
    """Run ``args.handler``; a user error becomes one line on stderr and exit code 1 (see the module doc)."""
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if debug_requested(args):
            raise
        print("compact-hooks: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_requested(args) or not is_user_error(exc):
            raise
        report_error(exc)
        return 1


def run_one(command: str, add_parser: Callable[[argparse._SubParsersAction], object],
            argv: Optional[Sequence[str]] = None) -> int:
    """``python -m <module of a subcommand> ARGS``: run one subcommand as ``compact-hooks <command> ARGS``
    would (the command word itself is optional; ``--debug`` may come first)."""
    parser = _top_parser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    rest = list(sys.argv[1:] if argv is None else argv)
    head = []
    while rest and rest[0] in TOP_FLAGS:
        head.append(rest.pop(0))
    if not rest or rest[0] != command:
        rest = [command, *rest]
    return dispatch(parser.parse_args([*head, *rest]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = _command_word(args_list)
    if command is None and not {"-h", "--help"} & set(args_list):
        command = ""  # --version, or no command: the subcommands' parsers are not needed
    return dispatch(build_parser(command).parse_args(args_list))


if __name__ == "__main__":
    sys.exit(main())
