#!/usr/bin/env bash
# GPU call 1 of the base-model recipe (docs/base_model.md): data speed, then the autoencoder and the text tower
# trained side by side on one GPU, then the UNet started in the background (later calls watch it and fetch it).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
MIN=${STAGE1_MINUTES:-6.5}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
python3 scripts/bench_data.py --sizes 256 512 --count 400 --workers 0 8 > runs/bench_data.txt 2>&1
cat runs/bench_data.txt
python3 -m snapfusion.cli train-autoencoder --run-dir runs/ae --max-steps 100000 --max-minutes "$MIN" \
  --batch-size 32 --num-workers 7 --sample-every 2000 > runs/ae.log 2>&1 &
python3 -m snapfusion.cli train-text --run-dir runs/text --max-steps 100000 --max-minutes "$MIN" \
  --batch-size 256 --lr 5e-4 --num-workers 7 > runs/text.log 2>&1 &
wait
tail -n 3 runs/ae.log runs/text.log
test -d runs/ae/final && test -d runs/text/final || { echo "stage 1 failed"; exit 1; }
setsid nohup python3 -m snapfusion.cli train-unet --run-dir runs/unet --vae runs/ae/final \
  --text-encoder runs/text/final --max-steps 200000 --max-minutes 60 --batch-size 64 --lr 2e-4 --warmup-steps 500 \
  --num-workers 14 --num-emoji "${NUM_EMOJI:-40}" --sample-every 2000 --checkpoint-every 500 \
  > runs/unet.log 2>&1 < /dev/null &
python3 - <<'PY'
import torch
from snapfusion.models.autoencoder import load_autoencoder, save_autoencoder
from snapfusion.models.text import load_text_encoder, save_text_encoder
save_autoencoder("runs/pack/vae", load_autoencoder("runs/ae/final"), dtype=torch.float16)
save_text_encoder("runs/pack/text_encoder", load_text_encoder("runs/text/final"), dtype=torch.float16)
PY
tar cf "$OUT/vae.tar" -C runs/pack vae; tar cf "$OUT/text.tar" -C runs/pack text_encoder
tar cf "$OUT/logs1.tar" runs/*.log runs/*.txt runs/ae/metrics.jsonl runs/text/metrics.jsonl runs/ae/samples runs/ae/final/step.json
sleep 45; tail -c 1500 runs/unet.log
