"""Weights in and out: HF safetensors / GGUF loading, tokenizers, PEFT adapters and exports."""
