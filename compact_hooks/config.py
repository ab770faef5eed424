"""CompactConfig: the ``"compact_hooks"`` block of a DeepSpeed-style JSON config.

Example block::

    "compact_hooks": {
        "enabled": true,
        "compressor": {"name": "int2", "group_size": 128},
        "residual": "ef",
        "warmup_steps": 1,
        "collectives": ["all_to_all", "all_gather", "all_reduce"],
        "base_dtype": "input",
        "base_device": "input",
        "warmup_compressor": "int8",
        "rules": [],
        "stats": {"enabled": true}
    }
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .configs import missing_hint, resolve_config_path
from .errors import ConfigError
from .policy import BaseDevice, BaseDtype, Rule, feedback_problem
from .registry import build_compressor

BLOCK = "compact_hooks"

Collective = Literal["all_gather", "all_to_all", "all_reduce", "ring_exchange"]
ResidualMode = Literal["none", "delta", "ef", "ef2"]
HookKind = Literal["compact", "stale", "passthrough", "cast"]
MAX_TIMEOUT_S = 366 * 86400.0  # a year; larger values overflow timedelta / gloo's millisecond timeouts


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StatsConfig(_Block):
    """What the session counts."""

    enabled: bool = True
    error_every: int = Field(0, ge=0, description="sample the relative reconstruction error every N calls of a key (0: never)")


class CompactConfig(_Block):
    """Validated settings of compact-hooks. Every field has a default; see docs/configuration.md."""

    enabled: bool = True
    hook: HookKind = "compact"
    compressor: Union[str, dict[str, Any]] = "int2"
    residual: ResidualMode = "ef"
    warmup_steps: int = Field(1, ge=0)
    collectives: list[Collective] = Field(default_factory=lambda: ["all_gather", "all_to_all", "all_reduce", "ring_exchange"])
    base_dtype: BaseDtype = "input"  # "int8" / "fp8": 8-bit bases with group scales (compact_hooks.bases)
    base_device: BaseDevice = "input"  # "cpu": bases in (pinned) host memory, prefetched per call site
    cast_dtype: Literal["float16", "bfloat16"] = "bfloat16"
    verify_every: int = Field(0, ge=0)
    timeout_s: float = Field(300.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    # full sends as int8 by default: few-step samplers otherwise pay most of their bytes in the first step
    warmup_compressor: Optional[Union[str, dict[str, Any]]] = "int8"
    kernels: Literal["auto", "torch", "triton"] = "auto"  # see compact_hooks/kernels/dispatch.py
    rules: list[Rule] = Field(default_factory=list)
    links: Literal["all", "inter_host"] = "all"
    # DistriFusion's schedule on the compressed exchange: each call's exchange is used one step later
    stale: bool = False  # see compact_hooks/hooks/stale_compact.py
    stale_fresh_roles: list[str] = Field(default_factory=lambda: ["o"])  # roles exchanged fresh under stale
    # relay rings: per call site, send plain when measured times say the codec costs more than it saves
    plain_when_faster: bool = False  # see compact_hooks/collectives/relay_choice.py

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _int_seconds(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    stats: StatsConfig = StatsConfig()

    @field_validator("compressor", mode="before")
    @classmethod
    def _compressor_builds(cls, value: Any) -> Any:
        # before the type check: a wrong type or key gets the registry's message and key path
        # (compressor, compressor.name, compressor.<param>), not pydantic's "valid string" of the str branch
        build_compressor(value)  # raises ConfigError naming compressor.<param>
        return value

    @field_validator("warmup_compressor", mode="before")
    @classmethod
    def _warmup_compressor_builds(cls, value: Any) -> Any:
        if value is not None:
            build_compressor(value)
        return value

    @field_validator("collectives")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a collective twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _residual_fits_codecs(self) -> "CompactConfig":
        """Codecs that need error feedback (``auto``) get it, at the top level and in every rule (whose
        unset fields come from the top level)."""
        problem = feedback_problem(self.compressor, self.residual)
        if problem:
            raise ConfigError("residual", problem)
        for i, rule in enumerate(self.rules):
            if rule.plain:
                continue
            compressor = rule.compressor if rule.compressor is not None else self.compressor
            problem = feedback_problem(compressor, rule.residual or self.residual)
            if problem:
                raise ConfigError(f"rules[{i}].{'residual' if rule.residual is not None else 'compressor'}", problem)
        return self

    @model_validator(mode="after")
    def _stale_fits(self) -> "CompactConfig":
        if self.stale and self.hook != "compact":
            raise ConfigError("stale", f"\"stale\": true is the compressed stale exchange of hook \"compact\"; with "
                              f"hook {self.hook!r} drop it (hook \"stale\" alone is the uncompressed baseline)")
        if self.stale and self.base_device == "cpu":
            raise ConfigError("stale", "\"stale\": true keeps exchanges in flight across steps, which offloaded "
                              "bases (base_device \"cpu\") do not support; use base_device \"input\"")
        return self

    @model_validator(mode="after")
    def _budget_fits(self) -> "CompactConfig":
        """``auto`` with a byte budget sizes each step from the last step's decoded norms, which the
        stale schedule decodes only in the next step, and shares bytes across call sites, which
        ``plain_when_faster`` may send plain."""
        if not (self.stale or self.plain_when_faster):
            return self
        why = ("which \"stale\": true decodes only in the next step" if self.stale else
               "and shares the bytes across call sites, which \"plain_when_faster\": true may send plain")
        for where, spec in [("compressor", self.compressor)] + [
                (f"rules[{i}].compressor", rule.compressor) for i, rule in enumerate(self.rules)
                if not rule.plain and rule.compressor is not None]:
            if getattr(build_compressor(spec), "budgeted", False):
                raise ConfigError(where, "compressor 'auto' with a byte budget (target_ratio / bytes_of) sizes each "
                                  f"step from the previous step's decoded payloads, {why}; use a fixed codec "
                                  "(e.g. \"int2\") or auto's target_rel_error")
        return self

    def build_compressor(self):
        return build_compressor(self.compressor)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "CompactConfig":
        """These settings with some replaced (a rule's codec settings), and no rules."""
        return self.model_copy(update={**dict(overrides), "rules": []})


def _key_path(loc: tuple[Any, ...], last_is_key: bool = False) -> str:
    """``compact_hooks.a.b[0]`` from a pydantic error location; ``last_is_key``: the final item is a
    (non-string) mapping key, not a list index."""
    parts = [BLOCK]
    for n, item in enumerate(loc):
        if isinstance(item, int) and last_is_key and n == len(loc) - 1:
            parts.append(str(item))
        elif isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif item in ("str", "dict[str,any]", "function-after[_compressor_builds(), union[str,dict[str,any]]]"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_block(block: Any) -> CompactConfig:
    """Validate one ``"compact_hooks"`` block (a mapping); raise :class:`ConfigError` naming the key."""
    if isinstance(block, CompactConfig):
        return block
    if not isinstance(block, Mapping):
        raise ConfigError(BLOCK, f"must be a JSON object; got {type(block).__name__}")
    try:
        return CompactConfig.model_validate(dict(block))
    except ConfigError as exc:
        raise ConfigError(f"{BLOCK}.{exc.key_path}", str(exc).split(": ", 1)[1]) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ConfigError):  # a codec's own error: its path below the field that holds it
            loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "union[")))
            tail = ctx_error.key_path.split(".", 1)[1:] if "." in ctx_error.key_path else []
            where = _key_path(loc) if loc else f"{BLOCK}.{ctx_error.key_path.split('.', 1)[0]}"
            raise ConfigError(".".join([where, *tail]), str(ctx_error).split(": ", 1)[1]) from None
        path = _key_path(tuple(p for p in err["loc"] if not str(p).startswith(("function-", "union["))),
                         last_is_key=err["type"] == "invalid_key")
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            known = _known_keys(tuple(p for p in err["loc"] if not str(p).startswith(("function-", "union["))))
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.7)
            message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "") + \
                (f"; known keys: {', '.join(known)}" if known else "")
            if len(err["loc"]) == 1 and block.get("compact_hooks") is None and _looks_like_deepspeed(block):
                message += "; this looks like a whole DeepSpeed config: put the settings in its \"compact_hooks\" block"
        elif "input" in err and err["type"] != "missing":
            message += f" (got {err['input']!r})"
        raise ConfigError(path, message) from None


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed next to the unknown key at ``loc`` (a pydantic error location), sorted."""
    model: Any = CompactConfig
    for item in loc[:-1]:
        if isinstance(item, int) or model is None:
            continue
        field = model.model_fields.get(str(item))
        candidates = [field.annotation] if field is not None else []
        model = None
        while candidates:  # Optional[list[Rule]] -> Rule
            typ = candidates.pop()
            if isinstance(typ, type) and issubclass(typ, BaseModel):
                model = typ
                break
            candidates.extend(getattr(typ, "__args__", ()))
    return sorted(model.model_fields) if model is not None else []


def misspelt_block(data: Mapping[str, Any]) -> Optional[str]:
    """A top-level key of a DeepSpeed-style config that looks like a misspelt ``"compact_hooks"``
    (``compact_hook``, ``compactHooks``, ``compact-hooks``), when the real block is absent."""
    if BLOCK in data:
        return None
    names = {str(k).lower().replace("-", "_"): str(k) for k in data if str(k) not in CompactConfig.model_fields}
    close = difflib.get_close_matches(BLOCK, list(names), n=1, cutoff=0.8)
    return names[close[0]] if close else None


def check_block_name(data: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming both spellings when ``data`` holds a misspelt block."""
    wrong = misspelt_block(data)
    if wrong is not None:
        raise ConfigError(wrong, f"unknown block; did you mean \"{BLOCK}\"? (without it the settings would be "
                                 f"ignored: rename the block to \"{BLOCK}\")")


def _looks_like_deepspeed(mapping: Mapping[str, Any]) -> bool:
    return any(k in mapping for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "fp16",
                                      "bf16", "zero_optimization", "tensor_parallel", "dtype"))


def read_json(path: Union[str, os.PathLike[str]]) -> dict[str, Any]:
    """Read a JSON file (or a packaged config by name, see compact_hooks/configs); a missing file or bad
    JSON raises :class:`ConfigError`."""
    p = resolve_config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        hint = missing_hint(p) if isinstance(exc, FileNotFoundError) else ""
        raise ConfigError(str(p), f"cannot read the config file: {exc.strerror or exc}{hint}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), f"not a UTF-8 text file (byte {exc.start}): is it really the JSON config?") from None
    except ValueError as exc:  # a path with a NUL byte
        raise ConfigError(str(p).replace("\0", "\\0"), f"not a usable file path: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(p), f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ConfigError(str(p), "not a usable JSON config: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal with more digits than Python converts
        raise ConfigError(str(p), f"not a usable JSON config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), f"the top level must be a JSON object; got {type(data).__name__}")
    return data


def load_config(source: Union[str, os.PathLike[str], Mapping[str, Any], CompactConfig, None]) -> CompactConfig:
    """Read compact-hooks settings.

    ``source`` is a path to a JSON file or a mapping: either a DeepSpeed-style config holding a
    ``"compact_hooks"`` block, or the block itself. ``None`` gives the defaults.
    """
    if source is None:
        return CompactConfig()
    if isinstance(source, CompactConfig):
        return source
    data = read_json(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(data, Mapping):
        raise ConfigError(BLOCK, f"expected a path or a mapping; got {type(source).__name__}")
    check_block_name(data)
    block = data[BLOCK] if BLOCK in data else data
    return parse_block(block)


def strip_config(ds_config: Union[str, os.PathLike[str], Mapping[str, Any]]) -> dict[str, Any]:
    """The DeepSpeed config without its ``"compact_hooks"`` block (a deep copy), for DeepSpeed itself."""
    data = read_json(ds_config) if isinstance(ds_config, (str, os.PathLike)) else ds_config
    out = copy.deepcopy(dict(data))
    out.pop(BLOCK, None)
    return out
