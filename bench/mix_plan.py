"""The epoch plan's cost at scale, data.mix="dataset" vs "groups": time and memory of Batcher.plan.

Every process computes the plan of its epoch at start-up (and at each new epoch), from the datasets'
row counts alone, so the cost is a function of the rows, not the hosts. Tables here are stand-ins with
the row counts of 30 datasets of three tasks (10 each, sizes spread 1:10); global batch 256, 32 groups.
"""
import dataclasses

import numpy as np

from bench import harness
from piccolo_jax import config, data

LADDER = (10_000, 100_000, 1_000_000, 10_000_000)


@dataclasses.dataclass
class Rows:
  """A stand-in prepared dataset: what the plan reads of one (its task, row count and repeat)."""
  task: str
  rows: int
  repeat: int = 1

  def __len__(self):
    return self.rows


def stand_in(rows, mix, groups=32):
  """A Batcher whose plan() runs on stand-in tables of `rows` rows in all (its __init__ would map data)."""
  share = np.tile(np.linspace(1, 10, 10), 3)
  sizes = np.maximum((rows * share / share.sum()).astype(int), 256)
  tables = [Rows(("retrieval", "sts", "cls")[i // 10], int(n)) for i, n in enumerate(sizes)]
  c = config.section("data", global_batch_size=256, mix=mix)
  b = object.__new__(data.Batcher)
  b.c, b.tables, b.groups, b.unit = c, tables, groups, data.unit_rows(c, groups)
  b.tasks, b._plans = sorted({t.task for t in tables}), {}
  b.steps_per_epoch = data.steps_per_epoch(c, tables, groups)
  return b


def main():
  p = harness.parser(__doc__)
  p.parse_args()
  rows = [("rows", "steps/epoch", "dataset: plan s", "groups: plan s", "groups / dataset", "plan MiB (either)")]
  for n in LADDER:
    plans = {mix: stand_in(n, mix) for mix in ("dataset", "groups")}
    secs = {mix: harness.timed(lambda b=b: b.plan(0))[1] for mix, b in plans.items()}
    ds, rows_SB = plans["groups"].plan(0)
    rows.append((f"{n:,}", plans["dataset"].steps_per_epoch, f"{secs['dataset']:.3f}", f"{secs['groups']:.3f}",
                 f"{secs['groups'] / secs['dataset']:.1f}x", f"{(ds.nbytes + rows_SB.nbytes) / 2**20:.1f}"))
    print(harness.table_md(rows)[-1], flush=True)
  harness.emit(["\n### Epoch plan at scale (python -m bench.mix_plan)\n",
                f"{harness.machine()}: `{harness.command()}`. {' '.join(__doc__.split(chr(10) * 2)[1].split())}\n",
                *harness.table_md(rows)], harness.ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
  main()
