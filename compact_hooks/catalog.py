"""The catalogue of registered codecs: ``describe()`` rows and the ``compact-hooks compressors`` subcommand.

A codec's summary is the first paragraph of its class docstring as plain text: reST markup
(````x````, ``:class:`Grid```, ``*emphasis*``) removed, lines joined; the listing wraps it to the
terminal's width under the codec's name.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

# reST inline markup -> its text: :role:`~a.b.c` -> c, ``x`` / `x` -> x, **x** / *x* -> x
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?(?:[\w.]*\.)?([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}(?=\S)([^*]*?\S)\*{1,2}(?![\w*])")


def plain_text(text: str) -> str:
    """``text`` without reST inline markup, on one line (a trailing ``::`` becomes ``:``)."""
    text = " ".join(text.split())  # first: markup may span lines
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    text = _EMPHASIS.sub(r"\1", text)
    return text[:-1] if text.endswith("::") else text


def summary(doc: str) -> str:
    """The first paragraph of a docstring, as plain text."""
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return plain_text(first)


def describe() -> list[dict[str, Any]]:
    """One row per registered codec: name, constructor parameters and defaults, summable, the dtypes it
    codes losslessly, its module and its summary."""
    import inspect

    from compact_hooks.registry import REGISTRY, available_compressors

    rows = []
    for name in available_compressors():
        cls = REGISTRY.get(name)
        sig = inspect.signature(cls.__init__)
        params = {p: (None if v.default is inspect.Parameter.empty else v.default)
                  for p, v in sig.parameters.items() if p != "self" and v.kind is v.KEYWORD_ONLY or
                  (p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD)}
        rows.append({"name": name, "params": params, "summable": cls.summable,
                     "lossless_dtypes": sorted(str(d).replace("torch.", "") for d in cls.lossless_dtypes),
                     "module": cls.__module__, "summary": summary(inspect.getdoc(cls) or "")})
    return rows


def format_rows(rows: list[dict[str, Any]], width: int) -> str:
    """The listing: each codec's summary and ``[parameters]`` wrapped to ``width`` columns under its name."""
    import textwrap

    indent = max(len(r["name"]) for r in rows) + 2
    lines = []
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        text = r["summary"] + (f" [{params}]" if params else "")
        wrapped = textwrap.wrap(text, width=max(width, indent + 20), initial_indent=" " * indent,
                                subsequent_indent=" " * indent, break_on_hyphens=False,
                                break_long_words=False) or [""]
        lines.append(r["name"].ljust(indent) + wrapped[0][indent:])
        lines.extend(wrapped[1:])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import json
    import shutil

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_rows(rows, shutil.get_terminal_size().columns))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compressors", help="list registered compressors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=main)
