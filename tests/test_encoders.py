"""semppl_jax.encoders: reading an encoder from a release file, inferring its architecture, and
embedding with make_embedder (against a direct forward pass, sharded over 8 fake devices).
Run directories are read end to end by tests/test_label.py and tests/jaxline/test_eval_experiment.py."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import haiku_testlib

from semppl_jax import augmentations
from semppl_jax import checkpointing
from semppl_jax import encoders
from semppl_jax import networks
from semppl_jax import parallel

SIZE = 16


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
  def forward(images):
    return networks.make_encoder("tiny_resnet", small_images=True)(images, is_training=True)
  shapes = jax.eval_shape(hk.transform_with_state(forward).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, SIZE, SIZE, 3)))
  params, state = haiku_testlib.random_like(shapes, 5)
  path = str(tmp_path_factory.mktemp("release") / "tiny.pkl")
  checkpointing.export_release_checkpoint(path, params, state, step=7)
  return path


def test_load_encoder_infers_the_architecture_of_a_release_file(release_file):
  encoder = encoders.load_encoder(release_file)
  assert (encoder.architecture, encoder.width_multiplier, encoder.small_images) == (
      "tiny_resnet", 1, True)
  assert encoder.step == 7 and encoder.source == f"release checkpoint {release_file}"
  # Fixing the stem the other way cannot match: the error names the closest candidate.
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"the encoder of release checkpoint .* does not match tiny_resnet x1 "
                           r"\(small_images=False\)"):
    encoders.load_encoder(release_file, small_images=False)


def test_read_encoder_refuses_missing_paths_and_unknown_kinds(tmp_path, release_file):
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    encoders.read_encoder(str(tmp_path / "nothing.pkl"))
  with pytest.raises(ValueError, match="kind must be one of"):
    encoders.read_encoder(release_file, kind="pickle")
  with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint"):
    encoders.read_encoder(str(tmp_path))  # An empty folder is taken as a run directory.


def test_embedder_is_the_normalised_encoder_output_sharded_or_not(release_file):
  encoder = encoders.load_encoder(release_file)
  images = np.random.default_rng(0).integers(0, 256, (16, 20, 20, 1)).astype(np.uint8)
  model = hk.transform_with_state(lambda x: networks.make_encoder(
      "tiny_resnet", small_images=True)(x, is_training=False))
  # The reference: resize to SIZE, 3 channels, ImageNet normalisation, inference mode.
  x = jax.image.resize(jnp.broadcast_to(images / 255.0, (16, 20, 20, 3)).astype(jnp.float32),
                       (16, SIZE, SIZE, 3), "bilinear", antialias=True)
  direct, _ = model.apply(encoder.params, encoder.state, None, augmentations.normalize(x))
  direct = np.asarray(direct) / np.linalg.norm(direct, axis=1, keepdims=True)
  for devices in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    fn = encoders.embedder(encoder, mesh, image_size=SIZE)
    with jax.set_mesh(mesh):
      got = fn(parallel.host_local_to_global(images, mesh))
    np.testing.assert_allclose(np.asarray(got), direct, atol=1e-5)
  batches = [{"images": images[:8], "labels": np.zeros(8, np.int32), "mask": np.ones(8, bool)},
             {"images": images[8:], "labels": np.zeros(8, np.int32),
              "mask": np.arange(8) < 5}]
  np.testing.assert_allclose(encoders.embed_to_host(fn, batches, mesh), direct[:13], atol=1e-5)
