"""Does a text-to-image digits run draw the digit its prompt names? (issue 20, the CPU check)

Reads a `speed-fast sample --prompt/--prompts` .npz of a digits-t2i run (arr_0 uint8 [N, 8, 8, 3],
`prompts`), classifies every sample with a logistic regression trained on scikit-learn's digits
(the training set itself: held-out accuracy of the same classifier on a 70/30 split is printed too)
and prints, as JSON, the fraction of samples whose predicted digit is the one the prompt names (a
digit word or numeral in it), and the predicted-digit histogram of all samples (for `--prompt ""`,
the null caption, it should spread over the ten digits).

    python benchmarks/digits_caption_agreement.py samples.npz
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from speed_fast.data.digits import DIGIT_WORDS


def named_digit(prompt: str) -> int | None:
    found = {DIGIT_WORDS.index(w) for w in re.findall(r"[a-z]+", prompt.lower()) if w in DIGIT_WORDS}
    found |= {int(c) for c in re.findall(r"\b[0-9]\b", prompt)}
    return found.pop() if len(found) == 1 else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("npz")
    args = p.parse_args(argv)
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = d.images.reshape(len(d.images), -1) / 16.0, d.target
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0)
    held_out = LogisticRegression(max_iter=5000).fit(xtr, ytr).score(xte, yte)
    clf = LogisticRegression(max_iter=5000).fit(x, y)
    with np.load(args.npz, allow_pickle=False) as z:
        images, prompts = z["arr_0"], z["prompts"].tolist()
    pred = clf.predict(images[..., 0].reshape(len(images), -1).astype(np.float64) / 255.0)
    want = [named_digit(s) for s in prompts]
    named = [i for i, w in enumerate(want) if w is not None]
    out = {"npz": args.npz, "samples": len(images), "classifier_held_out_accuracy": round(float(held_out), 4),
           "samples_naming_a_digit": len(named),
           "agreement": round(float(np.mean([pred[i] == want[i] for i in named])), 4) if named else None,
           "predicted_histogram": np.bincount(pred, minlength=10).tolist()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
