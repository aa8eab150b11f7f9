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

from absl import app
from absl import flags
from ml_collections import config_flags

from gemma_sft_jax import data as data_lib
from gemma_sft_jax import runner
from gemma_sft_jax import sharding
from gemma_sft_jax import validation

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=True)
_PROMPTS = flags.DEFINE_string('prompts', None, 'JSONL file with one {"prompt": ...} per line.')
_PROMPT = flags.DEFINE_string('prompt', None, 'A single prompt; its completion goes to stdout.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSONL file for {"prompt", "completion"} rows.')
_ADAPTER = flags.DEFINE_string('adapter', None, "A run's final/ directory (LoRA or full SFT) or a "
                               'PEFT LoRA adapter directory.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Prompts per decode batch.')
flags.mark_flag_as_required('config')


def _decode(config):
  if (_PROMPTS.value is None) == (_PROMPT.value is None):
    raise ValueError('give exactly one of --prompts=IN.jsonl or --prompt=TEXT')
  if _PROMPTS.value and not _OUTPUT.value:
    raise ValueError('--prompts needs --output=OUT.jsonl')
  if _BATCH.value < 1:
    raise ValueError(f'--batch_size={_BATCH.value}: must be >= 1')
  validation.preflight(
      config, 'decode', inputs=[('--prompts', _PROMPTS.value)] if _PROMPTS.value else (),
      outputs=[('--output', _OUTPUT.value)] if _OUTPUT.value else (),
      input_dirs=[('--adapter', _ADAPTER.value)] if _ADAPTER.value else ())
  prompts = ([_PROMPT.value.replace('\\n', '\n')] if _PROMPT.value else
             data_lib.read_prompts(_PROMPTS.value))
  mesh = sharding.make_mesh(**config.mesh)
  setup, params = (runner.load_trained(config, _ADAPTER.value, mesh=mesh) if _ADAPTER.value else
                   runner.base_params(config, mesh=mesh))
  setup, params = runner.for_decoding(setup, params)
  completions = runner.decode_prompts(config, setup, params, prompts, batch_size=_BATCH.value)
  if _PROMPT.value:
    print(completions[0])
    return
  with open(_OUTPUT.value, 'w') as f:
    for p, c in zip(prompts, completions):
      f.write(json.dumps({'prompt': p, 'completion': c}) + '\n')
  print(f'{len(prompts)} completions -> {_OUTPUT.value}', file=sys.stderr)


main = runner.absl_main(_decode, _CONFIG)


if __name__ == '__main__':
  app.run(main, flags_parser=runner.parse_flags)
