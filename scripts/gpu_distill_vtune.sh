#!/usr/bin/env bash
# GPU call: v-prediction fine-tuning of the base UNet (SnapFusion §4, L_ori), one chunk of MINUTES; on a warm
# machine a second call resumes runs/vtune exactly. Emits the EMA UNet (fp16) and a fidelity check: the eps base
# and the v model at 16 trailing DDIM steps on the same test prompts and seeds (docs/step_distillation.md).
# Env: MODEL (pipeline folder, default the embedded base), VAE_ENCODER (if MODEL has no vae_encoder/), MINUTES,
#      BATCH, LR, NUM_EMOJI (the base UNet's training domain; 40 in gpu_base_stage1.sh), IMAGE_SIZE, WORKERS.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
MODEL=${MODEL:-snapfusion/assets/models/base}; RUN=${RUN:-runs/vtune}; SIZE=${IMAGE_SIZE:-512}
ENC=(); [ -n "${VAE_ENCODER:-}" ] && ENC=(--vae-encoder "$VAE_ENCODER")
RESUME=(); [ -f "$RUN/latest.json" ] && RESUME=(--resume)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m snapfusion.cli finetune-v --run-dir "$RUN" --model "$MODEL" "${ENC[@]}" "${RESUME[@]}" \
  --max-steps 1000000 --max-minutes "${MINUTES:-7}" --batch-size "${BATCH:-64}" --lr "${LR:-5e-5}" \
  --warmup-steps 100 --ema-decay "${EMA:-0.995}" --num-workers "${WORKERS:-14}" --num-emoji "${NUM_EMOJI:-40}" \
  --image-size "$SIZE" --log-every 25 --sample-every 0 --checkpoint-every 1000000 > "$RUN.log" 2>&1
rc=$?; tail -n 4 "$RUN.log"
[ $rc -eq 0 ] && [ -d "$RUN/final" ] || { echo "finetune-v failed (rc $rc)"; tail -c 3000 "$RUN.log"; exit 1; }
python3 - "$MODEL" "$RUN" "$SIZE" "${VAE_ENCODER:-}" "${NUM_EMOJI:-40}" <<'PY'
import json, sys, torch
from pathlib import Path
from snapfusion.data import SceneConfig
from snapfusion.distill.tasks import ModelSource, VFinetuneConfig, VFinetuneTask
from snapfusion.models.unet import UNet
model, run, size, enc, n_emoji = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None, int(sys.argv[5])
device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = VFinetuneConfig(source=ModelSource(model, vae_encoder=enc), image_size=size, sample_prompts=16,
                      data=SceneConfig(num_emoji=n_emoji))
VFinetuneTask(cfg).sample_grid(UNet.load(run / "final", device=device), run / "eval" / "vtune_16steps.png")
print(json.dumps(json.loads((run / "eval" / "vtune_16steps.json").read_text())["mse_to_source@16"]))
UNet.load(run / "final").save(run / "unet_v_fp16", dtype=torch.float16)
PY
cp -r "$RUN/unet_v_fp16" "$OUT/unet_v"
tar cf "$OUT/vtune_logs.tar" "$RUN.log" "$RUN/metrics.jsonl" "$RUN/run_config.json" "$RUN/final/step.json" "$RUN/eval"
ls -la "$OUT" "$OUT/unet_v"
