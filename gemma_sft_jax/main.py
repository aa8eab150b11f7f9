r"""Train entry point: base eval -> SFT -> SFT eval -> results.json.

  python -m gemma_sft_jax.main --config=configs/tiny.py --workdir=runs/tiny
  python -m gemma_sft_jax.main --config=configs/gemma3.py:size=270m,method=lora \
      --workdir=runs/g3_lora --config.train.steps=500 --config.eval.limit=200

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

from absl import flags
from ml_collections import config_flags

from gemma_sft_jax import runner

def _define_flags():
  """This entry point's flags, defined when it runs (`runner.run`)."""
  config = config_flags.DEFINE_config_file(
      'config', None, 'Run config file (configs/*.py[:args]).', lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
  flags.mark_flags_as_required(['config', 'workdir'])
  return config, workdir


if __name__ == '__main__':
  runner.run(runner.train_and_evaluate, _define_flags)
