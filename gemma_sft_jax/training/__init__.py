"""Training: data, optimizer and fused update, the train step, checkpoints, resume and metrics."""
