"""Pure-PyTorch building blocks shared by every modformer model."""
