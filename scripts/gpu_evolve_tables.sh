#!/usr/bin/env bash
# Issue 5, items 2 and 5 on one GPU: latency tables of the sd15, snapfusion and base UNets (random weights), the
# snapfusion/sd15 per-step ratio, and robust-training steps + one evolution action on the full-size sd15 UNet.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs/lat
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for p in sd15 snapfusion base; do
  for dt in fp32 fp16; do
    timeout 150 python3 -m snapfusion.cli bench-blocks --preset $p --device cuda --dtype $dt --repeats 20 \
      --out runs/lat/${p}_cuda_torch_${dt}.json 2>&1 | grep -v Warning | tail -1
  done
done
python3 - <<'PY'
import json
t = {p: {d: json.load(open(f"runs/lat/{p}_cuda_torch_{d}.json")) for d in ("fp32", "fp16")} for p in ("sd15", "snapfusion")}
for d in ("fp32", "fp16"):
    s, f = t["sd15"][d]["whole_ms"], t["snapfusion"][d]["whole_ms"]
    print(f"{d}: sd15 {s:.2f} ms, snapfusion {f:.2f} ms per UNet forward (batch 2, 64x64): ratio {s / f:.2f}x "
          f"(paper: 51.2 / 26.2 = 1.95x, A100 TensorRT fp32)")
PY
timeout 200 python3 scripts/bench_blocks_sd15_scale.py --batch 8 --steps 6 --out runs/lat/sd15_scale.json 2>&1 | tail -25
tar cf "$OUT/latency_gpu.tar" runs/lat
# CPU + onnxruntime tables on the GPU host's 16 cores (the 2-core dev machine would need ~1 h for sd15); the whole
# sd15 UNet is > 2 GB of ONNX; if its export fails the log shows the error and no sd15 onnxruntime table is written.
for p in snapfusion sd15; do
  timeout 110 python3 -m snapfusion.cli bench-blocks --preset $p --device cpu --backend onnxruntime --repeats 3 \
    --warmup 1 --out runs/lat/${p}_cpu16_onnxruntime.json 2>&1 | grep -v Warning | tail -2
done
tar cf "$OUT/latency_gpu.tar" runs/lat
