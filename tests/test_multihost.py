"""Two processes, one CPU device each, started as launch/ documents (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), train the tiny config exactly like one process with two
devices; SIGTERM to both saves one checkpoint at one agreed step and exits 0; one process on one
device (another mesh) then resumes and finishes with the same losses.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.conftest import ROOT, xla_flags

_STEPS = 8
_FLAGS = ('--config=configs/tiny.py:family=gemma2', f'--config.train.steps={_STEPS}',
          '--config.train.log_every=1', '--config.checkpoint.every_steps=100',
          '--config.eval.run_base=false', '--config.eval.run_sft=false')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, env, log):
  return subprocess.Popen([sys.executable, '-m', 'gemma_sft_jax.main', f'--workdir={workdir}',
                           *_FLAGS], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _losses(workdir) -> dict[int, float]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r['step']: r['loss'] for r in map(json.loads, filter(str.strip, f))}


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def test_two_processes_train_like_two_devices_stop_together_and_resume_on_one(tmp_path, env):
  ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
  logs = {name: open(tmp_path / f'{name}.log', 'w') for name in ('ref', 'p0', 'p1', 'resume')}
  two_devices = xla_flags('--xla_force_host_platform_device_count=2')
  reference = _start(ref_dir, dict(env, XLA_FLAGS=two_devices),
                     logs['ref'])
  port = _free_port()
  procs = [_start(run_dir, dict(env, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                                JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)), logs[f'p{i}'])
           for i in range(2)]
  try:
    deadline = time.time() + 300
    while not _losses(run_dir) and time.time() < deadline:
      assert all(p.poll() is None for p in procs), _read(tmp_path / 'p0.log')[-3000:]
      time.sleep(0.05)
    for p in procs:
      p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [_read(tmp_path / f'p{i}.log') for i in range(2)]
  assert codes == [0, 0], [t[-3000:] for t in texts]
  # Both leave the coordination service cleanly (jax.distributed.shutdown): no gRPC noise.
  assert not any('CANCELLED' in t for t in texts), [t[-3000:] for t in texts]
  saved = {int(re.search(r'preemption signal: saved step (\d+); exiting', t).group(1))
           for t in texts}
  assert len(saved) == 1, saved  # One step, agreed by both processes.
  [stopped] = saved
  assert 1 <= stopped < _STEPS and not os.path.exists(run_dir / 'final')
  assert sorted(os.listdir(run_dir / 'checkpoints')) == [str(stopped)]
  assert all('Traceback' not in t for t in texts)

  assert reference.wait(timeout=300) == 0, _read(tmp_path / 'ref.log')[-3000:]
  ref = _losses(ref_dir)
  two_hosts = _losses(run_dir)
  assert sorted(two_hosts) == list(range(1, stopped + 1))
  # The same global computation, split over two processes: the same losses.
  np.testing.assert_allclose([two_hosts[s] for s in two_hosts], [ref[s] for s in two_hosts],
                             rtol=1e-6)

  # One process, one device: the checkpoint of the two-device mesh restores onto it.
  resumed = _start(run_dir, env, logs['resume'])
  assert resumed.wait(timeout=300) == 0, _read(tmp_path / 'resume.log')[-3000:]
  assert f'at step {stopped}' in _read(tmp_path / 'resume.log')
  losses = _losses(run_dir)
  assert sorted(losses) == list(range(1, _STEPS + 1))
  # Another mesh sums in another order: equal up to float32 rounding.
  np.testing.assert_allclose([losses[s] for s in losses], [ref[s] for s in losses], rtol=1e-5)
  for log in logs.values():
    log.close()
