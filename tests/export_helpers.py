"""Export (hf, peft, gguf) and PEFT adapters read by --adapter, against transformers, peft and our
own loaders: what test_export_hf.py, test_export_peft.py and test_export_gguf.py share.

`build_runs` (conftest's session fixture `export_runs`, built once for the three files) writes tiny
random Gemma 2 and Gemma 3 checkpoints with save_pretrained (the byte tokenizer as their own
tokenizer files) and trains them a few steps through the `main` CLI: Gemma 2 with LoRA (scanned
layers), Gemma 3 full SFT (per-layer). It trains a PEFT adapter on the Gemma 3 base in torch
meanwhile, then exports each format once through the export CLI (and once from two processes), the
rest in this process, and decodes through the decode CLI; the tests check one thing each. Bad input
that fails before any weights are read runs while training does.

The tiny checkpoints have head_dim = query_pre_attn_scalar = 256, as every released Gemma 2 / 3
below 27B: GGUF does not store the query scale, and its readers derive it (llama.cpp and ours
from head_dim, transformers' GGUF reader takes Gemma's default 256).
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import torch

from gemma_sft_jax import runner
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import sharding
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.weights import export_formats
from gemma_sft_jax.weights import exporters
from gemma_sft_jax.weights import tokenizer as tokenizer_lib
from tests.conftest import ROOT, cli_env, tiny_config, write_hf_checkpoint

PROMPTS = ['Question: What is 2 + 2?\nAnswer:',
           'Question: Tom has 3 apples and buys 5 more. How many apples?\nAnswer:']
NEW_TOKENS = 12
FP32_ATOL = 1e-4
# GGUF half-precision exports round every matrix (norms stay float32); their logits against our
# float32 model (|logits| up to ~1 on these models): measured max abs diff 4.8e-3 (bf16) and
# 3.7e-4 (f16).
HALF_ATOL = {'bfloat16': 2e-2, 'float16': 3e-3}
# Even model and feed-forward widths, so that a 2-device mesh shards them (fsdp).
_SHAPE = dict(embed_dim=64, hidden_dim=96, num_heads=4, num_kv_heads=2, head_dim=256,
              query_pre_attn_scalar=256)
BASES = {
    'gemma2': dataclasses.replace(architecture.VARIANTS['tiny_gemma2'], **_SHAPE),
    'gemma3': dataclasses.replace(architecture.VARIANTS['tiny_gemma3'], **_SHAPE),
}
# Run name -> (family, method, extra training flags).
RUNS = {
    'g2_lora': ('gemma2', 'lora', ('--config.model.scan_layers=true', '--config.optim.lr=0.05')),
    'g2_full': ('gemma2', 'full', ('--config.optim.lr=0.01',)),
    'g3_full': ('gemma3', 'full', ('--config.optim.lr=0.01',)),
    'g3_lora': ('gemma3', 'lora', ('--config.model.scan_layers=true', '--config.optim.lr=0.05')),
}
LORA_RUNS = sorted(run for run, (_, method, _) in RUNS.items() if method == 'lora')
_TRAIN = ('--config.train.steps=3', '--config.train.batch_size=2',
          '--config.optim.warmup_steps=1', '--config.eval.run_base=false',
          '--config.eval.run_sft=false')


def _config_flags(root, run):
  family, method, _ = RUNS[run]
  return (f'--config=configs/tiny.py:family={family},method={method}',
          f'--config.model.checkpoint={os.path.join(root, family)}', '--config.model.tokenizer=',
          f'--config.decode.max_new_tokens={NEW_TOKENS}')


def _config(root, run):
  family, method, _ = RUNS[run]
  return tiny_config(f'family={family},method={method}',
                     **{'model.checkpoint': os.path.join(root, family), 'model.tokenizer': ''})


def _write_base(path, config):
  """A tiny random checkpoint (save_pretrained) with the byte tokenizer as its own files."""
  write_hf_checkpoint(path, config.to_hf_dict(), seed=1)
  export_formats.write_tokenizer_files(tokenizer_lib.ByteTokenizer(), path, source='',
                                       vocab_size=config.vocab_size)


class _Proc:
  """A CLI subprocess whose stdout/stderr go to files under `root`."""

  def __init__(self, root, name, module, *flags, env=None):
    self.name = name
    self._files = [open(os.path.join(root, f'{name}.{s}'), 'w+') for s in ('stdout', 'stderr')]
    self.proc = subprocess.Popen([sys.executable, '-m', f'gemma_sft_jax.{module}', *flags],
                                 cwd=ROOT, env={**cli_env(os.path.join(root, 'jax_cache')),
                                                **(env or {})},
                                 stdout=self._files[0], stderr=self._files[1])

  def result(self, timeout=300):
    rc = self.proc.wait(timeout=timeout)
    texts = []
    for f in self._files:
      f.seek(0)
      texts.append(f.read())
      f.close()
    return rc, *texts


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train_peft_adapter(base_dir, out_dir):
  """A LoRA adapter made and trained by peft in torch (rsLoRA, some projections, some layers)."""
  import peft  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  lora_config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, task_type='CAUSAL_LM',
                                target_modules=['q_proj', 'v_proj', 'o_proj', 'up_proj',
                                                'down_proj'],
                                layers_to_transform=[0, 2, 5])
  model = peft.get_peft_model(model, lora_config)
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
  tok = tokenizer_lib.ByteTokenizer()
  ids = torch.tensor([tok.encode(PROMPTS[1] + ' 3 + 5 = 8\n#### 8', add_special_tokens=True)])
  for _ in range(5):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
  model.save_pretrained(out_dir)


def build_runs(root):
  """Trains, exports and decodes under `root`: {'root', 'out', 'results': {name: (rc, stdout,
  stderr)}, 'ours': a cache of `_ours`}."""
  for family, config in BASES.items():
    _write_base(os.path.join(root, family), config)
  prompts = os.path.join(root, 'prompts.jsonl')
  with open(prompts, 'w') as f:
    f.writelines(json.dumps({'prompt': p}) + '\n' for p in PROMPTS)
  g3 = _config_flags(root, 'g3_full')
  os.makedirs(os.path.join(root, 'exists'))
  os.makedirs(os.path.join(root, 'untrained'))
  with open(os.path.join(root, 'a_file'), 'w') as f:
    f.write('not a directory')

  procs = [_Proc(root, f'train_{run}', 'main', *_config_flags(root, run),
                 f'--workdir={os.path.join(root, run)}', *_TRAIN, *extra)
           for run, (_, _, extra) in RUNS.items()]
  # Bad input, refused before any weights are read (the runs are still training).
  bad = {
      'no_final': ('--workdir=' + os.path.join(root, 'untrained'), '--format=hf',
                   '--output=' + os.path.join(root, 'out', 'no_final')),
      'exists': ('--workdir=' + os.path.join(root, 'g3_full'), '--format=hf',
                 '--output=' + os.path.join(root, 'exists')),
      'unwritable': ('--workdir=' + os.path.join(root, 'g3_full'), '--format=gguf',
                     '--output=' + os.path.join(root, 'a_file', 'model.gguf')),
  }
  procs += [_Proc(root, f'bad_{name}', 'export', *g3, *flags) for name, flags in bad.items()]
  _train_peft_adapter(os.path.join(root, 'gemma3'), os.path.join(root, 'peft_torch'))
  procs.append(_Proc(root, 'decode_peft_torch', 'decode', *g3, f'--prompts={prompts}',
                     f'--output={root}/peft_torch.jsonl', f'--adapter={root}/peft_torch'))
  results = {p.name: p.result() for p in procs[:len(RUNS)]}
  for run in RUNS:
    assert results[f'train_{run}'][0] == 0, results[f'train_{run}'][2][-3000:]

  out = os.path.join(root, 'out')
  # One export of each format through the CLI, beside the decode runs; the others in this process
  # (the same exporters.export, without another start-up).
  cli_exports = {
      'g2_lora_hf': ('g2_lora', '--format=hf', '--max_shard_mb=0.5'),  # Sharded, with an index.
      'g2_lora_peft': ('g2_lora', '--format=peft'),
      'g3_full.gguf': ('g3_full', '--format=gguf'),
  }
  procs += [_Proc(root, f'export_{name}', 'export', *_config_flags(root, run),
                  f'--workdir={os.path.join(root, run)}', f'--output={os.path.join(out, name)}',
                  *flags) for name, (run, *flags) in cli_exports.items()]
  # The scanned LoRA run exported by two processes (one CPU device each, fsdp=2), as launch/
  # starts several hosts: tensors gathered one at a time, written by process 0.
  port = _free_port()
  procs += [_Proc(root, f'export_process_{i}', 'export', *_config_flags(root, 'g2_lora'),
                  f'--workdir={os.path.join(root, "g2_lora")}', '--format=gguf',
                  f'--output={os.path.join(root, "two_processes", "g2_lora.gguf")}',
                  env={'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2',
                       'JAX_PROCESS_ID': str(i)}) for i in range(2)]
  procs.append(_Proc(root, 'bad_peft_of_full', 'export', *g3,
                     f'--workdir={os.path.join(root, "g3_full")}', '--format=peft',
                     f'--output={os.path.join(out, "peft_of_full")}'))
  procs += [_Proc(root, f'decode_{run}', 'decode', *_config_flags(root, run),
                  f'--prompts={prompts}', f'--output={root}/{run}.jsonl',
                  f'--adapter={os.path.join(root, run, "final")}') for run in RUNS]
  for name, run, fmt, dtype in (('g3_full_hf', 'g3_full', 'hf', 'float32'),
                                ('g2_full_hf', 'g2_full', 'hf', 'float32'),
                                ('g3_lora_hf', 'g3_lora', 'hf', 'float32'),
                                ('g3_lora_peft', 'g3_lora', 'peft', 'float32'),
                                ('g2_lora.gguf', 'g2_lora', 'gguf', 'float32'),
                                ('g2_full.gguf', 'g2_full', 'gguf', 'float32'),
                                ('g3_lora.gguf', 'g3_lora', 'gguf', 'float32'),
                                ('g2_lora_bf16.gguf', 'g2_lora', 'gguf', 'bfloat16'),
                                ('g3_full_f16.gguf', 'g3_full', 'gguf', 'float16')):
    exporters.export(_config(root, run), workdir=os.path.join(root, run), fmt=fmt,
                     output=os.path.join(out, name), dtype=dtype)
  results.update({p.name: p.result() for p in procs[len(RUNS):]})
  for key in ([f'export_{name}' for name in cli_exports] + [f'decode_{run}' for run in RUNS]
              + ['export_process_0', 'export_process_1']):
    assert results[key][0] == 0, f'{key}: {results[key][2][-3000:]}'
  return {'root': root, 'out': out, 'results': results, 'ours': {}}


def _completions(path):
  with open(path) as f:
    return [json.loads(line)['completion'] for line in f]


def _tokens(config):
  return np.random.default_rng(7).integers(0, config.vocab_size, size=(2, 23))


def _ours(runs, run):
  """Our model's logits with the run's trained weights (as eval and decode load them)."""
  if run not in runs['ours']:
    config = _config(runs['root'], run)
    setup, params = runner.load_trained(config, os.path.join(runs['root'], run, 'final'),
                                        mesh=sharding.make_mesh(**config.mesh))
    tokens = _tokens(setup.config)
    logits = jax.jit(lambda p, t: setup.model.apply({'params': p}, t)[0])(params, tokens)
    runs['ours'][run] = np.asarray(logits), tokens
  return runs['ours'][run]


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _greedy(model, base):
  """transformers' (or peft's) greedy continuation of each prompt, as decode prints it (with
  the tokenizer of the base checkpoint)."""
  tok = tokenizer_lib.load_tokenizer(base)
  out = []
  for prompt in PROMPTS:
    ids = data_lib.tokenize_prompt(prompt, tokenizer=tok)
    with torch.no_grad():
      gen = model.generate(input_ids=torch.tensor([ids]), do_sample=False,
                           max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    out.append(tok.decode(gen[:gen.index(1)] if 1 in gen else gen, skip_special_tokens=True))
  return out


def _hf(path, **kwargs):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           **kwargs).eval()
