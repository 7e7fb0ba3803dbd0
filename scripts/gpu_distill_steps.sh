#!/usr/bin/env bash
# GPU call: CFG-aware step distillation, one chunk of MINUTES (SnapFusion §4): STEPS-step student from a
# 2*STEPS-step teacher (default 16 -> 8), L = L_dstl (L_cfg with probability CFG_PROB, else L_vani) + 0.2 L_ori.
# On a warm machine a second call resumes RUN exactly. Emits the student's EMA UNet (fp16) and a small eval:
# teacher@2n, teacher@n and student@n on 12 test prompts at two guidance scales, with image MSE to teacher@2n.
# Env: TEACHER_UNET (v-prediction teacher UNet folder; default runs/vtune/final, i.e. the output of
#      gpu_distill_vtune.sh: on a fresh machine put its unet_v/ there and carry it), MODEL (pipeline folder for
#      text encoder, VAE, defaults), VAE_ENCODER, STEPS, CFG_PROB, MINUTES, BATCH, LR, NUM_EMOJI, IMAGE_SIZE.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs
MODEL=${MODEL:-snapfusion/assets/models/base}; TEACHER=${TEACHER_UNET:-runs/vtune/final}
STEPS=${STEPS:-8}; RUN=${RUN:-runs/distill$STEPS}; SIZE=${IMAGE_SIZE:-512}
[ -f "$TEACHER/config.json" ] || {
  echo "no teacher UNet at $TEACHER (run gpu_distill_vtune.sh first, or carry its unet_v there)"; exit 1; }
ENC=(); [ -n "${VAE_ENCODER:-}" ] && ENC=(--vae-encoder "$VAE_ENCODER")
RESUME=(); [ -f "$RUN/latest.json" ] && RESUME=(--resume)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m snapfusion.cli distill --run-dir "$RUN" --model "$MODEL" --teacher-unet "$TEACHER" "${ENC[@]}" \
  "${RESUME[@]}" --student-steps "$STEPS" --cfg-prob "${CFG_PROB:-0.1}" --max-steps 1000000 \
  --max-minutes "${MINUTES:-7}" --batch-size "${BATCH:-32}" --lr "${LR:-5e-5}" --warmup-steps 100 \
  --ema-decay "${EMA:-0.995}" --num-workers "${WORKERS:-14}" --num-emoji "${NUM_EMOJI:-40}" --image-size "$SIZE" \
  --log-every 25 --sample-every 0 --checkpoint-every 1000000 > "$RUN.log" 2>&1
rc=$?; tail -n 4 "$RUN.log"
[ $rc -eq 0 ] && [ -d "$RUN/final" ] || { echo "distill failed (rc $rc)"; tail -c 3000 "$RUN.log"; exit 1; }
python3 - "$MODEL" "$TEACHER" "$RUN" "$SIZE" "$STEPS" "${VAE_ENCODER:-}" "${NUM_EMOJI:-40}" <<'PY'
import json, sys, torch
from pathlib import Path
from snapfusion.data import SceneConfig
from snapfusion.distill.tasks import DistillConfig, DistillTask, ModelSource
from snapfusion.models.unet import UNet
model, teacher, run, size, n, enc, n_emoji = sys.argv[1:8]
run, size, n = Path(run), int(size), int(n)
device = "cuda" if torch.cuda.is_available() else "cpu"
student = UNet.load(run / "final", device=device)
for guidance in (None, 3.0):  # the pipeline's default guidance, and a low one
    cfg = DistillConfig(source=ModelSource(model, teacher_unet=teacher, vae_encoder=enc or None), student_steps=n,
                        image_size=size, sample_prompts=12, sample_guidance=guidance,
                        data=SceneConfig(num_emoji=int(n_emoji)))
    path = run / "eval" / f"student{n}_guidance{guidance or 'default'}.png"
    DistillTask(cfg).sample_grid(student, path)
    report = json.loads(path.with_suffix(".json").read_text())
    print(path.name, {k: v for k, v in report.items() if k != "prompts"})
UNet.load(run / "final").save(run / "unet_fp16", dtype=torch.float16)
PY
cp -r "$RUN/unet_fp16" "$OUT/unet_student$STEPS"
tar cf "$OUT/distill${STEPS}_logs.tar" "$RUN.log" "$RUN/metrics.jsonl" "$RUN/run_config.json" "$RUN/final/step.json" \
  "$RUN/eval" "$RUN/pipeline/model_index.json"
ls -la "$OUT" "$OUT/unet_student$STEPS"
