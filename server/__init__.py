"""The Flower coordinator: holds the global LoRA adapter and aggregates only adapter tensors."""
