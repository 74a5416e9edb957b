"""Prepare a corpus once for training: tokenize text files into a TFDS ArrayRecord dataset.

  python scripts/prepare_data.py --input 'corpus/**/*.jsonl.gz' --output data/prepared/mycorpus \
      --tokenizer tok/my32k.model [--text-field text] [--val-fraction 0.01]

--tokenizer is a SentencePiece .model, or a Hugging Face tokenizer.json or a model directory
holding one (its own BOS convention kept; an EOS ends each document).

Reads .txt / .txt.gz (a document per file) and .jsonl / .jsonl.gz (a document per line, text in
--text-field). Re-running with the same inputs is a no-op; an interrupted run leaves nothing that
looks complete. Train with --config.data.source=OUTPUT --config.data.tokenizer=MODEL.
"""
import argparse
import os
import sys
import time

from data import corpus, prepare  # noqa: E402
from data.tokenizer import tokenizer_file


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", action="append", required=True, help="glob of input files (repeatable)")
  parser.add_argument("--output", required=True, help="dataset directory to write")
  parser.add_argument("--tokenizer", required=True,
                      help="sentencepiece .model, or a Hugging Face tokenizer.json or model directory")
  parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
  parser.add_argument("--val-fraction", type=float, default=0.01)
  parser.add_argument("--record-tokens", type=int, default=131_072,
                      help="longest record; longer documents are stored as several pieces")
  parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: all cores)")
  args = parser.parse_args(argv)
  try:
    if not 0 <= args.val_fraction < 1:
      raise ValueError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.record_tokens < 1:
      raise ValueError(f"--record-tokens {args.record_tokens}: must be positive")
    if not os.path.isfile(tokenizer_file(args.tokenizer)):
      raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} does not exist (a SentencePiece .model, a "
                              "tokenizer.json or a directory holding one)")
    options = prepare.PrepareOptions(
        inputs=tuple(corpus.expand_inputs(args.input)), tokenizer=args.tokenizer,
        text_field=args.text_field, val_fraction=args.val_fraction, record_tokens=args.record_tokens,
        workers=args.workers)
    start = time.time()
    info, prepared_now = prepare.prepare(options, args.output)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  seconds = time.time() - start
  if not prepared_now:
    print(f"{args.output}: already prepared from these inputs; nothing to do")
  for split in prepare.SPLITS:
    s = info.get(split, {})
    print(f"{split:>10}: {s.get('documents', 0):,} documents, {s.get('tokens', 0):,} tokens, "
          f"{s.get('records', 0):,} records")
  if prepared_now:
    tokens = sum(info.get(split, {}).get("tokens", 0) for split in prepare.SPLITS)
    print(f"{len(options.inputs)} files in {seconds:.1f} s: {tokens / seconds:,.0f} tokens/s")
  skipped = {k: v for k, v in info.get("train", {}).items() if k.startswith("skipped_") or k == "invalid_utf8"}
  print("problems: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) if skipped else "none")
        + " (invalid_utf8: kept with U+FFFD; skipped_*: not in the dataset)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
