"""benchmarks/make_captioned_digits.py: the captioned digits are deterministic (same seed, same
bytes), captions name their digit, and the embeddings are the tiny CLIP's of each caption."""

import filecmp
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from speed_fast.data import MemmapLoader, read_latent_meta
from speed_fast.data.digits import DIGIT_WORDS, digit_captions
from speed_fast.text import load_text_encoder

ROOT = Path(__file__).resolve().parents[1]


def make(out, *extra):
    spec = importlib.util.spec_from_file_location("make_captioned_digits", ROOT / "benchmarks" / "make_captioned_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main([str(out), "--limit", "40", "--width", "16", *extra])


def test_captioned_digits_are_deterministic_and_name_their_digit(tmp_path, capsys):
    assert make(tmp_path / "a") == 0
    assert "wrote" in capsys.readouterr().out
    assert make(tmp_path / "b") == 0
    assert filecmp.cmp(tmp_path / "a" / "digits-captions.beton", tmp_path / "b" / "digits-captions.beton", shallow=False)
    assert filecmp.cmp(tmp_path / "a" / "clip" / "model.safetensors", tmp_path / "b" / "clip" / "model.safetensors",
                       shallow=False)
    assert (tmp_path / "a" / "captions.jsonl").read_text() == (tmp_path / "b" / "captions.jsonl").read_text()
    labels = np.arange(40) % 10
    assert digit_captions(labels, 0) != digit_captions(labels, 1)  # another seed, another draw
    assert make(tmp_path / "c", "--width", "7") == 2
    rows = [json.loads(line) for line in (tmp_path / "a" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len({r["caption"] for r in rows}) > 10
    assert all(DIGIT_WORDS[r["label"]] in r["caption"] or str(r["label"]) in r["caption"] for r in rows)
    meta = read_latent_meta(tmp_path / "a" / "digits-captions.beton", verify=True)
    assert meta["shape"] == [1, 8, 8] and meta["class_names"] == [str(i) for i in range(10)]
    enc = load_text_encoder(meta["text"]["encoder"])
    loader = MemmapLoader(tmp_path / "a" / "digits-captions.beton", 40, drop_last=False)
    (x, y, t, p), = list(loader)
    idx = loader.sample_indices(0)[0]
    for k in (0, 17):
        tokens, pooled, _ = enc.encode([rows[idx[k]]["caption"]])
        assert y[k] == rows[idx[k]]["label"]
        assert torch.equal(t[k], tokens[0].half()) and torch.equal(p[k], pooled[0].half())


def test_caption_agreement_reads_the_named_digit(tmp_path):
    """benchmarks/digits_caption_agreement.py: every training phrasing names its digit, and real digits
    with their own captions agree where the same images under shifted captions do not."""
    from speed_fast.data.digits import DIGIT_PHRASINGS, digits_arrays

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "digits_caption_agreement.py"
    spec = importlib.util.spec_from_file_location("digits_caption_agreement", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for d, w in enumerate(DIGIT_WORDS):
        for phrase in DIGIT_PHRASINGS:
            assert mod.named_digit(phrase.format(w=w, n=d)) == d, phrase
    assert mod.named_digit("") is None and mod.named_digit("one or two") is None
    x, y = digits_arrays()
    images = np.repeat(np.round((x[:300, 0] + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=-1)
    for shift, lo, hi in ((0, 0.9, 1.0), (3, 0.0, 0.2)):
        prompts = np.array([f"a handwritten {DIGIT_WORDS[(int(c) + shift) % 10]}" for c in y[:300]])
        np.savez(tmp_path / f"s{shift}.npz", arr_0=images, prompts=prompts)
        out = mod.main([str(tmp_path / f"s{shift}.npz")])
        assert lo <= out["agreement"] <= hi and out["samples_naming_a_digit"] == 300, out
