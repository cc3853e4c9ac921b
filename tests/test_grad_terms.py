"""experiments/grad_terms.py: the per-term weights and the gradient statistics it prints."""
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import grad_terms
from semppl_jax import train


def test_term_weights_follow_the_loss_composition():
  lc = train.LossConfig(contrastive_weight=0.3, semantic_weight=5.0, invariance_weight=2.0,
                        semantic_invariance_weight=None)
  assert grad_terms.term_weights(lc) == pytest.approx(
      {"augm_contrastive": 0.3, "semantic_contrastive": 1.5, "augm_invariance": 2.0,
       "semantic_invariance": 2.0})
  lc = train.LossConfig(semantic_invariance_weight=0.0)
  assert grad_terms.term_weights(lc)["semantic_invariance"] == 0.0


def test_norms_and_cosines_of_gradient_trees():
  grads = {"augm_contrastive": {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0])},
           "semantic_contrastive": {"a": jnp.array([0.0, 2.0]), "b": jnp.array([0.0])},
           "augm_invariance": {"a": jnp.array([-1.0, 0.0]), "b": jnp.array([0.0])},
           "semantic_invariance": {"a": jnp.array([0.0, 0.0]), "b": jnp.array([0.0])}}
  norms, cos = grad_terms.norms_and_cosines(grads)
  assert norms == pytest.approx({"augm_contrastive": 3.0, "semantic_contrastive": 2.0,
                                 "augm_invariance": 1.0, "semantic_invariance": 0.0})
  assert cos[("augm_contrastive", "semantic_contrastive")] == pytest.approx(0.0)
  assert cos[("augm_contrastive", "augm_invariance")] == pytest.approx(-1.0)
  assert np.isnan(cos[("augm_contrastive", "semantic_invariance")])  # A zero gradient.


def test_encoder_part_drops_the_heads():
  tree = {"res_net18/~/conv": 1, "projector/~/linear": 2, "predictor/~/linear": 3}
  assert grad_terms.encoder_part(tree) == {"res_net18/~/conv": 1}
