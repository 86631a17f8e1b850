"""Fine-tuning: data (``data``), settings (``config``), the training loop (``recipe``), checkpoints (``state``)."""
