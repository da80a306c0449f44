"""Loss registry: one name per loss class, `build_loss(name, **params)` to construct one from a config."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ctxsim.errors import ConfigError

__all__ = ["available_losses", "build_loss", "get_loss_class", "normalize_loss_name", "register_loss"]

_REGISTRY: dict[str, type[nn.Module]] = {}

# Arguments the trainer always passes; a loss that does not take them simply does not receive them.
_OPTIONAL_CONTEXT = ("num_classes", "embedding_dim")

T = TypeVar("T", bound=type)


def normalize_loss_name(name: str) -> str:
    """Canonical spelling of a loss name: lower case, '_' written as '-', surrounding blanks removed."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"loss name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("_", "-")


def register_loss(name: str) -> Callable[[T], T]:
    """Class decorator that registers a loss under `name`; a name used twice raises ConfigError."""
    key = normalize_loss_name(name)

    def deco(cls: T) -> T:
        if key in _REGISTRY:
            raise ConfigError(
                f"loss name {key!r} is already registered to {_REGISTRY[key].__qualname__}; pick another name"
            )
        _REGISTRY[key] = cls
        return cls

    return deco


def available_losses() -> list[str]:
    """Sorted names of every registered loss."""
    return sorted(_REGISTRY)


def get_loss_class(name: str) -> type[nn.Module]:
    """The class registered under `name`; ConfigError listing the known names if there is none."""
    key = normalize_loss_name(name)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ConfigError(
            f"unknown loss {name!r}; choose one of: {', '.join(available_losses())}"
        ) from None


def _init_params(cls: type[Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in list(sig.parameters.items())[1:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return params, var_kw


def build_loss(name: str, **params: Any) -> nn.Module:
    """Construct the loss registered under `name` with `params`.

    `num_classes` and `embedding_dim` are passed only to losses that accept them (the proxy losses), so a
    trainer may always pass them. Unknown or missing parameters raise ConfigError naming them.
    """
    cls = get_loss_class(name)
    key = normalize_loss_name(name)
    accepted, var_kw = _init_params(cls)
    kwargs = {}
    unknown = []
    for k, v in params.items():
        if k in accepted or var_kw:
            kwargs[k] = v
        elif k in _OPTIONAL_CONTEXT:
            continue
        else:
            unknown.append(k)
    if unknown:
        raise ConfigError(
            f"loss {key!r} does not take parameter(s) {', '.join(sorted(unknown))}; "
            f"it accepts: {', '.join(accepted) or '(none)'}"
        )
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"loss {key!r} needs parameter(s) {', '.join(missing)}")
    return cls(**kwargs)
