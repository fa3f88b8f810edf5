"""The modelhost server: checkpoint store, model registry, batching and the gRPC service.

Start one with `modelhost serve`, or in Python with `create_server(Settings(...))`.

The names below are imported when first used (PEP 562), so importing a light module
such as `modelhost.server.settings` does not import the server, or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelhost.server.app import Server, create_server, running, serve
    from modelhost.server.settings import Settings

__all__ = ["Server", "Settings", "create_server", "running", "serve"]

_HOMES = {
    "Server": "app",
    "create_server": "app",
    "running": "app",
    "serve": "app",
    "Settings": "settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
