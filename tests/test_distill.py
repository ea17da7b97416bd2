"""Distillation: the KL and embedding losses against float64 numpy references (1 and 8 devices, MRL), teacher
scores through the data path, teacher vectors in prepared data, pruned students, a distillation run."""
import json

import jax
import numpy as np
import pytest

from conftest import error_line, minilm_layers
from test_losses import _check_grad, np_cos, rand, ref_retrieval, shard  # pylint: disable=unused-import  (fixture)
import tiny_config
from piccolo_jax import config, encode, losses as L, modeldir, plan as plan_lib, prepare, sources, train
from piccolo_jax import models


# float64 numpy references, from the issue text with plain loops.

def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - (x.max() + np.log(np.sum(np.exp(x - x.max()))))


def ref_kl(q, p, n, ps, ns, t=0.02, tt=1.0, mask=None):
  rows = []
  for i in range(len(q)):
    keep = [True] + list(np.ones(n.shape[1], bool) if mask is None else mask[i])
    cands = [p[i]] + list(n[i])
    scores = [ps[i]] + list(ns[i])
    if not all(np.isfinite(s) for s, k in zip(scores, keep) if k):
      continue
    lt = np_log_softmax([s / tt for s, k in zip(scores, keep) if k])
    ls = np_log_softmax([np_cos(q[i], c) / t for c, k in zip(cands, keep) if k])
    rows.append(np.sum(np.exp(lt) * (lt - ls)))
  return np.mean(rows) if rows else 0.0


def ref_sims(x):
  return np.array([[np_cos(a, b) for b in x] for a in x])


def ref_cosine(s, t):
  return np.mean([1 - np_cos(a, b) for a, b in zip(s, t)])


def ref_similarity(s, t):
  return np.mean((ref_sims(s) - ref_sims(t)) ** 2)


def ref_relative(s, t, margin=0.015):
  S, T, terms = ref_sims(s), ref_sims(t), []
  for i in range(len(s)):
    for j in range(len(s)):
      for k in range(len(s)):
        if len({i, j, k}) == 3 and T[i, j] > T[i, k]:
          terms.append(max(0.0, S[i, k] - S[i, j] + margin))
  return np.mean(terms)


def scores_for(rng, b, k):
  ps, ns = rng.normal(size=b), rng.normal(size=(b, k))
  ns[1, 0] = np.nan  # Row 1 has no teacher scores: it adds nothing.
  return ps, ns


def test_kl_reference_and_grads():
  rng = np.random.default_rng(0)
  mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
  ps, ns = scores_for(rng, 4, 3)
  ns[2, 1:] = np.nan  # Padded negatives' missing scores do not count against the row.
  kw = dict(pos_score=ps, neg_score=ns, temperature=0.05, teacher_temperature=0.5, n_mask=mask)
  xs = [rand(rng, 4, 5), rand(rng, 4, 5), rand(rng, 4, 3, 5)]
  _check_grad(lambda q, p, n: L.score_kl(q, p, n, **kw),
              lambda q, p, n: ref_kl(q, p, n, ps, ns, 0.05, 0.5, mask), xs, (0, 1, 2))
  q, p, n = xs  # A teacher that scores as the student does: KL 0.
  cos = lambda a, b: L.normalize(a) @ L.normalize(b)
  same = dict(pos_score=np.array([cos(q[i], p[i]) for i in range(4)]),
              neg_score=np.array([[cos(q[i], n[i, k]) for k in range(3)] for i in range(4)]))
  assert abs(float(L.score_kl(q, p, n, **same, temperature=0.1, teacher_temperature=0.1))) < 1e-6
  none = dict(pos_score=np.full(4, np.nan), neg_score=np.full((4, 3), np.nan))
  assert float(L.score_kl(q, p, n, **none)) == 0.0  # No row with scores: 0, not NaN.
  g = jax.grad(lambda q: L.score_kl(q, p, n, **none))(q)
  assert np.all(g == 0)


def test_retrieval_is_infonce_plus_weighted_kl():
  rng = np.random.default_rng(1)
  q, p, n = rand(rng, 4, 6), rand(rng, 4, 6), rand(rng, 4, 2, 6)
  ps, ns = scores_for(rng, 4, 2)
  base = L.retrieval(q, p, n, pos_score=ps, neg_score=ns, weight=0.5)
  np.testing.assert_allclose(base, 0.5 * ref_retrieval(q, p, n), rtol=1e-5)
  got = L.retrieval(q, p, n, pos_score=ps, neg_score=ns, weight=0.5, kl_weight=2.0, teacher_temperature=0.3)
  np.testing.assert_allclose(got, 0.5 * (ref_retrieval(q, p, n) + 2.0 * ref_kl(q, p, n, ps, ns, 0.01, 0.3)),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["cosine", "similarity", "relative"])
def test_embedding_losses_reference_and_grads(name):
  rng = np.random.default_rng(2)
  fn, ref = {"cosine": (L.cosine_distill, ref_cosine), "similarity": (L.similarity_distill, ref_similarity),
             "relative": (lambda s, t: L.relative_distill(s, t, 0.1), lambda s, t: ref_relative(s, t, 0.1))}[name]
  _check_grad(fn, ref, [rand(rng, 5, 4), rand(rng, 5, 4)], (0,))


def test_embedding_distill_weights():
  rng = np.random.default_rng(3)
  s, t = rand(rng, 6, 4), rand(rng, 6, 4)
  got = L.embedding_distill(s, t, cosine=2.0, similarity=3.0, relative=0.5, margin=0.2, weight=0.1)
  want = 0.1 * (2 * ref_cosine(s, t) + 3 * ref_similarity(s, t) + 0.5 * ref_relative(s, t, 0.2))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sharded_with_mrl_equals_reference(shard):
  rng = np.random.default_rng(4)
  q, p, n = rand(rng, 16, 8), rand(rng, 16, 8), rand(rng, 16, 2, 8)
  ps, ns = scores_for(rng, 16, 2)
  kl = L.matryoshka(L.score_kl, (4, 8))
  got = jax.jit(lambda *a: kl(*a, pos_score=ps, neg_score=ns))(*shard(q, p, n))
  want = np.mean([ref_kl(q[..., :d], p[..., :d], n[..., :d], ps, ns) for d in (4, 8)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g_one = jax.grad(lambda *a: kl(*a, pos_score=ps, neg_score=ns), (0, 1, 2))(q, p, n)
  g_mesh = jax.jit(jax.grad(lambda *a: kl(*a, pos_score=ps, neg_score=ns), (0, 1, 2)))(*shard(q, p, n))
  for a, b in zip(g_mesh, g_one):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  s, t = rand(rng, 16, 8), rand(rng, 16, 8)
  ed = L.matryoshka(L.embedding_distill, (4, 8))
  got = jax.jit(ed)(*shard(s, t))
  want = np.mean([ref_cosine(s[:, :d], t[:, :d]) + ref_similarity(s[:, :d], t[:, :d]) +
                  ref_relative(s[:, :d], t[:, :d]) for d in (4, 8)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g_one = jax.grad(lambda s: ed(s, t))(s)
  g_mesh = jax.jit(jax.grad(lambda s, t: ed(s, t)))(*shard(s, t))
  np.testing.assert_allclose(g_mesh, g_one, rtol=1e-5, atol=1e-7)


# Teacher scores in the data.

def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return {"kind": "jsonl", "path": str(path), "task": "retrieval"}


SCORED = [{"query": f"q{i}", "pos": [f"p{i}", " "], "neg": [f"n{i}a", f"n{i}b"], "pos_scores": [0.9, 0.1],
           "neg_scores": [0.5, 0.25 + i]} for i in range(6)] + [{"query": "q6", "pos": ["p6"], "neg": ["n6"]}]


def test_scores_are_prepared_and_sampled(tmp_path, tokenizer):
  entry = write_jsonl(tmp_path / "s.jsonl", SCORED)
  c = config.section("data", prepared_dir=str(tmp_path / "prep"), global_batch_size=7)
  t = prepare.Prepared(prepare.prepare(entry, c, config.section("tasks"), tokenizer))
  assert t.scored_rows == 6 and len(t) == 7
  assert len(t.pos_score) == len(t.pos_ids) == 7 and len(t.neg_score) == len(t.neg_ids)
  np.testing.assert_array_equal(t.pos_score[:6], np.float32(0.9))  # The blank positive went with its 0.1.
  tasks_cfg = config.section("tasks")
  tasks_cfg.retrieval.neg_num = 2
  plan = plan_lib.Plan(c, tasks_cfg, [t], 1)
  (_, sel), = plan.units(0)
  for r, row in enumerate(sel["query"]):
    if row < 6:
      assert sel["pos_score"][r] == np.float32(0.9)
      assert sorted(sel["neg_score"][r].tolist()) == sorted(np.float32([0.5, 0.25 + row]).tolist())
    else:
      assert np.isnan(sel["pos_score"][r]) and np.isnan(sel["neg_score"][r]).all()


@pytest.mark.parametrize("row, why", [
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0]}, "field 'pos_scores' is given without 'neg_scores': teacher scores need both"),
    ({"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1.0], "neg_scores": [0.5]},
     "field 'neg_scores': 1 scores for 2 texts in 'neg'"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": ["high"], "neg_scores": [0.5]},
     "field 'pos_scores': expected a finite number, got 'high'"),
])
def test_bad_score_columns_named(tmp_path, row, why):
  entry = write_jsonl(tmp_path / "bad.jsonl", [SCORED[0], row])
  with pytest.raises(sources.DataError) as e:
    list(sources.read(entry))
  assert str(e.value) == f"{tmp_path / 'bad.jsonl'}: line 2: {why}"


@pytest.fixture(scope="module")
def tokenizer():
  return encode.load_tokenizer(models.resolve_init("minilm"))


# Teacher vectors, pruned students.

@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Two small teachers: all-MiniLM-L6-v2's first layer, and its first two."""
  root = tmp_path_factory.mktemp("teachers")
  for n in (1, 2):
    cfg, params = minilm_layers(n)
    modeldir.save_model_dir(root / f"l{n}", cfg, params, models.resolve_init("minilm"))
  return root


def test_teacher_vectors_keyed_by_teacher_and_texts(tmp_path, tokenizer, teachers):
  texts = ["A man is playing a flute.", "A cat sleeps.", "Two dogs run on the beach.", "Rain today"]
  (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
  entry = {"kind": "text", "path": str(tmp_path / "t.txt")}
  tasks_cfg = config.section("tasks")
  tasks_cfg.distill.teacher = str(teachers / "l1")
  c = config.section("data", prepared_dir=str(tmp_path / "prep"))
  t = prepare.open_one(entry, c, tasks_cfg, tokenizer)
  assert t.task == "distill" and t.teacher.dtype == np.float16 and t.teacher.shape == (4, 384)
  want = encode.Embedder.load(teachers / "l1").encode(texts, max_length=128)
  np.testing.assert_allclose(t.teacher, want, atol=1e-3)
  first = (t.path / t.teacher_file).stat().st_mtime_ns
  again = prepare.open_one(entry, c, tasks_cfg, tokenizer)  # Same teacher, same texts: read, not recomputed.
  assert again.teacher_file == t.teacher_file and (t.path / t.teacher_file).stat().st_mtime_ns == first
  tasks_cfg.distill.teacher = str(teachers / "l2")
  other = prepare.open_one(entry, c, tasks_cfg, tokenizer)
  assert other.teacher_file != t.teacher_file and not np.allclose(other.teacher, t.teacher, atol=1e-2)
  (tmp_path / "t.txt").write_text("\n".join(texts[::-1]) + "\n")  # Other texts: another prepared dir.
  moved = prepare.open_one(entry, c, tasks_cfg, tokenizer)
  assert moved.path != other.path
  np.testing.assert_array_equal(moved.teacher, other.teacher[::-1])
  tasks_cfg.distill.teacher = ""
  with pytest.raises(sources.DataError, match="task distill needs a teacher: set tasks.distill.teacher"):
    prepare.open_one(entry, c, tasks_cfg, tokenizer)


def test_pruned_student_equals_sentence_transformers(minilm_path):
  st = pytest.importorskip("sentence_transformers")
  import torch  # pylint: disable=g-import-not-at-top
  texts = ["A man is playing a flute.", "Ein Hund rennt.", "two dogs run on the beach at noon"]
  keep = (0, 2, 4)
  cfg, params, tok_dir = models.load_init(str(minilm_path))
  cfg, params = models.prune(cfg, params, keep)
  with pytest.raises(ValueError, match=r"model.keep_layers=\(0, 6\): expected distinct layer indices in \[0, 6\)"):
    models.prune(*models.load_init(str(minilm_path))[:2], (0, 6))
  model = st.SentenceTransformer(str(minilm_path), device="cpu")
  auto = model[0].auto_model
  auto.encoder.layer = torch.nn.ModuleList([auto.encoder.layer[i] for i in keep])
  auto.config.num_hidden_layers = len(keep)
  want = model.encode(texts, convert_to_numpy=True)
  got = encode.Embedder.from_params(cfg, params, tok_dir).encode(texts, normalize=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_distill_run_with_a_map_exports_the_student(tmp_path, teachers):
  """A 32-wide random student distils a 384-wide teacher through a trained map; the export is the student."""
  c = tiny_config.get_config()
  (tmp_path / "t.txt").write_text((tiny_config.DATA / "sts-b-en/sentences.train.txt").read_text()[:4000])
  c.data.datasets = ({"kind": "text", "path": str(tmp_path / "t.txt")},)
  c.data.prepared_dir = str(tmp_path / "prep")
  c.tasks.distill.update(teacher=str(teachers / "l1"), query_max_len=32, relative=0.0)
  c.loss.mrl_dims = (128, 384)
  c.train.update(epochs=1, max_steps=8)
  train.train(c, tmp_path / "run")
  rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  losses = [r["loss/distill"] for r in rows if "loss/distill" in r]
  assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
  cfg = modeldir.load_config(tmp_path / "run/model")
  assert cfg.distill_dim == 384 and cfg.embed_dim == 32
  st = pytest.importorskip("sentence_transformers")
  exported = st.SentenceTransformer(str(tmp_path / "run/export"), device="cpu")
  assert exported.get_embedding_dimension() == 32


def test_a_run_of_the_schema_before_distillation_resumes(tmp_path):
  """Fields added since a run started, at their defaults, are not a config change; set otherwise, they are."""
  from piccolo_jax import rundir  # pylint: disable=g-import-not-at-top
  c = tiny_config.get_config()
  rundir.write_config(tmp_path, c)
  old = json.loads((tmp_path / config.RUN_FILE).read_text())
  del old["tasks"]["distill"], old["model"]["keep_layers"], old["tasks"]["retrieval"]["kl_weight"]
  (tmp_path / config.RUN_FILE).write_text(json.dumps(old))
  config.check_workdir(tmp_path, c)
  c.tasks.retrieval.kl_weight = 1.0
  with pytest.raises(config.ConfigChangeError, match=r"tasks.retrieval.kl_weight None -> 1.0"):
    config.check_workdir(tmp_path, c)


def test_score_distillation_trains_and_counts_scored_rows(tmp_path):
  """Retrieval rows with and without teacher scores train together (kl_weight 1): the scored ones counted."""
  rows = [json.loads(l) for l in (tiny_config.DATA / "retrieval-zh/triplets.train.jsonl").open()][:40]
  rng = np.random.default_rng(0)
  for r in rows[:30]:
    r |= {"pos_scores": rng.uniform(0.5, 1, len(r["pos"])).tolist(), "neg_scores": rng.uniform(0, 0.5, len(r["neg"])).tolist()}
  c = tiny_config.get_config()
  c.data.datasets = (write_jsonl(tmp_path / "scored.jsonl", rows),)
  c.data.prepared_dir = str(tmp_path / "prep")
  c.tasks.retrieval.update(kl_weight=1.0, neg_num=3)
  c.train.update(max_steps=4, log_every=1)
  train.train(c, tmp_path / "run")
  metrics = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert metrics[0][f"data/{tmp_path / 'scored.jsonl'}/teacher_scored_rows"] == 30
  assert all(np.isfinite(m["loss/retrieval"]) for m in metrics[1:]) and len(metrics) == 5
