"""What a strategy does to a schedule: area boundaries, area shares, and a figure
in the spirit of the paper's Fig. 1-3 (used by `speed-fast plan`)."""

from __future__ import annotations

import textwrap

import numpy as np

from . import theory
from .schedule import NoiseSchedule
from .timesteps import TimestepStrategy


def plan_summary(schedule: NoiseSchedule, strategy: TimestepStrategy, step: int = 0) -> dict:
    """Numbers for one (schedule, strategy): tau, t_acc-dec, per-area step and mass shares,
    and the P(t), w(t) arrays."""
    peak, tau = theory.area_boundaries(schedule, strategy.area_tau())
    areas = theory.area_index(schedule, tau).numpy()
    p = strategy.probs(step).numpy()
    w = strategy.weights.numpy()
    T = schedule.T
    shares = {}
    for i, name in enumerate(theory.AREAS):
        mask = areas == i
        shares[name] = {
            "steps": [int(np.argmax(mask)), int(T - 1 - np.argmax(mask[::-1]))] if mask.any() else None,
            "step_share": float(mask.mean()),
            "mass": float(p[mask].sum()),
            "mean_weight": float(w[mask].mean()) if mask.any() else None,
            # Expected share of the weighted loss budget, sum_t P(t) w(t) over the area.
            "weighted_mass": float((p * w)[mask].sum() / (p * w).sum()),
        }
    out = {
        "schedule": schedule.describe(),
        "strategy": strategy.describe(),
        "step": step,
        "tau": int(tau),
        "tau_source": "strategy" if strategy.tau is not None else "SpeeD default for this schedule",
        "t_acc_dec": int(peak),
        "areas": shares,
        "P": p.tolist(),
        "w": w.tolist(),
    }
    if schedule.kind == "linear":
        out["t_acc_dec_bound"] = theory.acceleration_peak_bound(schedule)
        out["tau_closed_form_r140"] = theory.tau_from_magnitude(
            schedule.T, schedule.beta_start, schedule.beta_end, theory.DEFAULT_MAGNITUDE)
    if getattr(strategy, "dual", False):
        out["dual_m"] = strategy.dual_m
    if strategy.adaptive:
        # P and w above are where the run starts; the run moves them (docs/CONTRACT.md).
        out["adaptive"] = {"bins": strategy.bins, "update_every": strategy.update_every,
                           "bin_edges": [int(e) for e in np.flatnonzero(np.diff(strategy.bin_of.numpy())) + 1]}
        if strategy.name == "adaptive_speed":
            out["adaptive"].update(rule="adaptive_speed", history=strategy.history, k_bounds=[strategy.k_min, strategy.k_max],
                                   tau_bounds=[strategy.tau_min, strategy.tau_max], magnitude=strategy.magnitude)
        else:
            out["adaptive"]["rule"] = "loss_moment"
    return out


def format_summary(summary: dict) -> str:
    s, st = summary["schedule"], summary["strategy"]
    lines = [
        f"schedule  {s['kind']}  T={s['T']}" + (f"  beta {s['beta_start']}..{s['beta_end']}" if s["beta_start"] else ""),
        f"strategy  {st['name']}  " + "  ".join(f"{k}={v}" for k, v in st.items() if k != "name"),
        f"t_acc-dec {summary['t_acc_dec']}   (argmax d/dt Psi_t)",
        f"tau       {summary['tau']}   ({summary['tau_source']})",
    ]
    if "dual_m" in summary:
        lines.append(f"dual m    {summary['dual_m']}")
    if "adaptive" in summary:
        a = summary["adaptive"]
        if a["rule"] == "adaptive_speed":
            lines.append(f"adaptive  P(t), w(t) below are the start; every {a['update_every']} steps k moves in "
                         f"[{a['k_bounds'][0]:g}, {a['k_bounds'][1]:g}] and tau in [{a['tau_bounds'][0]}, "
                         f"{a['tau_bounds'][1]}] with the per-bin losses of the last {a['history']} windows "
                         f"({a['bins']} bins, tail magnitude r = {a['magnitude']:g})")
        else:
            lines.append(f"adaptive  P(t), w(t) below are the start; every {a['update_every']} steps P follows the "
                         f"run's RMS loss per bin ({a['bins']} bins)")
    lines.append("")
    lines.append(f"{'area':<14}{'steps':>12}{'share of T':>12}{'P mass':>10}{'mean w':>10}{'P*w share':>11}")
    for name, a in summary["areas"].items():
        span = f"{a['steps'][0]}-{a['steps'][1]}" if a["steps"] else "-"
        mw = f"{a['mean_weight']:.3f}" if a["mean_weight"] is not None else "-"
        lines.append(f"{name:<14}{span:>12}{a['step_share']:>12.3f}{a['mass']:>10.3f}{mw:>10}{a['weighted_mass']:>11.3f}")
    return "\n".join(lines)


def plot_plan(schedule: NoiseSchedule, strategy: TimestepStrategy, summary: dict, path: str) -> None:
    """Four panels: increment mean/variance with the areas, d/dt Psi_t, P(t) and w(t) vs uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = schedule.T
    t = np.arange(T)
    peak, tau = summary["t_acc_dec"], summary["tau"]
    phi = theory.increment_mean_coef(schedule)
    psi = theory.increment_variance(schedule)
    colors = {"acceleration": "#f4a582", "deceleration": "#92c5de", "convergence": "#d9d9d9"}
    edge = min(peak, tau)  # small T can put t_acc-dec past tau: no deceleration area then
    bounds = {"acceleration": (0, edge), "deceleration": (edge, tau), "convergence": (tau, T)}

    def shade(ax):
        for name, (a, b) in bounds.items():
            if b > a:
                ax.axvspan(a, b, color=colors[name], alpha=0.35, lw=0, label=name)
        ax.axvline(peak, color="k", ls=":", lw=1)
        ax.axvline(tau, color="k", ls="--", lw=1)
        ax.set_xlim(0, T - 1)
        ax.set_xlabel("time step t")

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    shade(ax)
    ax.plot(t[:-1], psi, color="C3", label=r"variance $\Psi_t$")
    ax.plot(t[:-1], np.abs(phi) / np.abs(phi).max(), color="C0", label=r"$|\phi_t|$ (normalised)")
    if schedule.kind == "linear":
        b = theory.increment_bounds(schedule)
        ax.plot(t, b["var_lower"], color="C3", ls="--", lw=1, label=r"Thm 1 lower bound of $\Psi_t$")
    ax.set_title(f"Process increment, {schedule.kind} schedule (Thm 1)")
    ax.legend(fontsize=7, loc="center right")

    ax = axes[0, 1]
    shade(ax)
    ax.plot(t[:-1], np.gradient(psi), color="C3", label=r"$\partial_t \Psi_t$")
    ax.annotate(f"t_acc-dec = {peak}", (peak, np.gradient(psi)[peak]), textcoords="offset points", xytext=(8, -4),
                fontsize=8)
    ax.set_title("Rate of change of the increment variance")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    shade(ax)
    p = np.asarray(summary["P"])
    ax.plot(t, p, color="C2", label=f"P(t), {strategy.name}")
    ax.plot(t, np.full(T, 1.0 / T), color="k", lw=1, label="uniform")
    ax.set_ylim(0, p.max() * 1.15)
    ax.set_title("Sampling distribution")
    if "adaptive" in summary:  # the bins whose losses move P during the run
        for e in summary["adaptive"]["bin_edges"]:
            ax.axvline(e, color="C2", lw=0.5, alpha=0.5)
        ax.set_title(f"Sampling distribution at the start (adapts every {summary['adaptive']['update_every']} "
                     f"steps, per bin)")
        if "tau_bounds" in summary["adaptive"]:
            lo, hi = summary["adaptive"]["tau_bounds"]
            ax.axvspan(lo, hi, fill=False, hatch="//", edgecolor="C2", lw=0, alpha=0.4, label="tau's range")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    shade(ax)
    w = np.asarray(summary["w"])
    ax.plot(t, w, color="C4", label=f"w(t), {strategy.name}")
    ax.plot(t, np.ones(T), color="k", lw=1, label="uniform")
    ax.set_title("Loss weight at the start (moves with the adaptation)" if "adaptive" in summary else "Loss weight")
    ax.legend(fontsize=7)

    fig.suptitle(textwrap.fill(f"{strategy!r}: t_acc-dec={peak}, tau={tau}", 160), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
