"""`speed-fast plan`: show what a time-step strategy does on a schedule (numbers + figure), and with
--model the model a run would train (speed_fast.models.registry)."""

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
    p.add_argument("--model", default=None, help="also describe this model (a train/main.py --model name other than "
                   "the custom ones): parameters, input/output, blocks")
    p.add_argument("--input-size", type=int, default=None, help="--model's input height = width (default: the data "
                   "it was made for: 8 for unet-small, else 32)")
    p.add_argument("--in-channels", type=int, default=None, help="--model's input channels (default 1 for "
                   "unet-small, 3 for unet-cifar10, else 4)")
    p.add_argument("--num-classes", type=int, default=None, help="--model's classes (default 10 for unet-small "
                   "and unet-cifar10, else 1000)")


def strategy_params(args) -> dict:
    params = {k: getattr(args, k) for k in STRATEGY_PARAMS if getattr(args, k) is not None}
    if args.dual:
        params["dual"] = True
    if args.importance_weights:
        params["importance_weights"] = True
    return params


def describe_model(args) -> dict | None:
    """The registry's description of --model on its input (None without --model)."""
    from ..models import registry

    if args.model is None:
        for flag in ("input_size", "in_channels", "num_classes"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} describes --model's input; give --model too")
        return None
    try:
        registry.family_of(args.model)
    except ValueError as exc:  # the list of known names
        raise ValueError(f"--{exc}") from None
    if args.model in (registry.DIT_CUSTOM, registry.UNET_CUSTOM):
        raise ValueError(f"--model {args.model} takes its sizes from a preset; name a model with fixed sizes "
                         f"(one of {[n for n in registry.model_names() if not n.endswith('custom')]})")
    size, channels, classes = registry.MADE_FOR.get(args.model, registry.DEFAULT_INPUT)
    fixed = dict(input_size=size if args.input_size is None else args.input_size,
                 in_channels=channels if args.in_channels is None else args.in_channels)
    if registry.family_of(args.model) == "t2i":  # conditioned on a caption of the width it was made for
        if args.num_classes is not None:
            raise ValueError(f"--num-classes {args.num_classes}: --model {args.model} is a text-to-image model "
                             "(no classes)")
        fixed["text_width"] = classes
    else:
        fixed["num_classes"] = classes if args.num_classes is None else args.num_classes
    try:
        config = registry.model_config(args.model, {}, **fixed)
    except ValueError as exc:
        raise ValueError(f"--model {args.model} on {fixed['in_channels']}x{fixed['input_size']}x{fixed['input_size']} "
                         f"inputs: {exc}") from None
    return registry.describe(args.model, config)


def run(args) -> int:
    from ..models.registry import format_description
    from ..plan import format_summary, plan_summary, plot_plan
    from ..schedule import NoiseSchedule
    from ..timesteps import make_strategy

    model = describe_model(args)
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
    if model is not None:
        summary["model"] = model
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
        if model is not None:
            print("\n" + format_description(model))
        if args.out:
            print(f"\nfigure    {args.out}")
    return 0
