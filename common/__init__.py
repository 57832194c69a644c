"""What the Pollen server and clients share: data, model, training, evaluation and config."""
