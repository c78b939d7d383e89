"""`speed-fast write-pixels`: folders and tar archives of class folders -> pixel .beton, exact 8-bit round trip."""

import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from speed_fast.cli import main as cli_main
from speed_fast.data import LatentLoader, read_latent_meta
from speed_fast.data.pixels import write_pixels
from speed_fast.evaluation import data_space


def make_tree(root, size=8, per_class=3, classes=("cat", "airplane", "dog")):
    """root/<class>/<i>.png with random RGB images; returns {relative path: uint8 array}."""
    rng = np.random.default_rng(0)
    images = {}
    for cls in classes:
        os.makedirs(root / cls)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            images[f"{cls}/{i}.png"] = arr
    return images


def read_all(path):
    """(x, y) of every record (in the loader's shuffled order; the tests compare as sets)."""
    n = read_latent_meta(path)["num_samples"]
    x, y = next(iter(LatentLoader(str(path), n, seed=0, num_workers=1, drop_last=False, out_dtype=torch.float32)))
    return x.clone(), y.clone()


def as_uint8(x):
    return ((x + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


def test_folder_and_tar_give_the_same_exact_pixels(tmp_path):
    tree = tmp_path / "imgs"
    images = make_tree(tree)
    tar_path = tmp_path / "imgs.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tree, arcname=".")
    metas = []
    for source, out in ((tree, tmp_path / "a.beton"), (tar_path, tmp_path / "b.beton")):
        status = write_pixels(str(source), str(out), progress=False)
        assert status["images"] == 9 and status["skipped"] == 0
        metas.append(read_latent_meta(str(out)))
    for meta in metas:
        assert meta["shape"] == [3, 8, 8] and meta["store_dtype"] == "float16"
        assert meta["class_names"] == ["airplane", "cat", "dog"] and data_space(meta) == "pixels"
    x, y = read_all(tmp_path / "a.beton")
    x2, y2 = read_all(tmp_path / "b.beton")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # Every stored image is one of the originals, bit-exact after rounding, under its class's label.
    got = as_uint8(x)
    names = ["airplane", "cat", "dog"]
    expected = {(names.index(rel.split("/")[0]), arr.tobytes()) for rel, arr in images.items()}
    assert {(int(label), img.tobytes()) for label, img in zip(y, got)} == expected


def test_unreadable_and_inconsistent_images(tmp_path, capsys):
    tree = tmp_path / "imgs"
    make_tree(tree, per_class=2)
    (tree / "cat" / "broken.png").write_bytes(b"not a png")
    status = write_pixels(str(tree), str(tmp_path / "a.beton"), progress=False, log=print)
    assert status["skipped"] == 1 and status["images"] == 6 and "broken.png" in capsys.readouterr().out
    assert read_latent_meta(str(tmp_path / "a.beton"))["source"]["skipped_files"] == ["cat/broken.png"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tree / "dog" / "big.png")
    with pytest.raises(ValueError, match="several sizes"):
        write_pixels(str(tree), str(tmp_path / "b.beton"), progress=False)
    status = write_pixels(str(tree), str(tmp_path / "b.beton"), resolution=8, progress=False)  # crops the 16x16
    assert status["images"] == 7
    Image.fromarray(np.zeros((8, 200, 3), np.uint8)).save(tree / "dog" / "wide.png")
    status = write_pixels(str(tree), str(tmp_path / "c.beton"), resolution=8, progress=False, log=print)
    assert status["skipped"] == 2 and "aspect" in capsys.readouterr().out  # never decoded at full size


def test_cli_errors_name_the_value(tmp_path, capsys):
    assert cli_main(["write-pixels", str(tmp_path / "missing"), "--out", str(tmp_path / "x.beton")]) == 2
    assert "missing" in capsys.readouterr().err
    make_tree(tmp_path / "imgs", per_class=1)
    assert cli_main(["write-pixels", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.npy")]) == 2
    assert ".beton" in capsys.readouterr().err
    assert cli_main(["write-pixels", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.beton"),
                     "--resolution", "2"]) == 2
    assert "resolution" in capsys.readouterr().err
    assert cli_main(["write-pixels", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.beton"),
                     "--no-progress"]) == 0
    assert "3 images" in capsys.readouterr().out


def test_cifar10_preset_trains_a_few_cpu_steps(tmp_path):
    """The cifar10 preset (DiT-S/2 on 32x32x3 pixels) end to end on a tiny pixel file: 2 steps, 1 process."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    make_tree(tmp_path / "imgs", size=32, per_class=2, classes=("cat", "dog"))
    beton = str(tmp_path / "px.beton")
    write_pixels(str(tmp_path / "imgs"), beton, progress=False)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(root, "train", "main.py"), "--preset", "cifar10", "--data", beton,
           "--max-steps", "2", "--global-batch", "4", "--run-dir", str(run_dir), "--eval-every", "0",
           "--sample-steps", "1", "--num-workers", "1", "--no-progress"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dit_config"]["hidden_size"] == 384 and config["dit_config"]["depth"] == 12
    assert config["dit_config"]["input_size"] == 32 and config["dit_config"]["in_channels"] == 3
    assert config["train"]["ema_warmup"] is True and config["strategy"]["dual"] is True
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert (run_dir / "samples.png").is_file()
