"""Checkpoint discovery: only complete checkpoints are resumed from, whatever moment a save was interrupted at."""

import os

from speed_fast.training.checkpoint import LATEST, STATE_FILE, TMP_PREFIX, find_latest, remove_stale, tag_for


def _complete(root, step):
    d = os.path.join(root, tag_for(step))
    os.makedirs(d)
    for name in ("model.pt", STATE_FILE):
        with open(os.path.join(d, name), "w") as f:
            f.write("x")
    return d


def _latest(root, step):
    with open(os.path.join(root, LATEST), "w") as f:
        f.write(tag_for(step) + "\n")


def test_no_checkpoint(tmp_path):
    assert find_latest(str(tmp_path / "missing")) is None
    assert find_latest(str(tmp_path)) is None


def test_latest_pointer_is_followed(tmp_path):
    root = str(tmp_path)
    _complete(root, 10)
    b = _complete(root, 20)
    _latest(root, 20)
    assert find_latest(root) == b


def test_interrupted_saves_are_ignored_and_removed(tmp_path):
    root = str(tmp_path)
    a = _complete(root, 10)
    _latest(root, 10)
    # killed while every rank was writing: only the temporary directory exists
    os.makedirs(os.path.join(root, TMP_PREFIX + tag_for(20)))
    # a directory with the final name but no state.json (never produced by save(), but not trusted either)
    os.makedirs(os.path.join(root, tag_for(30)))
    assert find_latest(root) == a
    remove_stale(root)
    assert not os.path.exists(os.path.join(root, TMP_PREFIX + tag_for(20)))


def test_killed_between_rename_and_pointer_update(tmp_path):
    root = str(tmp_path)
    _complete(root, 10)
    _latest(root, 10)
    b = _complete(root, 20)  # renamed into place, `latest` not yet replaced
    assert find_latest(root) == b


def test_stale_pointer_to_a_deleted_checkpoint(tmp_path):
    root = str(tmp_path)
    a = _complete(root, 10)
    _latest(root, 40)
    assert find_latest(root) == a
