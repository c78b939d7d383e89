"""`speed-fast plan`: show what a time-step strategy does on a schedule (numbers + figure)."""

from __future__ import annotations

import json
import os

from ..timesteps import STRATEGIES, STRATEGY_PARAMS

# The plan needs a finite-difference rate over T - 1 increments (T >= 3) and works in O(T) float64
# arrays plus a T-point figure; past 10^6 steps it stops being a quick look (T = 10^8 took 75 s).
T_RANGE = (3, 1_000_000)

HELP = "print tau, t_acc-dec and per-area shares for a schedule + strategy, and plot them"


def add_arguments(p) -> None:
    p.add_argument("--schedule", default="linear", choices=["linear", "quadratic", "cosine"])
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--beta-start", type=float, default=None, help="linear/quadratic only (default 1e-4)")
    p.add_argument("--beta-end", type=float, default=None, help="linear/quadratic only (default 0.02)")
    p.add_argument("--strategy", default="speed", choices=STRATEGIES)
    for name, typ in STRATEGY_PARAMS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"strategy parameter {name} (only for strategies that have it)")
    p.add_argument("--dual", action="store_true", help="speed: the reference code's paired draws")
    p.add_argument("--importance-weights", action="store_true", help="loss_moment: w = 1 / (T P(t))")
    p.add_argument("--step", type=int, default=0, help="training step at which to evaluate P(t) (clts)")
    p.add_argument("--out", default=None, help="write the figure (PNG) here")
    p.add_argument("--json", action="store_true", help="print the numbers (and P, w arrays) as JSON")


def strategy_params(args) -> dict:
    params = {k: getattr(args, k) for k in STRATEGY_PARAMS if getattr(args, k) is not None}
    if args.dual:
        params["dual"] = True
    if args.importance_weights:
        params["importance_weights"] = True
    return params


def run(args) -> int:
    from ..plan import format_summary, plan_summary, plot_plan
    from ..schedule import NoiseSchedule
    from ..timesteps import make_strategy

    if not T_RANGE[0] <= args.T <= T_RANGE[1]:
        raise ValueError(f"--T must be in [{T_RANGE[0]}, {T_RANGE[1]}], got {args.T}")
    if args.out:
        from .common import check_output

        check_output(args.out, "--out", (".png",))
    schedule = NoiseSchedule.make(args.schedule, T=args.T, beta_start=args.beta_start, beta_end=args.beta_end)
    strategy = make_strategy(args.strategy, schedule, **strategy_params(args))
    summary = plan_summary(schedule, strategy, step=args.step)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        plot_plan(schedule, strategy, summary, args.out)
        summary["figure"] = args.out
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        if args.out:
            print(f"\nfigure    {args.out}")
    return 0
