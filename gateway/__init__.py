"""muxgate gateway: the asyncio WebSocket server, pipelines, backends, Python SDK and CLI.

The SDK is re-exported here: ``from gateway import Client, AsyncClient`` (see
``gateway/client/``).
"""

from . import client as _client
from .client import *  # noqa: F403 - the SDK's public names, listed once in gateway/client

__all__ = list(_client.__all__)
