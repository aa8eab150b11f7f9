"""launch/: every script has a dry-run mode that prints the commands it would run, and none has a
placeholder to fill in."""

import os
import re
import shlex
import subprocess

import pytest

from tests.conftest import ROOT

_LAUNCH = os.path.join(ROOT, 'launch')
_MAIN_ARGS = ['--config=configs/gemma2.py:size=9b,method=full', '--workdir=/runs/a b']


def _dry_run(script, *args, **env):
  proc = subprocess.run(['bash', os.path.join(_LAUNCH, script), '--dry-run', *args], cwd=ROOT,
                        env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def test_no_placeholders():
  for name in os.listdir(_LAUNCH):
    with open(os.path.join(_LAUNCH, name)) as f:
      text = f.read()
    assert not re.search(r'YOUR_|<your|CHANGEME|TODO', text), name


def test_gpu_multinode_dry_run():
  [cmd] = _dry_run('gpu_multinode.sh', *_MAIN_ARGS, COORDINATOR='10.0.0.1:1234', NUM_NODES='2',
                   NODE_RANK='1', XLA_FLAGS='--xla_dump_to=/tmp/d')
  assert cmd[:4] == ['JAX_COORDINATOR_ADDRESS=10.0.0.1:1234', 'JAX_NUM_PROCESSES=2',
                     'JAX_PROCESS_ID=1', 'NCCL_NVLS_ENABLE=0']
  assert cmd[-5:] == ['python', '-m', 'gemma_sft_jax.main', *_MAIN_ARGS]
  _assert_gpu_env(cmd, user_flag='--xla_dump_to=/tmp/d')


def _assert_gpu_env(cmd, user_flag):
  """gpu_env.sh's settings: the memory fraction, and the collective-overlap flags before the
  user's own XLA_FLAGS (which come last, so they win)."""
  fraction = os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  assert f'XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}' in cmd
  [flags] = [c[len('XLA_FLAGS='):].split() for c in cmd if c.startswith('XLA_FLAGS=')]
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags and flags[-1] == user_flag


def test_gpu_slurm_dry_run():
  [cmd] = _dry_run('gpu_slurm.sbatch', *_MAIN_ARGS, XLA_FLAGS='--xla_dump_to=/tmp/d')
  assert cmd[-6:] == ['--kill-on-bad-exit=1', 'python', '-m', 'gemma_sft_jax.main', *_MAIN_ARGS]
  assert cmd[0] == 'NCCL_NVLS_ENABLE=0' and cmd[3] == 'srun'
  _assert_gpu_env(cmd, user_flag='--xla_dump_to=/tmp/d')


def test_gpu_env_overlap_flags_are_the_benchmarked_ones():
  """launch/gpu_env.sh sets exactly the flags benchmarks/variants.sh measured as OVERLAP."""
  def flags(path, name):
    text = open(os.path.join(ROOT, path)).read().replace('\\\n', ' ')
    return set(re.search(name + r'="([^"]*)"', text).group(1).split())
  overlap = flags('launch/gpu_env.sh', 'GEMMA_SFT_JAX_OVERLAP_FLAGS')
  assert len(overlap) == 8 and overlap == flags('benchmarks/variants.sh', 'OVERLAP')


def test_tpu_pod_dry_run():
  setup, train = _dry_run('tpu_pod.sh', 'my-tpu', 'us-central2-b', '--', *_MAIN_ARGS,
                          REPO='https://example.com/org/gemma_sft_jax.git', REV='abc123',
                          HF_TOKEN='secret')
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', '--zone=us-central2-b',
         '--worker=all']
  assert setup[:8] == ssh and train[:8] == ssh
  assert "git clone -q 'https://example.com/org/gemma_sft_jax.git'" in setup[8]
  assert "git checkout -q 'abc123'" in setup[8]
  remote = shlex.split(train[8][len('--command='):])
  assert remote[-5:] == ['python3', '-m', 'gemma_sft_jax.main', *_MAIN_ARGS]
  assert 'HF_TOKEN=<HF_TOKEN>' in remote and 'secret' not in train[8]  # Never printed.


def test_tpu_pod_without_a_repository_to_clone_says_so(tmp_path):
  # A copy of the script outside any git checkout has no origin to default to.
  (tmp_path / 'launch').mkdir()
  script = tmp_path / 'launch' / 'tpu_pod.sh'
  script.write_text(open(os.path.join(_LAUNCH, 'tpu_pod.sh')).read())
  env = {k: v for k, v in os.environ.items() if k not in ('REPO', 'REV')}
  proc = subprocess.run(['bash', str(script), '--dry-run', 'tpu', 'zone', '--', '--workdir=x'],
                        env={**env, 'GIT_CEILING_DIRECTORIES': str(tmp_path)},
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and 'set REPO=' in proc.stderr


@pytest.mark.parametrize('cpu', ['', '1'])
def test_scaling_dry_run(cpu):
  cmds = _dry_run('scaling.sh', '/tmp/s.jsonl', 'size=2b,method=lora', CPU=cpu)
  # 1 and 2 devices: one layout each; 4 and 8: three.
  assert len(cmds) == 8
  devices = [c[1] for c in cmds]
  if cpu:
    assert devices[-1] == 'XLA_FLAGS=--xla_force_host_platform_device_count=8'
    assert all('--config=configs/tiny.py' in c for c in cmds)
  else:
    assert devices[0] == 'CUDA_VISIBLE_DEVICES=0'
    assert devices[-1] == 'CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7'
    assert all('--config=configs/gemma2.py:size=2b,method=lora' in c for c in cmds)
  assert all(c[c.index('-m') + 1] == 'gemma_sft_jax.benchmark' and '--output=/tmp/s.jsonl' in c
             for c in cmds)
