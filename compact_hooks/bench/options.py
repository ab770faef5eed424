"""Argument types shared by the ``compact-hooks bench`` subcommands."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes comma-separated integers like 1088,3072; got {text!r}")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--shape dims must be positive; got {text!r}")
    return dims


def dtype_arg(text: str) -> torch.dtype:
    if text not in ("float32", "float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"--dtype is float32, float16 or bfloat16; got {text!r}")
    return getattr(torch, text)


def spec_arg(text: str) -> Any:
    return json.loads(text) if text.lstrip().startswith("{") else text
