"""GGUF files, read once per process: metadata values, the vocabulary, and views of the tensors.

`gguf.GGUFReader` makes numpy views of every part of every metadata value when it opens a file:
for Gemma's 262,144-string vocabulary that took ~12 s on a 2-core CPU, and the model config, the
weights and the tokenizer check each opened the file again. `read` walks the header with `struct`
instead: numbers and arrays of numbers are read as they are, arrays of strings are kept as
offsets and decoded only when indexed (`Strings`). One `GGUFFile` per file (path, size and
modification time) is kept for the process. Dequantisation stays with the gguf package, except
for Q8_0 (the 270M's 168M-entry embedding), which `dequantize` does in large chunks, bitwise
equal to gguf's and ~3x faster.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import mmap
import os
import struct
from typing import Any

import gguf
import numpy as np

_MAGIC = b'GGUF'
# GGUF value types (gguf.GGUFValueType) -> struct format of one value; 8 is STRING, 9 ARRAY.
_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q',
            12: 'd'}
_STRING, _ARRAY = 8, 9
# Tensor types whose data gguf keeps as typed values; every other type is blocks of bytes.
_PLAIN = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
          gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
          gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
          gguf.GGMLQuantizationType.I64: np.int64}


class Strings:
  """An array of GGUF strings, decoded on demand (`list(s)` decodes them all)."""

  def __init__(self, buf: Any, offsets: list[int]):
    self._buf, self._offsets = buf, offsets

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> str:
    start = self._offsets[i]
    (n,) = struct.unpack_from('<Q', self._buf, start)
    return bytes(self._buf[start + 8:start + 8 + n]).decode('utf-8', errors='replace')

  def __iter__(self):
    return (self[i] for i in range(len(self)))


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor: its raw data as gguf's reader shapes it (typed values, or rows of blocks)."""

  name: str
  tensor_type: gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # numpy order: the GGUF dims reversed
  data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  path: str
  fields: dict[str, Any]  # scalars as Python values, arrays as numpy arrays or `Strings`
  tensors: tuple[Tensor, ...]


class _Cursor:
  """Little-endian reads that advance through a buffer."""

  def __init__(self, buf: Any):
    self.buf, self.pos = buf, 0

  def unpack(self, fmt: str) -> Any:
    values = struct.unpack_from('<' + fmt, self.buf, self.pos)
    self.pos += struct.calcsize('<' + fmt)
    return values[0] if len(values) == 1 else values

  def string(self) -> str:
    n = self.unpack('Q')
    self.pos += n
    if self.pos > len(self.buf):
      raise ValueError(f'a string runs past the end of the file (byte {self.pos})')
    return bytes(self.buf[self.pos - n:self.pos]).decode('utf-8')

  def value(self, kind: int, key: str) -> Any:
    if kind in _SCALARS:
      return self.unpack(_SCALARS[kind])
    if kind == _STRING:
      return self.string()
    if kind != _ARRAY:
      raise ValueError(f'{key}: unknown value type {kind}')
    item, count = self.unpack('IQ')
    if item == _STRING:
      offsets = []
      for _ in range(count):  # Only the lengths are read here; `Strings` decodes on demand.
        offsets.append(self.pos)
        self.pos += 8 + struct.unpack_from('<Q', self.buf, self.pos)[0]
      return Strings(self.buf, offsets)
    if item not in _SCALARS:
      raise ValueError(f'{key}: arrays of value type {item} are not supported')
    dtype = np.dtype('<' + _SCALARS[item]) if item != 7 else np.dtype(np.bool_)
    array = np.frombuffer(self.buf, dtype, count, self.pos)
    self.pos += array.nbytes
    return array


def _parse(path: str) -> GGUFFile:
  with open(path, 'rb') as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  cur = _Cursor(buf)
  if bytes(buf[:4]) != _MAGIC:
    raise ValueError('not a GGUF file (bad magic)')
  cur.pos = 4
  version, n_tensors, n_fields = cur.unpack('IQQ')
  if version & 0xFFFF == 0:
    raise ValueError('big-endian GGUF files are not supported')
  if version not in (2, 3):
    raise ValueError(f'GGUF version {version} is not supported')
  fields: dict[str, Any] = {}
  for _ in range(n_fields):
    key = cur.string()
    fields[key] = cur.value(cur.unpack('I'), key)
  infos = []
  for _ in range(n_tensors):
    name = cur.string()
    dims = cur.unpack('I')
    shape = tuple(reversed(struct.unpack_from(f'<{dims}Q', buf, cur.pos)))
    cur.pos += 8 * dims
    infos.append((name, gguf.GGMLQuantizationType(cur.unpack('I')), shape, cur.unpack('Q')))
  alignment = int(fields.get('general.alignment', gguf.GGUF_DEFAULT_ALIGNMENT))
  start = -(-cur.pos // alignment) * alignment
  tensors = []
  for name, kind, shape, offset in infos:
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    if kind in _PLAIN:
      dtype, raw_shape = np.dtype(_PLAIN[kind]), shape
    else:
      dtype, raw_shape = np.dtype(np.uint8), gguf.quants.quant_shape_to_byte_shape(shape, kind)
    count = int(np.prod(raw_shape))
    end = start + offset + count * dtype.itemsize
    if end > len(buf):
      raise ValueError(f'tensor {name!r} ends at byte {end}, the file has {len(buf)} (truncated?)')
    data = np.frombuffer(buf, dtype, count, start + offset).reshape(raw_shape)
    tensors.append(Tensor(name, kind, shape, data))
  return GGUFFile(path, fields, tuple(tensors))


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime_ns: int) -> GGUFFile:
  del size, mtime_ns  # Only part of the cache key: a rewritten file is read again.
  return _parse(path)


def read(path: str | os.PathLike) -> GGUFFile:
  """The metadata and tensor views of a GGUF file; parsed on the first call for each version.

  Raises:
    ValueError: the file is not a GGUF file we can read; the message names the file and cause.
  """
  real = os.path.realpath(path)
  try:
    st = os.stat(real)
    return _read(real, st.st_size, st.st_mtime_ns)
  except (ValueError, KeyError, struct.error, OSError) as e:
    raise ValueError(f'{os.fspath(path)}: cannot read GGUF ({e})') from None


def _dequantize_q8_0(data: np.ndarray, threads: int) -> np.ndarray:
  # A Q8_0 block is an fp16 scale and 32 int8 values; gguf computes float32(q) * float32(scale).
  blocks = data.reshape(-1, 34)
  out = np.empty((blocks.shape[0], 32), np.float32)

  def chunk(lo, hi):
    scale = np.ascontiguousarray(blocks[lo:hi, :2]).view(np.float16).astype(np.float32)
    np.multiply(blocks[lo:hi, 2:].view(np.int8), scale, out=out[lo:hi], dtype=np.float32)

  step = max(1 << 16, -(-len(blocks) // (4 * threads)))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(lambda lo: chunk(lo, lo + step), range(0, len(blocks), step)))
  return out.reshape(*data.shape[:-1], data.shape[-1] // 34 * 32)


def dequantize(tensor: Tensor) -> np.ndarray:
  """The tensor as float32 (a view for F32 data), in `tensor.shape`."""
  if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
    return _dequantize_q8_0(tensor.data, min(8, os.cpu_count() or 1))
  return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
