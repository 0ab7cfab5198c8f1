"""facefed: common.crypto."""
