"""Scheme configs and the registry from config type to implementation.

A new scheme is one file in ``schemes/`` holding a frozen config dataclass and a
:class:`~torchrec_compress.schemes.base.TableScheme` subclass, tied together by
``@register_scheme(Config)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Type, TypeVar

__all__ = ["SchemeConfig", "register_scheme", "registered_schemes", "scheme_class_for", "scheme_types"]


@dataclasses.dataclass(frozen=True)
class SchemeConfig:
    """Base of every scheme config.

    ``ratio`` is the target compression against the fp32 logical table
    (``num_embeddings * embedding_dim * 4`` bytes); each scheme derives its sizes
    from it unless its explicit size parameters are given instead.
    """

    ratio: Optional[float] = None

    def __post_init__(self) -> None:
        if self.ratio is not None:
            if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool):
                raise ValueError(f"{type(self).__name__}: ratio must be a number, got {self.ratio!r}")
            if not self.ratio >= 1.0:
                raise ValueError(
                    f"{type(self).__name__}: ratio={self.ratio!r} is not allowed; "
                    "it is the compression factor against the fp32 table and must be >= 1"
                )

    @property
    def name(self) -> str:
        return type(self).__name__

    def _ratio_or(self, field: str) -> None:
        """Sizes come from exactly one of ``ratio=`` and the explicit ``field=``."""
        value = getattr(self, field)
        if (self.ratio is None) == (value is None):
            raise ValueError(f"{self.name}: give exactly one of ratio= or {field}=, got ratio={self.ratio!r}, {field}={value!r}")


_REGISTRY: Dict[Type[SchemeConfig], type] = {}
T = TypeVar("T", bound=type)


def register_scheme(config_type: Type[SchemeConfig]) -> Callable[[T], T]:
    """Class decorator: ``@register_scheme(Hashing) class HashingScheme(TableScheme)``."""

    def deco(impl: T) -> T:
        if config_type in _REGISTRY:
            raise ValueError(f"scheme config {config_type.__name__} is already registered to {_REGISTRY[config_type].__name__}")
        _REGISTRY[config_type] = impl
        return impl

    return deco


def registered_schemes() -> Dict[Type[SchemeConfig], type]:
    """Every registered config type -> its scheme class (importing ``torchrec_compress.schemes``
    registers the built-in ones), in registration order."""
    from . import schemes  # noqa: F401  (fills the registry)

    return dict(_REGISTRY)


def scheme_types() -> Dict[str, Type[SchemeConfig]]:
    """Config name (YAML ``type:``) -> config type of every scheme a user may choose (the
    ones with ``public = True``; e.g. ``MixedPrecision`` is built by export, not chosen)."""
    return {c.__name__: c for c, impl in registered_schemes().items() if getattr(impl, "public", True)}


def presets() -> Dict[str, Callable[[float, int], SchemeConfig]]:
    """Benchmark name -> ``(ratio, dim) -> config`` of every scheme that declares presets
    (``TableScheme.presets``), e.g. ``{"hashing": ..., "fiited_prior": ...}``."""
    out: Dict[str, Callable[[float, int], SchemeConfig]] = {}
    for impl in registered_schemes().values():
        for name, make in getattr(impl, "presets", {}).items():
            if name in out:
                raise ValueError(f"benchmark preset {name!r} is declared by two schemes")
            out[name] = make
    return out


def ranked_presets() -> List[str]:
    """Presets that assume ids numbered by descending frequency (``TableScheme.ranked_presets``):
    only data whose vocabularies are built by count (the CSV readers') runs them."""
    return [n for impl in registered_schemes().values() for n in getattr(impl, "ranked_presets", ())]


def scheme_class_for(config: SchemeConfig) -> type:
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        raise ValueError(f"no scheme registered for config {config!r}; known schemes: {known}") from None


def _check_positive_int(owner: str, field: str, value: Optional[int]) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {field} must be a positive int, got {value!r}")


def _check_steps(owner: str, field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}: {field} must be an int >= 0 (training steps), got {value!r}")


def unregister_scheme(config_type: Type[SchemeConfig]) -> None:
    """Remove a registration (a scheme registered inside a test or a notebook)."""
    _REGISTRY.pop(config_type, None)
