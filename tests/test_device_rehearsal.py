"""The lent GPU machine's conditions, rehearsed on the CPU: scripts/gpu_smoke.sh with the Python
given in $PYTHON (not a .venv it would make), FFCV unimportable (tests/no_ffcv first on
PYTHONPATH) and a scaled-down DiT: it installs nothing, says which loader it uses, and trains and
resumes through the DeepSpeed launcher on the memmap loader."""

import json
import os
import subprocess
import sys

from ds_launch import ROOT

SMOKE = os.path.join(ROOT, "scripts", "gpu_smoke.sh")


def test_smoke_rehearsal_without_ffcv_or_installer(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "PYTHONPATH": os.path.join(ROOT, "tests", "no_ffcv"), "SMOKE_STEPS": "6", "SMOKE_MORE": "2",
           "OMP_WAIT_POLICY": "PASSIVE", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", SMOKE, "--rehearse", "--only", "setup,train,resume,sample,fid"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "install" not in r.stdout.lower(), r.stdout  # never starts scripts/install.sh
    doc = json.loads((tmp_path / "out" / "gpu_smoke.json").read_text())
    steps = {s["step"]: s for s in doc["steps"]}
    assert [s["result"] for s in doc["steps"]] == ["PASS"] * 5, doc["steps"]
    assert f"({sys.executable})" in steps["setup"]["detail"]
    assert "loader memmap (FFCV not importable)" in steps["setup"]["detail"]
    assert "checkpoint step 6, loader memmap" in steps["train"]["detail"]
    assert "resumed at step 6, continued to 8" in steps["resume"]["detail"]
    # sample: the launcher path (torchrun, one rank) to ADM's .npz, decoded by a VAE; fid: eval of that file
    assert "8 samples 16x16, DDPM-5, cfg 1.5, bf16, one rank" in steps["sample"]["detail"]
    assert "features" in steps["fid"]["detail"] and "8 + 8 images" in steps["fid"]["detail"]
    assert {"gpu_smoke.json", "results.tsv", "smoke_logs.tgz", "train_metrics.jsonl", "samples.json",
            "eval.json"} <= set(os.listdir(tmp_path / "out"))
