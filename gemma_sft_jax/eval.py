r"""Eval entry point: GSM8K accuracy of a run's trained weights, or of the base model.

  python -m gemma_sft_jax.eval --config=configs/tiny.py --workdir=runs/tiny
  python -m gemma_sft_jax.eval --config=configs/gemma3.py:size=270m --workdir=runs/base --base \
      --config.eval.prompt_strategy=few_shot --config.eval.num_shots=8

Without --base it evaluates WORKDIR/final (written at the end of training), or --adapter (a run's
final/ directory or a PEFT LoRA adapter trained on the same base); with --base, or when WORKDIR
has no trained weights, the checkpoint named by model.checkpoint. Results go to
WORKDIR/eval_<model>_<prompts>_<digest>.json and predictions beside it, named by every setting
that changes them (the digest), so no evaluation overwrites another's.
"""

import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from gemma_sft_jax import runner
from gemma_sft_jax import validation
from gemma_sft_jax.evaluation import evaluator as evaluate
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import train as train_lib

def _define_flags():
  """This entry point's flags, defined when it runs (`runner.run`)."""
  holders = (
      config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=True),
      flags.DEFINE_string('workdir', None, 'Run directory (its final/ weights are evaluated).'),
      flags.DEFINE_bool('base', False, 'Evaluate the base checkpoint, not the trained weights.'),
      flags.DEFINE_string('adapter', None, "Trained weights instead of WORKDIR/final: a run's "
                          'final/ directory or a PEFT LoRA adapter directory.'))
  flags.mark_flags_as_required(['config', 'workdir'])
  return holders


def _evaluate(config, workdir, use_base, adapter):
  validation.preflight(config, 'eval', workdir=workdir,
                       input_dirs=[('--adapter', adapter)] if adapter else ())
  mesh = sharding.make_mesh(**config.mesh)
  final = adapter or os.path.join(workdir, 'final')
  if not use_base and not os.path.isdir(final):
    logging.warning('%s has no trained weights: evaluating the base model', workdir)
    use_base = True
  setup, params = (runner.base_params(config, mesh=mesh) if use_base else
                   runner.load_trained(config, final, mesh=mesh))
  label = 'base' if use_base else 'sft'
  result = runner.run_gsm8k_eval(config, setup, params, out_dir=workdir, label=label, mesh=mesh,
                                 weights='base' if use_base else os.path.abspath(final))
  path = os.path.join(workdir, f'eval_{runner.eval_name(label, config, result["settings"])}.json')
  if jax.process_index() != 0:
    return
  train_lib.write_json(path, result)
  print(evaluate.format_table({label: result}))
  print(f'results: {path}\npredictions: {result["predictions"]}')


if __name__ == '__main__':
  runner.run(_evaluate, _define_flags)
