"""Static dataset metadata, for config validation without touching the data."""

from __future__ import annotations

from typing import NamedTuple


class DatasetInfo(NamedTuple):
  """What a config needs to know about a dataset.

  Attributes:
    num_classes: number of classes C.
    image_shape: `(H, W, C)` of the evaluation images (for ImageNet the default 224 px centre
      crop, also the default large-view side; Fashion-MNIST is grayscale).
    num_train: examples in the train split (= the unlabelled pool).
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int


_INFOS = {
    "fashion_mnist": DatasetInfo(10, (28, 28, 1), 60_000),
    "imagenet": DatasetInfo(1000, (224, 224, 3), 1_281_167),
}
_ALIASES = {"imagenet2012": "imagenet"}


def dataset_info(name: str) -> DatasetInfo:
  """`(num_classes, image_shape, num_train)` of a known dataset.

  Args:
    name: 'fashion_mnist' or 'imagenet' (alias 'imagenet2012').

  Returns:
    a `DatasetInfo` NamedTuple (unpacks as the 3-tuple).

  Raises:
    ValueError: unknown name, listing the known ones.
  """
  key = _ALIASES.get(name, name)
  if key not in _INFOS:
    raise ValueError(f"name must be one of {sorted(_INFOS) + sorted(_ALIASES)}, got {name!r}")
  return _INFOS[key]
