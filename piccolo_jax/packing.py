"""Sequence packing, host side: many texts per fixed-length row, first-fit decreasing, few shapes.

Rows: `pack_tok`, `pack_seg`, `pack_pos` int32 [R, L] and `pack_len` int32 [R, S] (batch.Batch's
tokens, segments, positions, lengths): text s of row r is the tokens with pack_seg == s + 1 (0 is
padding), at positions pack_pos counted from 0 at its first token, pack_len[r, s] tokens long (0: an
empty slot); model.Bert.packed embeds it as slot r * S + s of its [R * S, D] output.

Shapes. L is fixed per task; R comes from a per-task menu of at most `size` row counts chosen from the
rows that planned batches need (`row_menu`), so a run compiles at most `size` programs per task while
padding stays a few percent. A batch that needs more rows than the menu's largest takes the next value
of a 12.5% geometric grid above it (a new program, rarely).
"""
import math

import numpy as np

ARRAYS = ("pack_tok", "pack_seg", "pack_pos", "pack_len")  # model.Bert.packed's arguments, in order.
SEGMENTS = 64  # Default most texts a row (data.pack_segments in training).
GROWTH = 1.125  # Row counts past the menu: max(menu) * GROWTH**k.


def first_fit(lens_N, L, S):
  """(row_N, slot_N, rows): first-fit decreasing of texts of lens_N tokens into rows of L tokens,
  at most S texts a row; texts fill a row left to right in slot order.

  Texts of one length, taken in index order, fill the first rows with room for them one row at a
  time, so each length is placed in one vectorised pass (at most L passes, not one per text).
  """
  lens_N = np.asarray(lens_N, np.int64)
  if len(lens_N) and (lens_N.max() > L or lens_N.min() < 1):
    raise ValueError(f"packing: text lengths must be in 1..{L} (row length), got {lens_N.min()}..{lens_N.max()}")
  n = len(lens_N)
  row_N, slot_N = np.zeros(n, np.int64), np.zeros(n, np.int64)
  free_R, count_R, rows = np.full(n, L), np.zeros(n, np.int64), 0
  order = np.argsort(-lens_N, kind="stable")
  first = np.flatnonzero(np.diff(lens_N[order], prepend=-1))  # Where each length starts.
  for a, b in zip(first, np.r_[first[1:], n]):
    l, items = int(lens_N[order[a]]), order[a:b]
    room_R = np.minimum(free_R[:rows] // l, S - count_R[:rows])  # Texts of length l each open row takes.
    before_R = np.cumsum(room_R) - room_R
    old = min(b - a, int(room_R.sum()))
    r_old = np.searchsorted(before_R + room_R, np.arange(old), side="right")
    per_row, j = min(L // l, S), np.arange(b - a - old)  # The rest open rows of per_row texts each.
    row_N[items] = np.r_[r_old, rows + j // per_row]
    slot_N[items] = np.r_[count_R[r_old] + np.arange(old) - before_R[r_old], j % per_row]
    rows += -(-(b - a - old) // per_row)
    placed_R = np.bincount(row_N[items], minlength=rows)
    free_R[:rows] -= l * placed_R
    count_R[:rows] += placed_R
  return row_N, slot_N, rows


def round_up(n, multiple):
  return -(-math.ceil(n) // multiple) * multiple


def row_menu(needed, size, multiple=1) -> tuple:
  """At most `size` row counts, multiples of `multiple`, that hold every count in `needed` with
  the fewest padding rows in total (each batch takes the smallest value that holds it)."""
  vals, counts = np.unique([round_up(n, multiple) for n in needed], return_counts=True)
  if not len(vals):
    return ()
  cum_c, cum_v = np.concatenate([[0], np.cumsum(counts)]), np.concatenate([[0], np.cumsum(counts * vals)])

  def waste(i, j):  # batches needing vals[i..j] take vals[j]
    return int(vals[j] * (cum_c[j + 1] - cum_c[i]) - (cum_v[j + 1] - cum_v[i]))

  best = [(waste(0, j), (int(vals[j]),)) for j in range(len(vals))]  # one value covering vals[:j + 1]
  for _ in range(min(size, len(vals)) - 1):
    best = [min([best[j]] + [(best[i][0] + waste(i + 1, j), best[i][1] + (int(vals[j]),)) for i in range(j)])
            for j in range(len(vals))]
  return best[-1][1]


def rows_for(needed, menu, multiple=1) -> int:
  """The rows a batch needing `needed` takes: the smallest menu value that holds it, else the
  smallest max(menu) * GROWTH**k (rounded up to `multiple`) that does."""
  fits = [m for m in menu if m >= needed]
  if fits:
    return min(fits)
  rows = max(menu, default=multiple)
  while rows < needed:
    rows = round_up(rows * GROWTH, multiple)
  return rows


def layout(lens_N, row_N, slot_N, R, L, S):
  """(flat token positions in [R * L] of the concatenated texts, seg, pos, pack_len [R, S]) of a first_fit."""
  order = np.lexsort((slot_N, row_N))  # Texts fill a row in slot order.
  start_N = np.zeros(len(lens_N), np.int64)
  ends = np.cumsum(lens_N[order])
  row_first = np.r_[True, row_N[order][1:] != row_N[order][:-1]]
  base = np.maximum.accumulate(np.where(row_first, ends - lens_N[order], 0))
  start_N[order] = ends - lens_N[order] - base
  pos_T = np.arange(lens_N.sum()) - np.repeat(np.cumsum(lens_N) - lens_N, lens_N)
  at_T = np.repeat(row_N * L + start_N, lens_N) + pos_T
  len_RS = np.zeros((R, S), np.int32)
  len_RS[row_N, slot_N] = lens_N
  return at_T, np.repeat(slot_N + 1, lens_N), pos_T, len_RS


def pack(tokens_T, lens_N, row_N, slot_N, R, L, S):
  """{pack_tok, pack_seg, pack_pos, pack_len} of texts (tokens_T: their token ids concatenated)."""
  at_T, seg_T, pos_T, len_RS = layout(lens_N, row_N, slot_N, R, L, S)
  out = {k: np.zeros(R * L, np.int32) for k in ("pack_tok", "pack_seg", "pack_pos")}
  out["pack_tok"][at_T], out["pack_seg"][at_T], out["pack_pos"][at_T] = tokens_T, seg_T, pos_T
  return {k: v.reshape(R, L) for k, v in out.items()} | {"pack_len": len_RS}

