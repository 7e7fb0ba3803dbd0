"""What every recipe stage shares: its result, the invocation's time budget, the process layout, loop configs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapfusion.compress.settings import RecipeConfig, Train

if TYPE_CHECKING:
    from snapfusion.train.loop import LoopConfig


@dataclass(frozen=True)
class StageResult:
    """What a stage made: ``done``, or ``partial`` (stopped at a checkpoint by the time budget; rerun to go on)."""

    status: str                                    # "done" or "partial"
    outputs: dict[str, str] = field(default_factory=dict)   # name -> path of a file or folder in the run folder
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""                                 # one line for the log, e.g. "step 120 of 600"


class Budget:
    """The invocation's wall-time limit (``--max-minutes``); 0 minutes: none."""

    def __init__(self, minutes: float, start: float | None = None):
        self.minutes = minutes
        self.deadline = (start or time.time()) + minutes * 60 if minutes > 0 else None

    def remaining_minutes(self) -> float:
        """Minutes left, for a loop's ``max_minutes`` (0.0: no limit; never 0 while limited)."""
        if self.deadline is None:
            return 0.0
        return max((self.deadline - time.time()) / 60, 1e-3)

    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def world() -> tuple[int, int, int]:
    """(rank, number of processes, local rank) of this process, from the launcher's environment."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def teacher_dir(config: RecipeConfig) -> Path:
    """The teacher pipeline's folder ('base' is the embedded one)."""
    from snapfusion.loading import model_folder

    return model_folder(config.teacher)


def teacher_part(config: RecipeConfig, part: str) -> Path:
    """A part folder of the teacher pipeline (text_encoder, unet, vae_encoder, vae_decoder)."""
    from snapfusion.pipeline import part_folder

    return part_folder(teacher_dir(config), part)


def prompt_source(config: RecipeConfig) -> str | None:
    """Where the prompt-only stages read their prompts: ``prompts``, else the image folder's captions, else None
    (the scenes')."""
    return config.prompts or config.data_folder


def data_inputs(config: RecipeConfig, *, prompts: bool = False) -> dict[str, Path]:
    """The user's data a stage reads, hashed into the manifest: the image folder's metadata.jsonl (``prompts``: the
    prompt file, or the metadata.jsonl of the folder it names, instead)."""
    source = prompt_source(config) if prompts else config.data_folder
    if not source:
        return {}
    path = Path(source)
    return {"prompts" if prompts else "data": path / "metadata.jsonl" if path.is_dir() else path}


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / name


def device_of(config: RecipeConfig) -> str:
    """The device of this process: ``config.device`` ('auto': CUDA if any), the local GPU when several processes."""
    from snapfusion.loading import resolve_device

    device = resolve_device(config.device, option="--device")
    _, n, local = world()
    return f"cuda:{local}" if device == "cuda" and n > 1 else device


def loop_config(config: RecipeConfig, run_dir: Path, train: Train, budget: Budget, *, seed: int = 0) -> LoopConfig:
    """The loop settings of one training stage; each process gets its share of the global batch."""
    from snapfusion.train.loop import LoopConfig

    c = config.scale.common
    _, n, _ = world()
    return LoopConfig(run_dir=str(run_dir), max_steps=train.steps, batch_size=max(1, train.batch // n), lr=train.lr,
                      warmup_steps=train.warmup, ema_decay=train.ema, mixed_precision=c.mixed_precision,
                      log_every=c.log_every, sample_every=0, checkpoint_every=c.checkpoint_every,
                      max_minutes=budget.remaining_minutes(), seed=seed, num_workers=c.num_workers)


def resuming(run_dir: Path) -> bool:
    """True when a training run folder holds a checkpoint to continue from."""
    from snapfusion.train import state as ckpt_io

    return run_dir.is_dir() and ckpt_io.latest_checkpoint(run_dir) is not None


def training_result(run_dir: Path, train: Train, outputs: dict[str, str]) -> StageResult:
    """A training stage's result: done at its last step, else partial (stopped by the budget at a checkpoint);
    metrics: the step and the last logged losses."""
    import json

    from snapfusion.train.state import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    step = int(ckpt.name.split("_")[-1]) if ckpt is not None else 0
    log = run_dir / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    last = {k: v for k, v in (json.loads(lines[-1]) if lines else {}).items() if isinstance(v, (int, float))}
    status = "done" if step >= train.steps else "partial"
    return StageResult(status, outputs if status == "done" else {}, {**last, "step": step},
                       f"step {step} of {train.steps}")


def gpu_count(device: str) -> int:
    """GPUs held by the invocation: every process's when on CUDA, else 0."""
    return world()[1] if device.startswith("cuda") else 0
