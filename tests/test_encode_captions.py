"""`speed-fast encode --captions` and `speed-fast write-pixels --captions`: captioned files from a
JSON-lines or COCO caption file, with a tiny CLIP and a tiny AutoencoderKL built here (no downloads).

One record per (image, caption) pair in file order, each image encoded once, the text embeddings
round-trip exactly through both loaders, two torchrun ranks write the bytes of one process, and bad
caption files are one line and exit 2."""

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speed_fast.cli import main
from speed_fast.data import MemmapLoader, null_text, read_latent_meta
from speed_fast.text import build_tiny_clip, load_text_encoder

ROOT = Path(__file__).resolve().parents[1]
RES = 8
PAIRS = [("b.png", "the digit seven"), ("a.png", "a red cat"), ("b.png", "number 7, drawn by hand"),
         ("sub/c.png", ""), ("broken.png", "never seen"), ("a.png", "a red cat " * 30)]  # one caption too long


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("captions")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, sample_size=RES, scaling_factor=0.3).save_pretrained(root / "vae")
    build_tiny_clip(root / "clip", seed=1, width=16)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        Image.fromarray(rng.integers(0, 256, (RES + i, RES + 1, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"not a png")
    with open(root / "captions.jsonl", "w") as f:
        for image, caption in PAIRS:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
    ids = {"b.png": 11, "a.png": 5, "sub/c.png": 2, "broken.png": 40}
    coco = {"info": {}, "images": [{"id": v, "file_name": k} for k, v in ids.items()],
            "annotations": [{"id": k, "image_id": ids[p], "caption": c} for k, (p, c) in enumerate(PAIRS)]}
    (root / "captions_train.json").write_text(json.dumps(coco))
    return root


def encode(data, out, captions="captions.jsonl", *extra):
    return main(["encode", str(data / "images"), "--vae", str(data / "vae"), "--out", str(out), "--resolution",
                 str(RES), "--batch-size", "2", "--shard-size", "2", "--workers", "0", "--no-progress",
                 "--captions", str(data / captions), "--text-encoder", str(data / "clip"), *map(str, extra)])


def test_captioned_encode_holds_one_record_per_pair_with_exact_text(data, tmp_path, capsys):
    out = tmp_path / "cap.beton"
    assert encode(data, out, "captions.jsonl", "--flip") == 0
    err = capsys.readouterr().err
    assert "skipping unreadable image broken.png" in err
    assert "1 of 5 captions are longer than the text encoder's 77 tokens and were truncated" in err
    meta = read_latent_meta(out, verify=True)
    kept = [p for p in PAIRS if p[0] != "broken.png"]
    assert meta["num_samples"] == 5 and meta["num_records"] == 10 and meta["class_names"] is None
    assert meta["text"]["encoder"] == str(data / "clip") and meta["text"]["truncated"] == 1
    assert (meta["text"]["width"], meta["text"]["tokens"]) == (16, 77)
    enc = load_text_encoder(str(data / "clip"))
    tokens, pooled, _ = enc.encode([c for _, c in kept])
    null_tokens, null_pooled, _ = enc.encode([""])
    nt, np_ = null_text(meta)
    assert torch.equal(nt, null_tokens[0].half()) and torch.equal(np_, null_pooled[0].half())
    # Order of the file: labels are image indices in order of first appearance (b 0, a 1, c 2; broken was 3).
    loader = MemmapLoader(out, 5, drop_last=False, flip=True, seed=2)
    (x, y, t, p), = list(loader)
    idx = torch.from_numpy(loader.sample_indices(0)[0])
    assert y.tolist() == [[0, 1, 0, 2, 1][i] for i in idx]
    assert torch.equal(t, tokens.half()[idx]) and torch.equal(p, pooled.half()[idx])
    plain = MemmapLoader(out, 5, drop_last=False, seed=2)
    (x0, y0, _, _), = list(plain)
    same_image = [i for i in range(5) if y0[i] == y0[0]]
    assert len(same_image) == 2 and torch.equal(x0[same_image[0]], x0[same_image[1]])  # one latent per image
    # The COCO layout of the same pairs writes the same records.
    coco = tmp_path / "coco.beton"
    assert encode(data, coco, "captions_train.json", "--flip") == 0
    assert filecmp.cmp(out, coco, shallow=False)
    from speed_fast.data import LatentLoader

    ffcv = LatentLoader(out, 5, drop_last=False, flip=True, seed=2, num_workers=1)
    (fx, fy, ft, fp), = [tuple(v.clone() for v in b) for b in ffcv]
    assert torch.equal(fx.view(torch.int16), x.view(torch.int16)) and torch.equal(ft, t) and torch.equal(fp, p)


@pytest.mark.parametrize("content,message", [
    ("", "is empty; expected JSON lines"),
    ('{"image": "a.png", "caption": "x"}\n{"image": "gone.png", "caption": "y"}\n{"image": "gone2.png", "caption": "z"}\n',
     "names 2 image(s) not found under"),
    ("image,caption\na.png,hello\n", "is in neither known layout (line 1 is not a JSON object)"),
    ('{"images": [], "annotations": []}', "holds no (image, caption) pair"),
])
def test_bad_caption_files_are_one_line_and_exit_2(data, tmp_path, capsys, content, message):
    (data / "bad.txt").write_text(content)
    assert encode(data, tmp_path / "bad.beton", "bad.txt") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if "not found" in message:
        assert "the first 'gone.png'" in err
    assert not (tmp_path / "bad.beton").exists()


def test_captions_need_a_text_encoder(data, tmp_path, capsys):
    assert main(["encode", str(data / "images"), "--vae", str(data / "vae"), "--out", str(tmp_path / "x.beton"),
                 "--captions", str(data / "captions.jsonl"), "--no-progress"]) == 2
    assert "--captions and --text-encoder go together" in capsys.readouterr().err
    assert encode(data, tmp_path / "y.beton", "captions.jsonl", "--text-encoder", str(tmp_path / "nope")) == 2


def test_two_ranks_write_the_captioned_bytes_of_one(data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encode(data, tmp_path / "one.beton") == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "speed_fast.cli",
           "encode", str(data / "images"), "--vae", str(data / "vae"), "--out", str(tmp_path / "two.beton"),
           "--resolution", str(RES), "--batch-size", "2", "--shard-size", "2", "--workers", "0", "--no-progress",
           "--captions", str(data / "captions.jsonl"), "--text-encoder", str(data / "clip"), "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert filecmp.cmp(tmp_path / "one.beton", tmp_path / "two.beton", shallow=False)


def test_write_pixels_with_captions(data, tmp_path, capsys):
    out = tmp_path / "pix.beton"
    assert main(["write-pixels", str(data / "images"), "--out", str(out), "--resolution", str(RES), "--no-progress",
                 "--captions", str(data / "captions_train.json"), "--text-encoder", str(data / "clip")]) == 0
    assert "5 latents" not in capsys.readouterr().out
    meta = read_latent_meta(out, verify=True)
    assert meta["num_samples"] == 5 and meta["source"]["space"] == "pixels" and meta["shape"] == [3, RES, RES]
    enc = load_text_encoder(str(data / "clip"))
    tokens, pooled, _ = enc.encode([c for p, c in PAIRS if p != "broken.png"])
    (x, y, t, p), = list(MemmapLoader(out, 5, drop_last=False, seed=0))
    idx = torch.from_numpy(MemmapLoader(out, 5, drop_last=False, seed=0).sample_indices(0)[0])
    assert torch.equal(t, tokens.half()[idx]) and torch.equal(p, pooled.half()[idx])
    from speed_fast.data.encode import center_crop_arr

    assert sorted(y.tolist()) == [0, 0, 1, 1, 2]
    c = np.asarray(center_crop_arr(Image.open(data / "images" / "sub" / "c.png").convert("RGB"), RES))  # image 2
    want = torch.from_numpy(c.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert x.dtype == torch.float16 and torch.equal(x[y.tolist().index(2)], want.half())
    assert main(["write-pixels", str(data / "images"), "--out", str(tmp_path / "bad.beton"), "--captions",
                 str(data / "captions.jsonl"), "--text-encoder", str(data / "clip"), "--max-images", "2"]) == 2


def test_a_resumed_captioned_encode_refuses_changed_captions(data, tmp_path, capsys):
    out = tmp_path / "part.beton"
    assert encode(data, out, "captions.jsonl", "--max-images", "1") == 0
    assert not out.exists()
    (data / "changed.jsonl").write_text((data / "captions.jsonl").read_text().replace("seven", "eight"))
    assert encode(data, out, "changed.jsonl") == 2
    err = capsys.readouterr().err
    assert "holds an unfinished encode with captions (sha256 " in err, err[-600:]
    assert encode(data, out, "captions_train.json") == 0  # the same pairs from another file: it continues
    assert read_latent_meta(out)["num_samples"] == 5
