"""The PyTorch reference: the Piccolo2 losses in torch and the train step as the original runs it, on one
GPU (torch_trainer) or as its DDP step over simulated workers (torch_ddp_grads)."""
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from piccolo_jax import config, export, losses


def unpacked(batch, task, field, length=None, pad_id=0):
  """(ids, mask) int32 [N, length or the longest] of a Batch's field, one text a row, padded: the layout
  of the unpacked model call (model.Bert.__call__), the parity reference of the packed one."""
  slots = [(t, seg == s + 1) for r in batch.rows for t, seg in zip(r.tokens, r.segments)
           for s in range(r.lengths.shape[1])]  # Slot order (piccolo_jax/packing.py).
  texts = [slots[s][0][slots[s][1]] for s in np.asarray(batch.slots[task][field])]
  length = length or max(len(t) for t in texts)
  ids, mask = np.full((len(texts), length), pad_id, np.int32), np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    ids[i, :len(t)], mask[i, :len(t)] = t, 1
  return ids, mask


def text_fields(batch) -> list[str]:
  """The fields of a padded batch ({field}_ids / {field}_mask)."""
  return sorted(k[:-4] for k in batch if k.endswith("_ids"))


def torch_losses(task, emb, batch, cfg):
  """The Piccolo2 losses in torch (the math of the original's piccolo/criteria.py), averaged over MRL dims.
  cfg: a config with `tasks` (temperature, weight) and `loss` (mrl_dims) sections."""
  norm = lambda x: F.normalize(x.float(), dim=-1, eps=losses.EPS)
  c = cfg.tasks[task]

  def one(d):
    e = {f: x[..., :d] for f, x in emb.items()}
    if task == "sts":
      s, y = (norm(e["text_a"]) * norm(e["text_b"])).sum(-1) / c.temperature, batch["label"]
      diff = (s[:, None] - s[None, :])[y[None, :] > y[:, None]]  # s_i - s_j where label_j > label_i.
      return c.weight * torch.logsumexp(torch.cat([diff, diff.new_zeros(1)]), 0)
    q, p = norm(e["query"]), norm(e["pos"])
    if task == "retrieval":  # Every query against all positives and all hard negatives the rows have.
      n = norm(e["neg"]) if "neg" in e else p[:0]
      n = n[batch["neg_valid"].reshape(-1)] if "neg_valid" in batch else n
      logits = q @ torch.cat([p, n]).T / c.temperature
      return c.weight * F.cross_entropy(logits, torch.arange(len(q), device=q.device))
    n = norm(e["neg"]).reshape(len(q), -1, q.shape[-1])  # cls: each query against its own negatives.
    logits = torch.cat([(q * p).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", q, n)], 1) / c.temperature
    keep = torch.cat([torch.ones_like(batch["neg_valid"][:, :1]), batch["neg_valid"]], 1)
    logits = logits.masked_fill(~keep, float("-inf"))
    return c.weight * F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

  return sum(one(d) for d in cfg.loss.mrl_dims) / len(cfg.loss.mrl_dims)


def torch_step(cfg, params, batch, task, dims, device="cpu", amp=None, remat=False, threads=0, seed=0):
  """(run() -> loss, info): one batch's step of torch_trainer."""
  step, info = torch_trainer(cfg, params, dims, device, amp, remat, threads, seed)
  return lambda: step(batch, task), info


def torch_encoder(cfg, params):
  """(HF BertModel, Dense or None) holding our params."""
  enc = transformers.BertModel(transformers.BertConfig.from_dict(export.hf_config(cfg)), add_pooling_layer=False)
  w = {k: torch.tensor(v) for k, v in export.to_weights(cfg, params).items()}
  dense = torch.nn.Linear(cfg.hidden_size, cfg.dense_out, bias=cfg.dense_bias) if cfg.dense_out else None
  if dense:
    dense.load_state_dict({k.removeprefix("2_Dense.linear."): w.pop(k) for k in list(w) if k.startswith("2_Dense.")})
  enc.load_state_dict(w, strict=True)
  return enc, dense


def torch_embed(enc, dense, tb, f):
  """Mean-pooled (+ Dense) embeddings of padded field f of a torch batch."""
  h = enc(input_ids=tb[f + "_ids"].long(), attention_mask=tb[f + "_mask"]).last_hidden_state
  m = tb[f + "_mask"][..., None].to(h.dtype)
  e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return (dense(e) if dense else e).float()


def torch_ddp_grads(cfg, params, workers, loss_cfg):
  """(loss, {HF name: grad}) of the original's DDP step: each worker (task, padded batch) takes its task's
  loss on its own rows only, and the gradients are averaged over the workers (dropout off)."""
  enc, dense = torch_encoder(cfg, params)
  enc.eval()
  total = 0.0
  for task, batch in workers:
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss = torch_losses(task, {f: torch_embed(enc, dense, tb, f) for f in text_fields(batch)}, tb, loss_cfg)
    (loss / len(workers)).backward()  # DDP: the mean of the workers' gradients.
    total += loss.item() / len(workers)
  grads = {k: v.grad.numpy() for k, v in enc.named_parameters() if v.grad is not None}
  if dense:
    grads |= {f"2_Dense.linear.{k}": v.grad.numpy() for k, v in dense.named_parameters()}
  return total, grads


def torch_trainer(cfg, params, dims, device="cpu", amp=None, remat=False, threads=0, seed=0):
  """(step(batch, task) -> loss, info): HF BertModel + mean pooling (+ Dense) + the losses + AdamW, as the
  original; batches are padded ({field}_ids/_mask)."""
  torch.set_num_threads(threads or torch.get_num_threads())
  torch.manual_seed(seed)
  enc, dense = torch_encoder(cfg, params)
  if remat:
    enc.gradient_checkpointing_enable({"use_reentrant": False})
  enc.embeddings.position_embeddings.weight.requires_grad = False  # Frozen, as in the original.
  mods = torch.nn.ModuleList([enc] + ([dense] if dense else [])).to(device).train()
  trainable, o = [p for p in mods.parameters() if p.requires_grad], config.section("optim")
  opt = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  loss_cfg = config.base()
  loss_cfg.loss.mrl_dims = tuple(dims)
  dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(amp)

  def step(batch, task):
    tb = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
      emb = {f: torch_embed(enc, dense, tb, f) for f in text_fields(batch)}
    loss = torch_losses(task, emb, tb, loss_cfg)  # Outside autocast: in float32.
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, o.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # Waits for the step (CUDA too).

  return step, {"threads": torch.get_num_threads(), "attn": enc.config._attn_implementation,
               "state_mb": 16 * sum(p.numel() for p in trainable) / 2**20}  # f32 params, grads, 2 moments.
