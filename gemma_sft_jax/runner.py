"""What the entry points (main, eval, decode) share: JAX start-up, error exits, run phases.

The entry points stay thin; the phases here read the run config and call the library with
explicit arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging as logging_std
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import app
from absl import logging
import jax
import ml_collections

from gemma_sft_jax import validation
from gemma_sft_jax.evaluation import evaluator as evaluate
from gemma_sft_jax.evaluation import gsm8k
from gemma_sft_jax.evaluation import sampler
from gemma_sft_jax.model import lora
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import checkpointing
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.training import resume
from gemma_sft_jax.training import train as train_lib
from gemma_sft_jax.weights import models
from gemma_sft_jax.weights import peft_adapters

# Errors that mean "the input is wrong": reported in one line, exit status 2. KeyError is not
# one of them: a missing key is a bug, and its traceback should show.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
             train_lib.TrainingError)
# The exit status of a run stopped by Ctrl-C, as a shell reports SIGINT.
INTERRUPTED_STATUS = 130


class Interrupted(Exception):
  """Ctrl-C stopped the run (a checkpoint was saved if training was under way)."""


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of libraries: orbax (it logs every save step by step) and JAX's backend
  probing (an 'Unable to initialize backend tpu' line on every machine without one); their
  warnings still show."""

  _SOURCES = ('/orbax/', 'xla_bridge.py')

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(
        s in record.pathname for s in self._SOURCES)


def compilation_cache_dir(env: dict[str, str] | None = None) -> str | None:
  """Where compiled programs persist between runs (None: nowhere).

  JAX_COMPILATION_CACHE_DIR when set; else GEMMA_SFT_JAX_COMPILATION_CACHE ('0' turns the cache
  off, a path moves it); else gemma_sft_jax/jax under $XDG_CACHE_HOME (default ~/.cache).
  """
  env = os.environ if env is None else env
  if env.get('JAX_COMPILATION_CACHE_DIR'):
    return env['JAX_COMPILATION_CACHE_DIR']
  choice = env.get('GEMMA_SFT_JAX_COMPILATION_CACHE', '')
  if choice.lower() in ('0', 'off', 'false', 'no'):
    return None
  if choice:
    return os.path.expanduser(choice)
  base = env.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'gemma_sft_jax', 'jax')


def setup_jax() -> None:
  """Multi-host initialisation when the environment describes several processes; the persistent
  compilation cache (`compilation_cache_dir`).

  `jax.distributed.initialize()` finds the coordinator itself on TPU pods, under SLURM, and with
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set (see launch/).
  """
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  elif env.get('SLURM_NTASKS', '1') != '1' or env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()  # Finds the coordinator in the SLURM / TPU environment.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  cache = compilation_cache_dir(env)
  if not cache:
    return
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError as e:
    logging.warning('compilation cache %s: %s; compiling without it', cache, e)
    return
  logging.info('JAX compilation cache: %s', cache)
  jax.config.update('jax_compilation_cache_dir', cache)
  # JAX keeps only programs that took >= 1 s to compile; keep the small ones of a start-up too
  # (random init, dtype conversions, PRNG seeding). On a 2-core CPU that is neither faster nor
  # slower; where compiling is dearer (GPU, TPU) it spares those compiles. An explicit
  # JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still wins.
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in env:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def _config_error(error: BaseException, argv: Sequence[str]) -> str:
  """One line for a flag or config that cannot be parsed, naming the flag."""
  root = error
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  if isinstance(root, KeyError) and isinstance(error, (AttributeError, KeyError)):
    # A mistyped key: ml_collections names only its last part ('stepz'), so find the flag.
    name = str(root.args[0]).strip("'")
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.')
                 and name in a.split('=')[0].split('.')[1:]), f'--config...{name}')
    hint = re.search(r'Did you mean "([^"]+)"', str(error))
    return f'{flag}: no such config key' + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
  if isinstance(root, OSError) and not isinstance(error, flags.Error):
    return f'--config: {str(root).strip().splitlines()[-1].strip()}'  # The file's own error.
  head = str(error).split(': ')[0] if str(error).startswith('flag --') else ''
  cause = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
  return f'{head}: {cause}' if head and root is not error else str(error).splitlines()[0]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for the entry points (`app.run(main, flags_parser=parse_flags)`): a
  flag or config that cannot be parsed (a mistyped key, a missing config file, a bad config
  argument or value) is one line naming it, and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      # ml_collections hands out a stand-in for a file that failed to load, which raises its
      # error on the first access; make that happen here.
      _ = flags.FLAGS['config'].value.keys
    return rest
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    print(f'error: {_config_error(e, argv)}', file=sys.stderr, flush=True)
    sys.exit(2)


def shutdown_jax() -> None:
  """Leaves the multi-host group cleanly (a no-op for one process)."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def absl_main(fn: Callable[..., Any], *flag_holders: Any) -> Callable[[list[str]], None]:
  """The `main(argv)` of an entry point: no positional arguments, JAX set up (`setup_jax`), then
  fn(flag values...) with bad input reported in one line (`exit_on_bad_input`)."""
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    setup_jax()
    exit_on_bad_input(fn, *(f.value for f in flag_holders))
  return main


def run(fn: Callable[..., Any], define_flags: Callable[[], Sequence[Any]]) -> None:
  """Runs an entry point: defines its flags, parses them (`parse_flags`), then `absl_main(fn)`.

  Args:
    fn: called with the value of each flag `define_flags` returns, in its order.
    define_flags: defines the entry point's absl flags and returns their holders. The flags are
      defined when the entry point runs, not when its module is imported: entry points share
      names (--config, --workdir, --output) that absl allows once per process.
  """
  app.run(absl_main(fn, *define_flags()), flags_parser=parse_flags)


def exit_on_bad_input(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """Runs fn; bad input becomes one line on stderr and exit status 2 (no traceback), Ctrl-C one
  line and status 130. The multi-host group is left in every case."""
  try:
    return fn(*args, **kwargs)
  except BAD_INPUT as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)
  except (Interrupted, KeyboardInterrupt) as e:
    print(f'error: {str(e) or "interrupted (Ctrl-C)"}', file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_STATUS)
  finally:
    shutdown_jax()


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    train_lib.write_json(path, obj)


def prompt_spec(config: ml_collections.ConfigDict, strategy: str | None = None) -> evaluate.PromptSpec:
  return evaluate.PromptSpec(strategy=strategy or config.eval.prompt_strategy,
                             num_shots=config.eval.num_shots, seed=config.train.seed,
                             one_shot_example=config.eval.one_shot_example,
                             template=config.data.prompt_template,
                             strip_calculator=config.data.strip_calculator)


def eval_settings(config: ml_collections.ConfigDict, *, weights: str) -> dict[str, Any]:
  """Everything that changes an evaluation's outputs; `weights` names the evaluated weights
  ('base', or the directory of trained weights)."""
  d, e = config.data, config.eval
  spec = prompt_spec(config)
  return {'weights': weights, 'model': config.model.checkpoint or config.model.variant,
          'tokenizer': config.model.tokenizer, 'source': d.source, 'subset': d.subset,
          'split': d.test_split, 'limit': e.limit, 'max_new_tokens': e.max_new_tokens,
          **dataclasses.asdict(spec),
          # Sampled completions change the file only when there are any.
          **({'num_samples': e.num_samples, 'temperature': e.temperature, 'top_p': e.top_p}
             if e.num_samples > 1 else {})}


def eval_name(label: str, config: ml_collections.ConfigDict, settings: dict[str, Any]) -> str:
  """'{label}_{prompts}_{digest of the settings}': evaluations with other settings never share
  an output file."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  return f'{label}_{prompt_spec(config).name}_{digest}'


def run_gsm8k_eval(config: ml_collections.ConfigDict, setup: models.Setup, params: Any, *,
                   out_dir: str, label: str, mesh: jax.sharding.Mesh,
                   weights: str) -> dict[str, Any]:
  """Evaluates params on the configured test split; writes predictions under out_dir.

  The result records its `settings` (`eval_settings`) and the `predictions` file, which is named
  by them (`eval_name`).
  """
  d = config.data
  questions = gsm8k.load_split(d.source, d.subset, d.test_split, skip_bad_rows=d.skip_bad_rows)
  if config.eval.limit:
    questions = questions[:config.eval.limit]
  spec = prompt_spec(config)
  pool = []
  if spec.strategy != 'zero_shot' and not (spec.strategy == 'one_shot' and spec.one_shot_example):
    pool = gsm8k.load_split(d.source, d.subset, d.train_split, skip_bad_rows=d.skip_bad_rows)
  settings = eval_settings(config, weights=weights)
  path = os.path.join(out_dir, f'predictions_{eval_name(label, config, settings)}.jsonl')
  logging.info('evaluating %s: %d questions, %s', label, len(questions), spec.strategy)
  setup, params = for_decoding(setup, params)
  result = evaluate.evaluate_gsm8k(
      model=setup.model, params=params, tokenizer=setup.tokenizer, questions=questions, pool=pool,
      prompts=spec, batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
      predictions_path=path, batch_sharding=sharding.batch_sharding(mesh), label=label,
      consistency=self_consistency(config))
  result['predictions'] = path
  result['settings'] = settings
  return result


def self_consistency(config: ml_collections.ConfigDict) -> evaluate.SelfConsistency | None:
  """eval.num_samples > 1: sampled completions besides the greedy one (maj@k, pass@k)."""
  e = config.eval
  if e.num_samples < 1:
    raise ValueError(f'eval.num_samples={e.num_samples} must be >= 1 (1 = greedy only)')
  if e.num_samples == 1:
    return None
  return evaluate.SelfConsistency(num_samples=e.num_samples, temperature=e.temperature,
                                  top_p=e.top_p, seed=config.train.seed)


def for_decoding(setup: models.Setup, params: Any) -> tuple[models.Setup, Any]:
  """Folds LoRA adapters into their kernels (in the kernels' dtype) for a LoRA-free model.

  Decoding is latency-bound: the adapters' extra small matmuls in every projection of every
  layer made a decode step several times slower. Training keeps them separate.
  """
  if not setup.model.lora.rank:
    return setup, params
  merged = jax.jit(functools.partial(lora.merge_weights, spec=setup.model.lora))(params)
  plain = setup.model.clone(lora=lora.LoraSpec())
  return dataclasses.replace(setup, model=plain), merged


def decode_prompts(config: ml_collections.ConfigDict, setup: models.Setup, params: Any,
                   prompts: Sequence[str], *, batch_size: int) -> list[str]:
  """Completions of text prompts under the config's `decode` settings, in `batch_size` slots.

  Greedy when decode.temperature is 0; otherwise temperature / top-k / top-p sampling seeded
  with train.seed.
  """
  d, tok = config.decode, setup.tokenizer
  sampling = sampler.SamplingParams(max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                                    top_k=d.top_k, top_p=d.top_p)
  generate = sampler.Generator(setup.model, sampling=sampling, eos_id=tok.eos_token_id)
  logging.info('decoding %d prompt(s), up to %d new tokens each (the first batch compiles, or '
               'reads the compilation cache)', len(prompts), d.max_new_tokens)
  ids = [data_lib.tokenize_prompt(p, tokenizer=tok) for p in prompts]
  out = generate(params, ids, pad_id=tok.pad_token_id or 0, seed=config.train.seed,
                 batch_size=batch_size)
  completions = [tok.decode(o, skip_special_tokens=True) for o in out]
  return completions


def _finished_step(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The last step when `workdir` holds a finished run of `config` (else None); refuses a
  config that may not resume there (`resume.check`)."""
  with checkpointing.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                  keep=config.checkpoint.keep) as ckpt:
    step = resume.resume_point(config, ckpt)
  meta_path = os.path.join(workdir, 'final.json')
  if step is None or step < config.train.steps or not os.path.exists(meta_path):
    return None
  return step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """main: base eval (unless disabled) -> training -> SFT eval -> results.json.

  A rerun resumes training; once training has finished, it keeps the recorded training and
  evaluations and runs only an evaluation whose settings are not there yet.
  """
  validation.preflight(config, 'main', workdir=workdir)
  results_path = os.path.join(workdir, 'results.json')
  results: dict[str, Any] = {}
  if os.path.exists(results_path):  # A resumed run keeps its base-model numbers.
    with open(results_path) as f:
      results = json.load(f)
  final_dir = os.path.abspath(os.path.join(workdir, 'final'))
  sft_settings = eval_settings(config, weights=final_dir)
  sft_missing = config.eval.run_sft and (results.get('sft') or {}).get('settings') != sft_settings
  finished = _finished_step(config, workdir)
  if finished is not None and 'train' in results and not sft_missing:
    if jax.process_index() == 0:
      print(f'{workdir}: already finished at step {finished}; nothing to evaluate that '
            f'{results_path} does not hold', flush=True)
    return results
  mesh = sharding.make_mesh(**config.mesh)

  def on_ready(setup, params):
    if config.eval.run_base and 'base' not in results:
      # The base model: adapters (if any) are still zero, so this is exactly the checkpoint.
      results['base'] = run_gsm8k_eval(config, setup, params, out_dir=workdir, label='base',
                                       mesh=mesh, weights='base')
      _write_json(results_path, results)
      print(evaluate.format_table({'base': results['base']}), flush=True)

  summary = train_lib.train(config, workdir, on_ready=on_ready)
  if summary.get('preempted'):
    if summary.get('signal') == 'SIGINT':
      raise Interrupted(f'interrupted (Ctrl-C): saved step {summary["step"]} in '
                        f'{os.path.join(workdir, "checkpoints")}; rerun the same command to resume')
    return results
  if not (summary['already_finished'] and 'train' in results):  # Keep the recorded timing.
    results['train'] = {k: summary[k] for k in (
        'step', 'final_loss', 'trainable_params', 'total_params', 'first_step_seconds',
        'train_seconds', 'steps_run', 'tokens_per_step', 'optimizer_state_bytes')}
    results['train']['tuning_method'] = config.tuning_method
  if sft_missing:
    params = lora.join(summary['frozen'], summary['state']['params'])
    results['sft'] = run_gsm8k_eval(config, summary['setup'], params, out_dir=workdir,
                                    label='sft', mesh=mesh, weights=final_dir)
  _write_json(results_path, results)
  if jax.process_index() == 0:
    print(evaluate.format_table({k: results.get(k) for k in ('base', 'sft')}))
    print(f'metrics: {os.path.join(workdir, "metrics.jsonl")}\nresults: {results_path}\n'
          f'final weights: {summary["final_dir"]}\ncheckpoints: {os.path.join(workdir, "checkpoints")}',
          flush=True)
  return results


def trained_config(config: ml_collections.ConfigDict, adapter_dir: str
                   ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The run config as trained, and the `final.json` written beside `adapter_dir` (a run's
  final/ directory): its tuning method, LoRA shape and layer layout override `config`'s."""
  meta_path = os.path.join(os.path.dirname(os.path.normpath(adapter_dir)), 'final.json')
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{meta_path}: not found (expected beside the trained weights '
                            f'{adapter_dir})')
  with open(meta_path) as f:
    meta = json.load(f)
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy.
  if meta['tuning_method'] == 'lora':
    for k, v in meta['lora'].items():
      config.lora[k] = v
  # The saved tree is stacked or per-layer as trained, whatever the eval config says.
  config.model.scan_layers = meta.get('scan_layers', False)
  return config, meta


def load_trained(config: ml_collections.ConfigDict, adapter_dir: str, *,
                 mesh: jax.sharding.Mesh) -> tuple[models.Setup, Any]:
  """The base model plus the trained weights saved in `adapter_dir`: a run's final/ directory,
  or a PEFT LoRA adapter directory (adapter_config.json) trained on the same base.

  For a run, the tuning method and LoRA shape come from the `final.json` written beside it;
  full-SFT weights replace the base, LoRA adapters are added to it.
  """
  if peft_adapters.is_peft_dir(adapter_dir):
    return peft_adapters.load(config, adapter_dir, mesh=mesh)
  config, meta = trained_config(config, adapter_dir)
  method = meta['tuning_method']
  setup = models.model_setup(config, with_lora=method == 'lora', mesh=mesh)
  # Same seed as training: a random-init base must be the one the weights were trained on.
  params = models.init_params(setup, mesh=mesh, seed=config.train.seed)
  trainable, frozen = lora.split(params, method)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          trainable)
  trained = checkpointing.load_params(adapter_dir, abstract)
  return setup, lora.join(frozen, trained)


def base_params(config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh
                ) -> tuple[models.Setup, Any]:
  setup = models.model_setup(config, with_lora=False, mesh=mesh)
  if not setup.checkpoint:
    logging.warning('model.checkpoint is empty: the base model is a random init (seed %d)',
                    config.train.seed)
  return setup, models.init_params(setup, mesh=mesh, seed=config.train.seed)
