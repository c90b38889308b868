"""Batching a per-head kernel call with the heads innermost in one call's grid.

Under `jax.vmap` a pallas_call gets the batch as its grid's outermost axis, so each head's
programs run in turn. Kernels whose heads share an input (a kv head's keys, or a view the
heads read together) run faster with one call whose grid has the head as its first axis,
the innermost of the launch: the programs of one tile for every head run together. This
module gives such kernels that batching rule (a `jax.custom_batching.custom_vmap`), and
`HeadRefs`, how their kernel bodies read and write each head's slice.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl


def heads_innermost(call, batched_call, split, arg_names, own_name):
  """A function of the call's flat arguments that runs `call(*split(args))` for one head
  and, under vmap, `batched_call(*split(args), per_head=names, n_heads=size)` with the
  names of the batched arguments. When `own_name` (the input the heads would share) is
  batched itself, nothing is shared: vmap's usual batching of `call`.

  Args:
    call: f(*arguments in `arg_names` order) -> outputs (arrays or None).
    batched_call: f(*the same, per_head: frozenset of names, n_heads: int) -> outputs with
      a leading head axis.
    split: the flat arguments (or their batched flags) -> `arg_names` order (absent
      optional arguments as None).
    arg_names: the names of `call`'s arguments.
    own_name: the shared input's name.
  """

  @jax.custom_batching.custom_vmap
  def one(*args):
    return call(*split(args))

  @one.def_vmap
  def batched(axis_size, in_batched, *args):
    flags = dict(zip(arg_names, split(in_batched), strict=True))
    if flags[own_name]:  # each head its own input: vmap's usual batching
      axes = [0 if b else None for b in in_batched]
      out = jax.vmap(lambda *a: call(*split(a)), in_axes=axes)(*args)
    else:
      per_head = frozenset(n for n, b in flags.items() if b)
      out = batched_call(*split(args), per_head=per_head, n_heads=axis_size)
    return out, jax.tree.map(lambda _: True, out)  # (None outputs stay None)

  return one


class HeadRefs:
  """Where a call batched over heads keeps each head's slice, inside a kernel body:
  `names` are the refs with a leading head axis, read and written at this program's head
  `h` (the grid's first axis); h None: an unbatched call, every ref read whole."""

  def __init__(self, names=frozenset(), h=None):
    self.names, self.h = names, h

  def program_id(self, axis):
    """The program id along the kernel's own grid axis (after the head axis, if any)."""
    return pl.program_id(axis + (self.h is not None))

  def num_programs(self, axis):
    """The grid's size along the kernel's own axis (after the head axis, if any)."""
    return pl.num_programs(axis + (self.h is not None))

  def get(self, name, ref, *idx):
    if self.h is not None and name in self.names:
      return ref[(self.h, *idx)]
    return ref[idx] if idx else ref[...]

  def set(self, name, ref, idx, val):
    if self.h is not None and name in self.names:
      ref[(self.h, *idx)] = val
    else:
      ref[idx] = val
