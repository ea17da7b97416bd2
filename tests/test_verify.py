"""python -m piccolo_jax.verify on what leaves a run: a model dir, an export and a prepared dataset, whole and with
one byte changed, a file cut short, missing or added. (Checkpoints: tests/test_faults.py.)"""
import contextlib
import io
import pathlib
import shutil
import subprocess
import sys

import pytest

from piccolo_jax import config, encode, export, model as model_lib, modeldir, prepare, verify
from piccolo_jax import models

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = model_lib.Config(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, dense_out=48)


def _verify(*dirs):
  """(exit code, stdout lines) of python -m piccolo_jax.verify DIRS (its main, in this process)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
    verify.main([str(d) for d in dirs])
  return e.value.code, out.getvalue().splitlines()


@pytest.fixture(scope="module")
def written(tmp_path_factory, minilm_path, data_dir):
  root = tmp_path_factory.mktemp("verify")
  modeldir.save_model_dir(root / "model", TINY, models.random_params(TINY, 0), minilm_path)
  export.export(root / "model", root / "export")
  entry = {"kind": "tsv", "path": str(data_dir / "sts-b-en/sts-b-en.dev.tsv"), "task": "sts", "limit": 20}
  prepared = prepare.prepare(entry, config.section("data"), config.section("tasks"), encode.load_tokenizer(minilm_path),
                             root / "prepared")
  return root, prepared


def _flip(f):
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 1
  f.write_bytes(bytes(b))


def test_verify_good_and_damaged_model_export_and_prepared_data(written, tmp_path):
  root, prepared = written
  rc, out = _verify(root / "model", root / "export", prepared)
  assert rc == 0 and [l.rsplit(": ", 1)[1] for l in out] == ["ok (files)"] * 3, out
  for name in ("model", "export"):
    shutil.copytree(root / name, tmp_path / name)
  shutil.copytree(prepared, tmp_path / "prepared")
  _flip(tmp_path / "export" / "model.safetensors")  # One bit, same size.
  (tmp_path / "export" / "2_Dense" / "model.safetensors").unlink()
  (tmp_path / "export" / "notes.txt").write_text("added\n")
  params = sorted(p for p in (tmp_path / "model" / "params").rglob("*") if p.is_file())
  params[-1].write_bytes(params[-1].read_bytes()[:-1])  # Cut short.
  pos = tmp_path / "prepared" / "pos_tok.bin"
  _flip(pos if pos.is_file() else next((tmp_path / "prepared").glob("*.bin")))
  rc, out = _verify(tmp_path / "model", tmp_path / "export", tmp_path / "prepared")
  assert rc == 1, out
  text = "\n".join(out)
  assert "export/model.safetensors: its content differs from its digest (same size)" in text
  assert "export/2_Dense/model.safetensors: missing" in text and "export/notes.txt: not in digests.json" in text
  assert f"{params[-1].relative_to(tmp_path)}: {params[-1].stat().st_size} bytes, " in text
  assert "prepared/" in text and "its content differs from its digest" in text.split("prepared/", 1)[1]
  assert [l for l in out if l.endswith("DAMAGED (files)")] == [f"{tmp_path / d}: DAMAGED (files)" for d in
                                                               ("model", "export", "prepared")]
  (tmp_path / "nothing").mkdir()
  r = subprocess.run([sys.executable, "-m", "piccolo_jax.verify", str(tmp_path / "nothing")], cwd=REPO,
                     capture_output=True, text=True)  # The CLI itself, once.
  assert r.returncode == 1 and "not a model dir, export, prepared dataset, checkpoint or workdir" in r.stderr
