"""Federated training: what a site runs when the coordinator asks it for a DP model update."""
