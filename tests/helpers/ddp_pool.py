"""Entry point for tests/test_train_ddp.py: a latent pool built under torchrun (gloo); each rank saves what it holds
(args: parts_dir out_dir count)."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from snapfusion.train.data import LatentPool
from snapfusion.train.unet import UNetTask, UNetTaskConfig

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_train_ddp import POOL_UNET  # noqa: E402

dist.init_process_group("gloo")
parts, out, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
task = UNetTask(UNetTaskConfig(model=POOL_UNET, vae=str(parts / "vae"), text_encoder=str(parts / "text"),
                               image_size=32, latent_pool=count, pool_workers=0))
pool = LatentPool(task.data.encoder, task.cfg, torch.device("cpu"))
save_file({"mean": pool.mean, "std": pool.std}, str(out / f"rank{dist.get_rank()}.safetensors"))
dist.barrier()
dist.destroy_process_group()
# Leave without interpreter finalization: gloo's worker threads can still hold work objects whose tensors refer to
# Python, and tearing them down during finalization aborts ("terminate called without an active exception", about 1
# run in 12 on this 2-core CPU; pytorch/pytorch PR 179291). Everything the test reads is saved above.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
