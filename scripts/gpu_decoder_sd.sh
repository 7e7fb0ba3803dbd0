#!/usr/bin/env bash
# The efficient decoder at SD-v1.5 scale with random weights (docs/efficient_decoder.md), about 5 minutes:
#  1. a random-weight SD-v1.5 pipeline (UNet 860M, CLIP-L text, VAE decoder 49.5M) saved as our pipeline folder;
#  2. reduce-decoder on it: 49,490,199 -> 12,387,479 parameters;
#  3. GPU latency of the SD decoder vs its halved version at 512x512 (fp32, fp16);
#  4. a few distillation steps at full size: with the teacher UNet making latents on the fly (DPM-Solver++ 12
#     steps, CFG), and from a latent cache (decoder work alone); time per step and peak memory from metrics.jsonl.
# Output: decoder_sd.tar (logs, bench JSON, metrics).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
BATCH=${BATCH:-4}
STEPS=${STEPS:-20}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'PY'
import torch
from snapfusion.models.autoencoder import AutoencoderConfig, Decoder
from snapfusion.models.text import TextEncoder, TextEncoderConfig
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import sd15
from snapfusion.pipeline import Pipeline, PipelineConfig
torch.manual_seed(0)
pipe = Pipeline(TextEncoder(TextEncoderConfig.sd15()), UNet(sd15()), Decoder(AutoencoderConfig.sd15()),
                PipelineConfig(name="sd15-random"))
pipe.save("runs/sd15_random", dtype=torch.float16)
print("saved random SD-v1.5 pipeline")
PY
python3 -m snapfusion.cli reduce-decoder --teacher runs/sd15_random --out runs/sd15_half 2>&1 | tail -n 1
python3 scripts/bench_decoder.py --device cuda --sd --no-onnx --out runs/bench_gpu_sd.json > runs/bench_gpu_sd.log 2>&1
tail -n 25 runs/bench_gpu_sd.log
LOOP="--teacher runs/sd15_random --batch-size $BATCH --max-steps $STEPS --log-every 5 --checkpoint-every 1000
  --sample-every 0 --num-workers 2 --warmup-steps 5 --max-minutes 3"
for mp in bf16 no; do  # on the fly: teacher UNet + teacher decoder + student forward/backward per step
  python3 -m snapfusion.cli distill-decoder --run-dir "runs/sd_fly_$mp" --mixed-precision "$mp" $LOOP \
    > "runs/sd_fly_$mp.log" 2>&1
  echo "on the fly, $mp:"; tail -n 2 "runs/sd_fly_$mp/metrics.jsonl"
done
python3 -m snapfusion.cli decoder-latents --teacher runs/sd15_random --latent-pool 64 --batch-size 16 --device cuda \
  --out runs/sd_latents.safetensors > runs/sd_latents.log 2>&1; tail -n 1 runs/sd_latents.log
python3 -m snapfusion.cli distill-decoder --run-dir runs/sd_cached --mixed-precision bf16 $LOOP \
  --latent-pool 64 --latent-cache runs/sd_latents.safetensors > runs/sd_cached.log 2>&1
echo "cached latents, bf16:"; tail -n 2 runs/sd_cached/metrics.jsonl
tar cf "$OUT/decoder_sd.tar" runs/*.log runs/*.json runs/sd_*/metrics.jsonl runs/sd_*/run_config.json 2>/dev/null
ls -la "$OUT"
