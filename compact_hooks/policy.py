"""Per-call-site codec policies: an ordered list of rules in the ``"compact_hooks"`` block.

Each rule matches call sites and says how they are sent; the first rule that matches wins and the
block's top-level settings are the default::

    "rules": [
        {"match": {"key": "transformer_blocks.0.*"}, "plain": true},
        {"match": {"role": ["k", "v"]}, "compressor": {"name": "lowrank", "rank": 32}},
        {"match": {"role": ["q", "o"], "op": "all_to_all"}, "compressor": "int2"},
        {"match": {"key": "single_transformer_blocks.*"}, "base_dtype": "int8", "base_device": "cpu"}
    ]

A call site is described by its key (``"transformer_blocks.3.attn:k"``), its role (the part of the
key after the last ``":"``: ``q``, ``k``, ``v``, ``o``, ...), the op, the group size and, where the
hook knows the host layout, the link class of its group (``intra_host`` or ``inter_host``).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .registry import build_compressor

Collective = Literal["all_gather", "all_to_all", "all_reduce", "ring_exchange"]
ResidualMode = Literal["none", "delta", "ef", "ef2"]
LinkClass = Literal["intra_host", "inter_host"]
BaseDtype = Literal["float32", "bfloat16", "float16", "input", "int8", "fp8"]  # int8 / fp8: compact_hooks.bases
BaseDevice = Literal["input", "cpu"]  # "cpu": bases in host memory between steps (compact_hooks.bases)


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RuleMatch(_Block):
    """What a rule matches; every given field must match (an empty match matches every call)."""

    key: Optional[list[str]] = Field(None, description="glob(s) on the call-site key")
    role: Optional[list[str]] = Field(None, description="the key's part after its last ':' (q, k, v, o, ...)")
    op: Optional[list[Collective]] = None
    link: Optional[list[LinkClass]] = None
    group_size: Optional[list[int]] = None

    @field_validator("key", "role", "op", "link", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("group_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value


class Rule(_Block):
    """One rule: ``match`` and what matching calls get (``plain``, or codec settings)."""

    match: RuleMatch = RuleMatch()
    plain: bool = False
    compressor: Optional[Union[str, dict[str, Any]]] = None
    residual: Optional[ResidualMode] = None
    warmup_steps: Optional[int] = Field(None, ge=0)
    warmup_compressor: Optional[Union[str, dict[str, Any]]] = None
    base_dtype: Optional[BaseDtype] = None
    base_device: Optional[BaseDevice] = None

    @field_validator("compressor", "warmup_compressor", mode="before")
    @classmethod
    def _builds(cls, value: Any) -> Any:
        if value is not None:
            build_compressor(value)  # raises ConfigError naming the parameter
        return value

    @model_validator(mode="after")
    def _plain_alone(self) -> "Rule":
        if self.plain and any(v is not None for v in (self.compressor, self.residual, self.warmup_steps,
                                                      self.warmup_compressor, self.base_dtype, self.base_device)):
            raise ValueError("a rule with \"plain\": true takes no codec settings; drop them or the plain flag")
        return self

    def overrides(self) -> dict[str, Any]:
        """The codec settings this rule sets (empty for a plain rule)."""
        if self.plain:
            return {}
        return {k: v for k, v in (("compressor", self.compressor), ("residual", self.residual),
                                  ("warmup_steps", self.warmup_steps),
                                  ("warmup_compressor", self.warmup_compressor), ("base_dtype", self.base_dtype),
                                  ("base_device", self.base_device)) if v is not None}


@dataclass(frozen=True)
class CallSite:
    """What rules look at: the call's key, op, group size and link class (``None``: unknown)."""

    key: str
    op: str
    group_size: int
    link: Optional[str] = None

    @property
    def role(self) -> str:
        return self.key.rsplit(":", 1)[1] if ":" in self.key else ""


def matches(match: RuleMatch, site: CallSite) -> bool:
    """Whether every field of ``match`` holds for ``site``. A ``link`` condition never matches a
    call whose link class is unknown."""
    if match.key is not None and not any(fnmatch.fnmatchcase(site.key, pattern) for pattern in match.key):
        return False
    if match.role is not None and site.role not in match.role:
        return False
    if match.op is not None and site.op not in match.op:
        return False
    if match.group_size is not None and site.group_size not in match.group_size:
        return False
    return match.link is None or (site.link is not None and site.link in match.link)


FEEDBACK_MODES = ("ef", "ef2")


def feedback_problem(compressor: Any, residual: str) -> Optional[str]:
    """Why the codec ``compressor`` (a spec) cannot run with residual mode ``residual``; ``None`` when it can."""
    codec = build_compressor(compressor)
    if not codec.needs_error_feedback or residual in FEEDBACK_MODES:
        return None
    effect = ("it would have no residual to size and always send its finest level" if residual == "none" else
              "a change it skips would be lost for good, as delta has no error feedback")
    return (f"compressor {codec.name!r} needs error feedback: it sizes each call by the residual against the "
            f"running base and lets the base carry what it skips; with residual {residual!r} {effect}. "
            f"Set \"residual\": \"ef\" (or \"ef2\"), or choose a fixed codec such as \"int8\"")


def first_match(rules: list[Rule], site: CallSite) -> Optional[int]:
    """Index of the first rule matching ``site``, or ``None`` (the defaults apply)."""
    return next((i for i, rule in enumerate(rules) if matches(rule.match, site)), None)


def rules_fingerprint(rules: list[Rule]) -> str:
    """A canonical text of the rules, equal on every rank with the same rules."""
    return json.dumps([r.model_dump(exclude_none=True) for r in rules], sort_keys=True, separators=(",", ":"))
