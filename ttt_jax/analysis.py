"""Weight-space comparison of two runs: ``python -m ttt_jax.analysis --a W1 --b W2``.

Both runs must share the model config (but for compute-only settings: dtype, remat, ...)
and tokenizer (one line names the difference otherwise); their newest usable checkpoints
are compared in float64 on the host.

**Matrices.** A parameter is viewed as the stack of its matrices ``M`` of shape
[in, out]: its batch axes (stacked layers, per-head copies) index the matrices, ``in``
is its reduction axes and ``out`` its output axes, the split Muon uses
(``training.optim.muon_dimension_numbers``). An embedding or untied head is one
[rows, cols] matrix as stored. Vectors (norm scales, biases, control parameters) get the
whole-tensor figures only.

**Whole tensor** (``a``, ``b`` flattened):

  cosine = <a, b> / (|a| |b|),    rel_l2 = |a - b| / |a|

**Per matrix** (singular values s_1 >= ... >= s_r, r = min(in, out)), averaged over a
parameter's matrices:

  operator norm = s_1,   condition number = s_1 / s_r,   stable rank = |M|_F^2 / s_1^2

and the principal angles between the top-k singular subspaces of ``M_a`` and ``M_b``
(k = min(--top-k, r)): with ``Q_a``, ``Q_b`` orthonormal bases of the top-k left
(input-side) singular vectors, cos(theta_i) = sigma_i(Q_a^T Q_b) (Bjorck and Golub,
"Numerical methods for computing angles between linear subspaces"); likewise for the
right (output-side) vectors. Reported: the mean and the smallest cosine.

**Quantization.** ``int6_rel_mse`` = |x - dequant(quant(x))|^2 / |x|^2 of the artifact's
encoding (``ttt_jax.quant``: per-row int6 matrices, int8 embeddings, float16 or float32
for the rest) for each run, and ``int6_mse_ratio``, their ratio b / a.

**Loss barrier** (linear mode connectivity, Frankle et al., "Linear Mode Connectivity
and the Lottery Ticket Hypothesis"): on run a's validation batches,

  barrier = L((theta_a + theta_b) / 2) - (L(theta_a) + L(theta_b)) / 2

Prints a table (one row per parameter) and the summary, and writes everything as JSON
(``--out``, by default ``W1/analysis_vs_<W2's name>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ttt_jax import compare as compare_lib
from ttt_jax import diagnostics, quant, runs
from ttt_jax.config import to_dict
from ttt_jax.data import corpus as corpus_lib
from ttt_jax.errors import ConfigError, user_errors
from ttt_jax.eval import lm as eval_lm
from ttt_jax.training import optim
from ttt_jax.training.step import make_eval_step

# ----------------------------------------------------------------------------- the math


def matrix_view(x: np.ndarray, reduction: tuple[int, ...], output: tuple[int, ...]
                ) -> np.ndarray:
  """[batch, in, out]: the batch axes (all others, in order) first, then the flattened
  reduction and output axes."""
  batch = tuple(i for i in range(x.ndim) if i not in reduction + output)
  moved = np.transpose(x, batch + reduction + output)
  n_in = math.prod(x.shape[i] for i in reduction)
  n_out = math.prod(x.shape[i] for i in output)
  return moved.reshape(-1, n_in, n_out)


def spectrum_stats(m: np.ndarray) -> dict[str, float]:
  """Operator norm, condition number (inf for a singular matrix) and stable rank."""
  s = np.linalg.svd(m, compute_uv=False)
  top, bottom = float(s[0]), float(s[-1])
  return {"op_norm": top, "condition": top / bottom if bottom > 0 else math.inf,
          "stable_rank": float(np.sum(s ** 2) / top ** 2) if top > 0 else 0.0}


def subspace_cosines(basis_a: np.ndarray, basis_b: np.ndarray) -> np.ndarray:
  """Cosines of the principal angles between the column spans of two orthonormal bases,
  largest first."""
  return np.clip(np.linalg.svd(basis_a.T @ basis_b, compute_uv=False), 0.0, 1.0)


def top_subspace_cosines(m_a: np.ndarray, m_b: np.ndarray, k: int
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(left, right) principal-angle cosines between the top-k singular subspaces."""
  u_a, _, vt_a = np.linalg.svd(m_a, full_matrices=False)
  u_b, _, vt_b = np.linalg.svd(m_b, full_matrices=False)
  k = min(k, u_a.shape[1])
  return (subspace_cosines(u_a[:, :k], u_b[:, :k]),
          subspace_cosines(vt_a[:k].T, vt_b[:k].T))


def _mean(values: list[float]) -> float:
  return float(np.mean(values)) if values else math.nan


def roundtrip_rel_mse(x: np.ndarray, spec: Any) -> float:
  """|x - decode(encode(x))|^2 / |x|^2 of the artifact's encoding (``quant.encode``:
  int6 matrices, int8 embeddings, the rest as float16 or float32)."""
  x = np.asarray(x, np.float32)
  error = quant.decode(quant.encode(x, spec, bits_matrix=6, bits_embed=8)) - x
  total = float(np.sum(np.square(x, dtype=np.float64)))
  return float(np.sum(np.square(error, dtype=np.float64)) / total) if total else 0.0


def compare_tensors(a: np.ndarray, b: np.ndarray, matrices: tuple | None, top_k: int
                    ) -> dict[str, Any]:
  """The figures of one parameter; ``matrices`` is (reduction, output) axes, or None for
  a vector (whole-tensor figures only)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
  row: dict[str, Any] = {
      "shape": list(a.shape),
      "cosine": float(np.vdot(a, b) / (norm_a * norm_b)) if norm_a and norm_b else math.nan,
      "rel_l2": float(np.linalg.norm(a - b) / norm_a) if norm_a else math.nan}
  if matrices is None:
    return row
  views = matrix_view(a, *matrices), matrix_view(b, *matrices)
  for name, stack in zip("ab", views):
    stats = [spectrum_stats(m) for m in stack]
    for key in ("op_norm", "condition", "stable_rank"):
      row[f"{key}_{name}"] = _mean([s[key] for s in stats])
  left, right = zip(*(top_subspace_cosines(m_a, m_b, top_k) for m_a, m_b in zip(*views)))
  row["subspace_k"] = int(len(left[0]))
  for side, cosines in (("left", left), ("right", right)):
    row[f"subspace_cos_{side}_mean"] = _mean([float(c.mean()) for c in cosines])
    row[f"subspace_cos_{side}_min"] = float(min(c.min() for c in cosines))
  return row


# ----------------------------------------------------------------------------- two runs


def _path_name(path: tuple) -> str:
  return "/".join(str(k) for k in optim._path_key(path))


def _matrix_axes(spec: Any, ndim: int) -> tuple | None:
  """(reduction, output) axes of a parameter, or None for a vector."""
  group = optim.param_group(spec)
  if group == optim.MATRIX:
    dims = optim.muon_dimension_numbers(spec)
    return tuple(dims.reduction_axis), tuple(dims.output_axis)
  if group == optim.EMBEDDING and ndim == 2:
    return (0,), (1,)
  return None


def compare_params(params_a: Any, params_b: Any, logical_axes: Any, top_k: int
                   ) -> dict[str, dict[str, Any]]:
  """``compare_tensors`` of every parameter, by path."""
  table = optim._SpecTable(logical_axes)
  flat_a, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(params_a))
  flat_b = jax.tree_util.tree_leaves(jax.device_get(params_b))
  rows = {}
  for (path, a), b in zip(flat_a, flat_b):
    spec = table.spec_of(path, a)
    row = compare_tensors(np.asarray(a), np.asarray(b), _matrix_axes(spec, np.ndim(a)), top_k)
    row["int6_rel_mse_a"], row["int6_rel_mse_b"] = (roundtrip_rel_mse(x, spec) for x in (a, b))
    row["int6_mse_ratio"] = (row["int6_rel_mse_b"] / row["int6_rel_mse_a"]
                             if row["int6_rel_mse_a"] else math.nan)
    rows[_path_name(path)] = row
  return rows


def _check_same_model(cfg_a, cfg_b, a: Path, b: Path) -> None:
  """Refuses (one line) runs of other models; settings that change only how the step
  computes (``ModelConfig.compute_only_keys``: dtype, remat, attention impl, ...) may
  differ, as between a checkpoint and the run resuming it (``runs.model_changes``)."""
  changes = runs.model_changes(to_dict(cfg_a.model), cfg_b.model)
  if changes:
    raise ConfigError(f"--b {b}: another model than --a {a} ({changes[0]}, --a -> --b); "
                      "only runs of one model config can be compared")


def _check_same_shapes(params_a: Any, params_b: Any, a: Path, b: Path) -> None:
  """Refuses (one line) runs whose params differ in shape although their model configs
  agree: another vocabulary (a pre-tokenized corpus has no tokenizer.model to compare)."""
  flat_a, _ = jax.tree_util.tree_flatten_with_path(params_a)
  for (path, x), y in zip(flat_a, jax.tree.leaves(params_b), strict=True):
    if np.shape(x) != np.shape(y):
      raise ConfigError(f"--b {b}: {_path_name(path)} has shape {list(np.shape(y))}, "
                        f"{list(np.shape(x))} in --a {a} (another vocabulary); only runs "
                        "of one model config and tokenizer can be compared")


def loss_barrier(cfg, graphdef, mesh, params_a, params_b, batches: int) -> dict[str, float]:
  """Validation losses at both ends and at the linear midpoint, and the barrier."""
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  corpus = corpus_lib.prepare_corpus(cfg.data, log=log)
  eval_batches, _ = eval_lm.validation_batches(cfg, corpus, mesh, batches)
  step = jax.jit(make_eval_step(graphdef))
  pieces = eval_lm.piece_bytes(corpus, mesh)
  midpoint = jax.tree.map(lambda x, y: ((x.astype(np.float32) + y.astype(np.float32)) / 2
                                        ).astype(x.dtype), params_a, params_b)
  loss = {name: eval_lm.evaluate(step, params, eval_batches, pieces)["eval_loss"]
          for name, params in (("a", params_a), ("b", params_b), ("mid", midpoint))}
  return {"loss_a": loss["a"], "loss_b": loss["b"], "loss_mid": loss["mid"],
          "barrier": loss["mid"] - (loss["a"] + loss["b"]) / 2}


def analyse(a: Path, b: Path, *, top_k: int, batches: int, barrier: bool) -> dict[str, Any]:
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  cfg_a, graphdef, params_a, step_a, mesh = runs.load_trained(a, log=log)
  cfg_b, _, params_b, step_b, _ = runs.load_trained(b, log=log)
  _check_same_model(cfg_a, cfg_b, a, b)
  if (a / "tokenizer.model").exists() != (b / "tokenizer.model").exists() or (
      (a / "tokenizer.model").exists()
      and (a / "tokenizer.model").read_bytes() != (b / "tokenizer.model").read_bytes()):
    raise ConfigError(f"--b {b}: another tokenizer than --a {a}; the token ids differ")
  _check_same_shapes(params_a, params_b, a, b)
  logical_axes = nnx.get_partition_spec(params_a)
  result: dict[str, Any] = {"a": {"workdir": str(a), "step": step_a},
                            "b": {"workdir": str(b), "step": step_b}, "top_k": top_k,
                            "params": compare_params(params_a, params_b, logical_axes, top_k)}
  if barrier:
    result["barrier"] = loss_barrier(cfg_a, graphdef, mesh, params_a, params_b, batches)
  return result


# ----------------------------------------------------------------------------- command line

_COLUMNS = (("cosine", "cos"), ("rel_l2", "rel_l2"), ("subspace_cos_left_mean", "sub_in"),
            ("subspace_cos_right_mean", "sub_out"), ("op_norm_a", "opnorm_a"),
            ("op_norm_b", "opnorm_b"), ("stable_rank_a", "srank_a"),
            ("stable_rank_b", "srank_b"), ("condition_a", "cond_a"),
            ("condition_b", "cond_b"), ("int6_rel_mse_a", "int6_a"),
            ("int6_rel_mse_b", "int6_b"))


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def report(result: dict[str, Any]) -> str:
  """The table of ``analyse``'s result, one row per parameter, and the barrier line."""
  rows = [[name, "x".join(map(str, row["shape"])),
           *(_cell(row.get(key)) for key, _ in _COLUMNS)]
          for name, row in result["params"].items()]
  lines = [compare_lib.table(["param", "shape", *(title for _, title in _COLUMNS)], rows)]
  if "barrier" in result:
    b = result["barrier"]
    lines.append(f"loss barrier at the midpoint: {b['barrier']:+.4f} nats (a {b['loss_a']:.4f}, "
                 f"b {b['loss_b']:.4f}, midpoint {b['loss_mid']:.4f})")
  return "\n".join(lines)


def _json_safe(value: Any) -> Any:
  """inf and nan (a singular matrix's condition number) as null: strict JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ttt_jax.analysis",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--a", required=True, metavar="W1", help="a run directory")
  parser.add_argument("--b", required=True, metavar="W2",
                      help="another run directory of the same model config and tokenizer")
  parser.add_argument("--top-k", type=int, default=8,
                      help="singular subspace size for the principal angles (default 8)")
  parser.add_argument("--batches", type=int, default=0,
                      help="validation batches for the loss barrier (0: run a's eval.batches)")
  parser.add_argument("--no-barrier", action="store_true",
                      help="skip the loss barrier (no forward passes)")
  parser.add_argument("--out", default=None,
                      help="JSON output file (default W1/analysis_vs_<W2's name>.json)")
  args = parser.parse_args(argv)
  with user_errors():
    if args.top_k < 1:
      raise ConfigError(f"--top-k: must be at least 1, got {args.top_k}")
    if args.batches < 0:
      raise ConfigError(f"--batches: must be 0 or more, got {args.batches}")
    a, b = runs.check_workdir(args.a), runs.check_workdir(args.b)
    diagnostics.library_logs_until_exit(diagnostics.run_log(a))
    result = analyse(a, b, top_k=args.top_k, batches=args.batches,
                     barrier=not args.no_barrier)
    out = Path(args.out) if args.out else a / f"analysis_vs_{b.resolve().name}.json"
    try:
      out.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    except OSError as e:
      raise ConfigError(f"--out {out}: cannot write ({e.strerror})") from None
  print(report(result))
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
