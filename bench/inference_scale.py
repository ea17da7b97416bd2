"""Inference at scale, each measurement in a fresh process: encode's peak memory and speed against the number
of texts (the former one-call tokenization vs bounded chunks), and exact top-k retrieval against the corpus
size (search.top_k vs a chunked numpy baseline and the former evaluate.top_k)."""
import argparse
import datetime
import functools
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from bench import harness
from piccolo_jax import convert, encode, modeldir, search, state
from piccolo_jax import model as model_lib

STSB_TRAIN = "data/sts-b-en/sts-b-en.train.tsv"
TINY = model_lib.Config(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)  # Costs ~ tokenizing.
K, D = 100, 384
IMPLS = {"before": "all tokenized at once, one global length sort (before)",
         "after": f"{encode.CHUNK} tokenized at a time, queued by bucket (after)"}


def passages(n, per=8) -> list[str]:
  """n distinct passages of `per` consecutive STS-B train sentences."""
  a, b, _ = harness.read_stsb(STSB_TRAIN)
  s = a + b
  return [" ".join(s[(i * 5 + j) % len(s)] for j in range(per)) + f" ({i})" for i in range(n)]


def encode_one_call(embedder, texts, batch_size) -> np.ndarray:
  """encode before issue 18: every text tokenized in one call, one global length sort, then batches."""
  max_length = embedder.model.cfg.max_seq_length
  ids = embedder.tokenize(texts, max_length)
  order = np.argsort([-len(x) for x in ids], kind="stable")
  out = np.zeros((len(ids), embedder.dim), np.float32)
  for start in range(0, len(ids), batch_size):
    rows = order[start:start + batch_size]
    L = encode.bucket_length(max(len(ids[i]) for i in rows), embedder.buckets, max_length)
    ids_BL = np.full((batch_size, L), embedder.model.cfg.pad_token_id, np.int32)
    mask_BL = np.zeros((batch_size, L), np.int32)
    for r, i in enumerate(rows):
      ids_BL[r, :len(ids[i])], mask_BL[r, :len(ids[i])] = ids[i], 1
    out[rows] = np.asarray(encode._embed(embedder.model, jnp.asarray(ids_BL), jnp.asarray(mask_BL))[:len(rows)])
  out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
  return out


def encode_child(model, n, impl, batch, out):
  """Peak RSS and texts/s of one encode of n passages, every bucket compiled first; embeddings saved to out."""
  embedder, texts = encode.Embedder.load(model), passages(n)
  max_length = embedder.model.cfg.max_seq_length
  for L in {encode.bucket_length(b, embedder.buckets, max_length) for b in embedder.buckets}:
    encode._embed(embedder.model, jnp.zeros((batch, L), jnp.int32), jnp.ones((batch, L), jnp.int32))
  run = {"before": lambda: encode_one_call(embedder, texts, batch),
         "after": lambda: embedder.encode(texts, batch_size=batch)}[impl]
  result = []  # (embeddings, s)
  rest, peak = harness.peak_mb(lambda: result.append(harness.timed(run)))
  np.save(out, result[0][0])
  tokens = np.mean([len(x) for x in embedder.tokenize(texts[:5000], max_length)])
  return {"rest_mb": rest, "peak_mb": peak, "s": result[0][1], "texts": n, "tokens_per_text": float(tokens)}


@functools.partial(jax.jit, static_argnames="k")
def _old_top_k(q_QD, c_CD, k):
  return jax.lax.top_k(jnp.matmul(q_QD, c_CD.T, precision="highest"), k)[1]


def old_top_k(q_QD, c_CD, k, chunk=256) -> np.ndarray:
  """evaluate.top_k before search.py: the whole corpus on the device, [256, C] score blocks."""
  k, chunk, c_CD = min(k, len(c_CD)), min(chunk, len(q_QD)), jnp.asarray(c_CD)
  out = []
  for s in range(0, len(q_QD), chunk):
    q_BD = np.zeros((chunk, q_QD.shape[1]), np.float32)
    n = len(q_QD[s:s + chunk])
    q_BD[:n] = q_QD[s:s + n]
    out.append(np.asarray(_old_top_k(jnp.asarray(q_BD), c_CD, k))[:n])
  return np.concatenate(out)


def numpy_top_k(q_QD, c_CD, k, q_chunk=search.Q_CHUNK, c_chunk=search.C_CHUNK) -> np.ndarray:
  """Exact top-k in numpy, in the same blocks as search.top_k: BLAS matmul, argpartition, merge, final sort."""
  k = min(k, len(c_CD))
  ids_QT = np.empty((len(q_QD), k), np.int64)
  for qs in range(0, len(q_QD), q_chunk):
    q_BD = q_QD[qs:qs + q_chunk]
    s_BT, i_BT = np.empty((len(q_BD), 0), np.float32), np.empty((len(q_BD), 0), np.int64)
    for cs in range(0, len(c_CD), c_chunk):
      b_BN = q_BD @ c_CD[cs:cs + c_chunk].T
      s_BN = np.concatenate([s_BT, b_BN], 1)
      i_BN = np.concatenate([i_BT, np.broadcast_to(np.arange(cs, cs + b_BN.shape[1]), b_BN.shape)], 1)
      top_BT = np.argpartition(-s_BN, k - 1, axis=1)[:, :k]
      s_BT, i_BT = np.take_along_axis(s_BN, top_BT, 1), np.take_along_axis(i_BN, top_BT, 1)
    ids_QT[qs:qs + len(q_BD)] = np.take_along_axis(i_BT, np.argsort(-s_BT, axis=1, kind="stable"), 1)
  return ids_QT


def unit_vectors(n, seed) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((n, D), np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


SEARCHES = {"search": lambda q, c: search.top_k(q, c, K)[1], "numpy": lambda q, c: numpy_top_k(q, c, K),
            "old": lambda q, c: old_top_k(q, c, K)}


def search_child(impl, corpus, queries, reps, searches=None):
  """A first call (compiles; its top-10 ids), then `reps` timed calls, the first of which measures peak RSS.
  searches: name -> (queries, corpus) -> ids (default SEARCHES)."""
  c, q = unit_vectors(corpus, 0), unit_vectors(queries, 1)
  run = functools.partial((searches or SEARCHES)[impl], q, c)
  ids, times = run()[:, :10].tolist(), []
  rest, peak = harness.peak_mb(lambda: times.append(harness.timed(run)[1]))
  times += [harness.timed(run)[1] for _ in range(reps - 1)]
  return {"rest_mb": rest, "peak_mb": peak, "s": harness.median(times), "ids": ids}


def child(spec) -> dict:
  """One measurement in a fresh process."""
  return harness.run_json(["-m", "bench.inference_scale", "--child", json.dumps(spec)])


def check(out):
  if "error" in out:
    sys.exit(f"failed:\n{out['stderr']}")
  return out


def main(argv=None):
  p = harness.parser(__doc__, reps=1, append=True)
  p.add_argument("--texts", default="10000,100000", help="encode sizes (tiny model), comma list")
  p.add_argument("--minilm-texts", type=int, default=1000, help="encode size with MiniLM (0: none)")
  p.add_argument("--corpus", default="10000,100000,1000000", help="retrieval corpus sizes, comma list")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--child", help=argparse.SUPPRESS)  # One measurement (a JSON spec), in this fresh process.
  args = p.parse_args(argv)
  if args.child:
    spec = json.loads(args.child)
    fn = encode_child if spec.pop("kind") == "encode" else search_child
    print(json.dumps(fn(**spec)))
    return
  ints = lambda s: [int(x) for x in s.split(",") if x]
  with tempfile.TemporaryDirectory() as tmp:
    tiny = pathlib.Path(tmp) / "tiny"
    minilm = state.resolve_init("minilm")
    modeldir.save_model_dir(tiny, TINY, state.random_params(TINY, 0), minilm)
    encode_runs = [("tiny", str(tiny), n) for n in ints(args.texts)]
    if args.minilm_texts:
      converted = pathlib.Path(tmp) / "minilm"
      convert.convert(minilm, converted)
      encode_runs.append(("MiniLM-L6", str(converted), args.minilm_texts))
    enc, diff = {}, {}
    for name, path, n in encode_runs:
      for impl in ("before", "after"):
        out = pathlib.Path(tmp) / f"{impl}.npy"
        enc[name, n, impl] = check(child({"kind": "encode", "model": path, "n": n, "impl": impl, "batch": args.batch,
                                          "out": str(out)}))
      diff[name, n] = float(np.abs(np.load(out) - np.load(pathlib.Path(tmp) / "before.npy")).max())
  srch = {(impl, c): check(child({"kind": "search", "impl": impl, "corpus": c, "queries": args.queries,
                                   "reps": args.reps}))
          for c in ints(args.corpus) for impl in SEARCHES}
  report(args, enc, diff, srch)


def report(args, enc, diff, srch):
  mb = lambda o: o["peak_mb"] - o["rest_mb"]
  rows = [("model", "texts", "tokens/text", "encode", "peak RSS MB", "above inputs MB", "texts/s",
           "max abs diff after - before")]
  for (name, n, impl), o in enc.items():
    rows.append((name, n, f"{o['tokens_per_text']:.0f}", IMPLS[impl], f"{o['peak_mb']:.0f}", f"{mb(o):.0f}",
                 f"{n / o['s']:.0f}", f"{diff[name, n]:.1e}" if impl == "after" else ""))
  sizes = sorted({n for name, n, _ in enc if name == "tiny"})
  growth = {impl: (mb(enc["tiny", sizes[-1], impl]) - mb(enc["tiny", sizes[0], impl])) * 1024 / (sizes[-1] - sizes[0])
            for impl in IMPLS} if len(sizes) > 1 else {}
  s_rows = [("corpus", "search", "peak RSS MB", "above inputs MB", "s", "M queries x corpus / s", "same top-10 as search")]
  names = {"search": "search.top_k (after)", "numpy": "numpy, chunked argpartition", "old": "evaluate.top_k (before)"}
  for (impl, c), o in srch.items():
    s_rows.append((c, names[impl], f"{o['peak_mb']:.0f}", f"{mb(o):.0f}", f"{o['s']:.2f}",
                   f"{args.queries * c / o['s'] / 1e6:.0f}", "yes" if o["ids"] == srch["search", c]["ids"] else "NO"))
  notes = [f"encode: passages of 8 STS-B train sentences (tokens/text: mean of the first 5000, truncated at the "
           f"model's max_seq_length), batch {args.batch}, every bucket "
           f"compiled first; 'tiny' is a random {TINY.num_layers}-layer width-{TINY.hidden_size} BERT with "
           "MiniLM's tokenizer, so the time is mostly tokenizing, batching and attention. 'above inputs' is the "
           "peak RSS during the call minus the RSS before it (model, texts, compiled programs)."]
  if growth:
    notes.append(f"memory growth per text, {sizes[0]} -> {sizes[-1]} texts: before {growth['before']:.1f} KB, "
                 f"after {growth['after']:.2f} KB (the output rows: {TINY.hidden_size * 4 / 1024:.2f} KB)")
  notes.append(f"retrieval: {args.queries} queries, top-{K}, random unit vectors, D={D}, float32 (corpus "
               f"C x {D} x 4 bytes: {1e6 * D * 4 / 2**20:.0f} MB at 1M); s = median of {args.reps} calls after the "
               "first (which compiles; the first timed one gives the peak RSS); 'above inputs' excludes the "
               f"corpus and queries. search.top_k blocks: {search.Q_CHUNK} x {search.C_CHUNK}.")
  machine = harness.machine()
  harness.emit(["\n### Inference at scale: encode and exact top-k search\n", f"{datetime.date.today()}, {machine}.",
                f"Command: `{harness.command()}` (each row in its own process)\n", *harness.table_md(rows), "",
                *harness.table_md(s_rows), "", *[f"- {n}" for n in notes]], args.append)
  print(json.dumps({"machine": machine, "encode": {"/".join(map(str, k)): v for k, v in enc.items()},
                    "search": {"/".join(map(str, k)): {x: y for x, y in v.items() if x != "ids"}
                               for k, v in srch.items()}}))


if __name__ == "__main__":
  main()
