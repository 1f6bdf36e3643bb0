"""Losses against numpy implementations written here (matching by scipy), on small batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from grain_jax import losses, sharding
from grain_jax.bench import _hlo
from grain_jax.config import base

B, Q, T, L, E = 4, 5, 5, 3, 8


# ----------------------------------------------------------------------------- numpy references


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax_at(logits, index):
  shifted = logits - logits.max()
  return shifted[index] - np.log(np.exp(shifted).sum())


def np_info_nce(image, text, logit_scale):
  logits = np.exp(logit_scale) * np_normalize(image) @ np_normalize(text).T
  n = len(logits)
  return -(
    sum(np_log_softmax_at(logits[i], i) for i in range(n)) + sum(np_log_softmax_at(logits[:, i], i) for i in range(n))
  ) / (2 * n)


def np_xyxy(box):
  return np.concatenate([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2])


def np_giou(box1, box2, union_epsilon=0.0):
  a, b = np_xyxy(box1), np_xyxy(box2)
  inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / (union + union_epsilon) - (hull - union) / hull


def np_match(pred, target, valid, union_epsilon=0.0):
  """scipy matching with cost 5 L1 - 2 GIoU -> (query_of_target [B, T], mean matched cost)."""
  query_of_target = np.full(valid.shape, -1)
  costs = []
  for b in range(len(pred)):
    targets = np.flatnonzero(valid[b])
    cost = np.array(
      [
        [5 * np.abs(p - target[b, t]).sum() - 2 * np_giou(p, target[b, t], union_epsilon) for t in targets]
        for p in pred[b]
      ]
    ).reshape(len(pred[b]), len(targets))
    rows, columns = linear_sum_assignment(cost)
    query_of_target[b, targets[columns]] = rows
    costs.extend(cost[rows, columns])
  return query_of_target, np.mean(costs) if costs else 0.0


def np_box_loss(pred, target, valid, query_of_target, union_epsilon=0.0, num_groups=None):
  """Sums over matched pairs / valid boxes: of the whole batch, or of each of `num_groups` groups,
  then averaged over the groups."""
  group_size = len(pred) // (num_groups or 1)
  per_group = []
  for start in range(0, len(pred), group_size):
    l1 = giou_loss = 0.0
    rows = slice(start, start + group_size)
    for b, t in zip(*np.nonzero(valid[rows] & (query_of_target[rows] >= 0))):
      b += start
      l1 += np.abs(pred[b, query_of_target[b, t]] - target[b, t]).sum()
      giou_loss += 1 - np_giou(pred[b, query_of_target[b, t]], target[b, t], union_epsilon)
    count = max(1, valid[rows].sum())
    per_group.append((l1 / count, giou_loss / count))
  return tuple(np.mean(per_group, axis=0))


def np_region_loss(region, desc, valid, query_of_target, text_id, logit_scale, mask_duplicates, num_groups=None):
  """Each matched region against the valid descriptions of the batch (or of its group): the mean
  over its group's matched regions, averaged over the groups."""
  group_size = len(region) // (num_groups or 1)
  per_group = []
  for start in range(0, len(region), group_size):
    losses_, correct = [], []
    rows = slice(start, start + group_size)
    for b, t in zip(*np.nonzero(valid[rows] & (query_of_target[rows] >= 0))):
      b += start
      region_vector = np_normalize(region[b, query_of_target[b, t]])
      candidates = [
        (b2 + start, t2)
        for b2, t2 in zip(*np.nonzero(valid[rows]))
        if (b2 + start, t2) == (b, t) or not mask_duplicates or text_id[b2 + start, t2] != text_id[b, t]
      ]
      logits = np.array([np.exp(logit_scale) * region_vector @ np_normalize(desc[c]) for c in candidates])
      own = candidates.index((b, t))
      losses_.append(-np_log_softmax_at(logits, own))
      correct.append(logits.argmax() == own)
    per_group.append((np.mean(losses_), np.mean(correct)) if losses_ else (0.0, 0.0))
  return tuple(np.mean(per_group, axis=0))


def np_authors_region_loss(region, desc, valid, query_of_target, logit_scale, num_devices):
  """The authors' L_rd written out in numpy, device by device: a device lists its valid descriptions
  image after image, scores each matched region against all of them (identical texts included) with
  its own description's position as the label, and takes the mean cross-entropy; DDP averages the
  devices."""
  per_device = []
  for rows in np.split(np.arange(len(region)), num_devices):
    descriptions = np.stack([desc[b, t] for b in rows for t in np.flatnonzero(valid[b])])
    picked, labels, offset = [], [], 0
    for b in rows:
      targets = np.flatnonzero(valid[b])
      for position, t in enumerate(targets):
        if query_of_target[b, t] >= 0:
          picked.append(region[b, query_of_target[b, t]])
          labels.append(offset + position)
      offset += len(targets)
    logits = np.exp(logit_scale) * np_normalize(np.stack(picked)) @ np_normalize(descriptions).T
    per_device.append(np.mean([-np_log_softmax_at(row, label) for row, label in zip(logits, labels)]))
  return np.mean(per_device)


def np_description_query_loss(region, desc, valid, query_of_target, logit_scale):
  """Each matched description against the Q queries of its own image."""
  losses_, correct = [], []
  for b, t in zip(*np.nonzero(valid & (query_of_target >= 0))):
    logits = np.exp(logit_scale) * np_normalize(region[b]) @ np_normalize(desc[b, t])
    losses_.append(-np_log_softmax_at(logits, query_of_target[b, t]))
    correct.append(logits.argmax() == query_of_target[b, t])
  return (np.mean(losses_), np.mean(correct)) if losses_ else (0.0, 0.0)


def np_spread_ratio(pred, target, valid):
  """Per-query std over images of the predicted boxes / std of the valid targets, per coordinate."""
  return pred.std(axis=0).mean() / target[valid].std(axis=0).mean()


# ----------------------------------------------------------------------------- batches, jitted fns


def random_batch(seed, batch=B, num_targets=T, empty=False):
  rng = np.random.default_rng(seed)

  def boxes(*shape):
    return np.concatenate([rng.uniform(0.2, 0.8, shape + (2,)), rng.uniform(0.05, 0.4, shape + (2,))], -1).astype(
      np.float32
    )

  valid = rng.random((batch, num_targets)) < 0.6
  valid[0] = True  # all targets valid in one image,
  valid[1] = False  # none in another
  return dict(
    image_embed=rng.normal(size=(batch, E)).astype(np.float32),
    caption_embed=rng.normal(size=(batch, E)).astype(np.float32),
    logit_scale=np.float32(np.log(10.0)),
    region_embed=rng.normal(size=(batch, Q, E)).astype(np.float32),
    layer_boxes=boxes(L, batch, Q),
    desc_embed=rng.normal(size=(batch, num_targets, E)).astype(np.float32),
    target_boxes=boxes(batch, num_targets),
    box_valid=valid & (not empty),
    desc_text_id=rng.integers(0, 6, (batch, num_targets)).astype(np.int32),
  )


def expected_grain_loss(
  batch, aux_layers, num_groups=None, mask_duplicates=True, description_to_query=0.0, box_groups=None, union_epsilon=0.0
):
  valid = batch["box_valid"]
  l1 = giou = 0.0
  for layer in range(L) if aux_layers else [L - 1]:
    pred = batch["layer_boxes"][layer]
    query_of_target, match_cost = np_match(pred, batch["target_boxes"], valid, union_epsilon)
    layer_l1, layer_giou = np_box_loss(pred, batch["target_boxes"], valid, query_of_target, union_epsilon, box_groups)
    l1, giou = l1 + layer_l1, giou + layer_giou
  rd, accuracy = np_region_loss(
    batch["region_embed"],
    batch["desc_embed"],
    valid,
    query_of_target,
    batch["desc_text_id"],
    batch["logit_scale"],
    mask_duplicates,
    num_groups,
  )
  dq, dq_accuracy = np_description_query_loss(
    batch["region_embed"], batch["desc_embed"], valid, query_of_target, batch["logit_scale"]
  )
  ic = np_info_nce(batch["image_embed"], batch["caption_embed"], batch["logit_scale"])
  metrics = dict(
    loss_ic=ic,
    loss_l1=l1,
    loss_giou=giou,
    loss_rd=rd,
    loss_dq=dq,
    match_cost=match_cost,
    rd_accuracy=accuracy,
    dq_accuracy=dq_accuracy,
    box_spread_ratio=np_spread_ratio(batch["layer_boxes"][-1], batch["target_boxes"], valid),
  )
  return ic + 1.5 * l1 + 1.5 * giou + rd + description_to_query * dq, metrics


def make_config(**loss_overrides):
  config = base.get_config("tiny")
  config.loss.update(loss_overrides)
  return config


@functools.lru_cache(maxsize=None)
def jitted_loss_and_grads(
  aux_layers=False,
  region_negatives="global",
  mask_duplicates=True,
  batch_shards=1,
  description_to_query=0.0,
  box_normalization="global",
  iou_union_epsilon=0.0,
):
  """One compiled (loss, metrics), grads function per configuration."""
  config = make_config(
    aux_layers=aux_layers,
    region_negatives=region_negatives,
    mask_duplicate_descriptions=mask_duplicates,
    description_to_query=description_to_query,
    box_normalization=box_normalization,
    iou_union_epsilon=iou_union_epsilon,
  )

  def loss(differentiable, fixed):
    return losses.grain_loss(
      **differentiable, **fixed, matching_config=config.matching, loss_config=config.loss, batch_shards=batch_shards
    )

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


DIFFERENTIABLE = ("image_embed", "caption_embed", "logit_scale", "region_embed", "layer_boxes", "desc_embed")


def run(batch, **config):
  differentiable = {k: v for k, v in batch.items() if k in DIFFERENTIABLE}
  fixed = {k: v for k, v in batch.items() if k not in DIFFERENTIABLE}
  (total, metrics), grads = jitted_loss_and_grads(**config)(differentiable, fixed)
  return float(total), {k: float(v) for k, v in metrics.items()}, grads


def assert_metrics_close(metrics, expected):
  assert metrics.keys() == expected.keys()
  for key in metrics:
    np.testing.assert_allclose(metrics[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)


# ----------------------------------------------------------------------------- tests


def test_image_caption_loss_hand_made():
  eye = jnp.eye(2)
  # logits [[10, 0], [0, 10]]: each direction and row gives log(1 + e^-10); XLA's float32 exp
  # is accurate to ~1e-4 relative there.
  image_caption_loss = jax.jit(losses.image_caption_loss)
  np.testing.assert_allclose(image_caption_loss(eye, 3 * eye, jnp.log(10.0)), np.log1p(np.exp(-10.0)), rtol=1e-3)
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  np.testing.assert_allclose(image_caption_loss(image, text, 1.3), np_info_nce(image, text, 1.3), rtol=1e-5)


def test_box_loss_hand_made():
  pred = np.array([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]], np.float32)
  target = np.array([[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1], [np.nan, 9, 9, 9]]], np.float32)
  valid = np.array([[True, True, True, False]])
  l1, giou_loss = jax.jit(losses.box_loss)(pred, target, valid, np.array([[1, 0, -1, -1]]))
  # Target 0: L1 0.4, IoU 0.04 / 0.16 inside its own enclosing box; target 1 exact; target 2
  # valid but unmatched (more targets than queries): it only counts in the 3 valid boxes.
  np.testing.assert_allclose([l1, giou_loss], [0.4 / 3, 0.75 / 3], rtol=1e-6)


def test_region_description_loss_masks_duplicates_and_groups():
  batch = random_batch(1, batch=4)
  valid = batch["box_valid"] | True
  text_id = np.arange(4 * T).reshape(4, T)
  text_id[2, 3] = text_id[0, 0]  # identical texts, same group of 2
  text_id[3, 1] = text_id[0, 1]
  query_of_target = np.tile(np.array([2, 0, 4, 1, 3]), (4, 1))
  query_of_target[3, 4] = -1  # unmatched
  args = (batch["region_embed"], batch["desc_embed"], valid, query_of_target, text_id, 0.7)
  loss_fn = jax.jit(losses.region_description_loss, static_argnames=("mask_duplicates", "num_groups"))
  results = {}
  for mask in (True, False):
    for groups in (None, 2):
      results[mask, groups] = loss_fn(*args, mask_duplicates=mask, num_groups=groups)
      np.testing.assert_allclose(
        results[mask, groups], np_region_loss(*args, mask, groups), rtol=1e-5, err_msg=str((mask, groups))
      )
  assert results[True, None][0] != results[False, None][0]
  assert results[True, None][0] != results[True, 2][0]
  with pytest.raises(ValueError, match="groups"):
    losses.region_description_loss(*args, num_groups=3)


@pytest.mark.parametrize("aux_layers,description_to_query", [(False, 0.0), (True, 0.7)])
def test_grain_loss_matches_numpy(aux_layers, description_to_query):
  batch = random_batch(2)
  total, metrics, _ = run(batch, aux_layers=aux_layers, description_to_query=description_to_query)
  assert set(metrics) == {"loss_ic", *losses.REGION_METRICS}  # the plain-CLIP baseline reports the same
  expected_total, expected_metrics = expected_grain_loss(batch, aux_layers, description_to_query=description_to_query)
  assert_metrics_close(metrics, expected_metrics)
  np.testing.assert_allclose(total, expected_total, rtol=2e-5)


def test_grain_loss_per_device_negatives_duplicates_and_more_targets_than_queries():
  batch = random_batch(3, num_targets=7)
  batch["desc_text_id"] = np.where(batch["desc_text_id"] < 3, 0, batch["desc_text_id"])
  total, metrics, _ = run(batch, region_negatives="per_device", mask_duplicates=False, batch_shards=2)
  expected_total, expected_metrics = expected_grain_loss(batch, False, num_groups=2, mask_duplicates=False)
  assert_metrics_close(metrics, expected_metrics)
  np.testing.assert_allclose(total, expected_total, rtol=2e-5)


def test_empty_batch_is_finite_with_finite_gradients():
  batch = random_batch(4, empty=True)
  total, metrics, grads = run(batch, aux_layers=True, description_to_query=0.7)
  assert np.isfinite(total)
  for key in ("loss_l1", "loss_giou", "loss_rd", "loss_dq", "match_cost", "rd_accuracy", "dq_accuracy"):
    assert metrics[key] == 0.0, key
  np.testing.assert_allclose(total, metrics["loss_ic"], rtol=1e-6)
  for name, grad in grads.items():
    assert np.isfinite(grad).all(), name
  assert not np.asarray(grads["layer_boxes"]).any() and not np.asarray(grads["region_embed"]).any()


def test_padding_slots_change_nothing():
  batch = random_batch(5)
  padded = dict(batch)
  rng = np.random.default_rng(6)
  garbage = lambda *shape: rng.choice([np.nan, np.inf, -1e30, 3.0], shape).astype(np.float32)
  padded["target_boxes"] = np.concatenate([batch["target_boxes"], garbage(B, 3, 4)], 1)
  padded["desc_embed"] = np.concatenate([batch["desc_embed"], garbage(B, 3, E)], 1)
  padded["box_valid"] = np.concatenate([batch["box_valid"], np.zeros((B, 3), bool)], 1)
  padded["desc_text_id"] = np.concatenate([batch["desc_text_id"], np.zeros((B, 3), np.int32)], 1)
  total, metrics, grads = run(batch, aux_layers=True, description_to_query=0.7)
  padded_total, padded_metrics, padded_grads = run(padded, aux_layers=True, description_to_query=0.7)
  np.testing.assert_allclose(padded_total, total, rtol=1e-6)
  assert_metrics_close(padded_metrics, metrics)
  for name in DIFFERENTIABLE:
    grad, padded_grad = np.asarray(grads[name]), np.asarray(padded_grads[name])
    if name == "desc_embed":
      assert not padded_grad[:, T:].any()
      padded_grad = padded_grad[:, :T]
    np.testing.assert_allclose(padded_grad, grad, rtol=1e-5, atol=1e-7, err_msg=name)


def test_plain_clip_mode():
  batch = random_batch(7)
  config = make_config()
  total, metrics = jax.jit(
    lambda a, b, s: losses.grain_loss(
      image_embed=a, caption_embed=b, logit_scale=s, matching_config=config.matching, loss_config=config.loss
    )
  )(batch["image_embed"], batch["caption_embed"], batch["logit_scale"])
  np.testing.assert_allclose(
    total, np_info_nce(batch["image_embed"], batch["caption_embed"], batch["logit_scale"]), rtol=1e-5
  )
  assert set(metrics) == {"loss_ic", *losses.REGION_METRICS}
  assert not any(float(metrics[name]) for name in losses.REGION_METRICS)


def test_sharded_global_batch_gives_the_same_loss():
  batch = random_batch(8, batch=8)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_axis = {"layer_boxes": 1}
  sharded = {}
  for key, value in batch.items():
    spec = [None] * np.ndim(value)
    if np.ndim(value):
      spec[batch_axis.get(key, 0)] = "data"
    sharded[key] = jax.device_put(value, jax.NamedSharding(mesh, jax.P(*spec)))
  total, metrics, _ = run(sharded)
  expected_total, expected_metrics = expected_grain_loss(batch, False)
  assert_metrics_close(metrics, expected_metrics)
  np.testing.assert_allclose(total, expected_total, rtol=2e-5)


def test_box_losses_per_device_with_the_authors_union_epsilon():
  batch = random_batch(10, batch=4)
  batch["box_valid"][2] = True  # the two devices hold 5 + 0 and 5 + 3ish valid boxes
  options = dict(box_normalization="per_device", iou_union_epsilon=0.05, batch_shards=2)
  total, metrics, _ = run(batch, **options)
  expected_total, expected_metrics = expected_grain_loss(batch, False, box_groups=2, union_epsilon=0.05)
  assert_metrics_close(metrics, expected_metrics)
  np.testing.assert_allclose(total, expected_total, rtol=2e-5)
  global_metrics = run(batch, batch_shards=2)[1]
  assert abs(global_metrics["loss_l1"] - metrics["loss_l1"]) > 1e-3


def authors_region_inputs(seed, batch):
  """A batch whose matching is a random one-to-one map per image, with many identical texts."""
  data = random_batch(seed, batch=batch)
  rng = np.random.default_rng(seed)
  query_of_target = np.stack([rng.permutation(Q)[:T] for _ in range(batch)]).astype(np.int32)
  query_of_target[~data["box_valid"]] = -1
  data["box_valid"][1] = True  # every device has a matched region (the authors' loss is NaN without)
  query_of_target[1] = np.arange(T)
  return data, query_of_target, data["desc_text_id"] % 3


def test_per_device_region_loss_on_a_mesh_is_the_authors_loss_shard_by_shard():
  devices = 8
  config = base.get_config("tiny")
  mesh = jax.make_mesh((2, 4, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  data, query_of_target, text_id = authors_region_inputs(11, 16)

  def loss(region, desc, scale, valid, assignment, ids):
    return losses.region_description_loss(
      region, desc, valid, assignment, ids, scale, mask_duplicates=False, num_groups=devices
    )[0]

  loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  args = (data["region_embed"], data["desc_embed"], data["logit_scale"], data["box_valid"], query_of_target, text_id)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    rows = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
    placed = [x if np.ndim(x) == 0 else jax.device_put(x, rows) for x in args]
    compiled = loss_and_grads.lower(*placed).compile()
    value, grads = compiled(*placed)
  expected = np_authors_region_loss(
    data["region_embed"], data["desc_embed"], data["box_valid"], query_of_target, data["logit_scale"], devices
  )
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # Outside a mesh the same groups are computed in one place: same values, same gradients.
  unsharded_value, unsharded_grads = loss_and_grads(*args)
  np.testing.assert_allclose(value, unsharded_value, rtol=1e-6)
  for grad, unsharded in zip(grads, unsharded_grads):
    np.testing.assert_allclose(grad, unsharded, rtol=1e-5, atol=1e-7)
  # Per device for real: no device receives another's descriptions or regions; only the [8]
  # per-device sums and the temperature's gradient cross devices.
  moved = _hlo.collectives(compiled.as_text())
  assert moved and max(c.tensor_bytes for c in moved) <= 4 * devices, moved
