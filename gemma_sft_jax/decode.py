r"""Decode entry point: completions of your own prompts, by the base model or with trained weights.

  python -m gemma_sft_jax.decode --config=configs/gemma3.py:size=270m \
      --prompts=in.jsonl --output=out.jsonl --adapter=runs/g3_lora/final
  python -m gemma_sft_jax.decode --config=configs/tiny.py --prompt='Question: 2+2?\nAnswer:'

Rows in: {"prompt": str}; rows out: {"prompt": str, "completion": str}. Greedy when
decode.temperature is 0; otherwise temperature / decode.top_k / decode.top_p sampling.
--adapter is a run's final/ directory (LoRA adapters, added to the base, or full SFT weights) or
a PEFT LoRA adapter directory trained on the same base.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from gemma_sft_jax import runner
from gemma_sft_jax import validation
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import data as data_lib

def _define_flags():
  """This entry point's flags, defined when it runs (`runner.run`)."""
  holders = (
      config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=True),
      flags.DEFINE_string('prompts', None, 'JSONL file with one {"prompt": ...} per line.'),
      flags.DEFINE_string('prompt', None, 'A single prompt; its completion goes to stdout.'),
      flags.DEFINE_string('output', None, 'JSONL file for {"prompt", "completion"} rows.'),
      flags.DEFINE_string('adapter', None, "A run's final/ directory (LoRA or full SFT) or a "
                          'PEFT LoRA adapter directory.'),
      flags.DEFINE_integer('batch_size', 32, 'Prompts per decode batch.'))
  flags.mark_flag_as_required('config')
  return holders


def _decode(config, prompts_file, prompt, output, adapter, batch_size):
  if (prompts_file is None) == (prompt is None):
    raise ValueError('give exactly one of --prompts=IN.jsonl or --prompt=TEXT')
  if prompts_file and not output:
    raise ValueError('--prompts needs --output=OUT.jsonl')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size}: must be >= 1')
  validation.preflight(
      config, 'decode', inputs=[('--prompts', prompts_file)] if prompts_file else (),
      outputs=[('--output', output)] if output else (),
      input_dirs=[('--adapter', adapter)] if adapter else ())
  prompts = ([prompt.replace('\\n', '\n')] if prompt else data_lib.read_prompts(prompts_file))
  mesh = sharding.make_mesh(**config.mesh)
  setup, params = (runner.load_trained(config, adapter, mesh=mesh) if adapter else
                   runner.base_params(config, mesh=mesh))
  setup, params = runner.for_decoding(setup, params)
  completions = runner.decode_prompts(config, setup, params, prompts, batch_size=batch_size)
  if prompt:
    print(completions[0])
    return
  with open(output, 'w') as f:
    for p, c in zip(prompts, completions):
      f.write(json.dumps({'prompt': p, 'completion': c}) + '\n')
  print(f'{len(prompts)} completions -> {output}', file=sys.stderr)


if __name__ == '__main__':
  runner.run(_decode, _define_flags)
