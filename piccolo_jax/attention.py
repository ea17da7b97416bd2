"""Attention over packed rows, one switch (model.attention) for the written-out XLA path and the fused kernels.

Every implementation attends within a text only: the rows' segment ids (text s of a row is seg == s + 1,
padding 0; packing.py) make the mask block-diagonal. Padding tokens attend among themselves and no text reads
them. causal=True (a decoder's, decoder.py) also masks the keys after the query: a text's tokens lie in order in
its row, so the segment mask AND the row's causal mask. The implementations:

| name | what runs | attention dropout | rows L a multiple of |
|---|---|---|---|
| `xla` | the einsums written out, softmax in float32: exact HF parity | yes | 1 |
| `splash` | TPU splash attention (Pallas, Mosaic), `SegmentIds` | no | 128 |
| `pallas_gpu` | the Pallas Triton flash-attention kernel, `segment_ids` | no | 128 |
| `cudnn` | cuDNN flash attention, packed THD layout (`q_offsets`/`kv_offsets`); Hopper or later | yes | 1 |
| `auto` | `xla` on CPU, `splash` on TPU, `pallas_gpu` on GPU | | |

The fused kernels run under `shard_map` over the batch axes of the mesh the program is traced under (`on(mesh)`,
which the train step and the refresh's embedder enter), each device on its own rows; on the CPU they run in Pallas'
interpret mode (a correctness tool, slow). `target(platform)` lowers for another platform from this host
(bench.accel). docs/training.md, "On accelerators", says how to choose.
"""
import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "splash", "pallas_gpu", "cudnn")
DROPOUT = ("xla", "cudnn")  # The implementations that apply attention dropout.
BLOCK = {"splash": 128, "pallas_gpu": 128}  # Row length multiple of the others: 1.
AUTO = {"cpu": "xla", "tpu": "splash", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}
LAYOUT = {"xla": "bhlk", "splash": "bhlk", "pallas_gpu": "blhk", "cudnn": "blhk"}  # q, k, v and output [B, H, L, E]
# or [B, L, H, E], as each implementation takes them (model.Attention projects straight to it).
BATCH_AXES = ("data", "fsdp")  # sharding.BATCH_AXES (not imported: the model does not depend on the mesh code).

_TARGET = contextvars.ContextVar("piccolo_jax_attention_target", default="")


@contextlib.contextmanager
def target(platform: str):
  """Within the block, programs are built for `platform` (tpu, cuda, cpu): `auto` resolves for it and the fused
  kernels are lowered for it, not interpreted (jax.export from this host)."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def on(mesh):
  """Within the block (while tracing), the fused kernels run under shard_map over `mesh`'s batch axes (None: on
  whatever devices the arrays are, as one program)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()


def shards() -> int:
  """The devices the batch rows are split over in the mesh being traced under (on()); 1 outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def platform() -> str:
  """The platform programs are built for: target()'s, else the default backend's."""
  return _TARGET.get() or jax.default_backend()


def resolve(name: str, plat: str | None = None) -> str:
  """The implementation `name` stands for (auto: by platform)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
  return AUTO.get(plat or platform(), "xla") if name == "auto" else name


def block(name: str) -> int:
  """The multiple a packed row's length must be for this implementation."""
  return BLOCK.get(resolve(name), 1)


def check_dropout(name: str, rate: float, explicit: bool) -> float:
  """The attention dropout rate `name` trains with: `rate`, or 0 where the kernel cannot apply it and the rate
  was not asked for (the checkpoint's; BENCHMARKS.md, "Attention dropout": no measured loss); one line if it was."""
  impl = resolve(name)
  if rate == 0 or impl in DROPOUT:
    return rate
  if explicit:
    raise ValueError(f"model.attention={name} ({impl}) cannot apply attention dropout "
                     f"(model.attention_dropout={rate}): set --config.model.attention_dropout=0, or choose "
                     f"--config.model.attention=xla or cudnn, which apply it")
  return 0.0


def mask(name: str, seg_BL, len_BS, causal=False):
  """What implementation `name` takes as its mask, from the segment ids [B, L] and text lengths [B, S]:
  xla: bool [B, L, L] (query may attend to key); splash, pallas_gpu: seg_BL; cudnn: (seg_BL, seqlen [B, S],
  offsets [B, S + 1]) of the THD layout (cudnn_segments). causal: the fused kernels take it in attend."""
  impl = resolve(name)
  if impl == "xla":
    m_BLL = seg_BL[:, :, None] == seg_BL[:, None, :]
    return m_BLL & jnp.tri(seg_BL.shape[1], dtype=bool) if causal else m_BLL
  if impl == "cudnn":
    return (seg_BL, *cudnn_segments(len_BS))
  return seg_BL


def cudnn_segments(len_BS):
  """(seqlen [B, S], offsets [B, S + 1]) of texts packed left to right in slot order, len_BS tokens each:
  cuDNN's packed layout, -1 past a row's last text."""
  len_BS = len_BS.astype(jnp.int32)
  real_BS = len_BS > 0
  start_BS = jnp.cumsum(len_BS, axis=1) - len_BS
  seqlen_BS = jnp.where(real_BS, len_BS, -1)
  offsets_BS = jnp.where(real_BS, start_BS, -1)
  return seqlen_BS, jnp.pad(offsets_BS, ((0, 0), (0, 1)), constant_values=-1)


def attend(name, q, k, v, m, *, dropout=None, rate=0.0, seed=0, causal=False):
  """Attention output in LAYOUT[impl] from q (already scaled by head_dim**-0.5), k, v in that layout and the
  mask from `mask` (of the same `causal`); dropout: the probability-dropout module of the xla path; rate, seed:
  cuDNN's."""
  impl = resolve(name)
  if impl == "xla":
    return xla(q, k, v, m[:, None], dropout)
  kernel = {"splash": functools.partial(_splash, causal=causal), "pallas_gpu": functools.partial(
      _pallas_gpu, causal=causal), "cudnn": functools.partial(_cudnn, rate=rate, seed=seed, causal=causal)}[impl]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return kernel(q, k, v, m)
  rows = P(BATCH_AXES)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(rows, rows, rows, jax.tree.map(lambda _: rows, m)),
                       out_specs=rows, check_vma=False)(q, k, v, m)


def rows_shape(m) -> tuple:
  """(R, L) of the rows a `mask` is of (its first array's leading dims)."""
  return tuple(jax.tree.leaves(m)[0].shape[:2])


def grouped(name, q, k, v, masks, *, dropout=None, seed=0, causal=False):
  """Attention within each group of rows whose tokens lie joined (model.join): q (scaled), k, v [n, H, T, E] or
  [n, T, H, E] (LAYOUT[impl]), group g's tokens [n, R_g / n, L_g] of the token axis T, masks its `mask`s; the
  output in the same layout. xla attends on them as they lie, the fused kernels take them as [R_g, ...] rows."""
  impl = resolve(name)
  n, t = q.shape[0], 2 if LAYOUT[impl] == "bhlk" else 1  # The token axis of [n, H, T, E] or [n, T, H, E].
  H, E = q.shape[3 - t], q.shape[-1]
  out, at = [], 0
  for m in masks:
    R, L = rows_shape(m)
    width = R // n * L
    cut = lambda x: jax.lax.slice_in_dim(x, at, at + width, axis=t).reshape(
        *x.shape[:t], R // n, L, *x.shape[t + 1:])  # [n, H, R/n, L, E] or [n, R/n, L, H, E].
    if impl == "xla":
      o = xla(cut(q), cut(k), cut(v), m.reshape(n, 1, R // n, L, L), dropout)
    else:
      rows = lambda x: x.swapaxes(1, 2).reshape(R, H, L, E) if t == 2 else x.reshape(R, L, H, E)
      o = attend(name, rows(cut(q)), rows(cut(k)), rows(cut(v)), m, dropout=dropout,
                 rate=dropout.rate if dropout is not None else 0.0, seed=seed, causal=causal)
      o = o.reshape(n, R // n, H, L, E).swapaxes(1, 2) if t == 2 else o
    out.append(o.reshape((n, H, width, E) if t == 2 else (n, width, H, E)))
    at += width
  return jnp.concatenate(out, axis=t)


def xla(q, k, v, m, dropout=None):
  """The written-out attention of q, k, v [..., L, E] under mask m (broadcast to [..., L, L]), softmax in float32."""
  logits = jnp.einsum("...qk,...sk->...qs", q, k)
  probs = jax.nn.softmax(jnp.where(m, logits, jnp.finfo(q.dtype).min).astype(jnp.float32), axis=-1)
  probs = dropout(probs) if dropout is not None else probs
  return jnp.einsum("...qs,...sk->...qk", probs.astype(q.dtype), v)


def _interpret() -> bool:
  return platform() == "cpu"


def _block(L, most=512) -> int:
  return next(b for b in (most, 256, 128) if L % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(H, L, interpret, causal=False):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  b = _block(L)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  with jax.ensure_compile_time_eval():  # Concrete mask tables, also when first built inside a trace.
    full = sa.CausalMask((L, L)) if causal else sa.FullMask((L, L))
    kernel = sa.make_splash_mha(sa.MultiHeadMask([full] * H), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)
  # Its mask tables as numpy, so a trace embeds them as constants (device arrays closed over become extra
  # arguments of the lowered program, which jax.export then miscounts).
  return jax.tree.map(np.asarray, kernel), sa.SegmentIds


def _splash(q_BHLE, k_BHLE, v_BHLE, seg_BL, causal=False):
  _, H, L, _ = q_BHLE.shape
  kernel, segment_ids = _splash_kernel(H, L, _interpret(), causal)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(s, s)))(q_BHLE, k_BHLE, v_BHLE, seg_BL)


def _pallas_gpu(q_BLHE, k_BLHE, v_BLHE, seg_BL, causal=False):
  from jax.experimental.pallas.ops.gpu import attention as ga  # pylint: disable=g-import-not-at-top
  return ga.mha(q_BLHE, k_BLHE, v_BLHE, seg_BL, sm_scale=1.0, causal=causal,
                block_sizes=ga.BlockSizes.get_default(), interpret=_interpret())


def _cudnn(q_BLHE, k_BLHE, v_BLHE, m, *, rate, seed, causal=False):
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  seg_BL, seqlen_BS, offsets_BS = m
  o_BLHE = fa.dot_product_attention(q_BLHE, k_BLHE, v_BLHE, None, None, seqlen_BS, seqlen_BS, offsets_BS,
                                    offsets_BS, scale=1.0, seed=seed,
                                    mask_type=fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING,
                                    dropout_rate=rate, qkv_layout="BTNH")
  return jnp.where((seg_BL > 0)[:, :, None, None], o_BLHE, 0)  # Padding tokens belong to no text: zeros, not NaN.
