"""Evaluation: the sampler, the GSM8K task (prompts, answer extraction) and the evaluator."""
