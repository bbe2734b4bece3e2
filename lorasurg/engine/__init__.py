"""The tensor engine: pure functions on tensors (no files, no nn.Module state, no printing)."""
