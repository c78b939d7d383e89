"""The captioned digits for the CPU text-to-image verdict (issue 20): OUT_DIR/digits-captions.beton.

scikit-learn's 1797 8x8 digits as the `digits` preset stores them (1x8x8 bf16, x / 8 - 1, labels the
digits), each with a caption naming its digit in one of six phrasings ("a handwritten seven", "the
digit 7", "number seven, drawn by hand", ...; speed_fast.data.digits.DIGIT_PHRASINGS) drawn per image
by a generator seeded with --seed, and the captions' CLIP embeddings from a tiny CLIP text model
built with the same seed (random weights: no pretrained CLIP can be had here). Writes

  OUT_DIR/clip/                       the tiny CLIP (save_pretrained; --text-encoder OUT_DIR/clip)
  OUT_DIR/captions.jsonl              {"index", "label", "caption"} per image
  OUT_DIR/prompts.txt                 every phrasing of every digit, one a line (prompts to sample)
  OUT_DIR/digits-captions.beton(.json) the captioned latent file

Deterministic: the same --seed and --width write the same bytes.

    python benchmarks/make_captioned_digits.py OUT_DIR [--seed 0] [--width 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the captions' draw and of the tiny CLIP (default 0)")
    p.add_argument("--width", type=int, default=32, help="the tiny CLIP's width D (default 32)")
    p.add_argument("--limit", type=int, default=None, help="the first N digits only (tests)")
    args = p.parse_args(argv)
    if args.seed < 0 or args.width < 2 or args.width % 2 or (args.limit is not None and args.limit < 1):
        print(f"make_captioned_digits: --seed must be >= 0 (got {args.seed}), --width an even integer >= 2 (got "
              f"{args.width}), --limit >= 1 (got {args.limit})", file=sys.stderr)
        return 2
    from speed_fast.data.digits import write_captioned_digits

    t0 = time.perf_counter()
    meta = write_captioned_digits(args.out_dir, seed=args.seed, width=args.width, limit=args.limit)
    print(f"wrote {os.path.join(args.out_dir, 'digits-captions.beton')}: {meta['num_samples']} digits with captions, "
          f"text [{meta['text']['tokens']}, {meta['text']['width']}] from {meta['text']['encoder']} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
