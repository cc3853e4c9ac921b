"""Tests for semppl_jax.networks.

Big networks are mostly only traced (``jax.eval_shape`` on ``init``): no memory or compute is
spent on their weights. Tiny networks (and one ResNet-18 on 28x28 inputs) actually run, and their
outputs are checked against numpy references written here.

The bottleneck ResNets are checked against an independent implementation, Haiku's own
``hk.nets.ResNet{50,101,152,200}`` (v1 and v2): same parameter trees, and ResNet-50 gives the same
logits and BatchNorm statistics for the same (random) parameters on a 2 x 32 x 32 input, so e.g.
a stride on the wrong conv of the bottleneck fails. The selective-kernel ResNets have no such
reference in Haiku (nor in any dependency); their SK block is checked against the numpy
reference below (``test_sk_block_matches_numpy``) and their sizes against SimCLRv2's.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import networks

# ----------------------------------------------------------------------------------------------
# Helpers.


def _encoder_fn(name, **kwargs):
  def forward(images, is_training):
    return networks.make_encoder(name, **kwargs)(images, is_training)
  return hk.transform_with_state(forward)


def _abstract_init(name, hw=224, batch=2, **kwargs):
  """(params, state, output) as ShapeDtypeStructs; nothing is allocated."""
  tr = _encoder_fn(name, **kwargs)
  images = jax.ShapeDtypeStruct((batch, hw, hw, 3), jnp.float32)

  def init_and_apply(x):
    params, state = tr.init(jax.random.PRNGKey(0), x, True)
    out, _ = tr.apply(params, state, None, x, True)
    return params, state, out

  return jax.eval_shape(init_and_apply, images)


def _shapes(tree):
  return {m: {k: tuple(v.shape) for k, v in d.items()} for m, d in tree.items()}


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _bn(c):
  return {"scale": (1, 1, 1, c), "offset": (1, 1, 1, c)}


def _expected_bottleneck_params(prefix, blocks_per_group, wm):
  """Release (Haiku 0.0.9 ResNet v1) parameter tree, written out independently."""
  expected = {f"{prefix}/~/initial_conv": {"w": (7, 7, 3, 64 * wm)},
              f"{prefix}/~/initial_batchnorm": _bn(64 * wm)}
  in_ch = 64 * wm
  for g, (n, out_ch) in enumerate(zip(blocks_per_group, (256, 512, 1024, 2048))):
    out_ch *= wm
    inner = out_ch // 4
    for b in range(n):
      p = f"{prefix}/~/block_group_{g}/~/block_{b}/~/"
      expected[p + "conv_0"] = {"w": (1, 1, in_ch, inner)}
      expected[p + "conv_1"] = {"w": (3, 3, inner, inner)}
      expected[p + "conv_2"] = {"w": (1, 1, inner, out_ch)}
      for i, c in enumerate((inner, inner, out_ch)):
        expected[p + f"batchnorm_{i}"] = _bn(c)
      if b == 0:
        expected[p + "shortcut_conv"] = {"w": (1, 1, in_ch, out_ch)}
        expected[p + "shortcut_batchnorm"] = _bn(out_ch)
      in_ch = out_ch
  return expected


# numpy references (float64) of Haiku's SAME convolution / pooling and BatchNorm.


def _same_pads(n, k, s):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return out, total // 2, total - total // 2


def _np_conv(x, w, stride):
  k = w.shape[0]
  oh, lo_h, hi_h = _same_pads(x.shape[1], k, stride)
  ow, lo_w, hi_w = _same_pads(x.shape[2], k, stride)
  xp = np.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  out = np.zeros(x.shape[:1] + (oh, ow, w.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] @ w[i, j]
  return out


def _np_max_pool(x):
  oh, lo_h, hi_h = _same_pads(x.shape[1], 3, 2)
  ow, lo_w, hi_w = _same_pads(x.shape[2], 3, 2)
  xp = np.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)), constant_values=-np.inf)
  return np.max([xp[:, i:i + 2 * oh:2, j:j + 2 * ow:2, :]
                 for i in range(3) for j in range(3)], axis=0)


def _np_avg_pool_2x2(x):
  # SAME padding, averaging only the valid entries (Haiku's avg_pool).
  oh, ow = -(-x.shape[1] // 2), -(-x.shape[2] // 2)
  out = np.zeros(x.shape[:1] + (oh, ow, x.shape[3]))
  for a in range(oh):
    for b in range(ow):
      out[:, a, b] = x[:, 2 * a:2 * a + 2, 2 * b:2 * b + 2].mean(axis=(1, 2))
  return out


def _np_bn(x, params, state, train, eps=1e-5):
  axes = tuple(range(x.ndim - 1))
  if train:
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
  else:
    mean = np.asarray(state["mean_ema"]["average"], np.float64)
    var = np.asarray(state["var_ema"]["average"], np.float64)
  return (x - mean) / np.sqrt(var + eps) * params["scale"] + params["offset"]


def _relu(x):
  return np.maximum(x, 0.0)


def _np64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _split_state(state):
  """'<bn>/~/mean_ema' / '<bn>/~/var_ema' entries -> {bn: {'mean_ema': .., 'var_ema': ..}}."""
  out = {}
  for key, value in state.items():
    bn, ema = key.rsplit("/~/", 1)
    out.setdefault(bn, {})[ema] = value
  return out


def _random_init(tr, x, seed):
  """(params, state) for ``tr`` with the shapes of ``tr.init``, drawn in numpy.

  Haiku's initialisers compile once per parameter shape, which dominates CPU test time; the
  references below take any values, and non-trivial BatchNorm scales/offsets and EMA
  statistics make them test more.
  """
  params_s, state_s = jax.eval_shape(lambda x: tr.init(jax.random.PRNGKey(0), x, True), x)
  rng = np.random.default_rng(seed)

  def param(name, spec):
    if name == "scale":
      return (1.0 + 0.2 * rng.standard_normal(spec.shape)).astype(np.float32)
    if name in ("offset", "b"):
      return (0.2 * rng.standard_normal(spec.shape)).astype(np.float32)
    fan_in = int(np.prod(spec.shape[:-1]))
    return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(np.float32)

  params = {m: {k: param(k, v) for k, v in d.items()} for m, d in params_s.items()}
  state = {}
  for m, d in state_s.items():
    shape = d["average"].shape
    if m.endswith("mean_ema"):
      average = rng.standard_normal(shape).astype(np.float32)
    else:
      average = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    state[m] = {"counter": np.zeros((), np.int32), "hidden": np.zeros(shape, np.float32),
                "average": average}
  return params, state


def _np_tiny_resnet(params, state, x, small_images, train, prefix="tiny_res_net"):
  p = _np64(params)
  bn_state = _split_state(_np64(state))

  def bn(name, h):
    full = f"{prefix}/~/{name}"
    return _np_bn(h, p[full], bn_state.get(full), train)

  def w(name):
    return p[f"{prefix}/~/{name}"]["w"]

  h = _np_conv(np.asarray(x, np.float64), w("initial_conv"), 1 if small_images else 2)
  h = _relu(bn("initial_batchnorm", h))
  if not small_images:
    h = _np_max_pool(h)
  g = "block_group_0/~/block_0/~/"
  o = _relu(bn(g + "batchnorm_0", _np_conv(h, w(g + "conv_0"), 1)))
  o = bn(g + "batchnorm_1", _np_conv(o, w(g + "conv_1"), 1))
  h = _relu(o + h)
  g = "block_group_1/~/block_0/~/"
  sc = bn(g + "shortcut_batchnorm", _np_conv(h, w(g + "shortcut_conv"), 2))
  o = _relu(bn(g + "batchnorm_0", _np_conv(h, w(g + "conv_0"), 2)))
  o = bn(g + "batchnorm_1", _np_conv(o, w(g + "conv_1"), 1))
  h = _relu(o + sc)
  return h.mean(axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Parameter trees of the big networks (traced only).


@pytest.mark.parametrize("wm,total", [(1, 23_508_032), (2, 93_907_072), (4, 375_378_176)])
def test_resnet50_release_parameter_tree(wm, total):
  params, state, out = _abstract_init("resnet50", width_multiplier=wm)
  assert _shapes(params) == _expected_bottleneck_params("res_net50", (3, 4, 6, 3), wm)
  assert len(jax.tree_util.tree_leaves(params)) == 159
  assert _num_params(params) == total
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert out.shape == (2, 2048 * wm) and out.dtype == jnp.float32
  # A few names spelled out, as the release checkpoint has them.
  assert params["res_net50/~/initial_conv"]["w"].shape == (7, 7, 3, 64 * wm)
  assert set(params["res_net50/~/initial_batchnorm"]) == {"scale", "offset"}
  assert "res_net50/~/block_group_3/~/block_0/~/shortcut_batchnorm" in params
  assert "res_net50/~/block_group_3/~/block_1/~/shortcut_conv" not in params
  # BatchNorm state: mean_ema / var_ema with counter, hidden, average for every BatchNorm.
  bn_modules = {m for m in params if "batchnorm" in m}
  assert set(state) == ({f"{m}/~/mean_ema" for m in bn_modules}
                        | {f"{m}/~/var_ema" for m in bn_modules})
  for m in bn_modules:
    c = params[m]["scale"].shape
    for ema in ("mean_ema", "var_ema"):
      leaves = state[f"{m}/~/{ema}"]
      assert set(leaves) == {"counter", "hidden", "average"}
      assert leaves["counter"].shape == () and leaves["counter"].dtype == jnp.int32
      assert leaves["hidden"].shape == c and leaves["average"].shape == c
      assert leaves["average"].dtype == jnp.float32


def test_resnet200_2x_parameter_tree():
  params, state, out = _abstract_init("resnet200", width_multiplier=2, hw=64)
  assert _shapes(params) == _expected_bottleneck_params("res_net200", (3, 24, 36, 3), 2)
  assert len(jax.tree_util.tree_leaves(params)) == 609
  assert _num_params(params) == 250_128_512
  assert len(state) == 2 * sum("batchnorm" in m for m in params)
  assert out.shape == (2, 4096)


@pytest.mark.parametrize("name,total", [
    ("resnet18", 11_176_512), ("resnet34", 21_284_672), ("resnet101", 42_500_160),
    ("resnet152", 58_143_808)])
def test_other_depths_counts(name, total):
  params, _, out = _abstract_init(name, hw=64)
  assert _num_params(params) == total
  assert out.shape == (2, networks.embedding_size(name, 1))


def test_small_images_changes_only_the_stem():
  big, _, _ = _abstract_init("resnet50", hw=64)
  small, _, out = _abstract_init("resnet50", hw=32, small_images=True)
  assert set(big) == set(small)
  diff = {m for m in big if _shapes({m: big[m]}) != _shapes({m: small[m]})}
  assert diff == {"res_net50/~/initial_conv"}
  assert small["res_net50/~/initial_conv"]["w"].shape == (3, 3, 3, 64)
  assert out.shape == (2, 2048)


@pytest.mark.parametrize("wm,total,reported", [(1, 35_215_584, 35.2e6),
                                                (2, 140_306_048, 140.3e6)])
def test_sk_resnet50_sizes(wm, total, reported):
  params, state, out = _abstract_init("sk_resnet50", width_multiplier=wm, hw=64)
  assert _num_params(params) == total
  assert abs(total - reported) / reported < 0.01  # SimCLRv2's reported encoder sizes.
  assert out.shape == (2, 2048 * wm)
  c = 64 * wm
  assert params["sk_res_net50/~/initial_conv_0"]["w"].shape == (3, 3, 3, c // 2)
  assert params["sk_res_net50/~/initial_conv_1"]["w"].shape == (3, 3, c // 2, c // 2)
  assert params["sk_res_net50/~/initial_conv_2"]["w"].shape == (3, 3, c // 2, c)
  blk = "sk_res_net50/~/block_group_3/~/block_0/~/"
  inner = 512 * wm
  assert params[blk + "conv_1"]["w"].shape == (3, 3, inner, 2 * inner)
  mid = max(int(inner * 0.0625), 32)
  assert params[blk + "sk_attention_conv_0"]["w"].shape == (1, 1, inner, mid)
  assert params[blk + "sk_attention_conv_1"]["w"].shape == (1, 1, mid, 2 * inner)
  assert params[blk + "shortcut_conv"]["w"].shape == (1, 1, 1024 * wm, 2048 * wm)
  assert len(state) == 2 * sum("batchnorm" in m for m in params)


def test_num_classes_adds_logits_layer():
  tr = hk.transform_with_state(lambda x, t: networks.ResNet50(num_classes=10)(x, t))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def init_and_apply(x):
    params, state = tr.init(jax.random.PRNGKey(0), x, True)
    return params, tr.apply(params, state, None, x, False)[0]

  params, out = jax.eval_shape(init_and_apply, x)
  assert _shapes({"l": params["res_net50/~/logits"]}) == {"l": {"w": (2048, 10), "b": (10,)}}
  assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_bfloat16_big_net_keeps_float32_params():
  params, state, out = _abstract_init("sk_resnet50", hw=32, compute_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jnp.dtype(jnp.float32) in {x.dtype for x in jax.tree_util.tree_leaves(state)}
  assert out.dtype == jnp.float32


def test_resnet_v2_structure():
  params, _, out = _abstract_init("resnet50", hw=32)  # v1 reference
  tr = hk.transform_with_state(lambda x, t: networks.ResNet50(resnet_v2=True)(x, t))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  v2, _ = jax.eval_shape(lambda x: tr.init(jax.random.PRNGKey(0), x, True), x)
  assert "res_net50/~/final_batchnorm" in v2
  assert "res_net50/~/initial_batchnorm" not in v2
  assert not any("shortcut_batchnorm" in m for m in v2)
  assert set(v2) - set(params) == {"res_net50/~/final_batchnorm"}


def test_embedding_size_matches_every_encoder():
  # Building modules (without calling them) is enough to read their width; the traced tests
  # above check that the outputs have this width.
  sizes = {}

  def build():
    for name in networks.ENCODER_NAMES:
      sizes[name] = networks.make_encoder(name, width_multiplier=2).embedding_size

  hk.transform(build).init(None)
  assert sizes == {name: networks.embedding_size(name, 2) for name in networks.ENCODER_NAMES}
  assert sizes["tiny_resnet"] == 64 and sizes["resnet18"] == 1024
  assert sizes["resnet50"] == sizes["sk_resnet152"] == 4096


# ----------------------------------------------------------------------------------------------
# Tiny networks, actually run and checked against numpy.


@pytest.fixture(scope="module")
def tiny():
  """Tiny ResNet (small-images stem) with perturbed BN params / EMA stats, plus a batch."""
  tr = _encoder_fn("tiny_resnet", small_images=True)
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 3))
  params, state = _random_init(tr, x, seed=0)
  apply = jax.jit(tr.apply, static_argnums=4)
  return tr, apply, params, state, x


def test_tiny_resnet_structure(tiny):
  _, _, params, _, _ = tiny
  assert 1_000 < _num_params(params) < 100_000
  assert _num_params(params) == 21_584 - 7 * 7 * 3 * 16 + 3 * 3 * 3 * 16
  assert params["tiny_res_net/~/initial_conv"]["w"].shape == (3, 3, 3, 16)


def test_tiny_resnet_train_mode_matches_numpy(tiny):
  _, apply, params, state, x = tiny
  out, new_state = apply(params, state, None, x, True)
  assert out.shape == (8, 32) and out.dtype == jnp.float32
  ref = _np_tiny_resnet(params, state, x, small_images=True, train=True)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
  # Training mode moves every EMA one step.
  for m in state:
    assert int(new_state[m]["counter"]) == int(state[m]["counter"]) + 1


def test_tiny_resnet_eval_mode_uses_ema_stats(tiny):
  _, apply, params, state, x = tiny
  out, new_state = apply(params, state, None, x, False)
  ref = _np_tiny_resnet(params, state, x, small_images=True, train=False)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, state)
  # Per-example in eval mode: one image alone gives its row of the batch result.
  single, _ = apply(params, state, None, x[:1], False)
  np.testing.assert_allclose(np.asarray(single), np.asarray(out[:1]), rtol=1e-5, atol=1e-6)


def test_tiny_resnet_imagenet_stem_matches_numpy():
  tr = hk.transform_with_state(lambda x, t: networks.TinyResNet()(x, t))
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 30, 30, 3))
  params, state = _random_init(tr, x, seed=1)
  out, _ = tr.apply(params, state, None, x, False)
  assert params["tiny_res_net/~/initial_conv"]["w"].shape == (7, 7, 3, 16)
  ref = _np_tiny_resnet(params, state, x, small_images=False, train=False)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_tiny_resnet_sharded_batch_matches_unsharded(tiny):
  _, apply, params, state, x = tiny
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  with jax.set_mesh(mesh):
    out_s, state_s = apply(params, state, None, xs, True)
  out, new_state = apply(params, state, None, x, True)
  # BatchNorm statistics are global by construction (only summation order may differ).
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                              atol=1e-6), state_s, new_state)


def test_tiny_resnet_bfloat16(tiny):
  _, _, params, state, x = tiny
  tr16 = _encoder_fn("tiny_resnet", small_images=True, compute_dtype=jnp.bfloat16)
  p16, s16 = jax.eval_shape(lambda x: tr16.init(jax.random.PRNGKey(0), x, True), x)
  assert _shapes(p16) == _shapes(params)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(p16))
  assert all(v.dtype == s.dtype for v, s in zip(jax.tree_util.tree_leaves(s16),
                                                 jax.tree_util.tree_leaves(state)))
  out16, new16 = tr16.apply(params, state, None, x, True)
  out32 = _np_tiny_resnet(params, state, x, small_images=True, train=True)
  assert out16.dtype == jnp.float32
  assert all(v.dtype == s.dtype for v, s in zip(jax.tree_util.tree_leaves(new16),
                                                 jax.tree_util.tree_leaves(state)))
  err = np.abs(np.asarray(out16) - out32).max()
  assert 0 < err < 0.05 * np.abs(out32).max()


def test_tiny_resnet_v2_and_logits_run():
  def forward(x, is_training):
    model = networks.TinyResNet(num_classes=5, resnet_v2=True, small_images=True)
    return model(x, is_training)

  tr = hk.transform_with_state(forward)
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 3))
  params, state = _random_init(tr, x, seed=6)
  assert "tiny_res_net/~/final_batchnorm" in params
  assert "tiny_res_net/~/initial_batchnorm" not in params
  logits, _ = tr.apply(params, state, None, x, True)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  # The logits layer is a linear map of the pooled embedding of the same torso.
  torso = hk.transform_with_state(
      lambda x, t: networks.TinyResNet(resnet_v2=True, small_images=True)(x, t))
  torso_params = {m: v for m, v in params.items() if m != "tiny_res_net/~/logits"}
  emb, _ = torso.apply(torso_params, state, None, x, True)
  lin = params["tiny_res_net/~/logits"]
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(emb, np.float64) @ lin["w"] + lin["b"],
                             rtol=1e-4, atol=1e-5)


def test_resnet18_small_images_runs_on_28px():
  tr = _encoder_fn("resnet18", small_images=True)
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, 28, 28, 3))
  params, state = _random_init(tr, x, seed=5)
  assert params["res_net18/~/initial_conv"]["w"].shape == (3, 3, 3, 64)
  assert "res_net18/~/block_group_0/~/block_0/~/shortcut_conv" not in params
  assert params["res_net18/~/block_group_1/~/block_0/~/shortcut_conv"]["w"].shape == (
      1, 1, 64, 128)
  out, new_state = tr.apply(params, state, None, x, False)
  assert out.shape == (2, 512) and np.all(np.isfinite(np.asarray(out)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, state)


def test_sk_block_matches_numpy():
  def forward(x, is_training):
    block = networks._SKBottleneckBlock(channels=32, stride=2, use_projection=True,
                                        sk_ratio=0.0625, bn_config=networks.DEFAULT_BN_CONFIG,
                                        name="block_0")
    return block(x, is_training)

  tr = hk.transform_with_state(forward)
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 7, 7, 16))
  params, state = _random_init(tr, x, seed=2)
  out, _ = tr.apply(params, state, None, x, True)
  assert out.shape == (3, 4, 4, 32)

  p = _np64(params)

  def w(name):
    return p[f"block_0/~/{name}"]["w"]

  def bn(name, h):
    return _np_bn(h, p[f"block_0/~/{name}"], None, True)

  xn = np.asarray(x, np.float64)
  shortcut = bn("shortcut_batchnorm", _np_conv(_np_avg_pool_2x2(xn), w("shortcut_conv"), 1))
  h = _relu(bn("batchnorm_0", _np_conv(xn, w("conv_0"), 1)))
  both = _relu(bn("batchnorm_1", _np_conv(h, w("conv_1"), 2)))  # [B, 4, 4, 16]
  a, b = both[..., :8], both[..., 8:]
  pooled = (a + b).mean(axis=(1, 2), keepdims=True)
  assert w("sk_attention_conv_0").shape == (1, 1, 8, 32)
  z = _relu(bn("sk_attention_batchnorm", _np_conv(pooled, w("sk_attention_conv_0"), 1)))
  logits = _np_conv(z, w("sk_attention_conv_1"), 1)
  la, lb = logits[..., :8], logits[..., 8:]
  wa = np.exp(la) / (np.exp(la) + np.exp(lb))
  mixed = wa * a + (1 - wa) * b
  ref = _relu(bn("batchnorm_2", _np_conv(mixed, w("conv_2"), 1)) + shortcut)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Heads.


def test_mlp_structure_and_forward():
  tr = hk.transform_with_state(lambda x, t: networks.MLP(16, 4)(x, t))
  x = jax.random.normal(jax.random.PRNGKey(6), (5, 8))
  params, state = _random_init(tr, x, seed=3)
  assert _shapes(params) == {
      "mlp/linear": {"w": (8, 16), "b": (16,)},
      "mlp/batch_norm": {"scale": (1, 16), "offset": (1, 16)},
      "mlp/linear_1": {"w": (16, 4)},
  }
  assert set(state) == {"mlp/batch_norm/~/mean_ema", "mlp/batch_norm/~/var_ema"}
  p = _np64(params)
  bn_state = _split_state(_np64(state))["mlp/batch_norm"]
  h = np.asarray(x, np.float64) @ p["mlp/linear"]["w"] + p["mlp/linear"]["b"]
  for train in (True, False):
    out, new_state = tr.apply(params, state, None, x, train)
    ref = _relu(_np_bn(h, p["mlp/batch_norm"], bn_state, train)) @ p["mlp/linear_1"]["w"]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
    if not train:
      jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, state)


def test_mlp_named_and_custom_bn_config():
  tr = hk.transform_with_state(
      lambda x, t: networks.MLP(4, 2, bn_config={"decay_rate": 0.5}, name="projector")(x, t))
  x = jnp.arange(6.0).reshape(3, 2)
  params, state = _random_init(tr, x, seed=4)
  assert set(params) == {"projector/linear", "projector/batch_norm", "projector/linear_1"}
  _, new_state = tr.apply(params, state, None, x, True)
  # One EMA step with decay 0.5: hidden = 0.5 * 0 + 0.5 * batch_mean.
  h = np.asarray(x) @ np.asarray(params["projector/linear"]["w"]) + np.asarray(
      params["projector/linear"]["b"])
  np.testing.assert_allclose(new_state["projector/batch_norm/~/mean_ema"]["hidden"],
                             0.5 * h.mean(0, keepdims=True), rtol=1e-5, atol=1e-6)


def test_linear_classifier():
  tr = hk.transform(lambda x: networks.LinearClassifier(3)(x))
  x = jax.random.normal(jax.random.PRNGKey(7), (4, 6))
  params = tr.init(jax.random.PRNGKey(0), x)
  assert _shapes(params) == {"linear_classifier": {"w": (6, 3), "b": (3,)}}
  out = tr.apply(params, None, x)
  w, b = (np.asarray(params["linear_classifier"][k], np.float64) for k in ("w", "b"))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x, np.float64) @ w + b,
                             rtol=1e-5, atol=1e-6)
  # The release's eval classifier is a bare hk.Linear named 'linear'.
  named = hk.transform(lambda x: networks.LinearClassifier(3, name="linear")(x))
  assert set(named.init(jax.random.PRNGKey(0), x)) == {"linear"}


# ----------------------------------------------------------------------------------------------
# Bottleneck ResNets against Haiku's reference implementation (hk.nets.ResNet*).

_HK_RESNETS = {50: hk.nets.ResNet50, 101: hk.nets.ResNet101, 152: hk.nets.ResNet152,
               200: hk.nets.ResNet200}
_OUR_RESNETS = {50: networks.ResNet50, 101: networks.ResNet101, 152: networks.ResNet152,
                200: networks.ResNet200}


def _resnet_pair(depth, resnet_v2, num_classes=10):
  """(ours, Haiku's) transform_with_state of the ResNet of ``depth`` with a logits layer."""
  ours = hk.transform_with_state(lambda x, is_training: _OUR_RESNETS[depth](
      num_classes=num_classes, resnet_v2=resnet_v2)(x, is_training))
  ref = hk.transform_with_state(lambda x, is_training: _HK_RESNETS[depth](
      num_classes=num_classes, resnet_v2=resnet_v2)(x, is_training=is_training))
  return ours, ref


def _random_like(params, state, seed):
  """Random values for every parameter and BatchNorm statistic (numpy, nothing compiled).

  Non-trivial everywhere: the zero-initialised last BatchNorm scale of each block and the
  zero-initialised logits would otherwise hide whole branches of the network.
  """
  rng = np.random.default_rng(seed)

  def param(path, leaf):
    name = path[-1].key
    if name == "w":  # He-scaled so activations stay O(1) through the depth.
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.3, 1.0, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)  # offset, b

  def stat(path, leaf):
    if path[-1].key == "counter":
      return np.full(leaf.shape, 5, np.int32)
    if "var_ema" in path[-2].key:
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)

  return (jax.tree_util.tree_map_with_path(param, params),
          jax.tree_util.tree_map_with_path(stat, state))


@pytest.mark.parametrize("depth", [50, 101, 152, 200])
@pytest.mark.parametrize("resnet_v2", [False, True])
def test_bottleneck_resnet_parameter_trees_match_haiku(depth, resnet_v2):
  # Traced only. Same module names, shapes and dtypes: parameters map one-to-one by name.
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  trees = [jax.eval_shape(lambda x, tr=tr: tr.init(jax.random.PRNGKey(0), x, True), x)
           for tr in _resnet_pair(depth, resnet_v2)]
  ours, ref = [jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t) for t in trees]
  assert ours == ref


@pytest.mark.parametrize("resnet_v2", [False, True])
@pytest.mark.slow
def test_resnet50_values_match_haiku(resnet_v2):
  ours, ref = _resnet_pair(50, resnet_v2)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda x: ref.init(jax.random.PRNGKey(0), x, True), x)
  params, state = _random_like(*shapes, seed=1)

  def both_modes(transformed):
    def run(params, state, x):
      eval_logits, eval_state = transformed.apply(params, state, None, x, False)
      train_logits, train_state = transformed.apply(params, state, None, x, True)
      return eval_logits, eval_state, train_logits, train_state
    return jax.jit(run)(params, state, x)

  got, want = both_modes(ours), both_modes(ref)
  eval_logits, _, train_logits, train_state = want
  # The comparison is not vacuous: logits vary across images, eval and train mode differ, and
  # training moves the statistics.
  assert np.ptp(np.asarray(eval_logits)) > 0.1 and np.ptp(np.asarray(train_logits)) > 0.1
  assert not np.allclose(eval_logits, train_logits, atol=1e-2)
  assert not np.allclose(train_state["res_net50/~/block_group_3/~/block_2/~/batchnorm_2/~/"
                                     "mean_ema"]["average"],
                         state["res_net50/~/block_group_3/~/block_2/~/batchnorm_2/~/"
                               "mean_ema"]["average"], atol=1e-3)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise():
  tr = _encoder_fn("tiny_resnet")
  with pytest.raises(ValueError, match=r"images.*\[B, H, W, C\]"):
    tr.init(jax.random.PRNGKey(0), jnp.zeros((28, 28, 3)), True)
  with pytest.raises(ValueError, match="images.*dtype"):
    tr.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3), jnp.int32), True)
  with pytest.raises(ValueError, match="resnet50"):
    networks.make_encoder("resnet9")
  with pytest.raises(ValueError, match="tiny_resnet"):
    networks.embedding_size("vit")
  with pytest.raises(ValueError, match="width_multiplier"):
    networks.embedding_size("resnet50", 0)
  with pytest.raises(ValueError, match="width_multiplier"):
    hk.transform_with_state(lambda x, t: networks.ResNet50(width_multiplier=1.5)(x, t)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True)
  with pytest.raises(ValueError, match="compute_dtype"):
    hk.transform_with_state(lambda x, t: networks.TinyResNet(compute_dtype=jnp.int8)(x, t)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True)
  with pytest.raises(ValueError, match="sk_ratio"):
    hk.transform_with_state(lambda x, t: networks.SKResNet50(sk_ratio=0.0)(x, t)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True)
  with pytest.raises(ValueError, match=r"x must have shape \[B, D\]"):
    hk.transform_with_state(lambda x, t: networks.MLP(4, 2)(x, t)).init(
        jax.random.PRNGKey(0), jnp.zeros((2, 3, 4)), True)
  with pytest.raises(ValueError, match=r"x must have shape \[B, F\]"):
    hk.transform(lambda x: networks.LinearClassifier(3)(x)).init(
        jax.random.PRNGKey(0), jnp.zeros((4,)))
  with pytest.raises(ValueError, match="num_classes"):
    hk.transform(lambda x: networks.LinearClassifier(0)(x)).init(
        jax.random.PRNGKey(0), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="decay_rate"):
    hk.transform_with_state(lambda x, t: networks.MLP(4, 2, {"decay_rate": 2.0})(x, t)).init(
        jax.random.PRNGKey(0), jnp.zeros((2, 3)), True)


# ----------------------------------------------------------------------------------------------
# Rematerialisation (remat='block' / 'group').


def _loss_and_grads(name, remat, images, compute_dtype=jnp.float32, **kwargs):
  """Parameters (shared across remat policies), loss, gradients and new BatchNorm state."""
  tr = _encoder_fn(name, remat=remat, compute_dtype=compute_dtype, **kwargs)
  params, state = _encoder_fn(name, **kwargs).init(jax.random.PRNGKey(0), images, True)

  def loss(p):
    out, new_state = tr.apply(p, state, None, images, True)
    return jnp.sum(jnp.sin(out)), new_state

  (value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, grads, new_state


@pytest.mark.parametrize("name,kwargs", [
    ("tiny_resnet", dict(small_images=True)),
    ("resnet18", dict(small_images=True)),
    ("sk_resnet50", dict()),
])
@pytest.mark.parametrize("remat", ["block", "group"])
@pytest.mark.slow
def test_remat_keeps_parameters_outputs_gradients_and_state(name, kwargs, remat):
  hw = 32 if name == "sk_resnet50" else 16
  images = jax.random.normal(jax.random.PRNGKey(1), (2, hw, hw, 3))
  ref = _loss_and_grads(name, "none", images, **kwargs)
  got = _loss_and_grads(name, remat, images, **kwargs)
  # Same parameter tree, so remat is invisible to checkpoints.
  assert jax.tree_util.tree_structure(ref[1]) == jax.tree_util.tree_structure(got[1])
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_remat_with_bfloat16_compute_matches():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  ref = _loss_and_grads("resnet18", "none", images, jnp.bfloat16, small_images=True)
  got = _loss_and_grads("resnet18", "block", images, jnp.bfloat16, small_images=True)
  # bfloat16 rounding differs where XLA fuses the recomputed forward differently, so compare
  # each leaf as a whole (relative L2 error) rather than element by element.
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-3, (a.shape, a, b)


def test_remat_policy_is_checked():
  with pytest.raises(ValueError, match=r"remat must be one of \['none', 'block', 'group'\]"):
    _abstract_init("resnet18", remat="layer")
