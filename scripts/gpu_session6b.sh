#!/usr/bin/env bash
# Session 6, the last call after scripts/gpu_session6.sh (same staged machine): the vanilla arm, the best student,
# completed: its w = 10.5 point, its w = 7.5 point with the base's full decoder (the decoder's share), and the same
# arm distilled 400 steps further (does attribute accuracy rise or fall with more steps?). Then the UNets to keep.
. "$(dirname "$0")/gpu_stage.sh" run
R=$STAGE/runs/s6; BASE=$STAGE/models/base; HALF=$STAGE/models/parts/vae_decoder_half
DEV=cuda; SIZE=512; EMOJI=40; NIMG=485; SF="python3 -m snapfusion.cli"; EVAL_TIMEOUT=200
(CUDA_VISIBLE_DEVICES=0 ev arm_vanilla_8_w10 $R/arm_vanilla/pipeline 8 ddim 10.5 --decoder "$HALF"
 CUDA_VISIBLE_DEVICES=0 ev arm_vanilla_8_full $R/arm_vanilla/pipeline 8 ddim 7.5) &
(CUDA_VISIBLE_DEVICES=1 timeout 200 $SF distill --run-dir $R/arm_vanilla2 --model "$BASE" \
   --student-unet $R/arm_vanilla/final \
   --student-steps 8 --cfg-prob 0 --offset-noise 0.1 --latent-pool 8192 --batch-size 32 --lr 1e-4 --warmup-steps 50 \
   --ema-decay 0.995 --max-steps 400 --max-minutes 3 --checkpoint-every 1000000 --num-emoji $EMOJI --image-size $SIZE \
   --num-workers 8 --sample-every 0 --log-every 25 > $R/arm_vanilla2.log 2>&1; tail -n 1 $R/arm_vanilla2.log
 [ -f $R/arm_vanilla2/final/config.json ] && \
   CUDA_VISIBLE_DEVICES=1 ev arm_vanilla2_8 $R/arm_vanilla2/pipeline 8 ddim 4.5,7.5 --decoder "$HALF") &
wait
summarize_evals
for s in arm_vanilla arm_vanilla2; do
  [ -f $R/$s/final/config.json ] && \
    python3 -c "from snapfusion.models.unet import UNet; UNet.load('$R/$s/final').save('$R/${s}_int8', int8=True)"
done
tar cf $R/results_b.tar --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  --exclude=evo20 --exclude='results*.tar' --exclude='*_int8' -C "$STAGE/runs" s6
for w in arm_vanilla_int8 arm_vanilla2_int8 vtune_int8; do
  [ -d $R/$w ] && tar rf $R/results_b.tar -C "$STAGE/runs" s6/$w
done
gzip -1 -f $R/results_b.tar && mkdir -p $R/out_b && split -b 15m -d $R/results_b.tar.gz $R/out_b/results_b.tgz.
ls -la $R/out_b
