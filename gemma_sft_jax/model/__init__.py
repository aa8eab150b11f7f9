"""The model: Gemma 2/3 architecture, the Flax Transformer, LoRA, the loss and sharding rules."""
