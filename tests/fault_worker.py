"""Worker for tests/test_faults.py: `python tests/fault_worker.py OUT.json BASE_RUN CASE_RUN...` (one rank).

Builds the trainer of BASE_RUN's configuration (the default preset) once, then for each CASE_RUN
(a copy of BASE_RUN whose newest checkpoint has one file replaced by a crafted pickle, with
state.json's size and SHA-256 updated to match, as an attacker who can write the run directory
would) does what a resume and `speed-fast sample` do with it: Trainer(plan, resume_from=...) and
load_for_inference with the EMA and the raw weights. The first case also goes through the real
entry point (train/main.py's main). OUT.json gets each outcome: the exception's type and message.
"""

import json
import os
import socket
import sys

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train", "configs")
TAG = "step-00000004"


def outcome(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # the test asserts on the type and message
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


def main(out: str, base: str, cases: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from speed_fast.training.checkpoint import load_for_inference
    from speed_fast.training.config import parse_args, resolve
    from speed_fast.training.main import main as train_main
    from speed_fast.training.trainer import Trainer

    cfg, _ = parse_args(["--run-dir", base, "--no-progress"], CONFIGS)
    plan = resolve(cfg, 1, CONFIGS, cuda_available=False)
    Trainer(plan, rank=0)  # process group and engine once; each case below builds its own engine from the checkpoint
    results = {}
    for case in cases:
        path = os.path.join(case, "checkpoints", TAG)
        results[case] = {
            "resume": outcome(lambda: Trainer(plan, rank=0, resume_from=path)),
            "inference_ema": outcome(lambda: load_for_inference(case, ema=True)),
            "inference_raw": outcome(lambda: load_for_inference(case, ema=False)),
        }
    results["main_rc"] = train_main(["--run-dir", cases[0], "--max-steps", "6", "--no-progress"], CONFIGS)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
