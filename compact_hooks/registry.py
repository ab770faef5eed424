"""The compressor registry: names to codec classes, built-ins plus entry-point plugins."""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping, TypeVar, Union

from .compressors.base import Compressor
from .errors import ConfigError

ENTRY_POINT_GROUP = "compact_hooks.compressors"

CompressorSpec = Union[str, Mapping[str, Any], Compressor]
C = TypeVar("C", bound=type[Compressor])


BUILTIN_MODULES = ("cast", "quantize", "fp8", "sparse", "lowrank", "adaptive")


@dataclass
class Registry:
    """A name -> Compressor-class table. The process-wide table is :data:`REGISTRY` (the one
    piece of process-wide state, as with any plugin registry); tests may build their own."""

    classes: dict[str, type[Compressor]] = field(default_factory=dict)
    entry_points_loaded: bool = False

    def register(self, name: str, cls: type[Compressor]) -> type[Compressor]:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"compressor names are non-empty [A-Za-z0-9_-]; got {name!r}")
        existing = self.classes.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"compressor name {name!r} is already registered to {existing.__qualname__}")
        cls.name = name
        self.classes[name] = cls
        return cls

    def load_entry_points(self) -> None:
        """Import the built-in codec modules and the classes that installed packages declare in the
        ``compact_hooks.compressors`` entry-point group."""
        if self.entry_points_loaded:
            return
        self.entry_points_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"compact_hooks.compressors.{module}")
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.classes:
                continue
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Compressor)):
                raise TypeError(f"entry point {ep.name!r} = {ep.value!r} is not a Compressor subclass")
            self.register(ep.name, cls)

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self.classes)

    def get(self, name: str) -> type[Compressor]:
        if name not in self.classes:
            self.load_entry_points()
        if name not in self.classes:
            raise ConfigError(
                "compressor.name",
                f"unknown compressor {name!r}; registered: {', '.join(self.names())}. "
                f"Third-party codecs register through the entry-point group {ENTRY_POINT_GROUP!r}.",
            )
        return self.classes[name]

    def build(self, spec: CompressorSpec) -> Compressor:
        if isinstance(spec, Compressor):
            return spec
        if isinstance(spec, str):
            name, params = spec, {}
        elif isinstance(spec, Mapping):
            if "name" not in spec:
                raise ConfigError("compressor", f"a compressor spec needs a 'name'; got {dict(spec)!r}")
            params = {k: v for k, v in spec.items() if k != "name"}
            name = spec["name"]
            if not isinstance(name, str):
                raise ConfigError("compressor.name", f"must be a string; got {name!r}")
        else:
            raise ConfigError("compressor", f"must be a name or a mapping with a 'name'; got {spec!r}")
        cls = self.get(name)
        accepted = _keyword_params(cls)
        for key in params:
            if accepted is not None and key not in accepted:
                raise ConfigError(
                    f"compressor.{key}",
                    f"{name!r} has no parameter {key!r}; its parameters: {', '.join(sorted(accepted)) or 'none'}",
                )
        try:
            return cls(**params)
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError) as exc:
            bad = _named_param(str(exc), params)
            raise ConfigError(f"compressor.{bad}" if bad else "compressor", f"{name!r}: {exc}") from exc


def _keyword_params(cls: type) -> set[str] | None:
    sig = inspect.signature(cls.__init__)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_POSITIONAL}


def _named_param(message: str, params: Mapping[str, Any]) -> str | None:
    """The parameter a codec's error message is about: the one it names first, as a whole word
    (``"m (the block length) ..."`` is about ``m``, not ``n``, though the text contains an n)."""
    best: tuple[int, str] | None = None
    for key in params:
        found = re.search(rf"(?<![A-Za-z0-9_]){re.escape(str(key))}(?![A-Za-z0-9_])", message)
        if found is not None and (best is None or found.start() < best[0]):
            best = (found.start(), str(key))
    return best[1] if best else None


REGISTRY = Registry()


def _registry() -> Registry:
    return REGISTRY


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator: ``@register_compressor("int2")`` makes the class buildable by that name."""

    def decorate(cls: C) -> C:
        _registry().register(name, cls)
        return cls

    return decorate


def build_compressor(spec: CompressorSpec) -> Compressor:
    """Build a codec from a name (``"int2"``), a dict (``{"name": "lowrank", "rank": 32}``) or pass one through."""
    return _registry().build(spec)


def available_compressors() -> list[str]:
    """Names of every registered codec, plugins included."""
    return _registry().names()
