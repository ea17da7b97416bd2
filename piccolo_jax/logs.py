"""Run logging: a progress bar with throughput, metrics to JSONL and TensorBoard (process 0)."""
import json
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

from piccolo_jax import flops as flops_lib


class MetricLogger:
  """Fetches step metrics one step late (the step after is already dispatched, so the host never waits
  on the device between steps), updates the bar, writes every `every` steps to metrics.jsonl and tb/."""

  def __init__(self, workdir, total_steps, start_step, global_batch, mrl_dims, schedule, every,
               enabled=True, flops=None, tensorboard=True):
    """flops: info -> (computed, real) FLOPs of a global step (flops.step_flops), for FLOP/s and MFU;
    tensorboard: also write tb/."""
    self.enabled, self.every, self.dims, self.flops = enabled, every, tuple(mrl_dims), flops
    kind = jax.devices()[0].device_kind
    self.peak = (flops_lib.peak(kind) or 0) * jax.device_count()  # 0: an unknown kind (a CPU), FLOP/s only.
    self.global_batch, self.schedule = global_batch, schedule
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if enabled and path.is_file():  # A resumed run rewrites what came after its checkpoint, and the refresh due at
      # its first step (refresh.py: it runs before that step's batch, after the checkpoint was saved).
      keep = lambda r: r["step"] < start_step or r["step"] == start_step and "refresh/seconds" not in r
      rows = [l for l in path.read_text().splitlines(keepends=True) if keep(json.loads(l))]
      path.with_suffix(".tmp").write_text("".join(rows))
      path.with_suffix(".tmp").replace(path)
    self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not enabled)
    self.jsonl = open(path, "a") if enabled else None
    # purge_step: TensorBoard drops the earlier run's events from start_step + 1 on.
    self.tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (it imports torch if installed)
      self.tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"), purge_step=start_step + 1 if start_step else None)
    self.tick, self.task_loss, self.last, self.skipped, self.pending = time.perf_counter(), {}, {}, 0, None

  def push(self, step, metrics, info) -> dict | None:
    """Holds a dispatched step's device metrics; returns the host metrics of the one held before (or None)."""
    done, self.pending = self.flush(), (step, metrics, info)
    return done

  def flush(self) -> dict | None:
    """The host metrics of the step held (None if none); blocks on its device values."""
    if self.pending is None:
      return None
    (step, metrics, meta), self.pending = self.pending, None
    task, m = meta["task"], jax.device_get(metrics)
    now = time.perf_counter()
    dt, self.tick = now - self.tick, now
    # This process's real tokens (not padding), texts and squared lengths, times the processes.
    scaled = {k: meta.get(k, 0) * jax.process_count() for k in ("tokens", "squares", "texts")}
    self.task_loss |= {t: float(v) for t, v in m["task_loss"].items()}
    self.skipped += not bool(m["ok"])
    host = {"step": step, "task": task, "dataset": meta["dataset"], "rows": meta["rows"],
            "row_lengths": "/".join(str(L) for _, L in meta["shape"]),
            "ok": bool(m["ok"]),
            f"loss/{task}": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
            **{f"loss/{t}": float(v) for t, v in m["task_loss"].items() if t != task},
            "lr": float(self.schedule(step - 1)), "pad_frac": meta["pad_frac"],
            "examples_per_s": self.global_batch / dt, "tokens_per_s": scaled["tokens"] / dt,
            "nonfinite_skipped": self.skipped}
    host |= {f"loss/{task}/dim{d}": float(v) for d, v in zip(self.dims, np.ravel(m["loss_per_dim"]))}
    host |= {k: float(v) for k, v in m.get("stats", {}).items()}  # e.g. retrieval/masked_false_negatives
    shown = {}
    if self.flops:
      computed, real = self.flops(meta | scaled)
      host |= {"flops_computed": computed, "flops_real": real, "flops_per_s": real / dt}
      shown["TFLOP/s"] = f"{real / dt / 1e12:.3g}"
      if self.peak:
        host["mfu"] = real / dt / self.peak
        shown["MFU"] = f"{100 * host['mfu']:.1f}%"
    self.last = host
    self.bar.update(1)
    self.bar.set_postfix({**{f"{t}": f"{v:.4f}" for t, v in self.task_loss.items()},
                          "ex/s": f"{host['examples_per_s']:.1f}", "tok/s": f"{host['tokens_per_s']:.0f}", **shown},
                         refresh=False)
    if step % self.every == 0:
      self.write(step, host, echo=False)
    return host

  def write(self, step, metrics: dict, echo=True):
    """Appends metrics to the JSONL file and TensorBoard; echo prints them under the bar."""
    if not self.enabled or not metrics:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items() if self.tb else ():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
        self.tb.add_scalar(k, v, step)
    if echo:
      self.bar.write(f"step {step}: " + "  ".join(
          f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

  def close(self):
    self.bar.close()
    if self.enabled:
      self.jsonl.close()
    if self.tb:
      self.tb.close()
