"""The jaxline data source hands the views config to the host pipelines unchanged."""
from ml_collections import config_dict
import pytest

from semppl_jax.jaxline import data_source


@pytest.mark.parametrize("antialias", [False, True])
def test_host_crops_get_the_views_antialias_setting(monkeypatch, antialias):
  calls = []
  monkeypatch.setattr(data_source.data_lib, "imagenet_semi_supervised",
                      lambda percent, **kwargs: calls.append(kwargs))
  source = object.__new__(data_source.DataSource)  # No tfds data needed to build the call.
  source._config = config_dict.ConfigDict(dict(  # pylint: disable=protected-access
      dataset="imagenet", label_percent=1, data_dir="", labelled_batch_size=8,
      unlabelled_batch_size=8, seed=3))
  source._views = data_source.Views(  # pylint: disable=protected-access
      num_large=2, large_size=32, large_scale=(0.2, 1.0), num_small=1, small_size=16,
      antialias=antialias)
  source._process = dict(process_index=0, process_count=1)  # pylint: disable=protected-access
  source._train_dataset(5)  # pylint: disable=protected-access
  (kwargs,) = calls
  assert kwargs["antialias"] is antialias
  assert (kwargs["num_large"], kwargs["large_size"], kwargs["start_step"]) == (2, 32, 5)
