"""``bench ttt``: ``python -m ttt_jax.bench ttt [--backbone mamba] [--batch 2] [--seq 512]
[--width 256] [--heads 4] [--mini-batch 16] [--dtype float32] [--remat-group 0]``.

Times one TTT-Linear layer alone (projections, convs, inner TTT, output) on random
inputs: forward and forward+backward (gradients of every parameter and of the input)
with the inner model in the dual form and in the primal anchored form, and decoding
token by token (``ttt_linear_decode_step`` in a scan over the sequence). It reports
median and best times, tokens/s and the compiled peak memory (for decode also that of
one step, which does not grow with the sequence). Variants are compiled first, then
timed in interleaved rounds. It takes no config.

Per variant it also reports what XLA's compiled program says about its traffic, which
does not depend on how busy the machine is: the cost analysis (FLOPs and bytes
accessed) and the temporary buffers (``temp_size_in_bytes`` of the memory analysis).
XLA's cost analysis counts the body of a loop once, not once per iteration, so for the
scans (the dual form's mini-batches, the primal form's and decode's tokens) it
describes the code around the loops plus one iteration; compare it between
implementations of the same loop structure, not as total work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.bench import common
from ttt_jax.compare import table
from ttt_jax.config import ModelConfig
from ttt_jax.models.mixers import ttt_linear
from ttt_jax.training.step import compile_step


def compiled_costs(compiled: jax.stages.Compiled) -> dict:
  """XLA's cost analysis of a compiled program: FLOPs and bytes accessed (each loop body
  counted once; None where the backend reports none)."""
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # older jax: one dict per program
    costs = costs[0] if costs else None
  costs = costs or {}
  return {"xla_flops": costs.get("flops"), "xla_bytes_accessed": costs.get("bytes accessed")}


def bench_ttt(backbone: str, batch: int, seq: int, width: int, heads: int, mini_batch: int,
              dtype: str, remat_group: int, iters: int, warmup: int) -> dict:
  cfg = ModelConfig(mixer=ttt_linear.TTTLinearConfig(backbone=backbone, mini_batch=mini_batch,
                                                     remat_group=remat_group),
                    d_model=width, n_heads=heads, dtype=dtype, n_layers=1)
  layer = ttt_linear.TTTLinear(cfg, rngs=nnx.Rngs(0))
  params, spec = layer.params(), layer.spec
  rng = np.random.default_rng(0)
  x_BxTxD = jnp.asarray(rng.normal(size=(batch, seq, width)), jnp.dtype(dtype))
  cotangent_BxTxD = jnp.asarray(rng.normal(size=(batch, seq, width)), jnp.dtype(dtype))

  def forward(params, x_BxTxD, form):
    return ttt_linear.ttt_linear_forward(params, spec, x_BxTxD, inner_form=form)[0]

  def forward_backward(params, x_BxTxD, form):
    def loss(params, x_BxTxD):
      y_BxTxD = forward(params, x_BxTxD, form).astype(jnp.float32)
      return jnp.sum(y_BxTxD * cotangent_BxTxD.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(params, x_BxTxD)

  def decode_sequence(params, x_BxTxD):
    cache = ttt_linear.init_cache(params, spec, batch, x_BxTxD.dtype)
    step = lambda cache, x_BxD: ttt_linear.ttt_linear_decode_step(params, spec, cache, x_BxD)
    _, y_TxBxD = jax.lax.scan(step, cache, jnp.swapaxes(x_BxTxD, 0, 1))
    return y_TxBxD

  cases = {}
  for form in ("dual", "primal"):
    cases[f"{form}_fwd_bwd"] = (lambda p, x, f=form: forward_backward(p, x, f), params, x_BxTxD)
    cases[f"{form}_fwd"] = (lambda p, x, f=form: forward(p, x, f), params, x_BxTxD)
  cases["decode"] = (decode_sequence, params, x_BxTxD)
  compiled, results = {}, {}
  for name, (fn, *args) in cases.items():
    compiled[name], compile_s, memory = compile_step(jax.jit(fn), *args, log=lambda _: None)
    results[name] = {"compile_s": compile_s, "peak_bytes": memory.get("peak_bytes"),
                     "temp_bytes": memory.get("temp_size_in_bytes"),
                     **compiled_costs(compiled[name])}
    for _ in range(warmup):
      jax.block_until_ready(compiled[name](*args))
  times = {name: [] for name in cases}
  for _ in range(iters):  # interleaved rounds: a busy shared CPU slows every variant alike
    for name, (_, *args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*args))
      times[name].append(time.perf_counter() - start)
  for name, samples in times.items():
    median = statistics.median(samples)
    results[name].update({"median_ms": 1e3 * median, "best_ms": 1e3 * min(samples),
                          "tokens_per_sec": batch * seq / median})
  decode = results["decode"]
  decode["per_token_ms"] = decode["median_ms"] / seq
  cache = ttt_linear.init_cache(params, spec, batch, x_BxTxD.dtype)
  one_step = jax.jit(lambda p, c, x: ttt_linear.ttt_linear_decode_step(p, spec, c, x))
  _, _, step_memory = compile_step(one_step, params, cache, x_BxTxD[:, 0], log=lambda _: None)
  decode["one_step_peak_bytes"] = step_memory.get("peak_bytes")
  return {
      "benchmark": "ttt",
      "shape": {"backbone": backbone, "batch": batch, "seq": seq, "width": width,
                "heads": heads, "head_dim": width // heads, "mini_batch": mini_batch,
                "dtype": dtype, "remat_group": remat_group},
      "results": results,
      "dual_speedup_fwd_bwd": (results["primal_fwd_bwd"]["median_ms"]
                               / results["dual_fwd_bwd"]["median_ms"]),
      "dual_speedup_fwd": results["primal_fwd"]["median_ms"] / results["dual_fwd"]["median_ms"],
      "device_kind": jax.devices()[0].device_kind,
      "machine": common.machine(processor=True),
  }


def summary(result: dict) -> list[str]:
  """A table of the variants (times, then XLA's view of the compiled program), then the
  dual form's speedup and the decode step."""
  shape = result["shape"]
  flops = lambda r: "-" if r["xla_flops"] is None else common.human_count(r["xla_flops"])
  rows = [[name, f"{r['median_ms']:.3f}", f"{r['best_ms']:.3f}",
           common.human_count(r["tokens_per_sec"]), common.human_bytes(r["peak_bytes"]),
           f"{r['compile_s']:.1f}", flops(r), common.human_bytes(r["xla_bytes_accessed"]),
           common.human_bytes(r["temp_bytes"])] for name, r in result["results"].items()]
  decode = result["results"]["decode"]
  return [
      f"ttt: one TTT-Linear layer ({shape['backbone']}), batch {shape['batch']} x seq "
      f"{shape['seq']}, width {shape['width']}, {shape['heads']} heads, mini-batch "
      f"{shape['mini_batch']}, {shape['dtype']}",
      table(["variant", "median ms", "best ms", "tokens/s", "peak memory", "compile s",
             "XLA flops", "XLA bytes", "temp"], rows),
      f"dual form vs primal: {result['dual_speedup_fwd_bwd']:.2f}x (fwd+bwd), "
      f"{result['dual_speedup_fwd']:.2f}x (fwd); decode {decode['per_token_ms']:.4f} ms/token, "
      f"one step's peak memory {common.human_bytes(decode['one_step_peak_bytes'])}; XLA "
      f"flops and bytes count each loop body once"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--backbone", default="mamba", choices=("mamba", "transformer"),
                      help="TTT layer backbone: mamba (with the pre-conv) or transformer")
  parser.add_argument("--batch", type=int, default=2, help="sequences per call")
  parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
  parser.add_argument("--width", type=int, default=256, help="model width (d_model)")
  parser.add_argument("--heads", type=int, default=4, help="heads (head width: width / heads)")
  parser.add_argument("--mini-batch", type=int, default=16,
                      help="TTT mini-batch: tokens per inner gradient step")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype of the layer (the fast weights stay float32)")
  parser.add_argument("--remat-group", type=int, default=0,
                      help="mini-batches per rematerialised group of the inner scan (0: none)")
  parser.add_argument("--iters", type=int, default=10,
                      help="timed rounds (one call of each variant)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compile")


def _run(cfg: None, args: argparse.Namespace) -> dict:
  del cfg
  return bench_ttt(args.backbone, args.batch, args.seq, args.width, args.heads,
                   args.mini_batch, args.dtype, args.remat_group, args.iters, args.warmup)


BENCH = common.register(common.Bench(
    "ttt", "one TTT-Linear layer: dual vs primal vs decode", __doc__, _add_arguments, _run,
    summary,
    uses_config=False,
    counts=(("batch", 1), ("seq", 1), ("width", 1), ("heads", 1), ("mini_batch", 1),
            ("remat_group", 0), ("iters", 1), ("warmup", 0))))
