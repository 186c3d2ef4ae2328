"""muxgate gateway: the asyncio WebSocket server, pipelines, backends, Python SDK and CLI."""

__all__: list[str] = []
