"""Mining speed: exact top-k search throughput and peak memory against the corpus size (search on a corpus
resident on the mesh, as piccolo_jax.mine runs it, vs the streamed search.top_k, a chunked numpy baseline and
faiss IndexFlatIP where installed), and piccolo_jax.mine end to end on retrieval-zh with all-MiniLM-L6-v2.
Each measurement runs in a fresh process."""
import argparse
import datetime
import json
import pathlib
import tempfile

import jax
import numpy as np

from bench import harness
from bench import inference_scale
from bench.inference_scale import D, numpy_top_k
from piccolo_jax import search
from piccolo_jax import sharding

K = 200  # piccolo_jax.mine's default search depth (--range 2-200).
NAMES = {"resident": "search.iter_top_k, corpus resident on the mesh (mine)", "streamed": "search.top_k, streamed",
         "numpy": "numpy, chunked argpartition", "faiss": "faiss IndexFlatIP"}


def resident(q, c):
  corpus = search.place(c, sharding.make_mesh())
  return np.concatenate([i for _, _, i, _ in search.iter_top_k(q, corpus, K)])


def faiss_top_k(q, c):
  import faiss  # pylint: disable=g-import-not-at-top  (optional: a baseline only)
  index = faiss.IndexFlatIP(c.shape[1])
  index.add(c)
  return index.search(q, K)[1]


SEARCHES = {"resident": resident, "streamed": lambda q, c: search.top_k(q, c, K)[1],
            "numpy": lambda q, c: numpy_top_k(q, c, K), "faiss": faiss_top_k}


def search_child(impl, corpus, queries, reps):
  """inference_scale's measurement with these searches. Resident calls include placing the corpus on the
  devices; faiss calls building the index."""
  return inference_scale.search_child(impl, corpus, queries, reps, SEARCHES) | {"devices": jax.device_count()}


def mine_child(rows):
  """piccolo_jax.mine on the first `rows` rows of retrieval-zh (0: all), into a temporary dir: its stats."""
  from piccolo_jax import mine  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    (report, s) = harness.timed(lambda: mine.run(*mine.parse_args(
        ["minilm", "--input", str(harness.ROOT / "data/retrieval-zh/triplets.train.jsonl"), "--limit", str(rows),
         "--output", f"{tmp}/out.jsonl"])[1:]))
  return {"s": s, "peak_mb": harness.rss_mb("VmHWM"), **report}


def child(spec) -> dict:
  """One measurement in a fresh process."""
  return inference_scale.check(harness.run_json(["-m", "bench.mine_bench", "--child", json.dumps(spec)]))


def main(argv=None):
  p = harness.parser(__doc__, reps=1, append=True)
  p.add_argument("--corpus", default="10000,100000,1000000", help="corpus sizes, comma list")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--impls", default=",".join(SEARCHES), help="searches, comma list (faiss: when importable)")
  p.add_argument("--mine-rows", type=int, default=0, help="retrieval-zh rows mined end to end (0: all; -1: skip)")
  p.add_argument("--child", help=argparse.SUPPRESS)  # One measurement (a JSON spec), in this fresh process.
  args = p.parse_args(argv)
  if args.child:
    spec = json.loads(args.child)
    print(json.dumps((mine_child if spec.pop("kind") == "mine" else search_child)(**spec)))
    return
  impls = [i for i in args.impls.split(",") if i != "faiss" or _has_faiss()]
  srch = {(impl, c): child({"kind": "search", "impl": impl, "corpus": c, "queries": args.queries, "reps": args.reps})
          for c in map(int, args.corpus.split(",")) for impl in impls}
  mined = child({"kind": "mine", "rows": args.mine_rows}) if args.mine_rows >= 0 else None
  report(args, srch, mined)


def _has_faiss() -> bool:
  try:
    import faiss  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def report(args, srch, mined):
  rows = [("corpus", "search", "devices", "peak RSS MB", "above inputs MB", "s", "M queries x corpus / s",
           "same top-10 as resident")]
  for (impl, c), o in srch.items():
    ref = srch.get(("resident", c), o)
    rows.append((c, NAMES[impl], o["devices"], f"{o['peak_mb']:.0f}", f"{o['peak_mb'] - o['rest_mb']:.0f}",
                 f"{o['s']:.2f}", f"{args.queries * c / o['s'] / 1e6:.0f}", "yes" if o["ids"] == ref["ids"] else "NO"))
  lines = ["\n### Mining: exact top-k search and piccolo_jax.mine end to end\n",
           f"{datetime.date.today()}, {harness.machine()}. Command: `{harness.command()}` (each row in its own "
           "process)\n", *harness.table_md(rows), "",
           f"- {args.queries} queries, top-{K}, random unit vectors, D={D}, float32; s = median of {args.reps} calls "
           "after a first one (compiles); 'above inputs' = peak RSS during the first timed call minus RSS before it "
           f"(resident: includes the device copy of the corpus, C x {D} x 4 bytes, placed in every call). Blocks: "
           f"{search.Q_CHUNK} queries x up to {search.C_CHUNK} corpus rows per device."]
  if mined:
    sec = mined["seconds"]
    lines.append(f"- `python -m piccolo_jax.mine minilm --input data/retrieval-zh/triplets.train.jsonl` (defaults; "
                 f"{mined['rows']} rows, corpus {mined['corpus']} texts, 1 process, {mined['devices']} device): "
                 f"{mined['s']:.1f} s in all, of which read + load model {sec['read_load']:.1f} s, embed corpus "
                 f"{sec['embed_corpus']:.1f} s ({mined['corpus'] / sec['embed_corpus']:.0f} texts/s), embed queries + "
                 f"search + select {sec['mine']:.1f} s; peak RSS {mined['peak_mb']:.0f} MB. {mined['negatives']} "
                 f"negatives, {mined['rows_short']} rows short of {mined['options']['num']} ({mined['rows_without']} "
                 f"without any); best positive's rank {mined['positive_rank']}.")
  harness.emit(lines, args.append)
  print(json.dumps({"search": {f"{i}/{c}": {k: v for k, v in o.items() if k != "ids"} for (i, c), o in srch.items()},
                    "mine": {k: v for k, v in (mined or {}).items() if k != "options"}}))


if __name__ == "__main__":
  main()
