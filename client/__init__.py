"""A partner platform's Flower client: trains the shared adapter and its private head on its own data."""
