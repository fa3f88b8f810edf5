"""The modelhost server: checkpoint store, model registry, batching and the gRPC service.

Start one with `modelhost serve`, or in Python with `create_server(Settings(...))`.
"""

from modelhost.server.app import Server, create_server, running, serve
from modelhost.server.settings import Settings

__all__ = ["Server", "Settings", "create_server", "running", "serve"]
