"""The one training loop: any ``Task``, one GPU or many (accelerate / DDP), EMA, logs, samples, resumable.

Resume is exact: the data stream is indexed by global sample number (step * global batch + rank offset), and the
model, EMA, optimizer and RNG states are restored from the last atomic checkpoint. ``max_minutes`` ends a run
cleanly with a checkpoint, so long trainings run as a chain of short chunks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from snapfusion.config import format_config, save_json, to_dict
from snapfusion.errors import SnapFusionError
from snapfusion.train import state as ckpt_io


@dataclass(frozen=True)
class LoopConfig:
    run_dir: str
    max_steps: int
    batch_size: int                      # per process
    lr: float = 1e-4
    weight_decay: float = 0.01           # AdamW, as SnapFusion §5
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200              # linear warm-up, then constant
    grad_clip: float = 1.0
    ema_decay: float = 0.999             # 0 disables EMA
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_minutes: float = 0.0             # > 0: stop with a checkpoint after this much wall time (chunked runs)
    seed: int = 0
    num_workers: int = 4
    compile: bool = False                # torch.compile the trained module's forward in place (GPU speed; the
                                         # first steps pay the compile time; weights and checkpoints unchanged)


class Task(Protocol):
    """What a training stage supplies to the loop (e.g. train/unet.py, distill/tasks.py, decoder/task.py)."""

    name: str
    # optional ``compiles = True``: the loss calls the trained module itself with one fixed graph, so --compile can
    # compile it in place (not: modules used through their methods, or random block skips that change the graph)

    def build(self) -> nn.Module: ...                      # the trainable module (ModuleDict if several)
    def dataset(self) -> Dataset: ...                      # map-style, procedurally indexed by sample number
    def collate(self, items: list) -> Any: ...
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...
    def save(self, model: nn.Module, folder: Path) -> None: ...   # save_pretrained of the unwrapped module
    def load(self, model: nn.Module, folder: Path) -> None: ...
    def sample_grid(self, model: nn.Module, path: Path) -> None: ...
    def describe(self) -> dict: ...                        # JSON-ready description, saved with the run


class _StreamSampler(Sampler[list[int]]):
    """Batches of global sample indices for one rank, starting at ``start_step``; infinite."""

    def __init__(self, batch_size: int, rank: int, world: int, start_step: int):
        self.batch_size, self.rank, self.world, self.start_step = batch_size, rank, world, start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            base = (step * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))
            step += 1


class _Stop:
    """Turns SIGTERM/SIGINT into a clean stop with a checkpoint: at the end of the current step in one process,
    at the next multiple of STOP_SYNC_EVERY steps under DDP (where the processes agree on it)."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "_Stop":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: give up at once; the last checkpoint is intact
            sys.exit(128 + signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        ema_params = list(ema.parameters())
        params = [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters())]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused launch instead of one per tensor
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


STOP_SYNC_EVERY = 10  # steps between the processes' agreement on a stop request or --max-minutes (DDP)


def train(cfg: LoopConfig, task: Task, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) ``task`` under ``cfg``; returns the final state (step, last losses)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(cfg.run_dir)
    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    main = acc.is_main_process
    existing = ckpt_io.latest_checkpoint(run_dir) if run_dir.exists() else None
    if existing is not None and not resume:
        raise SnapFusionError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or pick a new run dir")
    set_seed(cfg.seed + acc.process_index)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast: TF32 on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True
    model = task.build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).float().requires_grad_(False) if cfg.ema_decay > 0 else None
    step, history = 0, {}
    if existing is not None:
        task.load(model, existing / "model")
        if ema is not None and (existing / "ema").is_dir():
            task.load(ema, existing / "ema")
        history = ckpt_io.read_checkpoint_state(existing, opt)
        step = history["step"]
    if cfg.compile:
        if not getattr(task, "compiles", False):
            raise SnapFusionError(f"--compile: the {task.name} stage does not support it (its loss does not call the "
                                  "trained network through one fixed graph); run it without --compile")
        model.compile()  # in place, after the EMA copy: parameter names and checkpoint keys stay the same
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json({"loop": to_dict(cfg), "task": task.describe()}, run_dir / "run_config.json")
        print(f"[{task.name}] loop config:\n{format_config(cfg)}", flush=True)
        print(f"[{task.name}] task: {json.dumps(task.describe())}", flush=True)
        print(f"[{task.name}] {'resuming at step ' + str(step) if step else 'starting'}; "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; {acc.num_processes} process(es)", flush=True)
    loader = DataLoader(task.dataset(), batch_sampler=_StreamSampler(cfg.batch_size, acc.process_index,
                        acc.num_processes, step), collate_fn=task.collate, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers else None,
                        pin_memory=torch.cuda.is_available())
    model, opt = acc.prepare(model, opt)
    if ema is not None:
        ema.to(acc.device)
    unwrapped = acc.unwrap_model(model)
    gen = torch.Generator(device=acc.device)
    logger = _Logger(run_dir, main)
    t_start, t_last, n_seen = time.time(), time.time(), 0
    stop_reason = "max_steps"

    def save(at: int) -> None:
        def save_models(folder: Path) -> None:
            task.save(unwrapped, folder / "model")
            if ema is not None:
                task.save(ema, folder / "ema")
        if main:
            ckpt_io.write_checkpoint(run_dir, at, save_models, opt, {"history": history.get("history", [])[-50:]},
                                     keep=cfg.keep_checkpoints)
        acc.wait_for_everyone()

    progress = _progress(main, cfg.max_steps, step, task.name)
    with _Stop() as stopper:
        for batch in loader:
            if step >= cfg.max_steps:
                break
            gen.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + acc.process_index)  # noise depends on step only
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            with acc.autocast():
                per_sample, logs = task.loss(model, batch, gen)  # logs: floats or 0-d tensors, read only when logged
                loss = per_sample.mean()
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                _ema_update(ema, unwrapped, cfg.ema_decay)
            step += 1
            n_seen += cfg.batch_size * acc.num_processes
            progress.update(1)
            timed_out = cfg.max_minutes > 0 and (time.time() - t_start) / 60 >= cfg.max_minutes
            # Under DDP the processes agree on stopping through an all-reduce, a host sync: only every few steps
            stop_now = (_any_process(acc, stopper.requested or timed_out)
                        if acc.num_processes == 1 or step % STOP_SYNC_EVERY == 0 else False)
            checkpoint_now = step % cfg.checkpoint_every == 0 or stop_now or step == cfg.max_steps
            logging_now = step % cfg.log_every == 0 or step == cfg.max_steps
            if (checkpoint_now or logging_now) and not torch.isfinite(loss):  # a sync: only when needed
                raise SnapFusionError(f"[{task.name}] loss is {loss.item()} at step {step}; last checkpoint kept")
            if logging_now:
                now = time.time()
                record = {"step": step, "loss": acc.gather(loss.detach()[None]).mean().item(), "lr": lr,
                          "samples_per_s": n_seen / max(now - t_last, 1e-9),
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          **{k: float(v) for k, v in logs.items()}}
                history.setdefault("history", []).append(record)
                logger.log(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                t_last, n_seen = now, 0
            if main and cfg.sample_every and step % cfg.sample_every == 0:
                with _eager(cfg.compile):  # without EMA the grid runs the compiled module: no recompiles for it
                    task.sample_grid(ema if ema is not None else unwrapped,
                                     run_dir / "samples" / f"step_{step:07d}.png")
            if checkpoint_now:
                save(step)
            if stop_now:
                stop_reason = "signal" if stopper.requested else "max_minutes"
                break
    progress.close()
    logger.close()
    if main:
        print(f"[{task.name}] stopped at step {step} ({stop_reason}); checkpoint in {run_dir}", flush=True)
    return {"step": step, "stop_reason": stop_reason, "history": history.get("history", []), "is_main": main}


def _eager(compiled: bool):
    """A context running compiled modules eagerly (torch >= 2.6), or nothing."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def is_main_process() -> bool:
    """True in the process that writes files (rank 0 under accelerate/torchrun, or a single process)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _any_process(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def _progress(main: bool, total: int, initial: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, disable=not main, mininterval=5, dynamic_ncols=True)


class _Logger:
    """jsonl metrics, plus TensorBoard when the tensorboard package is installed."""

    def __init__(self, run_dir: Path, main: bool):
        self.main = main
        self.tb = None
        if not main:
            return
        self.file = (run_dir / "metrics.jsonl").open("a")
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def loop_config(**kwargs) -> LoopConfig:
    """A ``LoopConfig`` from keyword arguments, ignoring None values (CLI convenience)."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    return LoopConfig(**{k: v for k, v in kwargs.items() if k in names and v is not None})
