"""`speed-fast plan` end to end: numbers, JSON, figure, and errors."""

import json
import subprocess
import sys

import pytest

from speed_fast.cli import main


def test_plan_text_and_figure(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["plan", "--schedule", "linear", "--strategy", "speed", "--k", "5", "--tau", "700", "--lam", "0.6",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "t_acc-dec 218" in text and "tau       700" in text
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule", ["linear", "quadratic", "cosine"])
def test_plan_json(schedule, capsys):
    assert main(["plan", "--schedule", schedule, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["P"]) == len(d["w"]) == 1000
    assert sum(d["P"]) == pytest.approx(1.0)
    shares = d["areas"]
    assert sum(a["step_share"] for a in shares.values()) == pytest.approx(1.0)
    assert sum(a["mass"] for a in shares.values()) == pytest.approx(1.0)
    assert shares["acceleration"]["steps"][1] + 1 == d["t_acc_dec"] == shares["deceleration"]["steps"][0]
    assert shares["convergence"]["steps"][0] == d["tau"]
    # SpeeD moves mass out of the convergence area: k=5 leaves it 1/5 of its uniform share, renormalised.
    conv = shares["convergence"]
    T, tau = 1000, d["tau"]
    assert conv["mass"] == pytest.approx((T - tau) / (5 * tau + T - tau))


def test_plan_other_strategies(capsys):
    assert main(["plan", "--strategy", "clts", "--step", "100000", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tau_source"].startswith("SpeeD default") and d["tau"] == 700
    assert main(["plan", "--strategy", "speed", "--r", "10", "--dual", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tau"] == 477 and d["dual_m"] == 642


def test_plan_adaptive_strategy(tmp_path, capsys):
    out = tmp_path / "lm.png"
    assert main(["plan", "--strategy", "loss_moment", "--importance-weights", "--bins", "8", "--update-every", "50",
                 "--json", "--out", str(out)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["strategy"]["importance_weights"] is True and d["strategy"]["bins"] == 8
    assert d["adaptive"] == {"bins": 8, "update_every": 50, "bin_edges": [125, 250, 375, 500, 625, 750, 875],
                             "rule": "loss_moment"}
    assert d["P"] == pytest.approx([1e-3] * 1000) and d["w"] == [1.0] * 1000  # where the run starts
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plan", "--strategy", "loss_moment"]) == 0
    assert "adaptive  P(t), w(t) below are the start; every 100 steps" in capsys.readouterr().out


def test_plan_adaptive_speed_starts_as_speed_and_names_its_bounds(capsys):
    """adaptive_speed's plan is SpeeD's P(t) and w(t) (where the run starts) with the rule's bounds."""
    assert main(["plan", "--strategy", "adaptive_speed", "--k", "4", "--tau", "650", "--k-max", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert main(["plan", "--strategy", "speed", "--k", "4", "--tau", "650", "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)
    assert d["P"] == speed["P"] and d["w"] == speed["w"] and d["tau"] == 650
    assert d["adaptive"]["k_bounds"] == [1.0, 8.0] and d["adaptive"]["tau_bounds"] == [477, 829]
    assert main(["plan", "--strategy", "adaptive_speed"]) == 0
    assert "k moves in [1, 10] and tau in [477, 829]" in capsys.readouterr().out


def test_plan_errors_are_clean():
    r = subprocess.run([sys.executable, "-m", "speed_fast.cli", "plan", "--strategy", "p2", "--lam", "0.6"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown parameter" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "speed_fast.cli", "plan", "--k", "0.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "k must be" in r.stderr and "0.5" in r.stderr


@pytest.mark.parametrize("T", ["2", "100000000"])
def test_plan_T_is_bounded(T, capsys):
    assert main(["plan", "--T", T, "--tau", "1"]) == 2
    assert f"--T must be in [3, 1000000], got {T}" in capsys.readouterr().err


def test_small_T_areas_follow_tau(capsys):
    # T=10: t_acc-dec = 8 lies past tau = 5, so there is no deceleration area and t >= 5 is convergence.
    assert main(["plan", "--T", "10", "--tau", "5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["t_acc_dec"] == 8 and d["tau"] == 5
    areas = d["areas"]
    assert areas["acceleration"]["steps"] == [0, 4] and areas["deceleration"]["steps"] is None
    assert areas["convergence"]["steps"] == [5, 9]
    assert main(["plan", "--T", "3", "--tau", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["areas"]["convergence"]["steps"] == [2, 2]


def test_plan_out_is_checked_before_work(tmp_path, capsys):
    assert main(["plan", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
