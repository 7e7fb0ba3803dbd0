#!/usr/bin/env bash
# Issue 5, items 1, 3, 4 on the base model (needs snapfusion/assets/models/base with vae_encoder/, and the shipped
# evaluators): granularity measurement, robust training, evolution to 30% of the base UNet's CPU latency (table
# measured on the 2-core dev CPU), a fine-tune chunk, BK-SDM baseline, and 50-step CLIP/attribute comparison.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
TABLE=snapfusion/assets/latency/base_cpu_torch.json
B=snapfusion/assets/models/base
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m snapfusion.cli bench-blocks --model base --device cuda --repeats 20 --out runs/base_cuda_torch.json 2>&1 | tail -1
# 1. robust training (per-sample skips, p = 0.9 for both kinds), ~2 min
python3 -m snapfusion.cli robust-train --run-dir runs/robust --model base --max-steps 100000 --max-minutes 2 \
  --batch-size 32 --lr 5e-5 --warmup-steps 50 --ema-decay 0 --num-workers 12 --sample-every 0 \
  --checkpoint-every 1000 > runs/robust.log 2>&1; tail -n 2 runs/robust.log
R=$(python3 -c "from pathlib import Path; from snapfusion.train.state import latest_checkpoint as l; print(l(Path('runs/robust')))")
# 2. evolution: budget 30% of the CPU table's base latency; 16 prompts, 10 DDIM steps, CFG 7.5 per candidate
python3 -m snapfusion.cli evolve --run-dir runs/evo --table $TABLE --budget 0.3 --init "$R/model" --device cuda \
  --iterations 12 --actions-per-step 3 --num-prompts 16 --eval-steps 10 --eval-batch 16 --train-steps 60 \
  --batch-size 32 --num-workers 12 --max-minutes 3.5 > runs/evo.log 2>&1; tail -n 3 runs/evo.log
# 3. fine-tune the evolved UNet and the BK-SDM baseline (p = 1: no skips), ~1 min each
python3 -m snapfusion.cli bk-sdm --init "$R/model" --out runs/bk/unet --table $TABLE
for m in evo bk; do
  INIT=runs/evo/final; [ $m = bk ] && INIT=runs/bk/unet
  [ -d "$INIT" ] || INIT=$(ls -d runs/evo/iter_*/unet | tail -1)
  python3 -m snapfusion.cli robust-train --run-dir runs/ft_$m --model base --init "$INIT" --p-res 1 --p-attn 1 \
    --max-steps 100000 --max-minutes 1 --batch-size 32 --lr 5e-5 --warmup-steps 20 --ema-decay 0 \
    --num-workers 12 --sample-every 0 > runs/ft_$m.log 2>&1; tail -n 1 runs/ft_$m.log
done
# 4. 50-step comparison on 64 test prompts
timeout 100 python3 - <<'PY'
import json
from pathlib import Path
from snapfusion.loading import resolve_model
from snapfusion.data import load_prompt_set
from snapfusion.eval.evaluators import load_evaluators
from snapfusion.evolve.compare import compare_unets
from snapfusion.evolve.latency import load_table
from snapfusion.models.unet import UNet
from snapfusion.train.state import latest_checkpoint
pipe = resolve_model("base", device="cuda")
unets = {"base": pipe.unet}
for m in ("evo", "bk"):
    ck = latest_checkpoint(Path(f"runs/ft_{m}"))
    if ck is not None:
        unets[m] = UNet.load(ck / "model")
res = compare_unets(pipe, unets, load_prompt_set("test200")[:64], load_evaluators(device="cuda"), steps=50,
                    table=load_table("snapfusion/assets/latency/base_cpu_torch.json"))
print(json.dumps(res, indent=1)); json.dump(res, open("runs/compare.json", "w"), indent=1)
PY
tar cf "$OUT/evolve_logs.tar" runs/*.log runs/*.json runs/evo/evolve.jsonl runs/evo/state.json runs/evo/trajectory.png \
  runs/evo/final/config.json runs/robust/metrics.jsonl 2>/dev/null
