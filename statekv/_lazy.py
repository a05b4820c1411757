"""Lazy package attributes (PEP 562): a package's public names imported on first use, so that importing the package
(or a cheap submodule of it) does not pay for torch and transformers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, namespace: dict[str, Any], exports: dict[str, str]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package` whose module namespace is `namespace`: a name in `exports` (public
    name -> defining module) or a submodule used as an attribute is imported on first access, then kept in the
    namespace so later look-ups skip the function."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        else:  # a submodule used as an attribute (`statekv.policies.StateKV`), as when __init__ imported them all
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", ())})

    return __getattr__, __dir__
