"""facefed: common.privacy."""
