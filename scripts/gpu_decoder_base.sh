#!/usr/bin/env bash
# Efficient decoder on the base model (docs/efficient_decoder.md), one GPU call of about 9 minutes:
#  1. One pass of the teacher UNet: 2048 cached latents (train-split prompts), shared by every run below.
#  2. Init ablation at equal steps: halved decoder from L1-selected teacher channels, first channels, random init.
#  3. The main halved decoder (L1 init) continues as a resumable chunk; the TAESD-style baseline trains alike.
#  4. PSNR vs the teacher decoder on 64 held-out test-prompt latents, and (when the evaluators are shipped)
#     domain FID / CLIP / attribute accuracy of the full pipeline with each decoder on 500 test prompts.
# Continue the main run in a later call: untar $OUT/dec_half_ckpt.tar into runs/ here, carry runs/dec_half and
# rerun with ABLATE=0 (skips 2; 1 reruns: the 128 MB cache is over the carry limit).
# Outputs: decoder_base.tar (logs, metrics, reports, samples), dec_half_final.tar, dec_tiny_final.tar,
# dec_half_ckpt.tar.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
MODEL=${MODEL:-base}             # the teacher pipeline
ABLATE=${ABLATE:-1}
MAIN_MIN=${MAIN_MIN:-2}        # minutes of the main halved run in this call
TINY_MIN=${TINY_MIN:-1.2}
ABL_STEPS=${ABL_STEPS:-250}      # steps of each init-ablation arm
BATCH=${BATCH:-16}
POOL=${POOL:-2048}               # cached teacher latents per process (docs: why)
EMOJI=${NUM_EMOJI:-40}           # the prompt domain the base UNet was trained on
EVAL_N=${EVAL_N:-64}
PIPE_N=${PIPE_N:-500}
WORKERS=${WORKERS:-4}
MP=${MP:-no}                     # fp32 (TF32 matmuls): targets and student at full precision for the PSNR goal
DEVICE=${DEVICE:-cuda}           # DEVICE=cpu with a tiny MODEL is a dry run of this script
# latent options left at their defaults: DPM-Solver++(2M), 12 steps, guidance w ~ U[1, 10.5]
LATENT="--teacher $MODEL --latent-pool $POOL --num-emoji $EMOJI"
COMMON="$LATENT --latent-cache runs/latents.safetensors --batch-size $BATCH --num-workers $WORKERS
  --mixed-precision $MP --lr 5e-4 --warmup-steps 100 --ema-decay 0.99 --log-every 25 --sample-every 500
  --checkpoint-every 250"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, transformers.__version__)"
distill() {  # run_dir minutes max_steps extra-args...
  local dir=$1 min=$2 steps=$3; shift 3
  local resume=""; test -f "runs/$dir/latest.json" && resume="--resume"
  python3 -m snapfusion.cli distill-decoder --run-dir "runs/$dir" $resume --max-minutes "$min" \
    --max-steps "$steps" $COMMON "$@" > "runs/$dir.log" 2>&1
  tail -n 2 "runs/$dir.log"; tail -n 1 "runs/$dir/metrics.jsonl"
}
if [ ! -f runs/latents.safetensors ]; then  # one pass of the teacher UNet, shared by every run below
  t0=$SECONDS
  python3 -m snapfusion.cli decoder-latents $LATENT --batch-size 64 --device "$DEVICE" --out runs/latents.safetensors \
    > runs/latents.log 2>&1
  tail -n 2 runs/latents.log; echo "latent cache: $((SECONDS - t0)) s"
fi
if [ "$ABLATE" = 1 ]; then
  for init in l1 first random; do
    distill "abl_$init" 0.8 "$ABL_STEPS" --init "$init"
  done
fi
distill dec_half "$MAIN_MIN" 100000 --init l1
distill dec_tiny "$TINY_MIN" 100000 --student tiny
STUDENTS="runs/dec_half/final runs/dec_tiny/final"
[ "$ABLATE" = 1 ] && STUDENTS="$STUDENTS runs/abl_l1/final runs/abl_first/final runs/abl_random/final"
EXTRA=""; test -f snapfusion/assets/evaluators/reference_stats.safetensors && EXTRA="--pipeline-metrics $PIPE_N"
python3 -m snapfusion.cli eval-decoder $STUDENTS --teacher "$MODEL" --count "$EVAL_N" --batch-size 16 \
  --num-emoji "$EMOJI" --device "$DEVICE" $EXTRA --out runs/eval_decoder.json > runs/eval.log 2>&1
grep -v per_image runs/eval_decoder.json | head -n 120 || tail -n 20 runs/eval.log
tar cf "$OUT/decoder_base.tar" runs/*.log runs/*.json runs/*/metrics.jsonl runs/*/run_config.json runs/*/samples \
  runs/*/final/step.json 2>/dev/null
for r in dec_half dec_tiny; do test -d "runs/$r/final" && tar cf "$OUT/${r}_final.tar" -C runs "$r/final"; done
last=$(python3 -c "import json; print(json.load(open('runs/dec_half/latest.json'))['path'])" 2>/dev/null)
test -n "$last" && tar cf "$OUT/dec_half_ckpt.tar" runs/dec_half/latest.json "runs/dec_half/$last" 2>/dev/null
ls -la "$OUT"
