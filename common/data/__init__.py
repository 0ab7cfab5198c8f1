"""facefed: common.data."""
