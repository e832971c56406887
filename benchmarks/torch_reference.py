"""Times the handoff's PyTorch reference ``MHCTransformerLM`` on this machine (issue 5).

``python -m ttt_jax.bench mhc`` reports mHC throughput against this reference, so the
reference has to run on the same CPU. Its source is not part of ttt_jax: it is the
listing in the appendix of ``shared/seeds/mhc_sdft_tttdiscover_handoff.md``. This script
reads the five files the model needs out of that document (the fenced block under each
``## `path``` heading, byte for byte), writes them to a temporary directory, imports them
and times training steps. It needs PyTorch, which is not a ttt_jax dependency:

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy
    /tmp/torch/bin/python benchmarks/torch_reference.py \
        --seed-doc ../shared/seeds/mhc_sdft_tttdiscover_handoff.md

The config is that of ``configs/bench_dense.yaml`` with mHC on, in the reference's own
field names: 4 layers, d_model 256, 4 heads of 64, d_ff 688 (SwiGLU), vocab 8192, tied
embeddings, n = 4 streams, Sinkhorn t_max = 20, float32, batch 8 x 256, AdamW (lr 1e-3,
torch defaults otherwise), ``torch.set_num_threads(--threads)``. A timed step is forward
on random token ids, next-token cross-entropy, backward, ``AdamW.step`` and
``zero_grad``. The reference has no plain-residual switch (``MHCTransformerLM`` always
builds mHC blocks), so only the mHC model is timed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

FILES = (
    "src/llm_mhc_sdft_tttd/__init__.py",
    "src/llm_mhc_sdft_tttd/config.py",
    "src/llm_mhc_sdft_tttd/model/layers.py",
    "src/llm_mhc_sdft_tttd/model/mhc.py",
    "src/llm_mhc_sdft_tttd/model/transformer.py",
)
HEADING = re.compile(r"^## `([^`]+)`\s*$")


def listings(document: str) -> dict[str, str]:
  """path -> body of the first fenced block under each ``## `path``` heading."""
  lines = document.splitlines(keepends=True)
  heads = [(i, m.group(1)) for i, line in enumerate(lines) if (m := HEADING.match(line))]
  bodies = {}
  for k, (start, path) in enumerate(heads):
    end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
    opening = next((j for j in range(start + 1, end) if lines[j].startswith("```")), None)
    if opening is None:
      continue
    closing = next((j for j in range(opening + 1, end) if lines[j].rstrip("\n") == "```"),
                   None)
    if closing is None:
      raise SystemExit(f"{path}: unterminated code block in the seed document")
    bodies[path] = "".join(lines[opening + 1:closing])
  return bodies


def extract(seed_doc: Path, root: Path) -> None:
  try:
    bodies = listings(seed_doc.read_text(encoding="utf-8"))
  except OSError as e:
    raise SystemExit(f"--seed-doc: cannot read {seed_doc} ({e.strerror})") from None
  missing = [path for path in FILES if path not in bodies]
  if missing:
    raise SystemExit(f"--seed-doc: {seed_doc} has no listing of {', '.join(missing)}")
  for path in FILES:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(bodies[path], encoding="utf-8")
  (root / "src/llm_mhc_sdft_tttd/model/__init__.py").touch()  # the seed lists none


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed-doc", type=Path, required=True)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args(argv)
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    raise SystemExit("torch_reference.py needs PyTorch (not a ttt_jax dependency): see "
                     "the module docstring") from None

  with tempfile.TemporaryDirectory() as directory:
    extract(args.seed_doc, Path(directory))
    sys.path.insert(0, str(Path(directory) / "src"))
    from llm_mhc_sdft_tttd.config import MHCConfig, ModelConfig
    from llm_mhc_sdft_tttd.model.transformer import MHCTransformerLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, seq_len = 8, 256
    cfg = ModelConfig(vocab_size=8192, n_layers=4, d_model=256, n_heads=4, d_head=64,
                      d_ff=688, max_seq_len=seq_len,
                      mhc=MHCConfig(n_streams=4, sinkhorn_tmax=20))
    model = MHCTransformerLM(cfg).to(torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
      ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator)
      start = time.perf_counter()
      logits = model(ids)
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
      loss.backward()
      optimizer.step()
      optimizer.zero_grad()
      elapsed = time.perf_counter() - start
      if i >= args.warmup:
        times.append(elapsed)
    median = statistics.median(times)
    print(json.dumps({
        "benchmark": "torch_reference_mhc",
        "model_config": json.loads(cfg.to_json()),
        "batch": batch, "seq_len": seq_len,
        "step_time_median_s": median, "step_time_min_s": min(times),
        "tokens_per_sec_median": batch * seq_len / median,
        "tokens_per_sec_best": batch * seq_len / min(times),
        "step_times_s": times,
        "final_loss": float(loss.detach()),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
  main()
