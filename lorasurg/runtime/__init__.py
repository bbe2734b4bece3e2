"""nn.Module wrappers that inject LoRA into a live model; their math calls lorasurg.engine."""
