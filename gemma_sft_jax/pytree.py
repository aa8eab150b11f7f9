"""Parameter paths: one way to name a pytree's leaves ('layers/attn/q/kernel').

Checkpoint keys, sharding rules, exported tensor names and the stored config all use these
names, so every module flattens and names trees through this file.
"""

from collections.abc import Callable
from typing import Any

from flax import traverse_util
import jax

SEP = '/'


def path_name(path: tuple[Any, ...], sep: str = SEP) -> str:
  """'a/b/0' for a jax key path; dict keys, attribute names and indices alike.

  Orbax metadata turns NamedTuple fields into dict keys, so naming keys by their bare name
  lets a saved tree and a live one be compared path by path.
  """
  return jax.tree_util.keystr(path, simple=True, separator=sep)


def flatten(tree: Any, sep: str = SEP, is_leaf: Callable[[Any], bool] | None = None
            ) -> dict[str, Any]:
  """{'a/b/c': leaf} for every leaf of `tree` (in jax's leaf order)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_name(path, sep): leaf for path, leaf in leaves}


def unflatten(flat: dict[str, Any], sep: str = SEP) -> dict[str, Any]:
  """The nested dict of `flat` ({'a/b': x} -> {'a': {'b': x}}); the inverse of `flatten`."""
  return traverse_util.unflatten_dict(flat, sep=sep)


def paths(tree: Any) -> Any:
  """A tree of the same structure whose leaves are their 'a/b/c' paths."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), tree)
