"""What a refresh of the negatives costs (refresh.every, piccolo_jax/refresh.py) against the train
step, by corpus size: configs/demo.py's model and retrieval settings on synthetic retrieval rows of C / 4 queries
with 4 distinct passages each (1 positive, 3 negatives: retrieval-zh has 3.2 distinct texts a row; STS-B-en training
sentences numbered to be distinct), so the corpus holds C texts. Times the steady train step, then one refresh
in its parts: embedding the passages, and embedding the queries + the search + the selection (which the miner
interleaves per chunk of queries)."""
import json
import pathlib
import tempfile
import time

import jax
import numpy as np

from bench import harness
from piccolo_jax import mine, refresh, search, sharding, sources, train

PER_ROW = 4  # Distinct passages a row: 1 positive, 3 negatives.


def write_rows(path, corpus) -> int:
  """corpus / PER_ROW rows {query, pos, neg} whose texts are distinct across the file; returns the rows."""
  sents = [line for _, line in sources.lines(harness.ROOT / "data/sts-b-en/sentences.train.txt")]
  rows, at = corpus // PER_ROW, 0
  with open(path, "w", encoding="utf-8") as f:
    for i in range(rows):
      texts = [f"{sents[(at + j) % len(sents)]} ({at + j})" for j in range(PER_ROW)]
      at += PER_ROW
      f.write(json.dumps({"query": sents[(7 * i) % len(sents)], "pos": texts[:1], "neg": texts[1:]}) + "\n")
  return rows


def measure(corpus, steps, tmp) -> dict:
  from piccolo_jax.configs import demo  # pylint: disable=g-import-not-at-top
  path = tmp / f"rows-{corpus}.jsonl"
  rows = write_rows(path, corpus)
  c = demo.get_config()
  c.data.datasets = ({"kind": "jsonl", "path": str(path), "task": "retrieval"},)
  c.eval.tasks, c.eval.best_metric = (), ""
  c.refresh.every, c.data.prepared_dir = 10 ** 9, str(tmp / "prepared")
  run = train.start(c, tmp / f"run-{corpus}")
  state, times = run.state, []
  for _ in range(steps + 3):  # 3 to compile and settle.
    batch, _ = next(run.data)
    t = time.perf_counter()
    state, metrics = run.train_step(state, sharding.put_batch(batch, run.mesh), run.rngs)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  step_s = harness.median(times[3:])
  (t,) = refresh.refreshed(run.tables, c.tasks)
  embed = refresh.Embed(run.graphdef, run.rngs, run.mesh, c.data)
  passages = len(t.p_off) - 1
  embed(state["params"], t, "pos", np.arange(min(passages, 4096)), t.longest_passage)  # Compile.
  _, embed_s = harness.timed(lambda: embed(state["params"], t, "pos", np.arange(passages), t.longest_passage))
  _, total_s = harness.timed(lambda: refresh.refresh(run.workdir, embed, state["params"], [t],
                                                     mine.config_options(c.refresh), c.seed, 1))
  epoch_s = step_s * (rows // c.data.global_batch_size)
  return {"corpus": passages, "queries": rows, "passage_tokens": int(t.p_off[-1]), "query_tokens": int(t.q_off[-1]),
          "step_s": step_s, "embed_passages_s": embed_s, "refresh_s": total_s, "rest_s": total_s - embed_s,
          "epoch_steps": rows // c.data.global_batch_size, "epoch_s": epoch_s}


def main():
  p = harness.parser(__doc__, append=True)
  p.add_argument("--corpus", default="10000,100000", help="corpus sizes (texts), comma list")
  p.add_argument("--steps", type=int, default=10, help="timed train steps")
  args = p.parse_args()
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for corpus in map(int, args.corpus.split(",")):
      out.append(measure(corpus, args.steps, pathlib.Path(tmp)))
      print(out[-1], flush=True)
  rows = [["corpus texts", "queries (rows)", "tokens embedded", "train step s", "embed passages s",
           "embed queries + search + select s", "refresh s", "refresh / step", "epoch steps", "refresh / epoch"]]
  for r in out:
    rows.append([r["corpus"], r["queries"], r["passage_tokens"] + r["query_tokens"], f"{r['step_s']:.3f}",
                 f"{r['embed_passages_s']:.1f}", f"{r['rest_s']:.1f}", f"{r['refresh_s']:.1f}",
                 f"{r['refresh_s'] / r['step_s']:.0f}", r["epoch_steps"], f"{r['refresh_s'] / r['epoch_s']:.2f}"])
  per_token = [r["embed_passages_s"] / r["passage_tokens"] for r in out]
  notes = [f"Embedding: {1e6 * np.mean(per_token):.1f} s per million tokens (passages), the same law at every size; "
           f"search: {search.Q_CHUNK}-query chunks against the whole corpus, Q x C.",
           "'refresh / epoch': the refresh's time over the epoch's (epoch steps x the step) of these rows."]
  harness.report("Refresh of the negatives against the train step (python -m bench.refresh_cost)", rows, notes,
                 {"rows": out}, args.append)


if __name__ == "__main__":
  main()
