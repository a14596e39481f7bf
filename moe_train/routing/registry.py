"""The one table of router kinds: `kind` -> Router class.

Every fact about a kind (experts per token, gate width, expected destination ranks, layout rules,
field checks) is a class attribute or classmethod of its Router class, looked up here, so a new
router is one file:

    @register_router("my_router")
    class MyRouter(Router):
        def route(self, logits, ctx): ...

and nothing outside moe_train/routing/ compares kind strings. The built-in kinds register when
the package's __init__ imports their modules, which Python runs before any module of the package
(this one included) can be used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # the classes import config, which imports this module
    from .base import Router

R = TypeVar("R", bound="type[Router]")

_ROUTERS: dict[str, type[Router]] = {}


def register_router(kind: str) -> Callable[[R], R]:
    """Class decorator: make `cls` the router of `router.kind=<kind>` (sets `cls.kind`)."""

    def add(cls: R) -> R:
        old = _ROUTERS.get(kind)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"router kind {kind!r} is already registered by {old.__qualname__}")
        cls.kind = kind
        _ROUTERS[kind] = cls
        return cls

    return add


def unregister_router(kind: str) -> None:
    """Remove a kind (for tests that register a router of their own)."""
    _ROUTERS.pop(kind, None)


def router_class(kind: str) -> type[Router]:
    """The Router class of `kind`; ValueError naming router.kind and the allowed kinds."""
    try:
        return _ROUTERS[kind]
    except KeyError:
        raise ValueError(
            f"router.kind: got {kind!r}; allowed: {', '.join(router_kinds())}"
        ) from None


def router_kinds() -> tuple[str, ...]:
    """The registered kinds, built-ins first, in registration order."""
    return tuple(_ROUTERS)
