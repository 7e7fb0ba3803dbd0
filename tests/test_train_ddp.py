"""The training loop under DDP: two CPU processes (gloo) through torchrun, as `accelerate launch` runs it on GPUs."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT

from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
from snapfusion.models.text import TextEncoder, save_text_encoder
from snapfusion.models.unet_config import tiny_sd15
from snapfusion.train.loop import _StreamSampler
from snapfusion.train.data import LatentPool
from snapfusion.train.unet import UNetTask, UNetTaskConfig

SCRIPT = Path(__file__).parent / "helpers" / "ddp_train.py"
POOL_SCRIPT = Path(__file__).parent / "helpers" / "ddp_pool.py"


def test_stream_sampler_splits_the_global_batch_across_ranks():
    world, batch = 3, 4
    first = [next(iter(_StreamSampler(batch, r, world, start_step=5))) for r in range(world)]
    flat = sorted(i for b in first for i in b)
    assert flat == list(range(5 * world * batch, 6 * world * batch))  # disjoint, contiguous: one global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, steps: int, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPT), str(run_dir), str(steps), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_process_run_checkpoints_once_and_resumes(tmp_path):
    out = _torchrun(tmp_path, 3)
    assert "2 process(es)" in out
    assert out.count("RESULT") == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003"]
    out = _torchrun(tmp_path, 5, "resume")
    assert "resuming at step 3" in out
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 5
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # the main process alone logs, once per step


POOL_UNET = dataclasses.replace(tiny_sd15(), context_dim=32)


@pytest.mark.slow
@pytest.mark.parametrize("count", [5, 6])
def test_a_latent_pool_built_by_two_processes_is_the_whole_pool_in_each(tmp_path, count):
    """Under DDP each process encodes its share of the pooled scenes and gathers the rest: every process ends with
    the pool a single process builds (an odd count too: the last share is shorter)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    save_autoencoder(tmp_path / "vae", AutoencoderKL(AutoencoderConfig.tiny()))
    save_text_encoder(tmp_path / "text", TextEncoder(TINY_TEXT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(POOL_SCRIPT), str(tmp_path), str(tmp_path), str(count)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = UNetTask(UNetTaskConfig(model=POOL_UNET, vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "text"),
                                   image_size=32, latent_pool=count, pool_workers=0))
    alone = LatentPool(task.data.encoder, task.cfg, torch.device("cpu"))
    assert alone.mean.shape == (count, 4, 4, 4)
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        torch.testing.assert_close(got["mean"], alone.mean, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got["std"], alone.std, atol=1e-3, rtol=1e-3)
