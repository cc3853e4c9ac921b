"""Tests for semppl_jax.train: the pure SemPPL step on tiny shapes, in process.

One tiny configuration (tiny ResNet, 12 px / 8 px views of 16 px images, batch 8 + 8, a 64-entry
queue) is shared by every test; the step is compiled once per objective and layout.
"""
import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import augmentations
from semppl_jax import compiled_cost
from semppl_jax import evaluation
from semppl_jax import knn
from semppl_jax import losses
from semppl_jax import nonfinite_guard
from semppl_jax import parallel
from semppl_jax import queue as queue_lib
from semppl_jax import semantic_positives
from semppl_jax import train

NUM_CLASSES = 4
SHARDS = 8


def _config(objective="semppl", **loss):
  return train.TrainConfig(
      objective=objective, num_classes=NUM_CLASSES, labelled_batch_size=8,
      unlabelled_batch_size=8, queue_size=64, training_steps=10, num_shards=SHARDS,
      views=train.ViewConfig(num_large=2, num_small=1, large_size=12, small_size=8,
                             large_scale=(0.5, 1.0), small_scale=(0.3, 0.6)),
      network=train.NetworkConfig(encoder="tiny_resnet", small_images=True,
                                  projector_hidden_size=32, projection_size=16,
                                  predictor_hidden_size=32),
      loss=train.LossConfig(**loss),
      optim=train.OptimConfig(base_learning_rate=1.0, warmup_steps=2))


def _batch(seed):
  rng = np.random.RandomState(seed)
  return {
      "labelled_images": rng.randint(0, 256, (8, 16, 16, 1)).astype(np.uint8),
      "labels": rng.randint(0, NUM_CLASSES, (8,)).astype(np.int32),
      "unlabelled_images": rng.randint(0, 256, (8, 16, 16, 1)).astype(np.uint8),
      "unlabelled_labels": rng.randint(0, NUM_CLASSES, (8,)).astype(np.int32),
  }


def _filled_queue(config, seed=0):
  """Queues whose every slot holds a unit vector and a label (every class present)."""
  rng = np.random.RandomState(seed)
  L, Q, D = config.views.num_large, config.queue_size, config.network.projection_size
  emb = rng.randn(L, Q, D).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  labels = np.tile(np.arange(Q) % NUM_CLASSES, (L, 1)).astype(np.int32)
  return queue_lib.Queue(jnp.asarray(emb), jnp.asarray(labels), jnp.zeros((), jnp.int32))


@pytest.fixture(scope="module")
def state():
  return train.init_train_state(_config(), jax.random.PRNGKey(0))


def _unit_jit(config):
  return jax.jit(functools.partial(train.train_step, config))


def test_objectives_are_data():
  assert set(train.OBJECTIVES) == {"semppl", "relic", "supervised"}
  assert train.OBJECTIVES["semppl"].semantic and train.OBJECTIVES["semppl"].contrastive
  assert not train.OBJECTIVES["relic"].semantic and train.OBJECTIVES["relic"].contrastive
  assert train.OBJECTIVES["supervised"].probe_trains_encoder
  with pytest.raises(ValueError, match="objective: got 'byol'"):
    _config("byol")
  with pytest.raises(ValueError, match="labelled_batch_size: 8 is not divisible by num_shards=3"):
    dataclasses.replace(_config(), num_shards=3)


def test_config_is_frozen_and_hashable():
  config = _config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.objective = "relic"  # type: ignore[misc]
  assert hash(config) == hash(_config())


def _hand_assembled_loss(config, state, batch, key):
  """The objective rebuilt from the public pieces (views, networks, contrastive_loss,
  invariance_loss), independently of semppl_loss's batched loops."""
  nets = train.build_networks(config.network, NUM_CLASSES)
  k_views, k_sem, _ = jax.random.split(key, 3)
  large, small = train.make_views(config, batch, k_views, SHARDS)
  labels = train._interleave(batch["labels"], batch["unlabelled_labels"], SHARDS)  # pylint: disable=protected-access
  rows = train.labelled_rows(config, SHARDS)
  flat = lambda x: augmentations.normalize(x.reshape((-1,) + x.shape[2:]))
  (emb_l, _, pred_l), st = nets.online.apply(state.online_params, state.online_state, None,
                                             flat(large), True)
  (_, _, pred_s), _ = nets.online.apply(state.online_params, st, None, flat(small), True)
  L, B = 2, 16
  online = np.concatenate([np.asarray(pred_l).reshape(L, B, -1),
                           np.asarray(pred_s).reshape(1, B, -1)])
  online = np.asarray(losses.l2_normalize(jnp.asarray(online)))
  target, _ = nets.target.apply(state.target_params, state.target_state, None, flat(large), True)
  target = np.asarray(losses.l2_normalize(target)).reshape(L, B, -1)
  probe_in = np.asarray(emb_l).reshape(L, B, -1)[:, rows].reshape(L * 8, -1)
  probe_ce, _ = evaluation.classifier_loss(nets.probe, state.probe_params, probe_in,
                                           np.tile(labels[rows], L))

  def terms(candidate_sets):
    ce, inv = [], []
    for cands in candidate_sets:
      per_view = [losses.contrastive_loss(online[a], cands, temperature=0.2) for a in range(3)]
      ce += [float(jnp.mean(c)) for c, _ in per_view]
      inv.append(np.mean([float(jnp.mean(losses.invariance_loss(per_view[a][1],
                                                                 per_view[b][1])))
                          for a in range(3) for b in range(3) if a != b]))
    return np.mean(ce), np.mean(inv)

  l_augm, i_augm = terms([target[l] for l in range(L)])
  total = 0.3 * l_augm + 5.0 * i_augm + float(probe_ce)
  if config.objective == "semppl":
    lc = config.loss
    queries = online[:L] if lc.knn_query == "prediction" else target
    pseudo = knn.pseudo_labels(jnp.asarray(queries), state.queue, k=1,
                               num_classes=NUM_CLASSES)
    is_labelled = np.zeros(B, bool)
    is_labelled[np.asarray(rows)] = True
    y_star = np.where(is_labelled, labels, np.asarray(pseudo))
    semantic, valid = semantic_positives.sample_semantic_positives(k_sem, jnp.asarray(y_star),
                                                                   state.queue, 3)
    assert np.all(np.asarray(valid))  # Every class is in the queue: no masking to mirror.
    semantic = np.asarray(semantic)
    if lc.semantic_negatives == "semantic":  # First built: the other rows' draws.
      l_sem, i_sem = terms([semantic[l, s] for l in range(L) for s in range(3)])
      total += 0.3 * 0.2 * l_sem + 5.0 * i_sem
    else:  # Row i's own target replaced by its draw; λ_sem = 0: no KL.
      ce = []
      for l in range(L):
        for s in range(3):
          for a in range(3):
            logits = online[a] @ target[l].T / 0.2
            np.fill_diagonal(logits, np.sum(online[a] * semantic[l, s], axis=-1) / 0.2)
            ce.append(-np.diagonal(np.asarray(jax.nn.log_softmax(logits, axis=-1))))
      total += 0.3 * 5.0 * float(np.mean(ce))
  return total


FIRST_BUILT = dict(semantic_weight=0.2, semantic_negatives="semantic",
                   semantic_invariance_weight=None, knn_query="prediction")


@pytest.mark.parametrize("objective, form", [("relic", {}), ("semppl", {}),
                                             ("semppl", FIRST_BUILT)])
@pytest.mark.slow
def test_loss_equals_hand_assembled_sum_of_terms(state, objective, form):
  config = _config(objective, **form)
  state = state._replace(queue=_filled_queue(config))
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(1))
  key = jax.random.PRNGKey(7)
  loss, fwd = train.objective_loss(config, state.online_params, state.probe_params,
                                   state.target_params, state, batch, key)
  expected = _hand_assembled_loss(config, state, batch, key)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  assert float(fwd.metrics["loss"]) == float(loss)


def _grads(config, state, batch):
  fn = jax.grad(lambda o, p, t: train.objective_loss(config, o, p, t, state, batch,
                                                     jax.random.PRNGKey(3))[0],
                argnums=(0, 1, 2))
  return fn(state.online_params, state.probe_params, state.target_params)


def _norm(tree):
  return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.slow
def test_gradients_reach_online_and_probe_never_target(state):
  config = _config("semppl")
  state = state._replace(queue=_filled_queue(config))
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(2))
  online, probe, target = _grads(config, state, batch)
  assert _norm(online) > 0 and _norm(probe) > 0
  assert _norm(target) == 0.0


@pytest.mark.parametrize("objective, encoder_learns_from_probe", [("semppl", False),
                                                                   ("supervised", True)])
def test_probe_shapes_the_encoder_only_in_the_supervised_baseline(state, objective,
                                                                  encoder_learns_from_probe):
  # Loss weights 0: the probe's cross-entropy is the only term left.
  config = _config(objective, contrastive_weight=0.0, invariance_weight=0.0)
  online, probe, _ = _grads(config, state, jax.tree_util.tree_map(jnp.asarray, _batch(3)))
  encoder = {m: v for m, v in online.items() if not m.startswith(("projector", "predictor"))}
  assert _norm(probe) > 0
  assert (_norm(encoder) > 0) == encoder_learns_from_probe


@pytest.mark.slow
def test_step_traces_once_and_updates_what_each_objective_owns(state):
  config = _config("relic")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, batch, key):
    return train.train_step(config, state, batch, key)

  s = jax.tree_util.tree_map(jnp.copy, state)
  for i in range(3):
    s, metrics = step(s, jax.tree_util.tree_map(jnp.asarray, _batch(10 + i)),
                      jax.random.PRNGKey(i))
  assert int(s.step) == 3
  assert float(metrics["semantic_contrastive"]) == 0.0
  # Three steps of 8 labelled items in each of the 2 queues.
  assert int(jnp.sum(s.queue.labels >= 0)) == 2 * 24
  assert not np.allclose(np.asarray(s.target_params["projector/linear"]["w"]),
                         np.asarray(state.target_params["projector/linear"]["w"]))

  sup = train.train_step(_config("supervised"), state,
                         jax.tree_util.tree_map(jnp.asarray, _batch(10)), jax.random.PRNGKey(0))[0]
  chex.assert_trees_all_equal(sup.queue, state.queue)
  chex.assert_trees_all_equal(sup.target_params, state.target_params)


@pytest.mark.slow
def test_sharded_step_equals_unsharded(state):
  """8 fake devices vs one, same layout (num_shards=8). BatchNorm means are sums over the
  batch that XLA adds in another order when the batch is split over devices, so the two agree
  to float32 rounding (1e-5 after two steps), not bit for bit."""
  config = _config("semppl")
  mesh = parallel.make_mesh(jax.devices()[:SHARDS])
  shardings = train.train_state_shardings(state, mesh)
  sharded_step = jax.jit(functools.partial(train.train_step, config),
                         in_shardings=(shardings, parallel.data_sharding(mesh), None),
                         out_shardings=(shardings, None))
  plain_step = _unit_jit(config)
  a = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), shardings)
  b = jax.tree_util.tree_map(jnp.copy, state)
  for i in range(2):
    batch = _batch(20 + i)
    with jax.set_mesh(mesh):
      a, metrics_a = sharded_step(a, parallel.host_local_to_global(batch, mesh),
                                  jax.random.PRNGKey(i))
    b, metrics_b = plain_step(b, jax.tree_util.tree_map(jnp.asarray, batch),
                              jax.random.PRNGKey(i))
  assert a.queue.embeddings.sharding.spec == jax.sharding.PartitionSpec(None, "data", None)
  chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(a.queue.labels), np.asarray(b.queue.labels))
  for k in metrics_a:
    np.testing.assert_allclose(float(metrics_a[k]), float(metrics_b[k]), atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------------------------
# The non-finite guard.
# ----------------------------------------------------------------------------------------------

def _assert_same_state_but_guard(got, expected):
  """Every leaf bit-identical, except the two guard fields."""
  strip = lambda s: s._replace(nonfinite_step=0, nonfinite_check=0)
  chex.assert_trees_all_equal(jax.device_get(strip(got)), jax.device_get(strip(expected)))


@pytest.mark.slow
def test_nonfinite_batch_leaves_the_state_unchanged_and_sets_the_guard(state):
  config = _config("semppl")
  step = _unit_jit(config)
  good, metrics = step(jax.tree_util.tree_map(jnp.copy, state),
                       jax.tree_util.tree_map(jnp.asarray, _batch(30)), jax.random.PRNGKey(0))
  assert int(good.step) == 1 and int(good.nonfinite_step) == -1
  assert int(good.nonfinite_check) == -1
  names = nonfinite_guard.nonfinite_check_names(metrics)
  assert names[:2] == ("loss", "grad_norm") and names[-1] == "queue"

  nan_batch = dict(_batch(31), labelled_images=np.full((8, 16, 16, 1), np.nan, np.float32))
  refused, metrics = step(jax.tree_util.tree_map(jnp.copy, good),
                          jax.tree_util.tree_map(jnp.asarray, nan_batch), jax.random.PRNGKey(1))
  _assert_same_state_but_guard(refused, good)  # step stays 1: the update was not applied.
  assert int(refused.nonfinite_step) == 2  # The second step, as in 'step 2/10'.
  # The first check in order that failed: a metric if one is non-finite, else a state field
  # (NaN pixels can leave the loss finite -- ReLU maps NaN to 0 -- and poison the BatchNorm
  # statistics, which only the state check sees).
  bad_metrics = [n for n in names if n in metrics and not np.isfinite(float(metrics[n]))]
  failed = names[int(refused.nonfinite_check)]
  if bad_metrics:
    assert failed == bad_metrics[0]
  else:
    assert failed in nonfinite_guard.GUARDED_STATE_FIELDS
  print(f"NaN pixels: first non-finite check {failed!r}, non-finite metrics {bad_metrics}")

  # Sticky: a finite batch afterwards does not resume training behind the host's back.
  after, metrics = step(jax.tree_util.tree_map(jnp.copy, refused),
                        jax.tree_util.tree_map(jnp.asarray, _batch(32)), jax.random.PRNGKey(2))
  assert np.isfinite(float(metrics["loss"]))
  _assert_same_state_but_guard(after, good)
  assert (int(after.nonfinite_step), int(after.nonfinite_check)) == (
      2, int(refused.nonfinite_check))


def test_guard_names_the_first_nonfinite_metric_or_state_field(state):
  metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0),
             "augm_contrastive": jnp.float32(0.5)}
  names = nonfinite_guard.nonfinite_check_names(metrics)
  assert names == (("loss", "grad_norm", "augm_contrastive")
                   + nonfinite_guard.GUARDED_STATE_FIELDS)
  new = state._replace(step=state.step + 1)

  # All finite: accepted.
  assert int(nonfinite_guard.guard_nonfinite(state, new, metrics).step) == 1
  inf_params = dict(new.online_params)
  module = sorted(inf_params)[0]
  inf_params[module] = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf),
                                              inf_params[module])
  kept = nonfinite_guard.guard_nonfinite(state, new._replace(online_params=inf_params), metrics)
  _assert_same_state_but_guard(kept, state)
  assert int(kept.nonfinite_step) == 1
  assert names[int(kept.nonfinite_check)] == "online_params"

  bad_metrics = dict(metrics, grad_norm=jnp.float32(np.inf), augm_contrastive=jnp.float32(np.nan))
  kept = nonfinite_guard.guard_nonfinite(state, new, bad_metrics)
  assert names[int(kept.nonfinite_check)] == "grad_norm"  # The first of the two, in order.


def test_guard_checks_the_queue_through_what_was_enqueued(state):
  metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}
  names = nonfinite_guard.nonfinite_check_names(metrics)
  L, Q, D = state.queue.embeddings.shape
  items = jnp.ones((L, 4, D), jnp.float32)
  new = state._replace(step=state.step + 1, queue=queue_lib.enqueue(state.queue, items,
                                                                     jnp.zeros(4, jnp.int32)))
  accepted = nonfinite_guard.guard_nonfinite(state, new, metrics, enqueued=items)
  assert int(accepted.step) == 1 and int(accepted.nonfinite_step) == -1
  chex.assert_trees_all_equal(accepted.queue, new.queue)

  # A non-finite item: refused as 'queue', whether given as `enqueued` or found in the whole
  # updated queue (enqueued=None).
  bad = items.at[1, 2, 3].set(jnp.nan)
  bad_new = new._replace(queue=queue_lib.enqueue(state.queue, bad, jnp.zeros(4, jnp.int32)))
  for enqueued in (bad, None):
    kept = nonfinite_guard.guard_nonfinite(state, bad_new, metrics, enqueued=enqueued)
    _assert_same_state_but_guard(kept, state)
    assert int(kept.nonfinite_step) == 1 and names[int(kept.nonfinite_check)] == "queue"
  # Only `enqueued` is read, not the queue: a finite float32 item that overflows the queue's
  # dtype counts, an entry elsewhere in the queue does not (every accepted queue was finite).
  half = state._replace(queue=state.queue._replace(
      embeddings=state.queue.embeddings.astype(jnp.float16)))
  big = jnp.full((L, 4, D), 1e6, jnp.float32)
  half_new = half._replace(queue=queue_lib.enqueue(half.queue, big, jnp.zeros(4, jnp.int32)))
  kept = nonfinite_guard.guard_nonfinite(half, half_new, metrics, enqueued=big)
  assert names[int(kept.nonfinite_check)] == "queue"
  poisoned = new._replace(queue=new.queue._replace(
      embeddings=new.queue.embeddings.at[0, Q - 1, 0].set(jnp.inf)))
  kept = nonfinite_guard.guard_nonfinite(state, poisoned, metrics, enqueued=items)
  assert int(kept.nonfinite_step) == -1 and int(kept.step) == 1
  # A step that does not enqueue (supervised) leaves the queue object as it is: not read.
  same = nonfinite_guard.guard_nonfinite(state, state._replace(step=state.step + 1), metrics)
  assert int(same.nonfinite_step) == -1 and int(same.step) == 1



def test_guard_runs_the_enqueue_after_its_decision(state):
  """update_queue: the queue kept is update_queue(accept): the enqueue when accepted, the queue
  as it was (position included) when refused, whatever made the guard refuse."""
  metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}
  names = nonfinite_guard.nonfinite_check_names(metrics)
  L, _, D = state.queue.embeddings.shape
  items = jnp.ones((L, 4, D), jnp.float32)
  labels = jnp.zeros(4, jnp.int32)
  update = lambda items: lambda accept: queue_lib.enqueue(state.queue, items, labels,
                                                          write=accept)
  new = state._replace(step=state.step + 1)
  guard = functools.partial(nonfinite_guard.guard_nonfinite, state)
  accepted = guard(new, metrics, enqueued=items, update_queue=update(items))
  assert int(accepted.step) == 1 and int(accepted.nonfinite_step) == -1
  chex.assert_trees_all_equal(accepted.queue, queue_lib.enqueue(state.queue, items, labels))
  bad = items.at[1, 2, 3].set(jnp.nan)
  for kept, check in ((guard(new, metrics, enqueued=bad, update_queue=update(bad)), "queue"),
                      (guard(new, dict(metrics, loss=jnp.float32(np.inf)), enqueued=items,
                             update_queue=update(items)), "loss")):
    _assert_same_state_but_guard(kept, state)
    assert int(kept.nonfinite_step) == 1 and names[int(kept.nonfinite_check)] == check
  with pytest.raises(ValueError, match="update_queue needs enqueued"):
    guard(new, metrics, update_queue=update(items))


@pytest.mark.slow
def test_accepted_step_does_not_copy_the_queue():
  """The compiled step (state donated, as the experiment runs it) holds no copy of the queue:
  the enqueue runs after the guard's decision, in place, rather than the guard's conditional
  choosing between the updated and the old queue (which copied the updated one). The queue is
  made the largest array of the state so that its copy is unambiguous."""
  config = dataclasses.replace(_config("semppl"), queue_size=4096)
  abstract = jax.eval_shape(lambda: train.init_train_state(config, jax.random.PRNGKey(0)))
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(1))
  hlo = jax.jit(functools.partial(train.train_step, config), donate_argnums=0).lower(
      abstract, batch, jax.random.PRNGKey(0)).compile().as_text()
  queue_type = re.escape(f"f32[{','.join(map(str, abstract.queue.embeddings.shape))}]")
  assert re.search(queue_type + r"(\{[^}]*\})? (dynamic-update-slice|scatter|fusion)\(", hlo)
  copies = re.findall(r"= " + queue_type + r"(\{[^}]*\})? copy(-start)?\(", hlo)
  assert not copies, copies

def test_guard_fields_stay_out_of_checkpoint_dicts(state):
  tree = state.to_dict()
  assert "nonfinite_step" not in tree and "nonfinite_check" not in tree
  restored = train.TrainState.from_dict(tree)  # A checkpoint from before the guard, too.
  assert (int(restored.nonfinite_step), int(restored.nonfinite_check)) == (-1, -1)
  chex.assert_trees_all_equal(restored, state)


# ----------------------------------------------------------------------------------------------
# Research oracles (pseudo_labels='oracle' / 'noisy_oracle').
# ----------------------------------------------------------------------------------------------

def test_oracle_labels_have_the_requested_accuracy_and_uniform_errors():
  labels = jnp.asarray(np.arange(40000) % NUM_CLASSES, jnp.int32).at[:10].set(-1)
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(train.oracle_labels(key, labels, NUM_CLASSES, 1.0), labels)
  wrong = np.asarray(train.oracle_labels(key, labels, NUM_CLASSES, 0.0))
  known = np.asarray(labels) >= 0
  assert (wrong[~known] == -1).all()
  assert (wrong[known] != np.asarray(labels)[known]).all()
  assert ((wrong[known] >= 0) & (wrong[known] < NUM_CLASSES)).all()
  # Errors are uniform over the other classes: each shift 1..C-1 about equally often.
  shifts = (wrong[known] - np.asarray(labels)[known]) % NUM_CLASSES
  counts = np.bincount(shifts, minlength=NUM_CLASSES)[1:]
  np.testing.assert_allclose(counts / counts.sum(), 1 / (NUM_CLASSES - 1), atol=0.01)
  noisy = np.asarray(train.oracle_labels(key, labels, NUM_CLASSES, 0.7))
  np.testing.assert_allclose(np.mean(noisy[known] == np.asarray(labels)[known]), 0.7, atol=0.01)


def test_loss_config_refuses_unknown_switch_values():
  with pytest.raises(ValueError, match="pseudo_labels: got 'truth'"):
    train.LossConfig(pseudo_labels="truth")
  with pytest.raises(ValueError, match="semantic_negatives: got 'rows'"):
    train.LossConfig(semantic_negatives="rows")
  with pytest.raises(ValueError, match=r"oracle_accuracy: got 1.5, expected a value in \[0, 1\]"):
    train.LossConfig(oracle_accuracy=1.5)
  with pytest.raises(ValueError, match="knn_query: got 'embedding'"):
    train.LossConfig(knn_query="embedding")
  with pytest.raises(ValueError, match=r"min_vote_agreement: got 2.0, expected a value in"):
    train.LossConfig(min_vote_agreement=2.0)
  with pytest.raises(ValueError, match="precision: got 'high', allowed: highest, default"):
    train.LossConfig(precision="high")
  with pytest.raises(ValueError, match="knn_monitor_every: got 0, expected an int >= 1"):
    train.LossConfig(knn_monitor_every=0)
  with pytest.raises(ValueError, match="queue_dtype: got 'float16', allowed: float32, bfloat16"):
    dataclasses.replace(_config(), queue_dtype="float16")


def test_knn_query_switch_votes_with_the_target_projections(state):
  """'target' labels unlabelled rows by the target projections' kNN vote: the forward's
  pseudo-labels equal knn.pseudo_labels of its own target output (and differ from the
  prediction query's vote on this random network)."""
  results = {}
  for query in ("prediction", "target"):
    config = _config("semppl", knn_query=query)
    s = state._replace(queue=_filled_queue(config))
    batch = jax.tree_util.tree_map(jnp.asarray, _batch(1))
    fwd = jax.jit(functools.partial(train.forward, config))(
        s.online_params, s.target_params, s, batch, jax.random.PRNGKey(7))
    source = fwd.online[:config.views.num_large] if query == "prediction" else fwd.target
    expected = knn.pseudo_labels(source, s.queue, k=config.loss.knn_k,
                                 num_classes=config.num_classes)
    # Only the unlabelled rows are queried; the labelled rows (which use their own label) hold
    # -1.
    unlabelled = ~np.asarray(fwd.is_labelled)
    np.testing.assert_array_equal(np.asarray(fwd.pseudo_labels)[unlabelled],
                                  np.asarray(expected)[unlabelled])
    assert (np.asarray(fwd.pseudo_labels)[~unlabelled] == -1).all()
    results[query] = np.asarray(fwd.pseudo_labels)
  assert np.any(results["prediction"] != results["target"])


def test_oracle_hands_the_loss_the_hidden_labels(state):
  """With the oracle every drawn positive has the image's true class (purity 1), whatever the
  kNN vote says; the kNN's accuracy stays a monitor."""
  config = _config("semppl", pseudo_labels="oracle", semantic_negatives="augmentation")
  state = state._replace(queue=_filled_queue(config))
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(1))
  _, fwd = jax.jit(functools.partial(train.objective_loss, config))(
      state.online_params, state.probe_params, state.target_params, state, batch,
      jax.random.PRNGKey(7))
  assert float(fwd.metrics["semantic_positive_purity"]) == 1.0
  assert float(fwd.metrics["pseudo_label_accuracy"]) < 1.0  # The random network's kNN vote.


# ----------------------------------------------------------------------------------------------
# Cost at scale (issue #20): reduced-precision loss matmuls, the relic step's kNN monitor.
# ----------------------------------------------------------------------------------------------

def _highest_dot_shapes(compiled_text):
  """Sorted result shapes of the dots that run at HIGHEST precision in optimised HLO."""
  return sorted(re.search(r"=\s*(\S+)\s+(?:dot|convolution)\(", line).group(1)
                for line in compiled_text.splitlines()
                if re.search(r"\s(?:dot|convolution)\(", line)
                and "operand_precision={highest" in line)


def test_highest_dots_helper_sees_the_loss_matmuls():
  """The HLO check below can fail: the float32 'highest' loss has HIGHEST dots, the bf16 and
  'default' forms none."""
  rng = np.random.RandomState(0)
  args = (rng.randn(3, 8, 16), rng.randn(2, 8, 16), rng.randn(2, 2, 8, 16),
          np.ones((2, 2, 8), bool))
  text = lambda **kw: jax.jit(lambda *a: losses.semppl_loss(*a, **kw)[0]).lower(
      *args).compile().as_text()
  assert len(_highest_dot_shapes(text())) >= 3
  assert not _highest_dot_shapes(text(matmul_dtype=jnp.bfloat16))
  assert not _highest_dot_shapes(text(precision="default"))


@pytest.mark.slow
def test_bfloat16_step_has_no_highest_dot_and_keeps_a_bfloat16_queue(state):
  """compute_dtype='bfloat16': the compiled step has no HIGHEST dot (loss, kNN and the views'
  blur), while the float32 step's views program has the blur's. A bfloat16 queue stays
  bfloat16 through the step."""
  config = dataclasses.replace(
      _config("semppl"), queue_dtype="bfloat16",
      network=dataclasses.replace(_config().network, compute_dtype="bfloat16"))
  s = train.init_train_state(config, jax.random.PRNGKey(0))
  assert s.queue.embeddings.dtype == jnp.bfloat16
  s = s._replace(queue=_filled_queue(config)._replace(
      embeddings=_filled_queue(config).embeddings.astype(jnp.bfloat16)))
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(1))
  key = jax.random.PRNGKey(0)
  compiled = jax.jit(functools.partial(train.train_step, config)).lower(s, batch, key).compile()
  k_views = jax.random.split(key, 3)[0]
  f32_views = jax.jit(lambda b, k: train.make_views(_config("semppl"), b, k, SHARDS)).lower(
      batch, k_views).compile()
  assert _highest_dot_shapes(f32_views.as_text())  # The check can fail: the blur's dots.
  assert not _highest_dot_shapes(compiled.as_text())
  new, metrics = compiled(s, batch, key)
  assert new.queue.embeddings.dtype == jnp.bfloat16
  assert int(new.nonfinite_step) == -1
  assert 0.0 < float(metrics["semantic_valid_fraction"]) <= 1.0


@pytest.mark.slow
def test_relic_step_leaves_its_knn_monitor_to_knn_monitor(state):
  """relic with knn_monitor_every > 1: the step's per-device FLOPs grow with the queue only by
  elementwise bookkeeping (enqueue, the non-finite guard's check of the queue: a few FLOPs per
  queue element), not by a kNN's 2 x L x (L x B_u) x D per slot; knn_monitor reports exactly
  the monitors the in-step kNN (knn_monitor_every=1) reports."""
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(1))
  key = jax.random.PRNGKey(7)
  flops = {}
  for size in (64, 1024):
    config = dataclasses.replace(_config("relic", knn_monitor_every=4), queue_size=size)
    abstract = jax.eval_shape(lambda c=config: train.init_train_state(c, jax.random.PRNGKey(0)))
    flops[size] = compiled_cost.program_cost(jax.jit(functools.partial(
        train.train_step, config)).lower(abstract, batch, key).compile()).flops
  L, B_u, D = 2, 8, 16
  per_slot = (flops[1024] - flops[64]) / (1024 - 64)
  assert 0 <= per_slot <= 4 * L * (D + 1), per_slot
  assert per_slot < (2 * L * (L * B_u) * D) / 4  # Far below one kNN over the new slots.

  config = _config("relic", knn_monitor_every=4)
  assert not train.knn_in_step(config) and train.knn_in_step(_config("relic"))
  assert train.knn_in_step(_config("semppl", knn_monitor_every=4))
  s = state._replace(queue=_filled_queue(config))
  _, fwd = jax.jit(functools.partial(train.objective_loss, config))(
      s.online_params, s.probe_params, s.target_params, s, batch, key)
  assert not {"pseudo_label_accuracy", "pseudo_label_coverage", "queue_fill"} & set(fwd.metrics)
  monitors = jax.jit(functools.partial(train.knn_monitor, config))(s, batch, key)
  _, in_step = jax.jit(functools.partial(train.objective_loss, _config("relic")))(
      s.online_params, s.probe_params, s.target_params, s, batch, key)
  assert set(monitors) == {"pseudo_label_accuracy", "pseudo_label_coverage", "queue_fill"}
  for name, value in monitors.items():
    assert float(value) == float(in_step.metrics[name]), name
  assert float(monitors["pseudo_label_coverage"]) == 1.0  # A full queue labels every row.
