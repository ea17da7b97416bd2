"""Packing's planning cost against the global batch: data.Batcher start-up (the row-count menus) and the
time per packed and padded batch, on retrieval-zh repeated 8x at 64/512 (host only, no model); and the
same packed, with data.mix=groups over 32 loss groups (each group its own unit)."""
import os

from bench import harness
from piccolo_jax import config, data, encode, state as state_lib

SHAPES = ((256, 1), (256, 7), (1024, 7))  # (global batch rows, negatives per row)


def main():
  p = harness.parser(__doc__)
  p.add_argument("--batches", type=int, default=20)
  args = p.parse_args()
  os.chdir(harness.ROOT)
  tok = encode.load_tokenizer(state_lib.resolve_init("minilm"))
  rows = [("global batch", "texts per batch", "menus at start-up s", "packed batch ms", "padded batch ms",
           "32 groups: menus s", "32 groups: batch ms")]
  for G, K in SHAPES:
    c = config.section("data", datasets=({"kind": "jsonl", "path": "data/retrieval-zh/triplets.train.jsonl",
                                          "repeat": 8},), global_batch_size=G, neg_num=K, query_max_len=64,
                       passage_max_len=512)
    tables = data.load_tables(c, tok)
    packed, start_s = harness.timed(lambda: data.Batcher(c, tables, row_multiple=8))
    padded = data.Batcher(config.replace(c, packing=False), tables)
    mixed, mixed_s = harness.timed(lambda: data.Batcher(config.replace(c, mix="groups"), tables, row_multiple=8, groups=32))
    ms = [1e3 * harness.timed(lambda: [b(s) for s in range(args.batches)])[1] / args.batches
          for b in (packed, padded, mixed)]
    rows.append((f"{G} rows, neg_num {K}", G * (2 + K), f"{start_s:.2f}", f"{ms[0]:.1f}", f"{ms[1]:.1f}",
                 f"{mixed_s:.2f}", f"{ms[2]:.1f}"))
  harness.report("Packing: planning cost (python -m bench.packing_plan)", rows, [], {"rows": rows})


if __name__ == "__main__":
  main()
