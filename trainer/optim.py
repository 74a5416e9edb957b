"""AdamW with linear warmup + cosine decay and global-norm gradient clipping (optax)."""
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
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=_decay_mask)
  if o.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw
