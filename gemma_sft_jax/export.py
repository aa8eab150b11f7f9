r"""Export entry point: a run's weights (or the base model) for transformers, PEFT or llama.cpp.

  python -m gemma_sft_jax.export --config=configs/gemma3.py:size=270m --workdir=runs/g3_full \
      --format=hf --output=exports/g3_full_hf
  python -m gemma_sft_jax.export --config=configs/gemma3.py:size=270m,method=lora \
      --workdir=runs/g3_lora --format=peft --output=exports/g3_lora_peft
  python -m gemma_sft_jax.export --config=configs/gemma3.py:size=270m --workdir=runs/g3_full \
      --format=gguf --dtype=bfloat16 --output=exports/g3_full.gguf
  python -m gemma_sft_jax.export --config=configs/gemma3.py:size=270m --base --format=hf \
      --output=exports/g3_270m_hf

--format=hf writes a transformers model directory (LoRA adapters merged into the base), peft the
adapters of a LoRA run, gguf one llama.cpp file. The output is written beside its final path and
renamed into place when complete; an existing output is replaced only with --overwrite.
"""

from absl import flags
import jax
from ml_collections import config_flags

from gemma_sft_jax import runner
from gemma_sft_jax import validation
from gemma_sft_jax.weights import exporters

def _define_flags():
  """This entry point's flags, defined when it runs (`runner.run`)."""
  holders = (
      config_flags.DEFINE_config_file('config', None, "The run's config (and its overrides).",
                                      lock_config=True),
      flags.DEFINE_string('workdir', None, 'Run directory (its final/ weights are exported).'),
      flags.DEFINE_enum('format', None, list(exporters.FORMATS), 'What to write.'),
      flags.DEFINE_string('output', None, 'Directory (hf, peft) or .gguf file to write.'),
      flags.DEFINE_bool('base', False, 'Export the base checkpoint, not the trained weights.'),
      flags.DEFINE_enum('dtype', 'float32', list(exporters.DTYPES),
                        'Weights dtype of hf and gguf exports (float32 is exact).'),
      flags.DEFINE_bool('overwrite', False, 'Replace an existing output.'),
      flags.DEFINE_float('max_shard_mb', 5000, 'hf: safetensors files split above this size.'))
  flags.mark_flags_as_required(['config', 'format', 'output'])
  return holders


def _export(config, workdir, fmt, output, base, dtype, overwrite, max_shard_mb):
  if not base and not workdir:
    raise ValueError('give --workdir=RUN (its final/ weights), or --base for the base model')
  validation.preflight(config, 'export')
  path = exporters.export(config, workdir=workdir, fmt=fmt, output=output, base=base, dtype=dtype,
                          overwrite=overwrite, max_shard_mb=max_shard_mb)
  if jax.process_index() == 0:
    print(f'{fmt} export: {path}')


if __name__ == '__main__':
  runner.run(_export, _define_flags)
