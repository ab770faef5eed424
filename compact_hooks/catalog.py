"""The catalogue of registered codecs: ``describe()`` rows and the ``compact-hooks compressors`` subcommand."""

from __future__ import annotations

import argparse
import inspect
import json

from compact_hooks.registry import REGISTRY, available_compressors


def describe() -> list[dict]:
    rows = []
    for name in available_compressors():
        cls = REGISTRY.get(name)
        sig = inspect.signature(cls.__init__)
        params = {p: (None if v.default is inspect.Parameter.empty else v.default)
                  for p, v in sig.parameters.items() if p != "self" and v.kind is v.KEYWORD_ONLY or
                  (p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD)}
        doc = (inspect.getdoc(cls) or "").splitlines()
        rows.append({"name": name, "params": params, "summable": cls.summable,
                     "lossless_dtypes": sorted(str(d).replace("torch.", "") for d in cls.lossless_dtypes),
                     "module": cls.__module__, "summary": doc[0] if doc else ""})
    return rows


def main(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        print(f"{r['name']:<{width}}  {r['summary']}" + (f"  [{params}]" if params else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compressors", help="list registered compressors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=main)
