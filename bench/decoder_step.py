"""The tiny decoder's train step on this CPU (configs/decoder_tiny: a random Qwen3-shape model, LoRA rank 8): packed
rows against one text a row, padded, over an epoch of its data; real (non-padding) tokens per second."""
import os

from bench import harness
from bench.packing_bench import jax_runner
from piccolo_jax import config, data, encode, models
from piccolo_jax import state as state_lib
from piccolo_jax.configs import decoder_tiny

RUNS = {"packed": {}, "one text a row": {"pack_segments": 1},
        "one text a row, one row length": {"pack_segments": 1, "pack_lengths": 1}}


def main():
  p = harness.parser(__doc__)
  p.add_argument("--block", type=int, default=4, help="steps per turn when alternating the runs")
  p.add_argument("--limit", type=int, default=1024, help="rows per dataset")
  p.add_argument("--out", default=str(harness.ROOT / "BENCHMARKS.md"))
  args = p.parse_args()
  os.chdir(harness.ROOT)  # Data paths are relative.
  c, load0 = decoder_tiny.get_config(), os.getloadavg()[0]
  c.data.datasets = tuple(dict(d, limit=args.limit) for d in c.data.datasets)
  cfg, params, tok_dir = models.init_params(c)
  params, frozen = state_lib.split_frozen(params, cfg, c.model.lora.base_dtype)
  tables = data.open_tables(c.data, c.tasks, encode.load_tokenizer(tok_dir))
  batches = {k: [a(s) for s in range(a.plan.steps_per_epoch)] for k, a in
             ((k, data.assembler(config.replace(c.data, **kw), c.tasks, tables)) for k, kw in RUNS.items())}
  runs = {k: jax_runner(cfg, params, tuple(c.loss.mrl_dims), frozen) for k in RUNS}
  compile_s = {k: harness.timed(lambda k=k: [runs[k](b, m["task"]) for b, m in
                                             {(m["task"], m["shape"]): (b, m) for b, m in batches[k]}.values()])[1]
               for k in RUNS}
  secs = dict.fromkeys(RUNS, 0.0)
  for first in range(0, len(batches["packed"]), args.block):
    for k, run in runs.items():
      run(batches[k][first][0], batches[k][first][1]["task"])  # Settles after the other runs (untimed).
      for b, m in batches[k][first:first + args.block]:
        secs[k] += harness.timed(lambda b=b, m=m: run(b, m["task"]))[1]
  real = sum(m["tokens"] for _, m in batches["packed"])
  computed = {k: sum(r.tokens.size for b, _ in batches[k] for r in b.rows) for k in RUNS}
  rows = [("run", "padding", "epoch s", "real tokens/s", "vs packed", "compile s")] + [
      (k, f"{1 - real / computed[k]:.1%}", f"{secs[k]:.1f}", f"{real / secs[k]:.0f}",
       f"{secs[k] / secs['packed']:.2f}x the time", f"{compile_s[k]:.0f}") for k in RUNS]
  notes = [f"one epoch ({len(batches['packed'])} steps of global batch {c.data.global_batch_size}, tasks retrieval "
           f"and sts), {cfg.num_layers} layers of width {cfg.hidden_size}, float32, LoRA rank {cfg.lora_rank} (base "
           "frozen in bfloat16); the runs train the same rows, alternating in turns of "
           f"{args.block} steps, each turn after one untimed step; compile time apart",
           f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end"]
  harness.report("Decoder embedders: the tiny decoder's CPU step, packed vs padded (python -m bench.decoder_step)",
                 rows, notes, {"secs": secs, "real_tokens": real, "computed_tokens": computed}, args.out)


if __name__ == "__main__":
  main()
