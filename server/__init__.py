"""facefed: server."""
