"""Behaviour kept across a refactor: the demo with its packing menus pinned to commit 35a04ec's, compared
with a reference run row by row (metrics.jsonl) and byte by byte (model.safetensors); and the padding of
the demo's steps under those menus and under the menus chosen now.

  python -m bench.demo_identity run WORKDIR [--pin]     # make demo's run, into WORKDIR
  python -m bench.demo_identity compare REF_DIR WORKDIR  # REF_DIR: a run dir of the reference commit
  python -m bench.demo_identity padding
"""
import argparse
import hashlib
import json
import pathlib

from piccolo_jax import batch, cli, data, encode, plan, train
from piccolo_jax import models
from piccolo_jax.configs import demo

PINNED = {k: batch.Menu((128,), tuple((R,) for R in v))  # 35a04ec's: from its first 256 steps, one row length.
          for k, v in {"sts": (6, 7, 8), "cls": (29, 30), "retrieval": (14, 15, 18)}.items()}
MATH = ("loss", "grad_norm", "eval/", "lr", "rows")  # metrics.jsonl fields that are the run's arithmetic.


def compare(ref, run):
  rows = [[json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, run)]
  math = [[{k: v for k, v in r.items() if k.startswith(MATH) or k in ("step", "task")} for r in rs] for rs in rows]
  diff = [(a.get("step"), k) for a, b in zip(*math) for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
  sha = [hashlib.sha256((d / "export" / "model.safetensors").read_bytes()).hexdigest() for d in (ref, run)]
  print(f"metrics.jsonl: {len(rows[0])} vs {len(rows[1])} rows, {sum(map(len, math[0]))} values, "
        f"{len(diff)} differ {diff[:5]}; model.safetensors {sha[0][:12]} vs {sha[1][:12]}: "
        f"{'identical' if sha[0] == sha[1] else 'DIFFERENT'}")


def padding():
  c = demo.get_config()
  tables = data.open_tables(c.data, c.tasks, encode.load_tokenizer(models.tokenizer_dir(c.model)))
  n = plan.steps_per_epoch(c.data, tables) * c.train.epochs  # The run's steps, as train.start counts them.
  a = data.assembler(c.data, c.tasks, tables, steps=n)
  for name, menus in (("35a04ec's", PINNED), ("chosen now", dict(a.menus))):
    a.menus, real, total, programs = menus, 0, 0, set()
    for s in range(n):
      b, info = a(s)
      real, total = real + info["tokens"], total + sum(r.tokens.size for r in b.rows)
      programs.add((info["task"], info["shape"]))
    print(f"menus {name} {menus}: padding over {n} steps {1 - real / total:.2%}, {len(programs)} programs")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("what", choices=("run", "compare", "padding"))
  p.add_argument("dirs", nargs="*", type=pathlib.Path)
  p.add_argument("--pin", action="store_true", help="the packing menus of 35a04ec")
  args = p.parse_args()
  if args.what == "run":
    if args.pin:
      batch.choose_menus = lambda *_, **__: PINNED
    cli.logging_setup()
    train.train(demo.get_config(), args.dirs[0])
  elif args.what == "compare":
    compare(*args.dirs)
  else:
    padding()


if __name__ == "__main__":
  main()
