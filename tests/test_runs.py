"""In-process runs of the tiny config that go wrong or change: the non-finite policy, a finished run extended,
a changed config refused, bad input as one line, skip counts. (Fault injection on CLI runs: test_faults.py.)"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import conftest
import tiny_config
from conftest import error_line, metric_steps, params, steps
from piccolo_jax import cli, config, data, encode, evaluate, export, sources, train
from piccolo_jax import convert as convert_lib
from piccolo_jax import models


def _sts_only(**train):
  """The tiny config on its STS dataset only (one compiled program)."""
  c = tiny_config.get_config()
  c.data.datasets = c.data.datasets[1:2]
  c.train.update(train)
  return c


def test_nonfinite_stop_keeps_the_checkpoint_in_flight(tmp_path):
  """lr 1e30: the first update is huge and step 2 goes NaN while checkpoint 1 is still being written."""
  c = _sts_only(max_steps=20, max_nonfinite_steps=2)
  c.optim.lr, c.checkpoint.every = 1e30, 1
  with pytest.raises(train.NonFiniteError, match="3 non-finite steps in a row") as e:
    train.train(c, tmp_path)
  resume = int(str(e.value).split("resumes from checkpoint step ")[1])
  assert max(steps(tmp_path)) == resume >= 1 and not [p for p in os.listdir(tmp_path / 'checkpoints') if 'tmp' in p]
  assert "commit_success.txt" in os.listdir(tmp_path / "checkpoints" / str(resume))


def test_nonfinite_with_grad_accum_waits_for_the_save(tmp_path):
  c = _sts_only(max_steps=20, max_nonfinite_steps=0)
  c.optim.update(lr=1e30, grad_accum=5)
  c.checkpoint.every = 5
  with pytest.raises(train.NonFiniteError) as e:
    train.train(c, tmp_path)
  resume = int(str(e.value).split("resumes from checkpoint step ")[1])
  assert steps(tmp_path) == [resume] and resume >= 5 and not [p for p in os.listdir(tmp_path / 'checkpoints') if 'tmp' in p]


def test_nonfinite_steps_are_skipped_below_the_limit(tmp_path):
  c = _sts_only(max_steps=3, max_nonfinite_steps=5)
  c.tasks.sts.temperature = 0.0  # cos / 0: every step NaN.
  train.train(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["nonfinite_skipped"] for r in rows if "task" in r] == [1, 2, 3]
  init = models.init_params(c)[1]
  jax.tree.map(np.testing.assert_array_equal, params(tmp_path / "model"), init)  # Nothing applied.


def test_a_run_of_the_old_config_schema_is_refused_naming_the_moves(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"data": {"neg_num": 7, "packing": True}, "loss": {"sts": {"temperature": 0.05}}}))
  with pytest.raises(config.ConfigChangeError) as e:
    config.check_workdir(tmp_path, _sts_only(max_steps=2))
  assert "data.neg_num is now tasks.retrieval.neg_num; data.packing is gone" in str(e.value)
  assert "loss.sts.temperature is now tasks.sts.temperature and tasks.sts.weight" in str(e.value)


def test_extend_finished_run_reexports_and_config_changes_are_refused(tmp_path):
  c = _sts_only(max_steps=2)
  train.train(c, tmp_path)
  lr, wide = c.copy_and_resolve_references(), c.copy_and_resolve_references()
  lr.optim.lr, wide.model.arch.hidden_size = 0.01, 64
  for changed, shown in ((lr, "optim.lr 0.003 -> 0.01"), (wide, "model.arch.hidden_size 32 -> 64")):
    with pytest.raises(config.ConfigChangeError, match=shown):
      train.train(changed, tmp_path)
  assert json.loads((tmp_path / "export.json").read_text()) == {"step": 2}
  before = params(tmp_path / "model")
  c.train.max_steps = 4
  train.train(c, tmp_path)
  assert json.loads((tmp_path / "export.json").read_text()) == {"step": 4}
  assert metric_steps(tmp_path) == [1, 2, 3, 4]
  assert np.abs(params(tmp_path / "model")["embeddings"]["word"]["embedding"]
                - before["embeddings"]["word"]["embedding"]).max() > 0
  shutil.rmtree(tmp_path / "export")  # Missing: rebuilt by the next run, which trains nothing.
  train.train(c, tmp_path)
  assert (tmp_path / "export" / "modules.json").is_file()


def test_clis_give_one_error_line(minilm_path, tmp_path, capsys):
  bad = tmp_path / "bad_model"
  shutil.copytree(minilm_path, bad)
  os.truncate(bad / "model.safetensors", (bad / "model.safetensors").stat().st_size // 3)
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "one.txt").write_text("a text\n")
  nope = str(tmp_path / "nope")
  cases = [(convert_lib.main, [str(bad), str(tmp_path / "out")], "model.safetensors: not a readable"),
           (encode.main, [str(minilm_path), "--input", str(tmp_path / "empty.txt"), "--output", "e.npy"], "no texts"),
           (encode.main, [nope, "--input", str(tmp_path / "one.txt"), "--output", "e.npy"], "nope"),
           (export.main, [nope, str(tmp_path / "o")], "nope"),
           (evaluate.main, [nope, "--task", f"sts:{conftest.DATA}/sts-b-en/sts-b-en.dev.tsv"], "nope")]
  for main, args, message in cases:
    with pytest.raises(SystemExit) as e:
      main(args)
    assert e.value.code != 0 and message in error_line(capsys.readouterr().err), main
  assert not (tmp_path / "out").exists()
  c = _sts_only(max_steps=1)
  c.model.init = str(bad)
  with pytest.raises(ValueError, match="model.safetensors: not a readable"):
    train.train(c, tmp_path / "w")


def test_skip_counts_are_logged_at_startup(tmp_path):
  path = tmp_path / "s.tsv"
  rows = [f"a{i}\tb{i}\t{i % 5}" for i in range(16)] + ["\tb\t1"]
  path.write_text("\n".join(rows) + "\n")
  c = _sts_only(max_steps=1)
  c.data.datasets = ({"kind": "tsv", "path": str(path), "task": "sts"},)
  train.train(c, tmp_path / "w")
  first = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["step"] == 0 and first[f"data/{path}/skipped/empty text"] == 1


def test_bad_config_and_entries(tmp_path):
  with pytest.raises(SystemExit, match="data.cls_neg_num is now tasks.cls.neg_num"):  # A field that moved.
    cli.check_overrides([f"--config={conftest.REPO / 'tests/tiny_config.py'}", "--config.data.cls_neg_num=20"])
  c = _sts_only(max_steps=1)
  c.data.datasets = ({**c.data.datasets[0], "limt": 32},)
  with pytest.raises(data.DataError, match="unknown key 'limt'; did you mean 'limit'?"):
    train.train(c, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # A failed start-up leaves no workdir behind.
  with pytest.raises(data.DataError, match="missing 'path'"):
    sources.expand(({"kind": "jsonl", "limit": 3},))
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError):  # train's CLI prints OSErrors as one line, as DataErrors.
    train.train(_sts_only(max_steps=1), tmp_path / "file" / "w")
