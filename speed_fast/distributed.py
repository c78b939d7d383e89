"""One job on one or many processes: the data commands' view of a launcher (torchrun, deepspeed).

`speed-fast sample`, `eval` and `encode` run as one process by default, or as N ranks of one job
under a launcher that sets the usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT: `torchrun --nproc_per_node N $(which speed-fast) ...` and
`deepspeed --num_gpus N $(which speed-fast) ...` both do; deepspeed also passes `--local_rank=N`,
which the CLI accepts and ignores in favour of the environment).

    with launch_job(device) as job:         # a process group only when WORLD_SIZE > 1
        job.agree(check_inputs, args)       # every rank checks; any failure fails every rank alike
        with job.output_lock(out, "sample"):   # rank 0 holds <out>.lock for the whole job
            mine = job.shard(num_chunks)    # this rank's chunks: rank, rank + world, ...
            ...
            job.barrier()

Rules that keep a job from hanging or half-failing:
* Failures that depend on the input are raised on every rank at the same point: `agree` runs a
  check on every rank and, when any rank fails, raises on all of them the lowest failing rank's
  message (JobError, a ValueError: the CLI prints it once, on rank 0, as one line; exit 2 on every
  rank); `on_main` runs work on rank 0
  only and hands its result, or its error, to every rank.
* The process group uses NCCL when the job's device is a GPU and gloo on the CPU; the rank's
  device is `cuda:LOCAL_RANK` when CUDA is chosen (`--device auto|cuda`), so one GPU per rank.
  An explicit `cuda:N` is refused in a multi-rank job (each rank takes its local GPU).
* Objects sent between ranks (`broadcast`, `all_gather`) go through gloo on the CPU even on GPUs
  (a CPU group), so they never wait on a GPU queue.
* A process that ran a rank of a multi-rank job ends with `os._exit` once `launch_job` has
  destroyed the process group and the command has returned (`speed_fast.cli.console`, the program's
  entry point; `main()` called from Python never exits). Left to the interpreter's normal exit, about
  1 two-rank CPU job in 8 aborted after writing its output (SIGABRT, "terminate called without an
  active exception": a gloo thread still running while the interpreter finalised, once diffusers or
  transformers had been imported after init_process_group: 5 of 40 two-rank CPU encodes, 4 of 10
  two-rank CLIP evaluations; 0 of 40 and 0 of 20 with os._exit). Everything a command writes is
  closed (and renamed into place) before it returns.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch

from .devices import resolve_device
from .lockfile import Locked

_FAILURES = (ValueError, OSError, Locked)


class JobError(ValueError):
    """An input error agreed by every rank of a job (`Job.agree`, `Job.on_main`, `Job.output_lock`).
    `echo` is True on the rank that should print it (rank 0), so a job of N ranks says it once."""

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    def read(name: str, default: int) -> int:
        raw = os.environ.get(name, "")
        if raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"${name}={raw!r} is not an integer (set by a launcher: torchrun, deepspeed)") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"$RANK={rank} and $WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    if local < 0:
        raise ValueError(f"$LOCAL_RANK={local} must be >= 0")
    return rank, world, local


@dataclass
class Job:
    """This process's place in a job (see the module docstring)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _cpu_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> range:
        """This rank's items of range(n), dealt round-robin: rank, rank + world, ... (disjoint, and
        together all of them, whatever n)."""
        return range(self.rank, n, self.world)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._cpu_group)

    def broadcast(self, obj=None):
        """rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._cpu_group)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def agree(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on every rank; when it fails on any rank (ValueError, OSError, a lock
        refusal), every rank raises JobError (a ValueError) with the lowest failing rank's message; rank 0 prints it."""
        try:
            result, error = fn(*args, **kwargs), None
        except _FAILURES as exc:
            result, error = None, _describe(exc)
        errors = self.all_gather(error)
        first = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if first is not None:
            rank, message = first
            raise JobError(message if rank == 0 else f"{message} (on rank {rank})", echo=self.is_main)
        return result

    def on_main(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on rank 0 only; its result (or its error, as JobError) on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except _FAILURES as exc:
                error = _describe(exc)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise JobError(error, echo=self.is_main)
        return result

    @contextlib.contextmanager
    def output_lock(self, out: str, command: str, log=None):
        """Rank 0 holds `<out>.lock` (speed_fast.lockfile.output_lock) while the job writes `out`; a
        refusal (another writer) is raised on every rank. The job's own ranks are never refused."""
        from .lockfile import output_lock

        stack = contextlib.ExitStack()
        error = None
        if self.is_main:
            try:
                stack.enter_context(_rank0_lock(output_lock, out, command, log))
            except _FAILURES as exc:
                error = _describe(exc)
        error = self.broadcast(error)
        if error is not None:
            stack.close()
            raise JobError(error, echo=self.is_main)
        with stack:
            yield


@contextlib.contextmanager
def _rank0_lock(output_lock, out, command, log):
    # output_lock skips the lock when $RANK is not 0; here only rank 0 ever calls it.
    with output_lock(out, command, log) as lock:
        yield lock


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ValueError) and exc.strerror:
        return f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    return str(exc)


_ENDED_GROUP = False  # launch_job made a process group in this process and destroyed it


def ended_a_process_group() -> bool:
    """Whether this process ran a rank of a multi-rank job whose process group launch_job made and
    has destroyed (then `speed_fast.cli.console` ends it with os._exit; module docstring)."""
    return _ENDED_GROUP


@contextlib.contextmanager
def launch_job(device: str | None = None, flag: str = "--device", timeout_s: float = 1800.0):
    """The job this process belongs to (one process without a launcher); see the module docstring.
    `device` is a --device value (None/auto: a GPU when present). The process group, when one is
    made here, is destroyed on exit."""
    global _ENDED_GROUP
    import torch.distributed as dist

    rank, world, local = launcher_env()
    if world == 1:
        yield Job(0, 1, 0, resolve_device(device, flag))
        return
    if device not in (None, "auto", "cpu", "cuda"):
        raise ValueError(f"{flag} {device!r} in a job of {world} ranks: use 'auto', 'cuda' or 'cpu' "
                         "(each rank takes the GPU of its LOCAL_RANK)")
    chosen = resolve_device(device, flag)
    if chosen.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"$LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
        chosen = torch.device("cuda", local)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": chosen} if chosen.type == "cuda" else {}))
        created = True
    cpu_group = dist.new_group(backend="gloo") if chosen.type == "cuda" else None
    if chosen.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks of one node share its cores (torch would give each rank all of them).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    try:
        yield Job(rank, world, local, chosen, cpu_group)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
            _ENDED_GROUP = True
