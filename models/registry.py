"""Name -> builder registry for the architectures in this package.

Builders register themselves with ``@register_model`` when their module is
imported; ``models/__init__.py`` imports every architecture module so that
``get_model`` sees them all.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    """Register ``builder`` under its function name; a second builder with the same name raises."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"a model named {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build the model registered as ``name`` with ``num_classes`` outputs.

    ``options`` go to the builder (for example ``stem="cifar"`` for the ResNets).
    An unknown name or an option the builder does not take raises ``ValueError``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    builder = _REGISTRY[name]
    accepted = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    return builder(num_classes=num_classes, **options)
