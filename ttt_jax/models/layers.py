"""Shared building blocks: RMSNorm, rotary position embedding, SwiGLU, embeddings.

RMSNorm (Zhang & Sennrich, 2019), statistics in fp32 whatever the compute dtype:

    rms_norm(x) = x / sqrt(mean_d(x_d^2) + eps) * scale

Rotary position embedding (RoPE; Su et al., 2021), "rotate-half" layout (GPT-NeoX / Llama):
the head vector x in R^K is split into halves (x1, x2); pair i (x1_i, x2_i) is rotated by
angle m * w_i at position m, with w_i = theta^(-2i/K), i = 0..K/2-1:

    rope(x, m) = (x1 * cos(m w) - x2 * sin(m w),  x2 * cos(m w) + x1 * sin(m w))

Rotations preserve norms and <rope(q, m), rope(k, n)> depends only on (m - n).

Parameters are created through ``param``, which attaches logical axis names (the
``out_sharding`` metadata that ``nnx.get_partition_spec`` reads) and never shards eagerly;
the sharding code maps the names to mesh axes. Every name is registered in
``registry.LOGICAL_AXES`` with what it means to the optimizer and the mesh: the core
names below here ('layers' is added by the stacking transform in lm.py, never by a
layer itself), a mechanism's own names in its module.

Dtypes: parameters are stored in ``param_dtype`` and cast to the activation's dtype at use,
so matmuls run in the compute dtype (float32 or bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import registry
from ttt_jax.registry import AxisInfo

for _name, _info in {
    "vocab": AxisInfo("the vocabulary (embedding, head)"),
    "embed": AxisInfo("the residual stream width"),
    "mlp": AxisInfo("the feed-forward hidden width"),
    "heads": AxisInfo("query heads (times head_dim)"),
    "kv_heads": AxisInfo("key/value heads (times head_dim)"),
    "head_dim": AxisInfo("the width of one head"),
    "norm": AxisInfo("a normalisation's scale or shift", vector=True),
    "layers": AxisInfo("stacked copies of a block"),
}.items():
  registry.LOGICAL_AXES.register(_name, _info)


# ----------------------------------------------------------------------------- params


def param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
  """A parameter carrying logical axis names (one per dim), never sharded eagerly.

  ``out_sharding`` is the current name of the metadata that flax 0.12 also accepts as
  the deprecated ``sharding_names``; ``nnx.get_partition_spec`` turns it into a
  ``PartitionSpec`` of logical names.
  """
  if len(names) != value.ndim:
    raise ValueError(f"param of shape {value.shape} got {len(names)} axis names {names}")
  unknown = [n for n in names if n not in registry.LOGICAL_AXES]
  if unknown:
    raise ValueError(f"unknown logical axis names {unknown}; registered: "
                     f"{registry.LOGICAL_AXES.names()}")
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype: jnp.dtype) -> jax.Array:
  """N(0, std^2) samples drawn in float32, stored in ``dtype``."""
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- pure math


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis; statistics in float32, result in ``x.dtype``."""
  x_f32 = x.astype(jnp.float32)
  mean_square = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
  normed = x_f32 * jax.lax.rsqrt(mean_square + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions_BxT: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Rotation angles m * w_i for every position m and pair i: [B, T, K/2] float32."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  exponents_K2 = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq_K2 = 1.0 / (theta ** exponents_K2)
  return positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq_K2[None, None, :]


def apply_rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotates each head vector by its position (rotate-half layout); computed in float32."""
  angles_BxTx1xK2 = rope_angles(positions_BxT, x_BxTxHxK.shape[-1], theta)[:, :, None, :]
  return rope_rotate(x_BxTxHxK, jnp.cos(angles_BxTx1xK2), jnp.sin(angles_BxTx1xK2))


def rope_rotate(x_BxTxHxK: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates each head vector by the angles of ``cos`` and ``sin`` ([.., K/2], broadcast
  against x's pairs; rotate-half layout) in float32."""
  head_dim = x_BxTxHxK.shape[-1]
  x_f32 = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x_f32[..., : head_dim // 2], x_f32[..., head_dim // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxTxHxK.dtype)


def dense(x_BxTxD: jax.Array, w_DxF: jax.Array,
          preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """x @ W over x's last axis, as one 2-D matmul with the leading axes flattened.

  Same result as ``einsum('btd,df->btf')``; the flattening matters for speed: XLA:CPU
  runs the weight gradient of the 3-D form (two contracting axes, 'btd,btf->df') about
  2x slower than the same product on [B*T, D] (benchmarks/RESULTS.md).
  """
  leading = x_BxTxD.shape[:-1]
  y_NxF = jnp.dot(x_BxTxD.reshape(-1, x_BxTxD.shape[-1]), w_DxF,
                  preferred_element_type=preferred_element_type)
  return y_NxF.reshape(*leading, w_DxF.shape[-1])


def embed_tokens(tokens_BxT: jax.Array, embedding_VxD: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Row lookup into the embedding table, returned in the compute dtype."""
  return jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(dtype)


def logits_from_head(x_BxTxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
  """x @ W_head with float32 accumulation and float32 logits."""
  return dense(x_BxTxD, head_DxV.astype(x_BxTxD.dtype), preferred_element_type=jnp.float32)


def logits_from_embedding(x_BxTxD: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
  """Tied head: x @ E^T with float32 accumulation and float32 logits."""
  return dense(x_BxTxD, embedding_VxD.astype(x_BxTxD.dtype).T,
               preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
  """Holds the [D] scale (init ones) of ``rms_norm``."""

  def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
    self.eps = eps
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)
