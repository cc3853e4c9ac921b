"""experiments/label.py end to end on generated image folders: the CSV against a brute-force
numpy kNN over the embeddings, the embeddings against a direct forward pass, the PNG, both
checkpoint kinds (release .pkl and a pre-training run directory) and the error messages."""
import os
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import haiku_testlib

from semppl_jax import augmentations
from semppl_jax import checkpointing
from semppl_jax import networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import label  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE = 24
CLASSES = ("blue", "green", "red")


def _random_encoder(seed=3):
  """Random tiny_resnet (small-image stem): He-scaled weights, unit BN scales / variances."""
  def forward(images):
    return networks.make_encoder("tiny_resnet", small_images=True)(images, is_training=True)

  shapes = jax.eval_shape(hk.transform_with_state(forward).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, SIZE, SIZE, 3)))
  return haiku_testlib.random_like(shapes, seed)


def _image(rng, colour):
  """uint8 [SIZE, SIZE, 3]: noise with one dominant channel and a random bright square."""
  x = rng.integers(0, 90, (SIZE, SIZE, 3))
  x[..., colour] += 120
  top, left = rng.integers(0, SIZE - 8, 2)
  x[top:top + 8, left:left + 8] = rng.integers(150, 256)
  return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  truth = {}
  for c, name in enumerate(CLASSES):
    os.makedirs(root / "labelled" / name)
    for i in range(4):
      Image.fromarray(_image(rng, c)).save(root / "labelled" / name / f"{i}.png")
  os.makedirs(root / "unlabelled" / "batch2")
  for i in range(14):
    c = i % 3
    rel = f"u{i:02d}.png" if i < 9 else f"batch2/u{i:02d}.jpg"
    Image.fromarray(_image(rng, c)).save(root / "unlabelled" / rel, quality=95)
    truth[rel] = c
  return root, truth


@pytest.fixture(scope="module")
def encoder():
  return _random_encoder()


@pytest.fixture(scope="module")
def release_file(tmp_path_factory, encoder):
  path = str(tmp_path_factory.mktemp("release") / "tiny.pkl")
  checkpointing.export_release_checkpoint(path, *encoder, step=5)
  return path


class _FakePretrain:
  def __init__(self, params, state):
    head = {"projector/~/linear": {"w": np.zeros((64, 4), np.float32),
                                   "b": np.zeros((4,), np.float32)}}
    self.train_state = {"online_params": {**params, **head}, "online_state": state,
                        "queue": {"labels": np.full((2, 8), -1, np.int32)}}

  def snapshot_state(self):
    return {"train_state": self.train_state}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, encoder):
  """A pre-training run directory (``<dir>/checkpoints``) written by the launcher's
  checkpointer."""
  directory = tmp_path_factory.mktemp("run")
  checkpointer = checkpointing.OrbaxCheckpointer(str(directory / "checkpoints"), max_to_keep=2)
  state = checkpointer.get_experiment_state("latest")
  state.experiment_module = _FakePretrain(*encoder)
  state.global_step = 42
  checkpointer.save("latest")
  checkpointer.close()
  return str(directory)


def _args(checkpoint, root, out, *extra):
  return label.parse_args([f"--checkpoint={checkpoint}", f"--labelled_dir={root / 'labelled'}",
                           f"--unlabelled_dir={root / 'unlabelled'}", f"--output_dir={out}",
                           f"--image_size={SIZE}", "--batch_size=8", *extra])


def _brute_force(queries, bank, bank_labels, k, vote, temperature=0.07, num_classes=3):
  """Per query: (label, share, nearest index, nearest similarity), in plain numpy."""
  out = []
  sims = queries.astype(np.float64) @ bank.astype(np.float64).T
  for s in sims:
    order = np.argsort(-s, kind="stable")[:k]
    top_labels, top_sims = bank_labels[order], s[order]
    if vote == "weighted":
      scores = np.zeros(num_classes)
      np.add.at(scores, top_labels, np.exp(top_sims / temperature))
      pred = int(np.argmax(scores))
      share = scores[pred] / scores.sum()
    else:
      counts = np.bincount(top_labels, minlength=num_classes)
      summed = np.zeros(num_classes)
      np.add.at(summed, top_labels, top_sims)
      best = np.flatnonzero(counts == counts.max())
      pred = int(best[np.argmax(summed[best])])
      share = counts[pred] / len(order)
    out.append((pred, share, int(order[0]), s[order[0]]))
  return out


def _check_against_brute_force(result, rows, k, vote):
  np.testing.assert_allclose(np.linalg.norm(result.unlabelled_embeddings, axis=1), 1.0, atol=1e-5)
  expected = _brute_force(result.unlabelled_embeddings, result.labelled_embeddings,
                          result.labelled.labels, k, vote)
  assert len(rows) == len(expected) == 14
  for row, name, (pred, share, nearest, similarity) in zip(rows, result.unlabelled.names,
                                                           expected):
    assert row["file"] == name
    assert int(row["predicted_index"]) == pred and row["predicted_class"] == CLASSES[pred], row
    assert abs(float(row["vote_share"]) - share) < 2e-4, (row, share)
    assert row["nearest_labelled_file"] == result.labelled.names[nearest], row
    assert row["nearest_labelled_class"] == CLASSES[result.labelled.labels[nearest]]
    assert abs(float(row["nearest_similarity"]) - similarity) < 2e-4


@pytest.mark.slow
def test_release_checkpoint_labels_folder_like_brute_force_knn(folders, release_file, encoder,
                                                              tmp_path, capsys):
  root, truth = folders
  result = label.run(_args(release_file, root, tmp_path / "out", "--k=5"))
  text = capsys.readouterr().out
  assert "tiny_resnet x1 (small_images=True), 24 px" in text
  assert "12 labelled images in 3 classes -> 14 unlabelled images labelled by weighted 5-NN" in text
  rows = label.read_csv(result.csv_path)
  assert list(rows[0]) == list(label.CSV_COLUMNS)  # No true_class: the folder has no labels.
  assert sorted(r["file"] for r in rows) == sorted(truth)
  assert result.labelled.names[:4] == tuple(f"blue/{i}.png" for i in range(4))
  _check_against_brute_force(result, rows, 5, "weighted")

  # The embeddings are the encoder's on the decoded images, in inference mode.
  model = hk.transform_with_state(lambda x: networks.make_encoder(
      "tiny_resnet", small_images=True)(x, is_training=False))
  images = np.stack([np.asarray(Image.open(root / "unlabelled" / n).convert("RGB"))
                     for n in result.unlabelled.names]).astype(np.float32) / 255
  direct, _ = jax.jit(model.apply)(*encoder, None, augmentations.normalize(images))
  direct = np.asarray(direct) / np.linalg.norm(direct, axis=1, keepdims=True)
  png = np.array([n.endswith(".png") for n in result.unlabelled.names])
  np.testing.assert_allclose(result.unlabelled_embeddings[png], direct[png], atol=1e-4)
  # TensorFlow's and Pillow's JPEG decoders round differently.
  np.testing.assert_allclose(result.unlabelled_embeddings[~png], direct[~png], atol=2e-2)

  with Image.open(result.png_path) as png:
    assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 200


def test_run_directory_and_majority_vote(folders, run_dir, tmp_path, capsys):
  root, _ = folders
  result = label.run(_args(run_dir, root, tmp_path / "out", "--k=4", "--vote=majority"))
  assert "pre-training checkpoint" in capsys.readouterr().out
  assert result.encoder.architecture == "tiny_resnet" and result.encoder.small_images
  _check_against_brute_force(result, label.read_csv(result.csv_path), 4, "majority")


@pytest.mark.parametrize("setup, extra, message", [
    ("empty_unlabelled", (), "--unlabelled_dir: directory .* holds no image files"),
    ("loose_labelled", (), "--labelled_dir: .* holds 1 image\\(s\\) outside class sub-folders"),
    ("one_class", (), "has 1 class folder\\(s\\) \\['only'\\]; labelling needs at least two"),
    ("ok", ("--dataset=fashion_mnist",), "pass either --labelled_dir and --unlabelled_dir, or "
     "--dataset"),
    ("ok", ("--encoder=resnet18",), "does not match resnet18 x1"),
    ("missing_checkpoint", (), "--checkpoint: .* does not exist"),
    ("ok", ("--k=0",), "--k: must be >= 1, got 0"),
])
def test_errors_name_the_flag_and_the_problem(folders, release_file, tmp_path, capsys, setup,
                                              extra, message):
  root, _ = folders
  data = root
  checkpoint = release_file
  if setup != "ok":
    data = tmp_path / "data"
    os.makedirs(data / "labelled" / "a")
    os.makedirs(data / "unlabelled")
    Image.fromarray(_image(np.random.default_rng(1), 0)).save(data / "labelled" / "a" / "x.png")
    if setup == "one_class":
      os.rename(data / "labelled" / "a", data / "labelled" / "only")
    else:
      os.makedirs(data / "labelled" / "b")
      Image.fromarray(_image(np.random.default_rng(2), 1)).save(data / "labelled" / "b" / "y.png")
    if setup != "empty_unlabelled":
      Image.fromarray(_image(np.random.default_rng(3), 2)).save(data / "unlabelled" / "z.png")
    if setup == "loose_labelled":
      Image.fromarray(_image(np.random.default_rng(4), 2)).save(data / "labelled" / "loose.png")
    if setup == "missing_checkpoint":
      checkpoint = str(tmp_path / "nowhere.pkl")
  argv = [f"--checkpoint={checkpoint}", f"--labelled_dir={data / 'labelled'}",
          f"--unlabelled_dir={data / 'unlabelled'}", f"--output_dir={tmp_path / 'out'}",
          f"--image_size={SIZE}", "--batch_size=8", *extra]
  assert label.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("label.py: error: ")
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(message, err), err
  assert not os.path.exists(tmp_path / "out" / "labels.csv")


@pytest.mark.skipif(not all(os.path.exists(p) for split in ("train", "test") for p in
                            label.data_lib.fashion_mnist.idx_file_paths(split)),
                    reason="dataset-fashion-mnist not installed")
@pytest.mark.slow
def test_fashion_mnist_test_split_is_labelled_from_the_label_split(release_file, tmp_path,
                                                                  capsys):
  result = label.run(label.parse_args([
      f"--checkpoint={release_file}", "--dataset=fashion_mnist", "--label_percent=1", "--k=5",
      "--batch_size=1000", f"--output_dir={tmp_path}", "--examples_per_class=3"]))
  text = capsys.readouterr().out
  assert "tiny_resnet x1 (small_images=True), 28 px" in text  # 28 px by default here.
  assert "600 labelled images in 10 classes -> 10000 unlabelled images" in text
  rows = label.read_csv(result.csv_path)
  assert len(rows) == 10000 and rows[0]["file"] == "fashion_mnist/test/00000"
  assert list(rows[0]) == list(label.CSV_COLUMNS) + ["true_class"]
  assert all(r["nearest_labelled_file"].startswith("fashion_mnist/train/") for r in rows[:50])
  accuracy = np.mean([r["predicted_class"] == r["true_class"] for r in rows])
  assert f"accuracy against the known labels: {100 * accuracy:.2f}%" in text
  _check_against_brute_force_subset(result, rows[:200], 5)


def _check_against_brute_force_subset(result, rows, k):
  expected = _brute_force(result.unlabelled_embeddings[:len(rows)], result.labelled_embeddings,
                          result.labelled.labels, k, "weighted", num_classes=10)
  for row, (pred, share, nearest, _) in zip(rows, expected):
    assert int(row["predicted_index"]) == pred
    assert abs(float(row["vote_share"]) - share) < 2e-4
    assert row["nearest_labelled_file"] == result.labelled.names[nearest]
