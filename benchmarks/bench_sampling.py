"""Time-step sampling benchmark: alias method (O(1) per draw) vs torch.multinomial, T = 1e3 .. 1e6.

    python benchmarks/bench_sampling.py --out sampling.json [--threads 2] [--draws 65536] [--quick]

P(t) has SpeeD's shape for every T (k = 5 below tau = 0.7 T, 1 above). For each T the alias
table is built once (speed_fast.alias, Vose), checked (its implied distribution is P, and
the cpp / triton draws equal the torch reference's bit for bit), then calls of --draws
draws (and of a 256-sample training batch) are timed round-robin against
torch.multinomial(P, n, replacement=True), which renormalises and prefix-sums all T
categories on every call, with the tables warm and cold in cache (see main). Reported: ns per
draw, and each method's growth from T = 1e3 to 1e6 (target for the alias backends: <= 1.3).
An alias draw does the same work for every T; what grows is the cost of its two table reads
once the 8 T bytes of tables outgrow the caches.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import meta, percentiles_ms, print_table, time_round_robin, write_json  # noqa: E402

from speed_fast.alias import build_alias_table, implied_probabilities  # noqa: E402
from speed_fast.ops import backend_status, sample_timesteps, sample_timesteps_ref  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draws", type=int, default=65536, help="draws per timed call")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="T up to 1e4, few rounds: a smoke test of the script")
    return p.parse_args(argv)


def speed_probs(T: int) -> torch.Tensor:
    p = torch.ones(T, dtype=torch.float64)
    p[: int(0.7 * T)] = 5.0
    return p / p.sum()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    alias_backends = []
    if backend_status("cpp")[0]:
        alias_backends.append(("cpp", "cpu"))
    if on_gpu and backend_status("triton")[0]:
        alias_backends.append(("triton", "cuda"))
    Ts = [1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000]
    iters = 3 if args.quick else args.iters
    info = meta(args.threads, {"draws_per_call": args.draws, "P": "SpeeD shape, k=5 below 0.7 T"})
    print(f"{info['machine']}, torch {info['torch']}, {args.threads} threads")
    # Every (method, T, n) is timed in one round-robin, so load from other processes drifting
    # over the run shifts all T alike and the growth ratios stay fair.
    fns, devices = {}, {}
    for T in Ts:
        p = speed_probs(T)
        prob, alias = build_alias_table(p)
        assert torch.allclose(implied_probabilities(prob, alias), p, rtol=1e-5, atol=0), "alias table != P"
        ref = sample_timesteps_ref(prob, alias, 4096, 1, 2, 3)
        for backend, device in alias_backends:
            pr, al = prob.to(device), alias.to(device)
            assert torch.equal(sample_timesteps(pr, al, 4096, seed=1, step=2, offset=3, backend=backend).cpu(), ref)
            for n in (args.draws, 256):
                fns[(backend, T, n)] = (lambda pr=pr, al=al, n=n, b=backend:
                                        sample_timesteps(pr, al, n, seed=0, step=5, backend=b))
                devices[(backend, T, n)] = device
        for device in sorted({"cpu"} | ({"cuda"} if on_gpu else set())):
            P = p.to(device=device, dtype=torch.float32)
            for n in (args.draws, 256):
                fns[(f"multinomial-{device}", T, n)] = lambda P=P, n=n: torch.multinomial(P, n, replacement=True)
                devices[(f"multinomial-{device}", T, n)] = device
    # Two cache states. "warm": each (method, T) is timed by itself, so its table stays in
    # cache between calls, as in a loop of draws. "cold": all (method, T, n) in one round-robin,
    # so the other calls evict the table first, as a training step's model does between two
    # draws of the time steps (and a slow phase of other processes shifts all variants alike).
    results = []
    for cache in ("warm", "cold"):
        for device in sorted(set(devices.values())):
            keys = [k for k in fns if devices[k] == device]
            groups = [[k for k in keys if k[:2] == m] for m in dict.fromkeys(k[:2] for k in keys)] \
                if cache == "warm" else [keys]
            for group in groups:
                times = time_round_robin({k: fns[k] for k in group}, device, warmup=3, iters=iters, max_seconds=300)
                for (name, T, n), ts in times.items():
                    row = dict(name=f"sample {name} ({cache})", backend=name, cache=cache, shape=f"T={T}, n={n}",
                               dtype="int64", T=T, draws=n, **percentiles_ms(ts), speedup_vs_eager=None)
                    row["ns_per_draw"] = row["ms_p50"] * 1e6 / n
                    results.append(row)
    # speedup_vs_eager: the alias backend against torch.multinomial on the same device, T, n, cache.
    by_key = {(r["backend"], r["cache"], r["T"], r["draws"]): r for r in results}
    for r in results:
        device = "cuda" if r["backend"] == "triton" else "cpu"
        base = by_key.get((f"multinomial-{device}", r["cache"], r["T"], r["draws"]))
        r["speedup_vs_eager"] = base["ms_p50"] / r["ms_p50"] if base else None
        r["growth_vs_smallest_T"] = r["ms_p50"] / by_key[(r["backend"], r["cache"], Ts[0], r["draws"])]["ms_p50"]
    print_table(results, [("backend", "method"), ("cache", "cache"), ("shape", "T, draws per call"),
                          ("ms_p20", "p20 ms"), ("ms_p50", "p50 ms"), ("ms_p80", "p80 ms"), ("ns_per_draw", "ns/draw"),
                          ("speedup_vs_eager", "x multinomial"), ("growth_vs_smallest_T", f"vs T={Ts[0]}")])
    for cache in ("warm", "cold"):
        for backend in sorted({r["backend"] for r in results}):
            g = [by_key[(backend, cache, Ts[-1], n)]["growth_vs_smallest_T"] for n in (args.draws, 256)]
            print(f"{backend} ({cache} cache): time per draw at T={Ts[-1]} / T={Ts[0]}: {g[0]:.2f} "
                  f"({args.draws} draws per call), {g[1]:.2f} (256 per call)")
    write_json(args.out, info, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
