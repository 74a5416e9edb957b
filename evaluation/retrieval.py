"""Retrieval accuracy by distance on the synthetic tasks (data/synthetic.py): how often the model's
top prediction is a scored target, by how far back its evidence is, in lengths of an attention
window (NSA's or any local attention's sliding window): evidence inside the window is reachable
without any sparse selection, evidence many windows back only through it.

Buckets are [0, 1), [1, 4), [4, 16), [16, 64), ... windows, each 4x the last. Pure numpy: the
caller supplies per-target `correct` (argmax == target), and the batch's `distance` and `weights`.
"""
import numpy as np

from data import sources, synthetic

BUCKET_FACTOR = 4


def distance_buckets(window: int, max_distance: int = 0) -> list[int]:
  """Bucket edges in tokens, [0, w, 4w, 16w, ...] for window w, enough to hold distances up to
  `max_distance`: bucket i holds distances [edges[i], edges[i+1])."""
  if window < 1:
    raise ValueError(f"window must be >= 1 token, got {window}")
  edges = [0, window]
  while edges[-1] <= max_distance:
    edges.append(edges[-1] * BUCKET_FACTOR)
  return edges


def bucket_label(lo: int, hi: int, window: int) -> str:
  """(0, w) -> '<1w', (w, 4w) -> '1-4w', (4w, 16w) -> '4-16w'."""
  return f"<{hi // window}w" if lo == 0 else f"{lo // window}-{hi // window}w"


def _scored(correct, distance, weights):
  correct, distance, weights = (np.asarray(x).ravel() for x in (correct, distance, weights))
  keep = weights > 0
  return correct[keep].astype(bool), distance[keep].astype(np.int64)


def accuracy_by_distance(correct, distance, weights, window: int) -> list[dict]:
  """[{bucket, lo, hi, count, accuracy}] per distance bucket (lo, hi in tokens), over the scored
  targets (weights > 0) only, up to the bucket of the longest distance; an empty bucket has
  accuracy nan."""
  correct, distance = _scored(correct, distance, weights)
  edges = distance_buckets(window, int(distance.max()) if distance.size else 0)
  n = len(edges) - 1
  bucket = np.searchsorted(edges, distance, side="right") - 1
  counts = np.bincount(bucket, minlength=n)
  hits = np.bincount(bucket, weights=correct, minlength=n)
  return [{"bucket": bucket_label(edges[i], edges[i + 1], window), "lo": edges[i], "hi": edges[i + 1],
           "count": int(counts[i]), "accuracy": float(hits[i] / counts[i]) if counts[i] else float("nan")}
          for i in range(n)]


def beyond(correct, distance, weights, window: int, windows: int = 8) -> dict:
  """{count, accuracy} over the scored targets whose evidence is at least `windows` windows back
  (accuracy nan when there are none)."""
  correct, distance = _scored(correct, distance, weights)
  far = distance >= windows * window
  count = int(far.sum())
  return {"count": count, "accuracy": float(correct[far].mean()) if count else float("nan")}


def chance(config, task: str | None = None) -> float:
  """The accuracy of guessing: 1 / value_vocab for mqar (values are uniform), 1/10 for passkey's
  digits. `task` ('mqar' or 'passkey') defaults to the one synthetic task the config uses."""
  if task is None:
    names = [t.name for t in sources.synthetic_tasks(config)]
    if len(names) != 1:
      raise ValueError(f"the config uses {len(names)} synthetic tasks ({', '.join(names) or 'none'}): name one")
    task, = names
  if task not in synthetic.TASKS:
    raise ValueError(f"unknown synthetic task {task!r}; allowed: {', '.join(synthetic.TASKS)}")
  return 1 / (config.data.synthetic.value_vocab if task == "mqar" else synthetic.PASSKEY_BASE)


def window_of(config) -> int:
  """The window distances are measured in: eval.retrieval_window, else NSA's sliding window, or
  for DSA its index_topk (the keys its local baseline covers)."""
  if config.eval.retrieval_window:
    return config.eval.retrieval_window
  return config.dsa.index_topk if config.attention.kind == "dsa" else config.nsa.window


def bucket_counts(correct, distance, weights, edges):
  """(hits, counts) per distance bucket of the synthetic targets (weights > 0 and distance > 0:
  text tokens in a mixture are scored with distance 0), in jnp, for a jitted eval step."""
  import jax.numpy as jnp
  synthetic_target = (weights > 0) & (distance > 0)
  bucket = jnp.searchsorted(jnp.asarray(edges), distance, side="right") - 1
  one_hot = (bucket[..., None] == jnp.arange(len(edges) - 1)) & synthetic_target[..., None]
  return (one_hot & correct[..., None]).sum((0, 1)), one_hot.sum((0, 1))


def metrics(hits, counts, edges, window: int, windows: int = 8) -> dict:
  """retrieval_acc_<bucket> per non-empty bucket, and retrieval_acc_beyond_<windows>w over the
  buckets from `windows` windows on (edges must include windows * window)."""
  hits, counts = np.asarray(hits, np.float64), np.asarray(counts, np.float64)
  out = {f"retrieval_acc_{bucket_label(edges[i], edges[i + 1], window)}": hits[i] / counts[i]
         for i in range(len(counts)) if counts[i]}
  far = np.asarray(edges[:-1]) >= windows * window
  if counts[far].sum():
    out[f"retrieval_acc_beyond_{windows}w"] = hits[far].sum() / counts[far].sum()
  return out


def eval_edges(config) -> list[int]:
  """The distance buckets of the train-time eval: [0, w, 4w, 8w, 16w, ...] up to seq_len, with
  an edge at 8 windows so that 'beyond 8 windows' is a sum of buckets."""
  w = window_of(config)
  return sorted(set(distance_buckets(w, config.seq_len)) | {8 * w})


def jit_correct(model, mesh):
  """jit(params, batch) -> bool [B, T]: the model's top prediction equals the target."""
  import jax
  import jax.numpy as jnp

  from parallel.mesh import batch_sharding
  from parallel.rules import use_mesh

  def correct(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    return jnp.argmax(logits, axis=-1) == batch["targets"]
  fn = jax.jit(correct, in_shardings=(None, batch_sharding(mesh)))

  def apply(params, batch):
    with use_mesh(mesh):
      return fn(params, batch)
  return apply


def evaluate(batches, correct_fn, window: int, chance_level: float) -> dict:
  """scripts/evaluate.py's retrieval section: {window, chance, buckets, beyond_8w} over the
  synthetic targets of `batches` (host batches with distance and weights)."""
  parts = [(np.asarray(correct_fn(b)), b["distance"], scored_targets(b["distance"], b["weights"])) for b in batches]
  correct, distance, weights = (np.concatenate([p[i] for p in parts]) for i in range(3))
  return {"window": window, "chance": chance_level,
          "buckets": accuracy_by_distance(correct, distance, weights, window),
          "beyond_8w": beyond(correct, distance, weights, window)}


def scored_targets(distance, weights) -> np.ndarray:
  """bool: the synthetic targets, scored (weights > 0) with evidence earlier in the row (distance > 0)."""
  return (np.asarray(weights) > 0) & (np.asarray(distance) > 0)


def evidence_selected(block_indices, distance, weights, slc_block: int) -> np.ndarray:
  """NSA's selection against the synthetic targets: [layers, KV heads], the share of scored
  targets (weights > 0, distance > 0) whose evidence block is among the blocks selected at the
  target's input position. block_indices [L, B, T, HKV, n] as NSA sows them; the target at input
  position t has its evidence at t - distance."""
  blocks = np.asarray(block_indices)
  rows, positions = np.nonzero(scored_targets(distance, weights))
  evidence = (positions - np.asarray(distance)[rows, positions]) // slc_block           # [N]
  chosen = blocks[:, rows, positions]                                                    # [L, N, HKV, n]
  return (chosen == evidence[None, :, None, None]).any(-1).mean(1)
