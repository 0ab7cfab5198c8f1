"""facefed: client."""
