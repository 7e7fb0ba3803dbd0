#!/usr/bin/env bash
# Does the halved decoder's per-channel GroupNorm (16 groups at 16 channels, 512²) cause its border frames and halos
# (docs/efficient_decoder.md, "Visible artifacts")? Two halved decoders distilled side by side on one GPU from the l1
# init with the same latents, steps and settings, 16 groups (the default) against 8 (group size 2), then PSNR on 64
# held-out latents and decodes of the shipped student's latents ($LATENTS, a safetensors file with "latents").
# About 5 minutes on one H200. Output in $OUT: eval_groups.json, groups_compare.png (rows: latents; columns: teacher,
# 16 groups, 8 groups).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; R=${R:-/tmp/groups}; mkdir -p "$OUT" "$R"
B=${MODEL:-snapfusion/assets/models/base}; MIN=${MIN:-2.2}; POOL=${POOL:-1024}; DEV=${DEVICE:-cuda}
SF="python3 -m snapfusion.cli"
$SF decoder-latents --teacher $B --latent-pool $POOL --num-emoji 40 --batch-size 128 --device $DEV \
  --out $R/lat.safetensors | tail -n 1
d=(--teacher $B --latent-pool $POOL --latent-cache $R/lat.safetensors --num-emoji 40 --batch-size 16 --ema-decay 0.99
   --mixed-precision no --max-steps 100000 --max-minutes $MIN --checkpoint-every 100000 --sample-every 0 --log-every 50
   --num-workers 2 --lr 5e-4 --warmup-steps 100)
$SF distill-decoder --run-dir $R/g16 "${d[@]}" > $R/g16.log 2>&1 &
$SF distill-decoder --run-dir $R/g8 "${d[@]}" --norm-groups 8 > $R/g8.log 2>&1 &
wait
tail -n 1 $R/g16/metrics.jsonl $R/g8/metrics.jsonl
$SF eval-decoder $R/g16/final $R/g8/final --teacher $B --count ${COUNT:-64} --batch-size 32 --num-emoji 40 --device $DEV \
  --out $OUT/eval_groups.json | grep -A4 psnr_mean
python3 - "$B" "$R" "$OUT" "${LATENTS:-}" <<'PY'
import sys
import torch
from PIL import Image
from snapfusion.decoder.evaluate import decode_unit
from snapfusion.decoder.io import load_decoder
from snapfusion.weights import load_safetensors
base, runs, out, latents = sys.argv[1:5]
if latents:
    z = load_safetensors(latents)["latents"]
    with torch.no_grad():
        imgs = [decode_unit(load_decoder(f), z) for f in (base, f"{runs}/g16/final", f"{runs}/g8/final")]
    side = 256
    canvas = Image.new("RGB", (3 * side, len(z) * side))
    for r in range(len(z)):
        for c, im in enumerate(imgs):
            a = (im[r].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(a).resize((side, side), Image.LANCZOS), (c * side, r * side))
    canvas.save(f"{out}/groups_compare.png")
    print("wrote", f"{out}/groups_compare.png")
PY
