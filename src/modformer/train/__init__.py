"""Training: configuration, the training loop, checkpoints and distributed setup."""
