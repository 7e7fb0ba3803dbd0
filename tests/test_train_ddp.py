"""The training loop under DDP: two CPU processes (gloo) through torchrun, as `accelerate launch` runs it on GPUs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from snapfusion.train.loop import _StreamSampler

SCRIPT = Path(__file__).parent / "helpers" / "ddp_train.py"


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
