"""The item text encoder (shared, LoRA), the private recommendation head, and the two put together."""
