"""facefed: simulations."""
