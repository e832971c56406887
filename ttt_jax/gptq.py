"""GPTQ for the quantized artifact: per-row codes chosen with the inputs' second moment.

GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes one weight matrix so that the layer's outputs on
calibration inputs move little, not its weights. Here a matrix is one batch element
(one layer, one head where heads index copies) of a 'matrix' parameter viewed as
W [I, O]: I inputs (its reduction axes, flattened), O output channels (the rows of
``ttt_jax.quant``, each with its own scale). With the inputs X [n, I] that reach it,

  H  = 2 X^T X / n + lambda mean(diag(2 X^T X / n)) 1     (damping lambda, 1% by default)
  U  = the upper Cholesky factor of H^-1  (H^-1 = U^T U)

and inputs i = 0..I-1 taken in order (with ``act_order``, by descending diag(H), the
permutation undone afterwards: the artifact stays plain), each row i of W is
quantized on the fixed per-channel scales s [O] and its error spread over the inputs
not yet quantized:

  q_i  = clip(round(w_i / s), -qmax, qmax)               (``quant.codes``)
  e_i  = (w_i - q_i s) / U_ii
  w_j -= U_ij e_i                                        for every j > i

which minimises ||X W - X W^||^2 greedily, one input at a time. The updates are applied
lazily in blocks of ``BLOCK`` inputs (inside a block at once, to the rest once per block
as one matrix product U[block, rest]^T E[block]), with the same result. The scales
are those of ``quant.quantize`` (each row's clip of least weight MSE among the
percentiles, found on the original weights): GPTQ changes only the int codes, so the
artifact's format and reader are unchanged. An input no calibration token reaches
(diag(H) = 0) is decoupled from the others (its row and column of H are zero but for
the damping): it is rounded to nearest and passes no error on. H = I gives
round-to-nearest exactly.

Calibration (``calibration_batch``): N sequences of T tokens the model samples itself
(temperature 1, from the end-of-document token, ``inference.sampling``; the seed fixes
them, nothing is read or downloaded), with the decode inputs of the run as side inputs.

Input statistics (``input_hessians``): the weights are read inside einsums, in a
scanned trunk, so no layer can be hooked. Instead the model's forward is traced to a
jaxpr with the parameters as inputs and run by a small interpreter that tags every
value derived from a 'matrix' parameter (a ``Source``: which parameter, which of its
axes each value axis is, which batch axes were sliced to one index). Tags follow
dtype casts, transposes, reshapes that merge axes or add/remove unit axes, unit
slices, optimization barriers, and calls (``jit``, ``checkpoint``/remat, ``custom_jvp``/``custom_vjp`` calls,
``cond`` on its taken branch, ``scan``, whose iterations run one by one with a sliced
operand's index fixed). At a ``dot_general`` of a tagged weight whose contracting axes
are exactly the parameter's reduction axes, the other operand's X^T X is added to the
parameter's H at the batch indices of that read (per scanned layer; per head where the
head axis is a dot batch axis; the same X for every copy where a batch axis is a free
axis of the product). Anything else a tagged value meets (arithmetic on a weight such
as a LoRA merge, a scan carry such as TTT-Linear's inner weights, a loop) makes its
parameter ``skipped`` with the reason: those are rounded to nearest. Eqns without a
tagged input run as they are (compiled).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore
from jax.sharding import PartitionSpec as P

from ttt_jax import quant
from ttt_jax.config import Config
from ttt_jax.data.tokenizer import Tokenizer
from ttt_jax.errors import ConfigError
from ttt_jax.inference import sampling
from ttt_jax.models.context import SequenceContext
from ttt_jax.models.lm import LM
from ttt_jax.training import optim

DAMP = 0.01
"""lambda: the damping added to diag(H), as a fraction of its mean."""
BLOCK = 128
"""Inputs whose updates are applied together (lazy batch updates)."""
CHUNK_ELEMENTS = 2 ** 25
"""``parameter_codes`` holds about this many H entries (float64) at once."""


# ----------------------------------------------------------------------------- the core


def gptq_codes(w_BxIxO: Any, hessian_BxIxI: Any, scale_BxO: Any, bits: int,
               damp: float = DAMP, act_order: bool = True, block: int = BLOCK
               ) -> np.ndarray:
  """int8 codes [B, I, O] of B matrices W [I, O] on the per-channel scales ``scale``
  [B, O] (module doc), computed in float64. ``hessian``: the inputs' H [B, I, I],
  undamped (``damp`` is added here)."""
  w_BxIxO = np.array(w_BxIxO, np.float64)
  h_BxIxI = np.array(hessian_BxIxI, np.float64)
  scale_Bx1xO = np.asarray(scale_BxO, np.float32)[:, None, :]
  batch, inputs, _ = w_BxIxO.shape
  diag_BxI = np.diagonal(h_BxIxI, axis1=1, axis2=2).copy()
  damped_BxI = diag_BxI + damp * diag_BxI.mean(axis=1, keepdims=True)
  damped_BxI = np.where(damped_BxI > 0, damped_BxI, 1.0)  # every input dead: H = I
  h_BxIxI[:, np.arange(inputs), np.arange(inputs)] = damped_BxI
  order_BxI = (np.argsort(-diag_BxI, axis=1, kind="stable") if act_order
               else np.broadcast_to(np.arange(inputs), (batch, inputs)))
  w_BxIxO = np.take_along_axis(w_BxIxO, order_BxI[:, :, None], axis=1)
  h_BxIxI = np.take_along_axis(np.take_along_axis(h_BxIxI, order_BxI[:, :, None], axis=1),
                               order_BxI[:, None, :], axis=2)
  u_BxIxI = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h_BxIxI)), 1, 2)
  q_BxIxO = np.zeros(w_BxIxO.shape, np.int8)
  for start in range(0, inputs, block):
    stop = min(start + block, inputs)
    w_BxKxO = w_BxIxO[:, start:stop]
    u_BxKxK = u_BxIxI[:, start:stop, start:stop]
    err_BxKxO = np.zeros_like(w_BxKxO)
    for i in range(stop - start):
      q_BxO = quant.codes(w_BxKxO[:, i, None].astype(np.float32), scale_Bx1xO, bits)[:, 0]
      q_BxIxO[:, start + i] = q_BxO
      err_BxO = ((w_BxKxO[:, i] - quant.dequantize(q_BxO, scale_Bx1xO[:, 0]))
                 / u_BxKxK[:, i, i, None])
      w_BxKxO[:, i + 1:] -= u_BxKxK[:, i, i + 1:, None] * err_BxO[:, None, :]
      err_BxKxO[:, i] = err_BxO
    w_BxIxO[:, stop:] -= np.swapaxes(u_BxIxI[:, start:stop, stop:], 1, 2) @ err_BxKxO
  restored_BxIxO = np.empty_like(q_BxIxO)
  np.put_along_axis(restored_BxIxO, order_BxI[:, :, None], q_BxIxO, axis=1)
  return restored_BxIxO


# ----------------------------------------------------------------------------- layouts


class Layout(NamedTuple):
  """The axes of a 'matrix' parameter: batch (indexing matrices), reduction (inputs),
  output (channels), each in axis order."""
  batch: tuple[int, ...]
  reduction: tuple[int, ...]
  output: tuple[int, ...]


def layout(spec: P, shape: tuple[int, ...]) -> Layout | None:
  """The ``Layout`` of a parameter the artifact quantizes as 'matrix', else None."""
  if quant.tensor_kind(spec, shape) != quant.MATRIX:
    return None
  numbers = optim.muon_dimension_numbers(spec)
  reduction, output = tuple(numbers.reduction_axis), tuple(numbers.output_axis)
  batch = tuple(i for i in range(len(shape)) if i not in reduction + output)
  return Layout(batch, tuple(sorted(reduction)), tuple(sorted(output)))


def hessian_shape(lay: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
  """[*batch sizes, I, I] of a parameter of ``shape``."""
  inputs = math.prod(shape[a] for a in lay.reduction)
  return tuple(shape[a] for a in lay.batch) + (inputs, inputs)


def parameter_codes(w: Any, scale: np.ndarray, hessian: np.ndarray, lay: Layout, bits: int,
                    damp: float = DAMP, act_order: bool = True) -> np.ndarray:
  """GPTQ's int8 codes of one parameter ``w`` in its own shape, on the scales ``scale``
  (``quant.quantize``'s, 1 along the reduction axes), with ``hessian`` [*batch, I, I]."""
  w = np.asarray(w, np.float32)
  order = lay.batch + lay.reduction + lay.output
  n_batch = math.prod(w.shape[a] for a in lay.batch)
  moved = np.transpose(w, order)
  matrices = moved.reshape(n_batch, math.prod(w.shape[a] for a in lay.reduction), -1)
  scale_BxO = np.transpose(np.broadcast_to(scale, w.shape), order).reshape(
      matrices.shape)[:, 0]
  hessians = hessian.reshape(n_batch, *hessian.shape[-2:])
  step = max(1, CHUNK_ELEMENTS // hessians[0].size)  # float64 H^-1 of this many at once
  q = np.concatenate([gptq_codes(matrices[i:i + step], hessians[i:i + step],
                                 scale_BxO[i:i + step], bits, damp, act_order)
                      for i in range(0, n_batch, step)])
  return np.transpose(q.reshape(moved.shape), np.argsort(order))


def requantize(encoded: dict[tuple, quant.Encoded], params: nnx.State,
               hessians: dict[tuple, np.ndarray], damp: float = DAMP,
               act_order: bool = True) -> dict[tuple, quant.Encoded]:
  """``encoded`` (``quant.encode_params`` of ``params``) with the codes of every 'matrix'
  parameter in ``hessians`` replaced by GPTQ's on the same scales; a ``ConfigError``
  naming the parameter where ``damp`` leaves its H singular."""
  specs = quant.param_specs(params)
  flat = dict(nnx.to_flat_state(params))
  result = dict(encoded)
  for path, hessian in hessians.items():
    enc = encoded[path]
    w = np.asarray(jax.device_get(flat[path].get_value()), np.float32)
    lay = layout(specs[path], w.shape)
    if enc.kind != quant.MATRIX or lay is None:
      raise ValueError(f"{'/'.join(map(str, path))}: not a quantized matrix")
    try:
      codes = parameter_codes(w, enc.scale, hessian, lay, enc.bits, damp, act_order)
    except np.linalg.LinAlgError:
      raise ConfigError(f"quant.gptq_damp={damp}: the damped input Hessian of "
                        f"{'/'.join(map(str, path))} is not positive definite (its "
                        "calibration inputs span fewer dimensions than it has inputs); "
                        "raise quant.gptq_damp (0.01 by default)") from None
    result[path] = enc._replace(values=codes)
  return result


# ----------------------------------------------------------------------------- calibration


def calibration_batch(model: LM, cfg: Config, start_token: int, n_seqs: int, length: int,
                      seed: int, tokenizer: Tokenizer | None = None
                      ) -> tuple[jax.Array, SequenceContext]:
  """(tokens [N, T], their context): N sequences the model samples at temperature 1
  after ``start_token``, with the run's decode inputs (``tokenizer``: the one they read)."""
  prompt_Nx1 = np.full((n_seqs, 1), start_token, np.int32)
  inputs = sampling.decode_inputs(cfg, tokenizer)
  rng = jax.random.key(seed)
  if not inputs:
    tokens_NxT = sampling.generate(model, prompt_Nx1, length - 1, rng)
    return tokens_NxT, SequenceContext.for_tokens(tokens_NxT)
  generation = sampling.generate_with_state(model, prompt_Nx1, length - 1, rng,
                                            inputs=inputs)
  return generation.tokens_BxT, SequenceContext.for_tokens(generation.tokens_BxT,
                                                           side=generation.side)


class Source(NamedTuple):
  """What a tagged value is of its parameter."""
  leaf: int
  axes: tuple[tuple[int, ...], ...]
  """Per value axis, the parameter axes it spans (merged in C order); () for a unit axis
  that is none of them."""
  fixed: tuple[tuple[int, int], ...] = ()
  """(parameter axis, index) of the axes sliced to one index."""


class Skipped(Exception):
  """A tagged value met something the interpreter does not follow (the message says
  what)."""


PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "name",
                          "reduce_precision", "sharding_constraint", "pvary"})
"""Primitives whose one result is their one operand's values, unchanged or cast."""
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
         "core_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
         "custom_vjp_call_jaxpr": "fun_jaxpr"}
"""Call primitives the interpreter enters, with the param holding their jaxpr."""


class _Interpreter:
  """Runs a jaxpr on concrete values, following tagged values (module doc) and summing
  X^T X per parameter."""

  def __init__(self, layouts: list[Layout | None], shapes: list[tuple[int, ...]]):
    self.layouts, self.shapes = layouts, shapes
    self.sums: dict[int, np.ndarray] = {}
    self.skipped: dict[int, str] = {}

  def skip(self, sources: Sequence[Source | None], reason: str) -> None:
    for source in sources:
      if source is not None:
        self.skipped.setdefault(source.leaf, reason)

  def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
          sources: Sequence[Source | None]) -> tuple[list[Any], list[Source | None]]:
    """(results, their tags) of ``jaxpr`` (open or closed) on ``args`` tagged ``sources``."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
      jaxpr, consts = jaxpr.jaxpr, list(jaxpr.consts) + list(consts)
    env: dict[Any, Any] = {}
    tags: dict[Any, Source | None] = {}

    def read(var):
      return (var.val, None) if isinstance(var, jcore.Literal) else (env[var], tags[var])

    for var, value in zip(jaxpr.constvars, consts):
      env[var], tags[var] = value, None
    for var, value, source in zip(jaxpr.invars, args, sources):
      env[var], tags[var] = value, source
    for eqn in jaxpr.eqns:
      values, in_sources = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
      if any(s is not None for s in in_sources):
        outs, out_sources = self.eqn(eqn, list(values), list(in_sources))
      else:
        outs, out_sources = self.bind(eqn, values), [None] * len(eqn.outvars)
      for var, value, source in zip(eqn.outvars, outs, out_sources):
        env[var], tags[var] = value, source
    results = [read(var) for var in jaxpr.outvars]
    return [v for v, _ in results], [s for _, s in results]

  @staticmethod
  def bind(eqn: Any, values: Sequence[Any]) -> list[Any]:
    outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]

  def eqn(self, eqn: Any, values: list[Any], sources: list[Source | None]
          ) -> tuple[list[Any], list[Source | None]]:
    name = eqn.primitive.name
    try:
      if name == "dot_general":
        self.dot(eqn, values, sources)
        return self.bind(eqn, values), [None]
      if name in CALLS and CALLS[name] in eqn.params:
        return self.run(eqn.params[CALLS[name]], (), values, sources)
      if name == "cond":
        branch = eqn.params["branches"][int(values[0])]
        return self.run(branch, (), values[1:], sources[1:])
      if name == "scan":
        return self.scan(eqn, values, sources)
      if name == "optimization_barrier":  # its operands, unchanged
        return self.bind(eqn, values), list(sources)
      outs = self.bind(eqn, values)
      return outs, [self.follow(eqn, values, sources, outs)]
    except Skipped as reason:
      self.skip(sources, str(reason))
      return self.bind(eqn, values), [None] * len(eqn.outvars)

  def follow(self, eqn: Any, values: list[Any], sources: list[Source | None],
             outs: list[Any]) -> Source:
    """The tag of a one-result eqn's result from its first operand's (the others untagged)."""
    name, source = eqn.primitive.name, sources[0]
    if source is None or any(s is not None for s in sources[1:]) or len(outs) != 1:
      raise Skipped(f"read by {name}")
    in_shape, out_shape = np.shape(values[0]), np.shape(outs[0])
    if name in PASS_THROUGH:
      return source
    if name == "transpose":
      return source._replace(axes=tuple(source.axes[i] for i in eqn.params["permutation"]))
    if name == "squeeze":
      return _drop_unit_axes(source, eqn.params["dimensions"])
    if name == "reshape":
      return _reshaped(source, in_shape, out_shape)
    if name == "broadcast_in_dim" and math.prod(out_shape) == math.prod(in_shape):
      kept = eqn.params["broadcast_dimensions"]
      axes = [()] * len(out_shape)
      for i, dim in enumerate(kept):
        axes[dim] = source.axes[i]
      return source._replace(axes=tuple(axes))
    if name in ("slice", "dynamic_slice"):
      starts = (eqn.params["start_indices"] if name == "slice"
                else [int(v) for v in values[1:]])
      if name == "slice" and any(s not in (None, 1) for s in (eqn.params["strides"] or ())):
        raise Skipped("read by a strided slice")
      return _sliced(source, starts, in_shape, out_shape)
    raise Skipped(f"read by {name}")

  def dot(self, eqn: Any, values: list[Any], sources: list[Source | None]) -> None:
    """Adds the untagged operand's X^T X to the tagged weight's H."""
    if sources[0] is not None and sources[1] is not None:
      raise Skipped("a product of two parameters")
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    side = 0 if sources[0] is not None else 1
    source, x = sources[side], values[1 - side]
    w_c, w_b = (lhs_c, lhs_b) if side == 0 else (rhs_c, rhs_b)
    x_c, x_b = (rhs_c, rhs_b) if side == 0 else (lhs_c, lhs_b)
    lay, shape = self.layouts[source.leaf], self.shapes[source.leaf]
    contracted = [a for d in w_c for a in source.axes[d]]
    if sorted(contracted) != list(lay.reduction):
      raise Skipped("contracted over other axes than its inputs")
    batch_axes = [a for d in w_b for a in source.axes[d]]
    fixed = dict(source.fixed)
    if not set(batch_axes) | set(fixed) <= set(lay.batch):
      raise Skipped("a dot batch axis that is not a batch axis of the parameter")
    x_rows = [d for d in range(np.ndim(x)) if d not in tuple(x_c) + tuple(x_b)]
    x = jnp.transpose(jnp.asarray(x, jnp.float32), tuple(x_b) + tuple(x_rows) + tuple(x_c))
    n_b = math.prod(x.shape[:len(x_b)])
    x_BxNxC = x.reshape(n_b, -1, math.prod(x.shape[len(x_b) + len(x_rows):]))
    sums_BxCxC = np.asarray(jnp.einsum("bnc,bnd->bcd", x_BxNxC, x_BxNxC,
                                       precision=jax.lax.Precision.HIGHEST), np.float64)
    sizes = [shape[a] for a in contracted]
    to_sorted = np.argsort(contracted)
    sums = sums_BxCxC.reshape([shape[a] for a in batch_axes] + sizes + sizes)
    k = len(batch_axes)
    sums = sums.transpose(list(range(k)) + [k + i for i in to_sorted]
                          + [k + len(sizes) + i for i in to_sorted])
    free = [a for a in lay.batch if a not in fixed]  # the accumulator view's batch axes
    sums = sums.reshape([shape[a] for a in batch_axes] + [sums_BxCxC.shape[-1]] * 2)
    sums = sums.transpose([batch_axes.index(a) for a in free if a in batch_axes] + [k, k + 1])
    sums = sums.reshape([shape[a] if a in batch_axes else 1 for a in free]
                        + [sums_BxCxC.shape[-1]] * 2)
    total = self.sums.setdefault(source.leaf, np.zeros(hessian_shape(lay, shape)))
    index = tuple(fixed[a] if a in fixed else slice(None) for a in lay.batch)
    total[index] += sums

  def scan(self, eqn: Any, values: list[Any], sources: list[Source | None]
           ) -> tuple[list[Any], list[Source | None]]:
    """A scan iteration by iteration, a tagged operand sliced with its index fixed."""
    params = eqn.params
    n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
    self.skip(sources[n_consts:n_consts + n_carry], "a scan carry")
    sources = [None if n_consts <= i < n_consts + n_carry else s for i, s in enumerate(sources)]
    if all(s is None for s in sources) or length == 0:
      return self.bind(eqn, values), [None] * len(eqn.outvars)
    consts, carry = values[:n_consts], values[n_consts:n_consts + n_carry]
    xs, xs_sources = values[n_consts + n_carry:], sources[n_consts + n_carry:]
    ys = []
    for step in (reversed(range(length)) if params["reverse"] else range(length)):
      body_sources = sources[:n_consts] + [None] * n_carry + [
          _sliced(s, [step] + [0] * (len(s.axes) - 1), np.shape(x), (1,) + np.shape(x)[1:],
                  drop_first=True) if s is not None else None
          for x, s in zip(xs, xs_sources)]
      outs, out_sources = self.run(params["jaxpr"], (), consts + carry + [x[step] for x in xs],
                                   body_sources)
      self.skip(out_sources, "returned by a scan")
      carry, y = outs[:n_carry], outs[n_carry:]
      ys.append(y)
    if params["reverse"]:
      ys.reverse()
    stacked = [jnp.stack(parts) for parts in zip(*ys)] if ys and ys[0] else []
    return carry + stacked, [None] * len(eqn.outvars)


def _drop_unit_axes(source: Source, dims: Sequence[int]) -> Source:
  """``source`` without its unit axes ``dims`` (a parameter axis among them is fixed at 0)."""
  fixed = list(source.fixed) + [(a, 0) for d in dims for a in source.axes[d]]
  return Source(source.leaf, tuple(ax for d, ax in enumerate(source.axes) if d not in dims),
                tuple(fixed))


def _sliced(source: Source, starts: Sequence[int], in_shape: tuple[int, ...],
            out_shape: tuple[int, ...], drop_first: bool = False) -> Source:
  """The tag of a slice of a tagged value: each axis whole, or one index of at most one
  parameter axis (fixed); ``drop_first``: the first axis then removed (a scan's slice)."""
  axes, fixed = list(source.axes), list(source.fixed)
  for d, (start, size_in, size_out) in enumerate(zip(starts, in_shape, out_shape)):
    if size_out == size_in != 1:
      continue
    if size_out != 1 or (size_in != 1 and len(source.axes[d]) > 1):
      raise Skipped("sliced by more than one index")
    fixed.extend((axis, int(start)) for axis in source.axes[d])
    axes[d] = ()
  if drop_first:
    axes = axes[1:]
  return Source(source.leaf, tuple(axes), tuple(fixed))


def _reshaped(source: Source, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
              ) -> Source:
  """The tag of a reshape that merges whole axes and adds or drops unit axes (a unit
  parameter axis dropped is fixed at 0)."""
  unit = [d for d, size in enumerate(in_shape) if size == 1]
  source = _drop_unit_axes(source, unit)
  in_sizes = [size for size in in_shape if size != 1]
  axes, i = [], 0
  for size in out_shape:
    merged, product = [], 1
    while product < size and i < len(in_sizes):
      product *= in_sizes[i]
      merged.extend(source.axes[i])
      i += 1
    if product != size:
      raise Skipped("read by a reshape that splits an axis")
    axes.append(tuple(merged))
  return source._replace(axes=tuple(axes))


def traced_sums(fn: Any, leaves: Sequence[jax.Array], layouts: Sequence[Layout | None],
                *args: Any) -> tuple[dict[int, np.ndarray], dict[int, str]]:
  """({i: sum of X^T X [*batch, I, I]}, {i: why not}) of the leaves ``leaves[i]`` of
  ``fn(leaves, *args)`` whose layout is given: the interpreter's run (module doc)."""
  closed = jax.make_jaxpr(fn)(list(leaves), *args)
  flat_args = jax.tree.leaves((list(leaves), *args))
  shapes = [tuple(np.shape(leaf)) for leaf in leaves]
  sources = [Source(i, tuple((a,) for a in range(len(shapes[i]))))
             if i < len(leaves) and layouts[i] is not None else None
             for i in range(len(flat_args))]
  interpreter = _Interpreter(list(layouts), shapes)
  interpreter.run(closed, (), flat_args, sources)
  skipped = {i: interpreter.skipped.get(i, "not read by a matrix product")
             for i, lay in enumerate(layouts)
             if lay is not None and (i in interpreter.skipped or i not in interpreter.sums)}
  return {i: s for i, s in interpreter.sums.items() if i not in skipped}, skipped


def input_hessians(model: LM, tokens_BxT: jax.Array, ctx: SequenceContext
                   ) -> tuple[dict[tuple, np.ndarray], dict[tuple, str]]:
  """({path: H [*batch, I, I] = 2 X^T X / n} of every 'matrix' parameter whose inputs
  the interpreter followed, {path: why not} of the other 'matrix' parameters), n the
  number of tokens (module doc)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = list(nnx.to_flat_state(params))
  specs = quant.param_specs(params)
  leaves = [var.get_value() for _, var in flat]
  layouts = [layout(specs[path], tuple(leaf.shape)) for (path, _), leaf in zip(flat, leaves)]

  def forward(leaves: list[jax.Array], tokens_BxT: jax.Array, ctx: SequenceContext
              ) -> jax.Array:
    merged = nnx.from_flat_state([(path, var.replace(leaf))
                                  for (path, var), leaf in zip(flat, leaves)])
    return nnx.merge(graphdef, merged, rest)(tokens_BxT, ctx)

  sums, skipped = traced_sums(forward, leaves, layouts, tokens_BxT, ctx)
  n_tokens = math.prod(np.shape(tokens_BxT))
  return ({flat[i][0]: 2 * total / n_tokens for i, total in sorted(sums.items())},
          {flat[i][0]: why for i, why in sorted(skipped.items())})
