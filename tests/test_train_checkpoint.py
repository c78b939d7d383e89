"""Checkpoint files without a training job: publication through `save` (a stand-in engine that
writes DeepSpeed-like files), verification and walk-back over every way a checkpoint gets
damaged, RNG states that load with weights_only=True, and refusal of files that would run code."""

import json
import os
import random

import numpy as np
import pytest
import torch

from damage import flip_byte, truncate
from speed_fast.training import checkpoint as ckpt


class FakeEngine:
    """What `checkpoint.save` needs of a DeepSpeed engine: save_checkpoint writing per-rank files."""

    def save_checkpoint(self, root, tag, save_latest):
        d = os.path.join(root, tag)
        os.makedirs(d, exist_ok=True)
        torch.save({"module": {"w": torch.arange(4.0)}}, os.path.join(d, "mp_rank_00_model_states.pt"))
        torch.save({"optimizer_state_dict": {"exp_avg": torch.ones(3)}},
                   os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def _save(root, step, keep=5):
    state = {"step": step, "micro_step": 2 * step, "skipped_steps": 0, "nonfinite_streak": 0,
             "loader": {"epoch": 0, "batch": step}, "world_size": 1}
    return ckpt.save(FakeEngine(), root, step, state, {"w": torch.full((2,), float(step))},
                     {"w": torch.zeros(2)}, rank=0, barrier=lambda: None, keep=keep)


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "checkpoints")
    for step in (10, 20, 30):
        _save(r, step)
    return r


def test_state_lists_every_file_with_size_and_hash(root):
    state = ckpt.verify(os.path.join(root, "step-00000030"))
    assert sorted(state["files"]) == ["ema.pt", "model.pt", "mp_rank_00_model_states.pt", "rng-rank0.pt",
                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    for name, entry in state["files"].items():
        assert entry == ckpt.describe_file(os.path.join(root, "step-00000030", name))
    assert open(os.path.join(root, ckpt.LATEST)).read().strip() == "step-00000030"
    assert ckpt.find_resumable(root) == (os.path.join(root, "step-00000030"), state, [])
    assert ckpt.find_resumable(os.path.join(root, "missing")) == (None, None, [])


def _edit_state(fn):
    def damage(p):
        with open(p) as f:
            state = json.load(f)
        fn(state)
        with open(p, "w") as f:
            json.dump(state, f)
    return damage


@pytest.mark.parametrize("name, damage, reason", [
    ("model.pt", truncate, "model.pt is "),
    ("mp_rank_00_model_states.pt", flip_byte, "does not match its SHA-256"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", os.remove, "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
    ("rng-rank0.pt", flip_byte, "rng-rank0.pt does not match"),
    ("ema.pt", truncate, "ema.pt is "),
    ("state.json", os.remove, "state.json is missing"),
    ("state.json", lambda p: open(p, "wb").write(b"\xff\xfe{"), "UnicodeDecodeError"),
    ("state.json", lambda p: open(p, "w").write('{"step": 30,'), "JSONDecodeError"),
    ("state.json", lambda p: open(p, "w").write("[1, 2]"), "holds list, expected a JSON object"),
    ("state.json", _edit_state(lambda s: s.pop("world_size")), "lacks ['world_size']"),
    ("state.json", _edit_state(lambda s: s.pop("files")), "without a file list"),
    ("state.json", _edit_state(lambda s: s.update(step=31)), "says step 31, but the directory is step-00000030"),
    ("state.json", _edit_state(lambda s: s.update(world_size=2)), "rng-rank1.pt is not in state.json's file list"),
    ("state.json", _edit_state(lambda s: s["files"].update({"model.pt": 5})), "entry for model.pt is 5"),
])
def test_damaged_newest_checkpoint_is_skipped_with_the_reason(root, name, damage, reason):
    damage(os.path.join(root, "step-00000030", name))
    path, state, skipped = ckpt.find_resumable(root)
    assert path == os.path.join(root, "step-00000020") and state["step"] == 20
    assert [tag for tag, _ in skipped] == ["step-00000030"]
    assert reason in skipped[0][1], skipped[0][1]


def test_walk_back_over_several_and_to_nothing(root):
    truncate(os.path.join(root, "step-00000030", "model.pt"))
    os.remove(os.path.join(root, "step-00000020", "state.json"))
    path, state, skipped = ckpt.find_resumable(root)
    assert path.endswith("step-00000010") and [t for t, _ in skipped] == ["step-00000030", "step-00000020"]
    os.remove(os.path.join(root, "step-00000010", "ema.pt"))
    assert ckpt.find_resumable(root)[:2] == (None, None)


def test_interrupted_saves_are_ignored_and_removed(root):
    os.makedirs(os.path.join(root, ckpt.TMP_PREFIX + ckpt.tag_for(40)))  # killed while ranks were writing
    os.makedirs(os.path.join(root, ckpt.tag_for(50)))  # a final name without state.json: skipped, reported
    path, _, skipped = ckpt.find_resumable(root)
    assert path.endswith("step-00000030") and skipped[0][0] == "step-00000050"
    ckpt.remove_stale(root)
    assert not os.path.exists(os.path.join(root, ckpt.TMP_PREFIX + ckpt.tag_for(40)))


def test_rotation_keeps_newer_leftovers_and_the_new_checkpoint(root):
    # Resume walked back from a damaged step 30 to step 20; the run then saves step 25 with keep=1:
    # the new checkpoint must survive (and the newer leftover is not the rotation's to delete).
    truncate(os.path.join(root, "step-00000030", "model.pt"))
    _save(root, 25, keep=1)
    assert ckpt.checkpoint_tags(root) == ["step-00000025", "step-00000030"]
    assert ckpt.find_resumable(root)[0].endswith("step-00000025")


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = ckpt.rng_state()
    want = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random(), random.gauss(0, 1))
    torch.save(state, tmp_path / "rng.pt")
    ckpt.set_rng_state(ckpt.safe_load(str(tmp_path / "rng.pt")))
    got = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    assert want[3:] == got[3:]
    with pytest.raises(ckpt.CheckpointError, match="not an RNG state written by this trainer"):
        ckpt.set_rng_state({"torch": torch.get_rng_state()}, where="x.pt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_file_that_would_run_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "ran"
    evil = str(tmp_path / "rng-rank0.pt")
    torch.save({"torch": _RunsCode(marker)}, evil, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ckpt.UnsafeCheckpointError) as err:
        ckpt.safe_load(evil, allowed=ckpt.deepspeed_safe_globals())
    assert evil in str(err.value) and "posix.system" in str(err.value) and "nothing in it was run" in str(err.value)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint file") as err:
        ckpt.safe_load(str(tmp_path / "junk.pt"))
    assert not isinstance(err.value, ckpt.UnsafeCheckpointError)
    torch.load(evil, weights_only=False)  # the control: this file really runs code when unpickled freely
    assert marker.exists()
