"""AdamW with linear warmup + cosine decay and global-norm gradient clipping (optax).

DSA's dense warm-up stage trains the lightning indexer only: every other parameter goes through
optax.set_to_zero (no update, no weight decay, no optimizer state), and clipping sees only the
indexer's gradients."""
import jax
import optax


def learning_rate(config) -> optax.Schedule:
  o = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(config.steps, o.warmup_steps + 1), end_value=o.lr * o.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on weight matrices and embeddings, not on norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in ("scale", "bias"), params)


def _trains_indexer_only(config) -> bool:
  return config.attention.kind == "dsa" and config.dsa.stage == "dense_warmup"


def trainable(config, params):
  """Params-shaped pytree of bools: which parameters this stage trains."""
  only_indexer = _trains_indexer_only(config)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not only_indexer or any(getattr(p, "key", None) == "indexer" for p in path), params)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=_decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
  if not _trains_indexer_only(config):
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(config, params))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
