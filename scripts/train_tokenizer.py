"""Train a sentencepiece tokenizer (BPE, byte fallback) on text files.

  python scripts/train_tokenizer.py --output data/assets/stdlib_4k --vocab-size 4096
      (no --input: the embedded corpus, this Python's standard library; this is how the
       shipped data/assets/stdlib_4k.model was made)
  python scripts/train_tokenizer.py --input 'corpus/*.txt' --output tok/my32k --vocab-size 32000

Writes PREFIX.model and PREFIX.vocab; prints the vocab size and characters per token.
"""
import argparse
import os
import sys
import time

import sentencepiece as spm  # noqa: E402

from data import corpus  # noqa: E402


def iter_texts(patterns: list[str], text_field: str):
  """Documents of the inputs (.txt/.jsonl, gzipped or not), or of the embedded corpus."""
  if not patterns:
    yield from (text for _, text in corpus.embedded_documents("train"))
    return
  for path in corpus.expand_inputs(patterns):
    yield from (text for _, text, _ in corpus.read_documents(path, text_field) if text is not None)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", action="append", default=[], help="glob of text files (repeatable)")
  parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model, PREFIX.vocab")
  parser.add_argument("--vocab-size", type=int, default=4096)
  parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
  parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
  parser.add_argument("--max-sentences", type=int, default=2_000_000,
                      help="sentencepiece's input_sentence_size: lines sampled for training")
  args = parser.parse_args()
  if args.vocab_size < 300:
    sys.exit(f"error: --vocab-size {args.vocab_size} is too small: byte fallback needs >= 300")

  try:
    texts = list(iter_texts(args.input, args.text_field))
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  lines = [line for text in texts for line in text.splitlines() if line.strip()]
  start = time.time()
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=args.output, vocab_size=args.vocab_size,
      model_type=args.model_type, byte_fallback=True, character_coverage=0.9995,
      input_sentence_size=args.max_sentences, shuffle_input_sentence=True,
      # Text comes back byte for byte: no normalisation, whitespace kept (indentation carries
      # meaning). No dummy prefix: a text cut after a newline tokenizes exactly as its pieces do,
      # which prepare_data.py relies on to tokenize long documents in parallel pieces.
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      split_digits=True, allow_whitespace_only_pieces=True,
      user_defined_symbols=["\n", "\t"], pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=args.output + ".model")
  sample = "\n".join(texts)[:5_000_000]
  chars_per_token = len(sample) / max(1, len(sp.encode(sample)))
  print(f"wrote {args.output}.model: vocab {sp.vocab_size()}, {chars_per_token:.2f} characters/token "
        f"on {len(sample) / 1e6:.1f} MB of the input, trained in {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
