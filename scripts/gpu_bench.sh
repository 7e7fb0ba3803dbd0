#!/usr/bin/env bash
# GPU benchmark (docs/benchmarks.md): SD-v1.5 vs the SnapFusion preset, random weights, fp16, 512x512, guidance 7.5:
# 50 steps vs 8 steps, eager and torch.compile'd UNet; FLOPs per image and the compute floor (FLOPs / measured
# fp16 matmul peak). ~8-10 minutes on one H100/H200 (the compiles dominate). Run it on an idle GPU.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs/bench
nvidia-smi --query-gpu=name,memory.total,utilization.gpu,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench() {  # name, timeout seconds, bench options...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" python3 -m snapfusion.cli bench --device cuda --dtype fp16 --size 512 --guidance 7.5 \
    --json "runs/bench/$name.json" "$@" > "runs/bench/$name.log" 2>&1 || echo "$name FAILED (see $name.log)"
  tail -n 1 "runs/bench/$name.log"
}
bench sd15_eager 60 --preset sd15 --steps 50 --runs 3 --warmup 1
bench snapfusion_eager 45 --preset snapfusion --steps 8 --runs 10 --warmup 2
bench snapfusion_compiled 150 --preset snapfusion --steps 8 --runs 10 --warmup 2 --compile
bench sd15_compiled 170 --preset sd15 --steps 50 --runs 3 --warmup 1 --compile
# CUDA graphs (reduce-overhead) for every network: the SnapFusion preset is launch-bound at batch 2 (session 2:
# 113 ms compiled against a 14 ms floor); not yet run
bench snapfusion_cudagraphs 200 --preset snapfusion --steps 8 --runs 10 --warmup 3 --compile \
  --compile-mode reduce-overhead --compile-all
python3 - <<'PY' | tee runs/bench/summary.md
import json, pathlib
from snapfusion.bench import markdown_table
runs = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path("runs/bench").glob("*.json"))}
order = [k for k in ("sd15_eager", "snapfusion_eager", "sd15_compiled", "snapfusion_compiled",
                     "snapfusion_cudagraphs") if k in runs]
print(markdown_table([runs[k] for k in order]))
for mode in ("eager", "compiled"):
    a, b = runs.get(f"sd15_{mode}"), runs.get(f"snapfusion_{mode}")
    if a and b:
        ta, tb = a["latency_s"]["total"]["median"], b["latency_s"]["total"]["median"]
        sa, sb = a["latency_s"]["unet_per_step"]["median"], b["latency_s"]["unet_per_step"]["median"]
        print(f"{mode}: end to end {ta*1e3:.0f} ms -> {tb*1e3:.1f} ms = {ta/tb:.1f}x (paper, A100 TensorRT: 12.2x); "
              f"UNet step {sa*1e3:.1f} -> {sb*1e3:.1f} ms = {sa/sb:.2f}x (paper: 1.95x)")
for k in order:
    r = runs[k]
    print(f"{k}: {r['flops']['total']/1e12:.2f} TFLOP/image, matmul peak {r['matmul_peak_tflops']:.0f} TFLOP/s, "
          f"floor {r['compute_floor_s']*1e3:.1f} ms, "
          f"measured/floor {r['latency_s']['total']['median'] / r['compute_floor_s']:.1f}x, "
          f"first run {r['first_run_s']:.1f} s, peak {r['peak_memory_mb']['torch_cuda_allocated']:.0f} MiB")
PY
tar czf "$OUT/bench.tar.gz" -C runs bench
