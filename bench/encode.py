"""Encoding time: the JAX Embedder against sentence-transformers on STS-B dev sentences, alternating."""
import os
import pathlib
import tempfile

import numpy as np

from bench import harness
from piccolo_jax import encode, export, modeldir, state as state_lib


def padded_tokens(embedder, texts, batch) -> dict:
  """Tokens encoded incl. padding: ours (one pass, as counted by the Embedder) vs sentence-transformers'
  longest-in-batch."""
  n = [len(x) for x in embedder.tokenize(texts, embedder.model.cfg.max_seq_length)]
  by_chars = [n[i] for i in np.argsort([-len(t) for t in texts], kind="stable")]
  chunks = lambda xs: [xs[i:i + batch] for i in range(0, len(xs), batch)]
  embedder.computed = 0
  embedder.encode(texts, batch_size=batch)
  return {"jax": embedder.computed, "st": sum(len(c) * max(c) for c in chunks(by_chars)), "real": sum(n)}


def main(argv=None):
  p = harness.parser(__doc__, reps=3, append=True, threads=True)
  p.add_argument("--model", default="minilm", help="'minilm', a piccolo_jax model dir or a sentence-transformers dir")
  p.add_argument("--data", default=harness.STSB_DEV, help="STS-B tsv (sentence1, sentence2)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--limit", type=int, default=0, help="the first N sentences only (0: all)")
  p.add_argument("--buckets", type=lambda s: tuple(sorted(map(int, s.split(",")))), help="length buckets, comma list")
  p.add_argument("--no-packing", action="store_true", help="our texts one per row, padded to their bucket")
  args = p.parse_args(argv)
  import torch
  from sentence_transformers import SentenceTransformer
  torch.set_num_threads(args.threads or os.cpu_count())
  a, b, _ = harness.read_stsb(args.data)
  texts, src = (a + b)[:args.limit or None], state_lib.resolve_init(args.model)
  embedder = encode.load_embedder(src)  # A sentence-transformers dir is converted on the fly.
  embedder.buckets, embedder.packing = args.buckets or embedder.buckets, not args.no_packing
  with tempfile.TemporaryDirectory() as tmp:
    st_dir = pathlib.Path(tmp) / "st" if (pathlib.Path(src) / modeldir.CONFIG_FILE).is_file() else src
    if st_dir != src:
      export.export(src, st_dir)
    st = SentenceTransformer(str(st_dir), device="cpu")
  runs = {"jax": lambda: embedder.encode(texts, batch_size=args.batch),
          "st": lambda: st.encode(texts, batch_size=args.batch, normalize_embeddings=True)}
  times, _, _, first = harness.alternate(runs, args.reps)  # The first JAX pass compiles a program per bucket.
  (emb_jax, warm), (emb_st, _) = first["jax"], first["st"]
  cos, pad = float(np.min(np.sum(emb_jax * emb_st, axis=1))), padded_tokens(embedder, texts, args.batch)
  out = {f"{k}_s": harness.median(v) for k, v in times.items()} | {f"{k}_runs_s": v for k, v in times.items()}
  out |= {"jax_first_s": warm, "sentences": len(texts), "batch": args.batch, "min_cosine": cos, "model": args.model,
          "torch_threads": torch.get_num_threads(), "padded_tokens": pad}
  out["ratio"] = out["st_s"] / out["jax_s"]
  rows = [("", "s per pass (median)", "sentences/s")]
  rows += [(name, f"{out[k + '_s']:.2f}", f"{len(texts) / out[k + '_s']:.0f}")
           for k, name in (("jax", "jax"), ("st", "sentence-transformers"))]
  notes = [f"ratio sentence-transformers/jax time: {out['ratio']:.2f}; first JAX pass (compiles) {warm:.1f} s; "
           f"min cosine between the two embeddings {cos:.6f}; torch threads {out['torch_threads']}; "
           f"{args.reps} alternating reps",
           f"tokens incl. padding: jax {pad['jax']} ({'packed' if embedder.packing else 'one text a row'}, "
           f"length buckets {embedder.buckets}, last batch padded), "
           f"sentence-transformers {pad['st']} (each batch padded to its longest); {pad['real']} real tokens"]
  harness.report(f"encode: {args.model}, {len(texts)} STS-B dev sentences, batch {args.batch}", rows, notes, out,
                 args.append)


if __name__ == "__main__":
  main()
