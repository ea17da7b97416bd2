"""How often a retrieval row's own positive passage appears again among its global batch's candidates (another
row's positive or anyone's hard negative), which tasks.retrieval.mask_duplicates leaves out of its denominator:
counted exactly over one epoch of the plan (the rule of losses.candidate_mask, on the host), per bundled dataset,
global batch size and negatives a row."""
import tempfile

import numpy as np

from bench import harness
from piccolo_jax import config, data, encode, plan as plan_lib
from piccolo_jax import models

DATASETS = {"retrieval-zh": {"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl", "task": "retrieval"},
            "piccolo_example retri": {"kind": "piccolo", "path": "data/piccolo_example/retri.dataset"}}


def count(plan) -> dict:
  """Masked (row, candidate) pairs, the candidates they are out of, and rows with any, over an epoch."""
  masked = others = rows = total_rows = 0
  for step in range(plan.steps_per_epoch):
    for _, sel in plan.units(step):
      pos, B = sel["pos"], len(sel["pos"])
      ids = np.concatenate([pos, sel["neg"].reshape(-1)]) if "neg" in sel else pos
      valid = np.concatenate([np.ones(B, bool), sel["neg_valid"].reshape(-1)]) if "neg" in sel else np.ones(B, bool)
      dup = (ids[None, :] == pos[:, None]) & valid[None, :] & (np.arange(len(ids))[None, :] != np.arange(B)[:, None])
      masked, others, rows = masked + dup.sum(), others + B * (valid.sum() - 1), rows + dup.any(1).sum()
      total_rows += B
  return {"masked": int(masked), "others": int(others), "rows": int(rows), "total_rows": total_rows}


def main():
  p = harness.parser(__doc__, append=True)
  p.add_argument("--batches", default="32,256")
  p.add_argument("--negatives", default="1,7")
  args = p.parse_args()
  tok = encode.load_tokenizer(models.resolve_init("minilm"))
  out = [["dataset", "rows", "global batch", "negatives a row", "rows with a duplicate (share of rows trained)",
          "masked pairs (share of row x candidate pairs)"]]
  with tempfile.TemporaryDirectory() as tmp:
    for name, entry in DATASETS.items():
      for batch in map(int, args.batches.split(",")):
        for k in map(int, args.negatives.split(",")):
          c = config.base()
          c.data.update(datasets=(entry,), global_batch_size=batch, prepared_dir=tmp)
          c.tasks.retrieval.neg_num = k
          try:
            (t,) = data.open_tables(c.data, c.tasks, tok)
          except data.DataError:  # Fewer rows than a batch.
            continue
          r = count(plan_lib.Plan(c.data, c.tasks, [t]))
          out.append([name, len(t), batch, k, f"{r['rows']} ({100 * r['rows'] / r['total_rows']:.2f}%)",
                      f"{r['masked']} ({100 * r['masked'] / r['others']:.4f}%)"])
          print(out[-1], flush=True)
  harness.report("Duplicate positives in the global batch (python -m bench.duplicates)", out,
                 ["Seed 0, epoch 0; rows past the last whole batch are not trained and not counted."],
                 {"rows": out[1:]}, args.append)


if __name__ == "__main__":
  main()
