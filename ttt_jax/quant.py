"""Post-training quantization, the quantized artifact, and late quantization-aware training.

Per-row symmetric quantization. A row is one output channel of one layer (and head) of a
parameter: the values sharing one scale are those along the parameter's reduction
(input) axes, found from its logical axis names as the optimizer finds them
(``training.optim.param_group`` / ``muon_dimension_numbers``); batch axes ('layers',
per-head copies) and output axes index the rows. For a row w (n values), with
qmax = 2^(bits-1) - 1 (31 for int6, 127 for int8):

  clip_p = quantile_p(|w|)                 for p in PERCENTILES (linear interpolation)
  s_p    = clip_p / qmax                   (1 where clip_p = 0)
  q_p    = clip(round(w / s_p), -qmax, qmax)
  p*     = argmin_p mean((q_p s_p - w)^2)  (the first p on a tie)
  w^     = q_{p*} s_{p*}

so |w - w^| <= s/2 wherever |w| <= qmax s (inside the clip). q is stored in int8 bytes
(int6 values use 63 of the 256 codes, which lzma then compresses), s in float32 with the
shape of w reduced to 1 along the reduction axes.

What is quantized (``tensor_kind``): 'matrix' parameters with ``bits_matrix`` (6 by
default), 'embedding' ones (any 'vocab' axis: embedding [V, D], untied head [D, V]; a row
is one token's vector) with ``bits_embed`` (8). Kept as raw floats: 'vector' parameters
(norm scales, biases, gates, mHC/CCT/TTT control parameters: any axis registered with
``AxisInfo.vector``, or fewer than two matrix axes) and every tensor of fewer than
``MIN_QUANT_ELEMENTS`` elements, whose bytes hardly count and whose scales would.
A raw tensor is stored as float16 when that loses at most float16's rounding: every value
finite with |x| <= 65504 (no overflow) and every non-zero |x| >= 2^-14 (float16's
smallest normal, so no loss to subnormals); otherwise as float32. A tensor to quantize
that holds an inf or NaN is refused (``encode_params``): it would make its row's scale
NaN.

The artifact (``serialize`` / ``deserialize``), one file, no pickle::

  MAGIC (8 bytes, b'TTTQART1') + xz(body)           one xz stream, lzma preset 9, CRC64 check
  body   = uint64 little-endian header length + header + blob
  header = UTF-8 JSON (sorted keys, no spaces): format version, config, step,
           vocab_size, tokenizer_hash, bits, and per tensor: path (key list), kind,
           dtype ('int8' | 'float16' | 'float32'), shape, offset, nbytes in blob, for
           quantized ones bits and scale {dtype, shape, offset, nbytes}
  blob   = the tensors' raw little-endian C-order bytes, in the header's order

The same params and metadata give the same bytes (xz has no timestamps).

Late QAT (``qat_transform``): once ``qat_active`` (past the warmup and lr(step) <
quant.qat_lr_ratio * optim.lr, a traced boolean, so one compiled step serves both
phases), the step merges the model from fake-quantized matrices, w -> w^ with
clip = the row's max |w| (p = 1: no sort inside the step), and a straight-through
gradient dL/dw = dL/dw^ (``fake_quant``'s custom VJP). Only what the export quantizes as
'matrix' is fake-quantized; the optimizer keeps updating the float weights, and the
train loop's evaluations score those (export to score the quantized ones).
"""

from __future__ import annotations

import functools
import json
import lzma
import math
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax.config import Config, to_dict
from ttt_jax.errors import CheckpointError
from ttt_jax.training import optim

PERCENTILES = (0.9, 0.95, 0.99, 0.999, 0.9999, 1.0)
"""Candidate clips, as quantiles of a row's |w|; the one of least MSE is kept."""
MIN_QUANT_ELEMENTS = 4096
"""Tensors with fewer elements are stored raw (module doc)."""
CHUNK_ELEMENTS = 2 ** 24
"""``quantize`` holds about this many candidate values (elements x percentiles) at once."""
MATRIX, EMBEDDING, RAW = "matrix", "embedding", "raw"
"""Tensor kinds: quantized with bits_matrix, with bits_embed, or stored as floats."""
MAGIC = b"TTTQART1"
FORMAT_VERSION = 1
F16_MAX, F16_TINY = 65504.0, 2.0 ** -14
DTYPES = ("int8", "float16", "float32")
"""The dtypes a tensor or scale may have in an artifact."""
QAT_METRIC = "qat_active"
"""The train step's metric (with late QAT on): 1.0 on steps run on fake-quantized weights."""


def qmax(bits: int) -> int:
  """The largest code of a symmetric ``bits``-bit quantization: 2^(bits-1) - 1."""
  return 2 ** (bits - 1) - 1


# ----------------------------------------------------------------------------- per-row math


def _rows(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  """``x`` with ``axes`` moved to the end and flattened: [*other axes, row length]."""
  moved = np.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  return moved.reshape(moved.shape[:x.ndim - len(axes)] + (-1,))


def scale_of(clip: Any, bits: int) -> Any:
  """s = clip / qmax, and 1 for an all-zero row (clip 0), whose codes are then 0.
  numpy or jax arrays alike (as ``codes`` and ``dequantize``)."""
  return clip / qmax(bits) + (clip <= 0)


def codes(w: Any, scale: Any, bits: int) -> Any:
  """q = clip(round(w / s), -qmax, qmax) as int8."""
  limit = qmax(bits)
  return (w / scale).round().clip(-limit, limit).astype(np.int8)


def dequantize(q: Any, scale: Any) -> Any:
  """w^ = q s, float32."""
  return q.astype(np.float32) * scale.astype(np.float32)


def row_errors(w: np.ndarray, scales: np.ndarray, axes: tuple[int, ...],
               bits: int) -> np.ndarray:
  """The mean squared error of each row for each candidate: ``scales`` [C, *keepdims]."""
  error = np.square(dequantize(codes(w, scales, bits), scales) - w)
  return np.mean(error, axis=tuple(a + 1 for a in axes), keepdims=True)


def quantize(w: Any, axes: tuple[int, ...], bits: int,
             percentiles: tuple[float, ...] = PERCENTILES) -> tuple[np.ndarray, np.ndarray]:
  """(q int8, s float32) of ``w``, rows reduced over ``axes``, with the clip of least
  MSE among ``percentiles`` (module doc). ``s`` keeps w's rank (1 along ``axes``).
  Rows are independent, so a large ``w`` is done in slices of its first row axis
  (``CHUNK_ELEMENTS``), with the same result."""
  w = np.asarray(w, np.float32)
  axes = tuple(sorted(a % w.ndim for a in axes))
  split = next((i for i in range(w.ndim) if i not in axes), None)
  pieces = min(w.size * len(percentiles) // CHUNK_ELEMENTS,
               w.shape[split] if split is not None else 1)
  if pieces > 1:
    parts = [quantize(part, axes, bits, percentiles)
             for part in np.array_split(w, pieces, axis=split)]
    return tuple(np.concatenate(arrays, axis=split) for arrays in zip(*parts))
  clips = np.quantile(_rows(np.abs(w), axes), np.asarray(percentiles), axis=-1)
  clips = np.expand_dims(clips.astype(np.float32), tuple(a + 1 for a in axes))
  scales = scale_of(clips, bits)
  best = np.argmin(row_errors(w, scales, axes, bits), axis=0)
  scale = np.take_along_axis(scales, best[None], axis=0)[0]
  return codes(w, scale, bits), scale


def _fake_quant_forward(w: jax.Array, axes: tuple[int, ...], bits: int) -> jax.Array:
  w32 = w.astype(jnp.float32)
  scale = scale_of(jnp.max(jnp.abs(w32), axis=axes, keepdims=True), bits)
  return dequantize(codes(w32, scale, bits), scale).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant(w: jax.Array, axes: tuple[int, ...], bits: int) -> jax.Array:
  """w^ with clip = the row's max |w|, in w's dtype; its gradient is the identity
  (straight-through estimator)."""
  return _fake_quant_forward(w, axes, bits)


fake_quant.defvjp(lambda w, axes, bits: (_fake_quant_forward(w, axes, bits), None),
                  lambda axes, bits, _, g: (g,))


# ----------------------------------------------------------------------------- which tensors


def tensor_kind(spec: P, shape: tuple[int, ...]) -> str:
  """MATRIX | EMBEDDING | RAW for a parameter of logical axes ``spec`` (module doc)."""
  if math.prod(shape) < MIN_QUANT_ELEMENTS or len(spec) != len(shape):
    return RAW
  group = optim.param_group(spec)
  return {optim.MATRIX: MATRIX, optim.EMBEDDING: EMBEDDING}.get(group, RAW)


def reduction_axes(spec: P, kind: str) -> tuple[int, ...]:
  """The axes one scale spans: a matrix's reduction (input) axes; for an embedding all
  axes but 'vocab' and the stacked ones (one row per token)."""
  if kind == MATRIX:
    return tuple(optim.muon_dimension_numbers(spec).reduction_axis)
  row_axes = (optim.VOCAB_AXIS,) + optim.STACKED_AXES
  names = [entry if isinstance(entry, tuple) else (entry,) for entry in spec]
  return tuple(i for i, n in enumerate(names) if not set(n) & set(row_axes))


def raw_dtype(x: np.ndarray) -> np.dtype:
  """float16 when it only rounds ``x`` (module doc), else float32."""
  magnitude = np.abs(np.asarray(x, np.float32))
  nonzero = magnitude[magnitude > 0]
  fits = (np.all(np.isfinite(magnitude)) and (magnitude.size == 0 or magnitude.max() <= F16_MAX)
          and (nonzero.size == 0 or nonzero.min() >= F16_TINY))
  return np.dtype(np.float16 if fits else np.float32)


class Encoded(NamedTuple):
  """One tensor as the artifact stores it."""
  kind: str
  values: np.ndarray
  """int8 codes (quantized) or the raw float16/float32 values."""
  scale: np.ndarray | None = None
  """float32 per-row scales (quantized only)."""
  bits: int = 0


def encode(w: Any, spec: P, bits_matrix: int, bits_embed: int) -> Encoded:
  """``w`` (logical axes ``spec``) quantized per row, or raw (module doc)."""
  w = np.asarray(w, np.float32)
  kind = tensor_kind(spec, w.shape)
  if kind == RAW:
    return Encoded(RAW, w.astype(raw_dtype(w)))
  bits = bits_matrix if kind == MATRIX else bits_embed
  q, scale = quantize(w, reduction_axes(spec, kind), bits)
  return Encoded(kind, q, scale, bits)


def decode(encoded: Encoded) -> np.ndarray:
  """The float32 tensor an ``Encoded`` stands for."""
  if encoded.kind == RAW:
    return encoded.values.astype(np.float32)
  return dequantize(encoded.values, encoded.scale)


def _flat(tree: nnx.State) -> list[tuple[tuple, Any]]:
  return [(tuple(path), var) for path, var in nnx.to_flat_state(tree)]


def param_specs(params: nnx.State) -> dict[tuple, P]:
  """The logical axes of every parameter of ``params``, by path."""
  return {path: var.get_value() for path, var in _flat(nnx.get_partition_spec(params))}


def encode_params(params: nnx.State, bits_matrix: int = 6,
                  bits_embed: int = 8) -> dict[tuple, Encoded]:
  """Every parameter of ``params`` encoded, by path (in the params' order). A
  ``CheckpointError`` naming the parameter where one to quantize holds a non-finite
  value (its row's scale, so the whole dequantized row, would be NaN)."""
  specs = param_specs(params)
  encoded = {}
  for path, var in _flat(params):
    w = np.asarray(jax.device_get(var.get_value()), np.float32)
    if tensor_kind(specs[path], w.shape) != RAW and not np.all(np.isfinite(w)):
      raise CheckpointError(f"parameter {'/'.join(map(str, path))}: "
                            f"{int(np.sum(~np.isfinite(w)))} values not finite; a quantized "
                            "artifact cannot hold them (export an earlier checkpoint)")
    encoded[path] = encode(w, specs[path], bits_matrix, bits_embed)
  return encoded


# ----------------------------------------------------------------------------- the artifact


def _little_endian(values: np.ndarray) -> bytes:
  return np.ascontiguousarray(values, values.dtype.newbyteorder("<")).tobytes()


def serialize(encoded: dict[tuple, Encoded], meta: dict[str, Any]) -> bytes:
  """The artifact's bytes (module doc); ``meta``: the header's JSON-able fields."""
  entries, chunks, offset = [], [], 0

  def place(values: np.ndarray) -> dict[str, Any]:
    nonlocal offset
    data = _little_endian(values)
    chunks.append(data)
    entry = {"dtype": values.dtype.name, "shape": list(values.shape), "offset": offset,
             "nbytes": len(data)}
    offset += len(data)
    return entry

  for path, enc in encoded.items():
    entry = {"path": list(path), "kind": enc.kind, **place(enc.values)}
    if enc.kind != RAW:
      entry.update(bits=enc.bits, scale=place(enc.scale))
    entries.append(entry)
  header = json.dumps({**meta, "format": FORMAT_VERSION, "tensors": entries},
                      sort_keys=True, separators=(",", ":")).encode()
  body = struct.pack("<Q", len(header)) + header + b"".join(chunks)
  return MAGIC + lzma.compress(body, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


def artifact_meta(cfg: Config, step: int, vocab_size: int, tokenizer_hash: str | None,
                  bits_matrix: int, bits_embed: int) -> dict[str, Any]:
  """The header fields besides the tensors."""
  return {"config": to_dict(cfg), "step": int(step), "vocab_size": int(vocab_size),
          "tokenizer_hash": tokenizer_hash,
          "bits": {MATRIX: bits_matrix, EMBEDDING: bits_embed}}


def _array(blob: bytes, entry: dict[str, Any], path: Path) -> np.ndarray:
  """The array an entry places in ``blob``, checked against the blob's size."""
  dtype, shape = np.dtype(entry["dtype"]).newbyteorder("<"), tuple(entry["shape"])
  offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
  if entry["dtype"] not in DTYPES or any(int(n) < 0 for n in shape):
    raise CheckpointError(f"{path}: damaged artifact (tensor of dtype {entry['dtype']!r}, "
                          f"shape {list(shape)})")
  if nbytes != math.prod(shape) * dtype.itemsize or offset < 0 or offset + nbytes > len(blob):
    raise CheckpointError(f"{path}: damaged artifact (a tensor's bytes lie outside the "
                          "file: truncated?)")
  return np.frombuffer(blob, dtype, math.prod(shape), offset).reshape(shape).astype(
      dtype.newbyteorder("="))


def _entry(entry: dict[str, Any], blob: bytes, path: Path) -> Encoded:
  values = _array(blob, entry, path)
  if entry["kind"] == RAW:
    return Encoded(RAW, values)
  bits, scale = int(entry["bits"]), _array(blob, entry["scale"], path)
  if (entry["kind"] not in (MATRIX, EMBEDDING) or values.dtype != np.int8
      or not 2 <= bits <= 8 or np.abs(values.astype(np.int32)).max(initial=0) > qmax(bits)):
    raise CheckpointError(f"{path}: damaged artifact (tensor {entry['path']}: codes "
                          f"outside int{bits} or of kind {entry['kind']!r})")
  if (scale.ndim != values.ndim or not np.all(np.isfinite(scale))
      or any(n not in (1, m) for n, m in zip(scale.shape, values.shape))):
    raise CheckpointError(f"{path}: damaged artifact (tensor {entry['path']}: scales of "
                          f"shape {list(scale.shape)} for codes of shape "
                          f"{list(values.shape)}, or not finite)")
  return Encoded(entry["kind"], values, scale, bits)


def deserialize(data: bytes, path: Path) -> tuple[dict[str, Any], dict[tuple, Encoded]]:
  """(header, tensors by path) of an artifact's bytes; a ``CheckpointError`` naming
  ``path`` for anything that is not an intact artifact of this format."""
  if not data.startswith(MAGIC):
    raise CheckpointError(f"{path}: not a ttt_jax quantized artifact (no "
                          f"{MAGIC.decode()} header; python -m ttt_jax.export writes one)")
  decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
  try:
    body = decompressor.decompress(data[len(MAGIC):])
  except lzma.LZMAError as e:
    raise CheckpointError(f"{path}: damaged artifact (its compressed data: {e})") from None
  if not decompressor.eof:
    raise CheckpointError(f"{path}: damaged artifact (its compressed data ends early: "
                          "truncated?)")
  if decompressor.unused_data:
    raise CheckpointError(f"{path}: damaged artifact ({len(decompressor.unused_data)} bytes "
                          "after its compressed data)")
  try:
    (length,) = struct.unpack_from("<Q", body)
    header = json.loads(body[8:8 + length].decode())
    if header.get("format") != FORMAT_VERSION:
      raise CheckpointError(f"{path}: artifact format {header.get('format')!r}; this "
                            f"version reads format {FORMAT_VERSION}")
    if not isinstance(header.get("step"), int):
      raise ValueError("no int 'step'")
    blob = body[8 + length:]
    tensors = {tuple(e["path"]): _entry(e, blob, path) for e in header["tensors"]}
  except (struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError,
          AttributeError) as e:
    raise CheckpointError(f"{path}: damaged artifact header ({type(e).__name__}: {e})"
                          ) from None
  return header, tensors


class Artifact(NamedTuple):
  """An artifact read from its file."""
  path: Path
  header: dict[str, Any]
  tensors: dict[tuple, Encoded]


def read_artifact(path: str | Path) -> Artifact:
  """The artifact at ``path`` (``deserialize``); a ``CheckpointError`` naming it when it
  cannot be read or is not intact."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read the artifact ({e.strerror})") from None
  return Artifact(path, *deserialize(data, path))


def artifact_params(artifact: Artifact, like: nnx.State, tokenizer_hash: str | None = None
                    ) -> tuple[nnx.State, int]:
  """(params, step) of ``artifact``, dequantized into the tree, dtypes and shardings of
  ``like`` (the run's params). Refused in one line naming the file where its tensors are
  not ``like``'s or it was made with another tokenizer than ``tokenizer_hash`` (when both
  are known)."""
  path, header, tensors = artifact
  saved_tokenizer = header.get("tokenizer_hash")
  if tokenizer_hash and saved_tokenizer and saved_tokenizer != tokenizer_hash:
    raise CheckpointError(f"{path}: made with another tokenizer (sha256 "
                          f"{saved_tokenizer[:12]}..., this run's {tokenizer_hash[:12]}...)")
  flat = _flat(like)
  missing = [p for p, _ in flat if p not in tensors] + [p for p in tensors
                                                         if p not in dict(flat)]
  if missing:
    raise CheckpointError(f"{path}: not this model's artifact (parameter "
                          f"{'/'.join(map(str, missing[0]))} is in one of them only)")
  leaves = []
  for key, var in flat:
    values, model = decode(tensors[key]), var.get_value()
    if values.shape != tuple(model.shape):
      raise CheckpointError(f"{path}: not this model's artifact ({'/'.join(map(str, key))} "
                            f"has shape {list(values.shape)}, the model's "
                            f"{list(model.shape)})")
    leaves.append((key, var.replace(jax.device_put(values.astype(model.dtype),
                                                   model.sharding))))
  return nnx.from_flat_state(leaves), int(header["step"])


def load_artifact(path: str | Path, like: nnx.State, tokenizer_hash: str | None = None
                  ) -> tuple[nnx.State, int]:
  """``artifact_params`` of the artifact at ``path``."""
  return artifact_params(read_artifact(path), like, tokenizer_hash)


# ----------------------------------------------------------------------------- late QAT


def qat_active(cfg: Config, step: jax.Array) -> jax.Array:
  """Whether optimizer step ``step`` runs on fake-quantized matrices: past the warmup
  and lr(step) < quant.qat_lr_ratio * optim.lr (traced; False when the ratio is 0)."""
  schedule = optim.lr_schedule(cfg.optim, cfg.train.steps)
  warmup = min(cfg.optim.warmup_steps, cfg.train.steps)
  return (step >= warmup) & (schedule(step) < cfg.quant.qat_lr_ratio * cfg.optim.lr)


def qat_start_step(cfg: Config) -> int | None:
  """The first optimizer step ``qat_active`` holds at (None: never within train.steps)."""
  active = np.asarray(jax.jit(functools.partial(qat_active, cfg))(
      jnp.arange(cfg.train.steps)))
  return int(np.argmax(active)) if active.any() else None


def fake_quant_params(params: nnx.State, on: jax.Array, bits: int) -> nnx.State:
  """``params`` with each 'matrix' tensor the export quantizes replaced by its
  ``fake_quant`` where ``on`` (a traced bool), the rest as they are."""
  specs = param_specs(params)

  def one(key: tuple, var: Any) -> Any:
    w = var.get_value()
    if tensor_kind(specs[key], w.shape) != MATRIX:
      return var
    return var.replace(jnp.where(on, fake_quant(w, reduction_axes(specs[key], MATRIX), bits),
                                 w))

  return nnx.from_flat_state([(key, one(key, var)) for key, var in _flat(params)])


def qat_transform(cfg: Config) -> Callable[[nnx.State, jax.Array],
                                          tuple[nnx.State, jax.Array]] | None:
  """``(params, optimizer step) -> (params to merge, on)`` for the train step; None when
  quant.qat_lr_ratio is 0."""
  if cfg.quant.qat_lr_ratio == 0:
    return None

  def transform(params: nnx.State, step: jax.Array) -> tuple[nnx.State, jax.Array]:
    on = qat_active(cfg, step)
    return fake_quant_params(params, on, cfg.quant.qat_bits), on

  return transform
