"""The run configuration: every field a config file can set, with its default.

Config files in `configs/` call `base_config()` and change what their model / method needs, then
return the locked ConfigDict. Only the entry points (`main`, `eval`, `decode`, `export`,
`benchmark`), the run phases they call (`runner`; `models.model_setup`, `train.build` and
`train.train`; `exporters.export`; `peft_adapters.load`) and the checks in `validation` and
`resume` read this object; the library below them (model, data, loss, sampler, checkpoints)
takes explicit keyword arguments.

Fields (the contract the README documents):
  model.checkpoint    hub id, local HF dir, or .gguf path; '' = random init of `model.variant`
  model.variant       a named variant (see `architecture.VARIANTS`) used for random init / shape checks
  model.dtype         activation dtype, 'float32' | 'bfloat16'
  model.param_dtype   dtype of the stored (base) parameters, 'float32' | 'bfloat16'
  model.remat         activation rematerialisation, 'none' | 'full' | 'dots' | 'save:PROJ,...'
  model.scan_layers   one nn.scan over the layers (stacked params; compile time independent of depth)
  model.remat_prevent_cse  unrolled layers: keep XLA from merging remat's recomputation (CSE)
  model.remat_after_cotangent  unrolled layers: each layer's backward pass held in its place (docs/remat.md)
  model.save_loss_logits  keep the loss's logits for the backward pass instead of recomputing them
  model.attention     training attention, 'einsum' | 'flash' (Pallas kernels) | 'auto' (GPU: flash)
  tuning_method       'full' | 'lora'
  lora.*              rank, alpha, dropout, targets (regex over parameter paths), base_sharding
  data.*              source (local dir, default the bundled GSM8K; or a hub id), subset, ...
  optim.*             lr, min_lr (absolute), warmup_steps, weight_decay, state_dtype, ...
  train.*             steps, batch_size (global), seq_len, seed, log_every, ...
  checkpoint.*        every_steps, keep
  eval.*              prompt_strategy, num_shots, limit, max_new_tokens, ...
  decode.*            temperature, max_new_tokens, top_k, top_p
  mesh.*              data, fsdp, tensor (-1 = all remaining devices)
  wandb.*             mode ('online' | 'offline' | 'disabled'), project, name
"""

from __future__ import annotations

import ml_collections

from gemma_sft_jax.evaluation import gsm8k


def base_config() -> ml_collections.ConfigDict:
  """Returns the default (unlocked) run configuration."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ''
  c.model.variant = 'tiny_gemma3'
  c.model.tokenizer = ''  # '' = the checkpoint's own tokenizer
  c.model.dtype = 'float32'
  c.model.param_dtype = 'float32'
  c.model.remat = 'none'  # 'none' | 'full' | 'dots' | 'save:q_proj,...' (model.remat_policy)
  # One nn.scan over the layers (stacked 'layers/...' params): compile time independent of depth.
  c.model.scan_layers = False
  # Unrolled layers with remat: jax.checkpoint's barriers against XLA merging the recomputation
  # with the forward pass. False lets XLA keep what it finds cheaper to keep (more memory, less
  # work; Gemma 2 2B full SFT: configs/gemma2.py). Scanned layers ignore it (they need none).
  c.model.remat_prevent_cse = True
  # Unrolled layers with remat: each layer's backward pass held in its place by two optimization
  # barriers (in place of jax.checkpoint's): its recomputation waits for its output's cotangent,
  # and its weight gradients are done before the layer below starts (docs/remat.md).
  c.model.remat_after_cotangent = False
  # Dtype of the vocab-chunk logits matmul in the loss: bfloat16 keeps its backward in bf16
  # (faster; BENCHMARKS.md); softmax statistics are fp32 either way.
  c.model.logits_dtype = 'float32'
  # Keep the loss's [tokens, vocab] logits (in logits_dtype) for the backward pass instead of
  # recomputing them: one matmul of the head fewer, for tokens x vocab x 2-4 bytes of memory.
  c.model.save_loss_logits = False
  # Attention in training and evaluation loss (no KV cache): 'einsum' (the reference path, any
  # backend), 'flash' (fused Pallas kernels that never write the scores to memory; GPU, or the
  # Pallas interpreter elsewhere) or 'auto' (flash on GPU where it applies, einsum otherwise).
  c.model.attention = 'auto'

  c.tuning_method = 'full'

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.dropout = 0.0
  c.lora.targets = r'.*/(q|k|v|o|gate|up|down)_proj/kernel'
  # The frozen base along the mesh's fsdp axis: 'fsdp' (split like trainable weights: least
  # memory, gathered layer by layer in every step), 'replicated' (a whole copy per fsdp shard:
  # no gathers), or 'auto' (replicated where it takes at most a quarter of a device's memory).
  c.lora.base_sharding = 'auto'

  c.data = ml_collections.ConfigDict()
  # GSM8K as shipped with the package (offline); 'openai/gsm8k' reads the hub through `datasets`.
  c.data.source = gsm8k.BUNDLED_DIR
  c.data.subset = 'main'
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.prompt_template = 'Question: {question}\nAnswer:'
  c.data.strip_calculator = True
  c.data.packing = True
  c.data.limit = 0  # 0 = all training examples
  c.data.skip_bad_rows = False

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.min_lr = 1e-6
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 0  # 0 = train.steps
  c.optim.weight_decay = 0.0
  c.optim.decay_embeddings = False
  c.optim.state_dtype = 'int8'  # 'int8' | 'bfloat16' | 'float32'
  c.optim.clip_norm = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.stochastic_rounding = True  # bf16 params and bf16 moments (state_dtype) only
  # 'auto': on GPUs, each leaf with 8-bit moments is updated by one Pallas kernel per shard;
  # 'xla': always XLA's fused update (docs/optimizer.md, "The training update").
  c.optim.update_kernel = 'auto'
  c.optim.grad_accum = 1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8
  c.train.seq_len = 512
  c.train.seed = 0
  c.train.log_every = 10

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.run_base = True
  c.eval.run_sft = True
  c.eval.prompt_strategy = 'zero_shot'  # 'zero_shot' | 'one_shot' | 'few_shot'
  c.eval.num_shots = 8
  c.eval.one_shot_example = ''  # '' = first train example; or "question|||answer"
  c.eval.limit = 0  # 0 = the whole test split
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 256
  # Self-consistency: >1 also samples this many completions per question (maj@k, pass@k).
  c.eval.num_samples = 1
  c.eval.temperature = 0.7
  c.eval.top_p = 1.0

  c.decode = ml_collections.ConfigDict()
  c.decode.temperature = 0.0
  c.decode.top_k = 0
  c.decode.top_p = 1.0
  c.decode.max_new_tokens = 256

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = 'disabled'
  c.wandb.project = 'gemma_sft_jax'
  c.wandb.name = ''
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config-file argument 'k1=v1,k2=v2' into a ConfigDict over `defaults`.

  Unknown keys are an error naming the key, so a typo never silently falls back to a default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config argument {item!r}: expected key=value')
    if key not in defaults:
      raise ValueError(f'config argument {key!r}: unknown (known: {", ".join(defaults)})')
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out
