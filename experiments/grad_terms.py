"""Per-term encoder gradients of the SemPPL objective: how much each loss term pulls, and where.

    python experiments/grad_terms.py                                   # at initialisation
    python experiments/grad_terms.py --checkpoint=runs/study/long/runs/p1_semppl_s0/checkpoints
    python experiments/grad_terms.py --set semppl.semantic_negatives=augmentation \\
        --set semppl.semantic_weight=5.0 --set semppl.pseudo_labels=oracle

For the weighted terms of ``loss = c·L_augm + c·α·L_sem + λ·I_augm + λ_sem·I_sem`` this prints the
norm of each term's gradient with respect to the online *encoder* parameters (the representation
every protocol evaluates; the heads are left out), averaged over ``--batches`` training batches
of the study's small batch (16 labelled + 48 unlabelled Fashion-MNIST images, 1 % labels, queues
of 640), and the cosine between every pair of term gradients (mean over batches). A checkpoint
supplies the network and its filled queues; at initialisation the queues are first filled by
``--fill_steps`` enqueue-only forward passes, so the semantic terms have positives to draw.
Run on CPU in about a minute per batch.
"""
import argparse
import functools
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TERMS = (("augm_contrastive", "c·L_augm"), ("semantic_contrastive", "c·α·L_sem"),
         ("augm_invariance", "λ·I_augm"), ("semantic_invariance", "λ_sem·I_sem"))


def term_weights(loss_config):
  """{metric name: weight} of each term in the total loss."""
  lam_sem = (loss_config.invariance_weight if loss_config.semantic_invariance_weight is None
             else loss_config.semantic_invariance_weight)
  return {"augm_contrastive": loss_config.contrastive_weight,
          "semantic_contrastive": loss_config.contrastive_weight * loss_config.semantic_weight,
          "augm_invariance": loss_config.invariance_weight, "semantic_invariance": lam_sem}


def encoder_part(tree):
  """The encoder modules of an online-parameter tree (projector and predictor dropped)."""
  return {k: v for k, v in tree.items() if not k.startswith(("projector", "predictor"))}


def term_gradients(config, state, batch, key):
  """{term: weighted gradient of that term w.r.t. the online encoder parameters}."""
  import jax  # pylint: disable=g-import-not-at-top
  from semppl_jax import train  # pylint: disable=g-import-not-at-top
  weights = term_weights(config.loss)

  def metric(name, online_params):
    _, fwd = train.objective_loss(config, online_params, state.probe_params,
                                  state.target_params, state, batch, key)
    return weights[name] * fwd.metrics[name]

  return {name: encoder_part(jax.grad(functools.partial(metric, name))(state.online_params))
          for name, _ in TERMS}


def norms_and_cosines(grads):
  """({term: norm}, {(term, term): cosine}) of flattened gradient trees."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  flat = {k: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for k, g in grads.items()}
  norms = {k: float(jnp.linalg.norm(v)) for k, v in flat.items()}
  cos = {}
  for a, b in itertools.combinations([k for k, _ in TERMS if k in flat], 2):
    denom = norms[a] * norms[b]
    cos[(a, b)] = float(flat[a] @ flat[b] / denom) if denom > 0 else float("nan")
  return norms, cos


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default="", help="a pre-training run's checkpoints")
  parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE",
                      help="pre-training config overrides (as experiments/study.py)")
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--fill_steps", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import study  # pylint: disable=g-import-not-at-top
  from semppl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from semppl_jax import queue as queue_lib  # pylint: disable=g-import-not-at-top
  from semppl_jax import train  # pylint: disable=g-import-not-at-top
  from semppl_jax.jaxline import data_source  # pylint: disable=g-import-not-at-top
  from semppl_jax.jaxline import experiment_config  # pylint: disable=g-import-not-at-top

  spec = study.make_specs(study.PRESETS["long"], label_percents=(1,), objectives=("semppl",),
                          seeds=(args.seed,), overrides=study.parse_overrides(args.set))[0]
  c = study.pretrain_config(spec)
  experiment_config.validate_pretrain_config(c, num_devices=1)
  config = experiment_config.train_config(c, 1)
  v = c.views
  data = data_source.DataSource(c.data, c.evaluation, data_source.Views(
      num_large=v.num_large, large_size=v.large_size, large_scale=tuple(v.large_scale),
      num_small=v.num_small, small_size=v.small_size, small_scale=tuple(v.small_scale)))
  batch_at = lambda step: jax.tree.map(jnp.asarray, data.train_batch(step))
  if args.checkpoint:
    step, snapshot = checkpointing.read_experiment_snapshot(args.checkpoint)
    state = train.TrainState.from_dict(jax.tree.map(jnp.asarray, snapshot["train_state"]))
    where = f"checkpoint {args.checkpoint} (step {step})"
  else:
    state = train.init_train_state(config, jax.random.PRNGKey(args.seed))
    fwd = jax.jit(functools.partial(train.objective_loss, config))
    for i in range(args.fill_steps):  # Enqueue only: the network stays at initialisation.
      _, out = fwd(state.online_params, state.probe_params, state.target_params, state,
                   batch_at(i), jax.random.PRNGKey(i))
      rows = train.labelled_rows(config, 1)
      state = state._replace(queue=queue_lib.enqueue(
          state.queue, out.target_projections[:, rows], out.labels[rows], num_shards=1))
    where = f"initialisation (queues filled by {args.fill_steps} enqueue-only passes)"
  grads_fn = jax.jit(functools.partial(term_gradients, config))
  norms, cosines = [], []
  for i in range(args.batches):
    n, cs = norms_and_cosines(grads_fn(state, batch_at(1000 + i), jax.random.PRNGKey(10 + i)))
    norms.append(n)
    cosines.append(cs)
  names = dict(TERMS)
  lc = config.loss
  print(f"Per-term encoder gradients at {where}; objective={config.objective}, "
        f"semantic_negatives={lc.semantic_negatives}, pseudo_labels={lc.pseudo_labels}, "
        f"c={lc.contrastive_weight}, α={lc.semantic_weight}, λ={lc.invariance_weight}, "
        f"λ_sem={term_weights(lc)['semantic_invariance']}; mean over {args.batches} batches.")
  print("\n| term | gradient norm |\n|---|---:|")
  for key, label in TERMS:
    print(f"| {label} | {np.mean([n[key] for n in norms]):.4g} |")
  print("\n| cosine | " + " | ".join(names[k] for k, _ in TERMS[1:]) + " |")
  print("|---|" + "---:|" * (len(TERMS) - 1))
  for i, (a, _) in enumerate(TERMS[:-1]):
    cells = ["" for _ in TERMS[1:i + 1]] + [
        f"{np.nanmean([c[(a, b)] for c in cosines]):+.3f}" for b, _ in TERMS[i + 1:]]
    print(f"| {names[a]} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
