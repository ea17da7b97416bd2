"""Sequence packing, host side: many texts per row, rows of a few lengths, first-fit decreasing, few shapes.

A step's rows are a few groups (`Rows`), group g of R_g rows of L_g tokens, the longest first. In a group,
`tokens`, `segments`, `positions` are int32 [R_g, L_g] and `lengths` int32 [R_g, S_g] (S_g = min(S, L_g) texts
at most a row): text s of row r is the tokens with segments == s + 1 (0 is padding), at positions counted from 0
at its first token, lengths[r, s] tokens long (0: an empty slot). model.Bert.embed_rows embeds the groups as one
[sum_g R_g * S_g, D] array, text s of row r of group g at slot R_0 S_0 + ... + R_{g-1} S_{g-1} + r S_g + s.

Lengths. A text goes to the rows of the shortest length that holds it, unless it fits the room left in a longer
row already open (first-fit decreasing). The lengths of a task's rows are chosen from the prepared token lengths
(`choose_lengths`): at most data.pack_lengths of them, the longest L the task's row length, costed so that a row
of L tokens costs L * (1 + L / data.pack_attention) (its tokens' layers and their L-wide attention).

Shapes. A task's row counts come from a menu of at most `size` tuples (R_0, R_1, ...) chosen from the rows that
planned batches need (`row_menu`), so a run compiles at most `size` programs per task while padding stays a few
percent. A batch that needs more rows than any tuple holds takes, per group, the next value of a 12.5%
geometric grid above the menu's largest (a new program, rarely).
"""
import itertools
import math
from typing import Any, NamedTuple

import numpy as np

SEGMENTS = 64  # Default most texts a row (data.pack_segments in training).
GROWTH = 1.125  # Row counts past the menu: max(menu) * GROWTH**k.
CANDIDATES = 16  # choose_lengths tries row lengths at multiples of about L / CANDIDATES.


class Rows(NamedTuple):
  """One group of packed rows (arrays [R, L] and lengths [R, S]); a pytree, model.Bert.packed's arguments."""
  tokens: Any
  segments: Any
  positions: Any
  lengths: Any


def first_fit(lens_N, lengths, S, budget=None):
  """(row_N, slot_N, length_R): first-fit decreasing of texts of lens_N tokens into rows of the given lengths (an
  int or several, ascending), at most S texts a row; texts fill a row left to right in slot order. A text that
  fits no open row opens one of the shortest length that holds it; with a `budget` (rows per length, ascending),
  of the shortest with rows left that holds it, and None is returned when none has.

  Texts of one length, taken in index order, fill the first rows with room for them one row at a
  time, so each length is placed in one vectorised pass (at most max(lengths) passes, not one per text).
  """
  lens_N, lengths = np.asarray(lens_N, np.int64), np.sort(np.atleast_1d(lengths))
  if len(lens_N) and (lens_N.max() > lengths[-1] or lens_N.min() < 1):
    raise ValueError(f"packing: text lengths must be in 1..{lengths[-1]} (row length), "
                     f"got {lens_N.min()}..{lens_N.max()}")
  n = len(lens_N)
  left = [n + 1] * len(lengths) if budget is None else list(budget)
  row_N, slot_N = np.zeros(n, np.int64), np.zeros(n, np.int64)
  free_R, count_R, length_R, rows = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), 0
  order = np.argsort(-lens_N, kind="stable")
  first = np.flatnonzero(np.diff(lens_N[order], prepend=-1))  # Where each length starts.
  for a, b in zip(first, np.r_[first[1:], n]):
    l, items = int(lens_N[order[a]]), order[a:b]
    room_R = np.minimum(free_R[:rows] // l, S - count_R[:rows])  # Texts of length l each open row takes.
    before_R = np.cumsum(room_R) - room_R
    old = min(b - a, int(room_R.sum()))
    r_old = np.searchsorted(before_R + room_R, np.arange(old), side="right")
    row_N[items[:old]], slot_N[items[:old]] = r_old, count_R[r_old] + np.arange(old) - before_R[r_old]
    rest, k = items[old:], int(np.searchsorted(lengths, l))
    while len(rest) and k < len(lengths):  # The rest open rows of per_row texts each, as the budget allows.
      L = int(lengths[k])
      per_row = min(L // l, S)
      new = min(-(-len(rest) // per_row), left[k])
      j = np.arange(min(len(rest), new * per_row))
      row_N[rest[j]], slot_N[rest[j]] = rows + j // per_row, j % per_row
      free_R[rows:rows + new], length_R[rows:rows + new] = L, L
      rows, left[k], rest, k = rows + new, left[k] - new, rest[len(j):], k + 1
    if len(rest):
      return None
    placed_R = np.bincount(row_N[items], minlength=rows)
    free_R[:rows] -= l * placed_R
    count_R[:rows] += placed_R
  return row_N, slot_N, length_R[:rows]


def round_up(n, multiple):
  return -(-math.ceil(n) // multiple) * multiple


def row_cost(L, attention):
  """What a row of L tokens costs: L * (1 + L / attention), attention the row length at which a token's attention
  costs as much as the rest of its layer (data.pack_attention)."""
  return np.asarray(L, np.float64) * (1 + np.asarray(L, np.float64) / attention)


def ladder(L, multiple=1, shortest=32) -> tuple:
  """Row lengths for encoding texts of at most L tokens: L, L / 2, L / 4, ... down to `shortest`, rounded up to
  multiples of 8 and of `multiple` (one program each)."""
  q = math.lcm(8, multiple)
  return tuple(sorted({round_up(L / 2 ** k, q) for k in range(max(1, int(math.log2(L / shortest)) + 1))},
                      reverse=True))


def histograms(lens_SN, top):
  """(C, T) [steps, top + 1]: per step, the texts of at most l tokens, and their tokens."""
  C = np.stack([np.bincount(l, minlength=top + 1) for l in lens_SN]).cumsum(1)
  return C, np.stack([np.bincount(l, weights=l, minlength=top + 1) for l in lens_SN]).cumsum(1)


def estimated_cost(C, T, lengths, attention, multiple=1) -> float:
  """The rows' cost (row_cost) of steps of texts with `histograms` (C, T) packed into rows of `lengths`, estimated
  from their token counts: a length's texts fill its rows (a text over half a row has one to itself) after they
  fill the room left in longer rows; each length's rows rounded up to `multiple`."""
  lengths = sorted(lengths)
  cost, room = 0.0, np.zeros(len(C))
  for a, L in reversed(list(zip([0, *lengths[:-1]], lengths))):
    tokens, big = T[:, L] - T[:, a], C[:, L] - C[:, max(a, L // 2)]
    need = np.maximum(tokens - room, 0)
    rows = np.ceil(np.where(need > 0, np.maximum(np.ceil(need / L), big), 0) / multiple) * multiple
    room += rows * L - tokens
    cost += float(rows.sum() * row_cost(L, attention))
  return cost


def choose_lengths(lens_SN, L, most, attention, multiple=1, length_multiple=1) -> tuple:
  """Row lengths for steps of texts lens_SN (one array each), longest first: L alone where most is 1, else at most
  `most` of L and the multiples of about L / CANDIDATES (and of length_multiple) below it, the longest holding
  every text, those of the least estimated_cost."""
  q = round_up(max(round_up(L / CANDIDATES, 8), length_multiple), length_multiple)
  longest = max([int(l.max()) for l in lens_SN if len(l)], default=1)
  candidates = sorted({L, *range(q, L, q)}, reverse=True)
  options = [(L,)] + [c for k in range(1, most + 1) for c in itertools.combinations(candidates, k)
                      if c[0] >= longest and most > 1]
  C, T = histograms(lens_SN, L)
  costs = [estimated_cost(C, T, o, attention, multiple) for o in options]
  return options[int(np.argmin(costs))]  # Ties: the first, with the fewest lengths.


def row_menu(needed, size, multiple=1, lengths=None, weights=None) -> tuple:
  """At most `size` tuples of row counts (one per group, multiples of `multiple`) that hold every tuple in `needed`
  with the least padding, each group's rows weighted by `weights` (default 1): each batch takes the cheapest tuple
  that holds it (place). Needs are ordered by cost and each tuple covers a run of them, the DP's unit. A tuple
  holds a need when it has as many rows per group (lengths None) or, rows of `lengths` (longest first), when its
  rows of the longest g lengths hold as many tokens as the need's do, for every g: texts also fit longer rows."""
  needed = np.asarray([[round_up(n, multiple) for n in np.atleast_1d(t)] for t in needed], np.int64)
  if not len(needed):
    return ()
  w = np.ones(needed.shape[1]) if weights is None else np.asarray(weights, np.float64)
  vals, counts = np.unique(needed, axis=0, return_counts=True)
  order = np.lexsort((*vals.T[::-1], vals @ w))
  vals, counts = vals[order], counts[order]
  tokens = vals if lengths is None else np.cumsum(vals * np.asarray(lengths), axis=1)
  n, covers, waste = len(vals), {}, np.zeros((len(vals), len(vals)))
  for i in range(n):  # cover(i, j): the least tuple holding vals[i..j]; waste(i, j): its padding over them.
    most, have, cover = np.maximum.accumulate(tokens[i:], axis=0), 0, np.zeros((n - i, vals.shape[1]), np.int64)
    for g, L in enumerate(np.ones(vals.shape[1], np.int64) if lengths is None else lengths):
      cover[:, g] = np.ceil(np.maximum(most[:, g] - (0 if lengths is None else have), 0) / (L * multiple)) * multiple
      have = have + cover[:, g] * L
    waste[i, i:] = (cover @ w) * np.cumsum(counts[i:]) - np.cumsum(counts[i:] * (vals[i:] @ w))
    covers |= {(i, j): tuple(int(x) for x in cover[j - i]) for j in range(i, n)}
  best = [(waste[0, j], (covers[0, j],)) for j in range(n)]  # one tuple covering vals[:j + 1]
  for _ in range(min(size, n) - 1):
    best = [min([best[j]] + [(best[i][0] + waste[i + 1, j], best[i][1] + (covers[i + 1, j],)) for i in range(j)])
            for j in range(n)]
  return best[-1][1]


def repaired(menu, lens_SN, lengths, S, multiple=1, weights=None) -> tuple:
  """The menu, a tuple given `multiple` more rows of its longest length with rows wherever `place` would pack a
  step of lens_SN outside every tuple though row_menu's token count says one holds it (texts do not split)."""
  menu = list(menu)
  for lens_N in lens_SN:
    while (packed := place(lens_N, lengths, menu, S, multiple, weights))[1] not in menu:
      own = np.cumsum(np.multiply(packed[0].rows, lengths))
      holds = [i for i, m in enumerate(menu) if (np.cumsum(np.multiply(m, lengths)) >= own).all()]
      if not holds:
        break  # Past the menu (it was chosen from other steps): a new program, as place says.
      i = min(holds, key=lambda i: float(np.dot(menu[i], weights if weights is not None else 1)))
      g = next(g for g, r in enumerate(menu[i]) if r)
      menu[i] = menu[i][:g] + (menu[i][g] + multiple,) + menu[i][g + 1:]
  return tuple(menu)


def _grown(needed, values, multiple) -> int:
  """The smallest of `values` holding needed, else the smallest max(values) * GROWTH**k (to `multiple`) that does."""
  fits = [m for m in values if m >= needed]
  if fits:
    return min(fits)
  rows = max(values, default=multiple) or multiple
  while rows < needed:
    rows = round_up(rows * GROWTH, multiple)
  return rows


def place(lens_N, lengths, menu, S, multiple=1, weights=None) -> tuple:
  """(Packed, row counts R_G) of a batch's texts: packed within the cheapest tuple of `menu` (row counts per length,
  longest first; costed by `weights`) that holds them, else on their own and given per group the smallest menu
  value that holds its rows or the growth grid above the largest (a new program, rarely)."""
  w = np.ones(len(np.atleast_1d(lengths))) if weights is None else np.asarray(weights, np.float64)
  for R_G in sorted(menu, key=lambda m: (float(np.dot(m, w)), m)):
    packed = Packed(lens_N, lengths, S, R_G)
    if packed.rows is not None:
      return packed, R_G
  packed = Packed(lens_N, lengths, S)
  needed = [round_up(n, multiple) for n in packed.rows]
  return packed, tuple(_grown(n, [m[g] for m in menu], multiple) if n else 0 for g, n in enumerate(needed))


class Packed:
  """Texts of lens_N tokens placed by first_fit into rows of `lengths` (an int or several), S texts at most a row;
  group g holds the rows of lengths[g] (longest first), rows[g] of them; batches of their rows are packed (the
  trainer's Assembler: one batch a step; encode and refresh: embedded a group's R rows at a time)."""

  def __init__(self, lens_N, lengths, S, budget=None):
    """budget: most rows per length (longest first); where they cannot hold the texts, `rows` is None."""
    self.lens_N, self.S = np.asarray(lens_N), S
    self.lengths = tuple(sorted({int(x) for x in np.atleast_1d(lengths)}, reverse=True))
    self.S_G = tuple(min(S, L) for L in self.lengths)  # A text has a token at least.
    placed = first_fit(self.lens_N, self.lengths[::-1], S, None if budget is None else budget[::-1])
    if placed is None:
      self.rows = None
      return
    row_N, self.slot_N, length_R = placed
    group_R = np.searchsorted(-np.asarray(self.lengths), -length_R)
    self.rows = tuple(int(x) for x in np.bincount(group_R, minlength=len(self.lengths)))
    by_group, local_R = np.argsort(group_R, kind="stable"), np.zeros(len(group_R), np.int64)
    local_R[by_group] = np.arange(len(group_R)) - np.r_[0, np.cumsum(self.rows)][group_R[by_group]]
    self.group_N, self.row_N = group_R[row_N], local_R[row_N]  # Its group, its row within the group.

  def slots(self, sel, R_G, first_G=None):
    """Texts sel's slots in the [sum_g R_G[g] * S_G[g], D] output of the batch of rows first_G[g] .. + R_G[g] of
    each group g (default: from 0)."""
    g, S_G = self.group_N[sel], np.asarray(self.S_G)
    first = 0 if first_G is None else np.asarray(first_G)[g]
    return np.r_[0, np.cumsum(np.multiply(R_G, S_G))][g] + (self.row_N[sel] - first) * S_G[g] + self.slot_N[sel]

  def pack(self, tokens_T, sel, first_G, R_G) -> tuple:
    """(Rows, ...) of the groups with R_G[g] > 0 rows, rows first_G[g] .. + R_G[g] of group g, which hold texts sel
    (tokens_T: theirs, concatenated in sel's order)."""
    sel, tokens_T = np.asarray(sel), np.asarray(tokens_T)
    group_T = np.repeat(self.group_N[sel], self.lens_N[sel])
    return tuple(self._pack_group(tokens_T[group_T == g], sel[self.group_N[sel] == g], first, R, L, S)
                 for g, (L, S, first, R) in enumerate(zip(self.lengths, self.S_G, first_G, R_G)) if R)

  def _pack_group(self, tokens_T, sel, first, R, L, S) -> Rows:
    lens_N, row_N, slot_N = self.lens_N[sel], self.row_N[sel] - first, self.slot_N[sel]
    order = np.lexsort((slot_N, row_N))  # Texts fill a row in slot order.
    ends, start_N = np.cumsum(lens_N[order]), np.zeros(len(lens_N), np.int64)
    row_first = np.r_[True, row_N[order][1:] != row_N[order][:-1]]
    start_N[order] = ends - lens_N[order] - np.maximum.accumulate(np.where(row_first, ends - lens_N[order], 0))
    pos_T = np.arange(lens_N.sum()) - np.repeat(np.cumsum(lens_N) - lens_N, lens_N)
    at_T = np.repeat(row_N * L + start_N, lens_N) + pos_T  # Flat positions in [R * L].
    tok, seg, pos = (np.zeros(R * L, np.int32) for _ in range(3))
    tok[at_T], seg[at_T], pos[at_T] = tokens_T, np.repeat(slot_N + 1, lens_N), pos_T
    len_RS = np.zeros((R, S), np.int32)
    len_RS[row_N, slot_N] = lens_N
    return Rows(tok.reshape(R, L), seg.reshape(R, L), pos.reshape(R, L), len_RS)

  def embedded(self, R_G, tokens, embed, full_only=False):
    """Yields (sel, e_nD) per batch of R_G[g] rows of one group g: its texts and their embeddings, embed(Rows)
    being the model's [R * S_G[g], D] (or [R, S_G[g], D]) output; tokens(sel): the texts' token ids concatenated. full_only:
    each group's last, partial batch is left out (its texts are those with row_N >= rows[g] // R * R)."""
    for g, (rows, R) in enumerate(zip(self.rows, R_G)):
      done = rows // R * R if full_only else rows
      mine = np.flatnonzero(self.group_N == g)
      order = mine[np.argsort(self.row_N[mine], kind="stable")]  # Texts by row: batch i holds rows iR .. iR + R - 1.
      bounds = np.searchsorted(self.row_N[order], np.arange(0, done + R, R))
      at = lambda x: tuple(x if h == g else 0 for h in range(len(self.rows)))
      for first, a, b in zip(range(0, done, R), bounds, bounds[1:]):
        sel = order[a:b]
        rows_g, = self.pack(tokens(sel), sel, at(first), at(R))
        e = embed(rows_g)
        yield sel, e.reshape(R * self.S_G[g], -1)[self.slots(sel, at(R), at(first))]
