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


class Packed:
  """Texts of lens_N tokens placed by first_fit into rows of L tokens, S texts at most a row; batches of its
  rows are packed (the trainer's Assembler: one batch a step; encode and refresh: embedded R rows at a time)."""

  def __init__(self, lens_N, L, S):
    self.lens_N, self.L, self.S = np.asarray(lens_N), L, S
    self.row_N, self.slot_N, self.rows = first_fit(self.lens_N, L, S)

  def slots(self, sel, first=0):
    """Texts sel's slots r * S + s of the [R * S, D] output of the batch of rows first..first + R."""
    return (self.row_N[sel] - first) * self.S + self.slot_N[sel]

  def pack(self, tokens_T, sel, first, R) -> dict:
    """{pack_tok, pack_seg, pack_pos, pack_len} of rows first..first + R, which hold texts sel (tokens_T: theirs,
    concatenated in sel's order)."""
    lens_N, row_N, slot_N, L = self.lens_N[sel], self.row_N[sel] - first, self.slot_N[sel], self.L
    order = np.lexsort((slot_N, row_N))  # Texts fill a row in slot order.
    ends, start_N = np.cumsum(lens_N[order]), np.zeros(len(lens_N), np.int64)
    row_first = np.r_[True, row_N[order][1:] != row_N[order][:-1]]
    start_N[order] = ends - lens_N[order] - np.maximum.accumulate(np.where(row_first, ends - lens_N[order], 0))
    pos_T = np.arange(lens_N.sum()) - np.repeat(np.cumsum(lens_N) - lens_N, lens_N)
    at_T = np.repeat(row_N * L + start_N, lens_N) + pos_T  # Flat positions in [R * L].
    out = {k: np.zeros(R * L, np.int32) for k in ("pack_tok", "pack_seg", "pack_pos")}
    out["pack_tok"][at_T], out["pack_seg"][at_T], out["pack_pos"][at_T] = tokens_T, np.repeat(slot_N + 1, lens_N), pos_T
    len_RS = np.zeros((R, self.S), np.int32)
    len_RS[row_N, slot_N] = lens_N
    return {k: v.reshape(R, L) for k, v in out.items()} | {"pack_len": len_RS}

  def embedded(self, R, tokens, embed, full_only=False):
    """Yields (sel, e_nD) per batch of R rows: its texts and their embeddings, embed(packed arrays) being the
    model's [R * S, D] (or [R, S, D]) output; tokens(sel): the texts' token ids concatenated. full_only: the
    last, partial batch is left out (its texts are those with row_N >= rows // R * R)."""
    done = self.rows // R * R if full_only else self.rows
    order = np.argsort(self.row_N, kind="stable")  # Texts by row: batch i holds rows iR .. iR + R - 1.
    bounds = np.searchsorted(self.row_N[order], np.arange(0, done + R, R))
    for first, a, b in zip(range(0, done, R), bounds, bounds[1:]):
      sel = order[a:b]
      e = embed(self.pack(tokens(sel), sel, first, R))
      yield sel, e.reshape(R * self.S, -1)[self.slots(sel, first)]

