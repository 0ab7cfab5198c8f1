"""facefed: common."""
