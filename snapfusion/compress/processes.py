"""Several processes (``accelerate launch``): the main process decides and shares, the others follow; a stage that
does not train runs in a child of the main process with a single-process environment while the others wait."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue as queue_module
from pathlib import Path
from typing import Any, Callable

from snapfusion.compress.core import Budget, StageResult, world

WAIT = datetime.timedelta(hours=6)  # how long a process may wait for the main one (evolution, evaluation)
_LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_group() -> None:
    """Join the launcher's process group with a long timeout (the training loop's accelerate state reuses it)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=WAIT)  # the CPU flag as Accelerator reads it


def share(value: Any) -> Any:
    """The main process's ``value`` in every process (itself when alone)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _child(run: Callable, config, run_dir: Path, minutes: float, queue) -> None:
    try:
        queue.put(("ok", run(config, run_dir, Budget(minutes))))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put(("error", f"{type(err).__name__}: {err}"))
        raise


def run_alone(run: Callable, name: str, config, run_dir: Path, budget: Budget) -> StageResult | None:
    """Run the stage function ``run`` (stage ``name``) in a child of the main process, on this process's GPU alone;
    None in the other processes."""
    rank, _, local = world()
    if rank != 0:
        return None
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    saved = dict(os.environ)
    try:  # the child sees one process and this process's GPU only
        for key in [k for k in os.environ if k in _LAUNCHER_KEYS or k.startswith(("TORCHELASTIC_", "ACCELERATE_"))]:
            del os.environ[key]
        visible = saved.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local] if visible else str(local)
        child = ctx.Process(target=_child, args=(run, config, run_dir, budget.remaining_minutes(), queue))
        child.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    kind, value = "error", ""
    while not value:
        alive = child.is_alive()  # read before the queue: an item put just before the end is still found
        try:
            kind, value = queue.get(timeout=5)
        except queue_module.Empty:
            if not alive:
                value = f"the stage's process ended with exit code {child.exitcode}"
    child.join()
    if kind != "ok":
        from snapfusion.errors import SnapFusionError

        raise SnapFusionError(f"stage {name}: {value}")
    return value
