"""Registry of adapter methods. A method is one module here; `@register` makes it selectable by name."""

from __future__ import annotations

from loraplex.core.adapter import Adapter

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    if not cls.method:
        raise ValueError(f"{cls.__name__} has no `method` name")
    _REGISTRY[cls.method] = cls
    return cls


def available() -> dict[str, type[Adapter]]:
    return dict(_REGISTRY)


def get(name: str) -> type[Adapter]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def _import_all() -> None:
    """Import every module of this package so each registers its method (adding a method = adding a file)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
