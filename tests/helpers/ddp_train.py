"""Entry point for tests/test_train_ddp.py: a tiny autoencoder run under torchrun (args: run_dir steps [resume])."""
import sys, json
from snapfusion.models.autoencoder import AutoencoderConfig
from snapfusion.train.loop import LoopConfig, train
from snapfusion.train.tasks import AutoencoderTask, AutoencoderTaskConfig
cfg = LoopConfig(run_dir=sys.argv[1], max_steps=int(sys.argv[2]), batch_size=2, num_workers=0, mixed_precision="no",
                 log_every=1, sample_every=0, checkpoint_every=100, warmup_steps=1)
r = train(cfg, AutoencoderTask(AutoencoderTaskConfig(model=AutoencoderConfig.tiny(), image_size=32, crop=16)),
          resume=len(sys.argv) > 3)
print("RESULT", json.dumps({"step": r["step"]}))
