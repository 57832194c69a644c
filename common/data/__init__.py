"""Interaction logs and item texts in one schema, their loaders, the split, and the embedded default."""
