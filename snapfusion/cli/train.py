"""``snapfusion train-autoencoder``, ``train-text``, ``train-unet``, ``train-prior`` and ``assemble``: train the base
model's parts and put them together."""

from __future__ import annotations

import argparse
from pathlib import Path

from snapfusion.cli import options, types
from snapfusion.errors import InputError, SnapFusionError
from snapfusion.loading import check_model, model_folder, resolve_model
from snapfusion.validation import MAX_BATCH, MAX_SIDE, MAX_STEPS


def check_train_autoencoder(a: argparse.Namespace) -> None:
    from snapfusion.train.tasks import AutoencoderTaskConfig

    options.check_train_options(a)
    options.data_folder(a, AutoencoderTaskConfig.image_size)
    if a.init and not model_folder(a.init).is_dir():
        raise InputError(f"--init {a.init}: no such model or folder")
    if a.decoder_only and not a.init:
        raise InputError("--decoder-only needs --init (the trained autoencoder whose decoder is fine-tuned)")


def cmd_train_autoencoder(a: argparse.Namespace) -> None:
    from snapfusion.train.stages import train_autoencoder
    from snapfusion.train.tasks import AutoencoderTaskConfig

    init = model_folder(a.init) if a.init else None
    folder = options.data_folder(a, AutoencoderTaskConfig.image_size)
    train_autoencoder(options.loop_config(a), AutoencoderTaskConfig(
        data=options.scene_config(a), init=str(init) if init else None, decoder_only=a.decoder_only,
        data_folder=folder), resume=a.resume)


def check_train_text(a: argparse.Namespace) -> None:
    from snapfusion.train.tasks import TextTaskConfig

    options.check_train_options(a)
    options.data_folder(a, TextTaskConfig.image_size)


def cmd_train_text(a: argparse.Namespace) -> None:
    from snapfusion.train.stages import train_text
    from snapfusion.train.tasks import TextTaskConfig

    folder = options.data_folder(a, TextTaskConfig.image_size)
    train_text(options.loop_config(a), TextTaskConfig(data=options.scene_config(a), data_folder=folder),
               resume=a.resume)


def check_train_unet(a: argparse.Namespace) -> None:
    """train-unet's cross-option checks: the loop, the frozen parts' folders, the timestep bias and mixing."""
    options.check_train_options(a)
    options.data_folder(a, a.image_size)
    _parts(a)
    _timestep_bias_options(a)


def _parts(a: argparse.Namespace) -> tuple[str, str, str | None, str | None]:
    """(vae, text encoder, init UNet, vae decoder) folders of train-unet's options, checked."""
    from snapfusion.config import load_json
    from snapfusion.pipeline import part_folder

    vae, text, init, decoder = a.vae, a.text_encoder, a.init_unet, a.vae_decoder
    if a.from_pipeline:  # continue training a pipeline's UNet on its own frozen text tower and autoencoder
        root = model_folder(a.from_pipeline)
        if not vae:  # the pipeline's encoder, so its decoder is the matching one for sample grids (if any)
            vae = str(part_folder(root, "vae_encoder"))
            decoder = decoder or (str(part_folder(root, "vae_decoder")) if a.sample_every else None)
        text, init = text or str(part_folder(root, "text_encoder")), init or str(part_folder(root, "unet"))
    if not vae or not text:
        raise SnapFusionError("train-unet needs --vae and --text-encoder, or --from-pipeline")
    for flag, folder in (("--vae", vae), ("--text-encoder", text), ("--init-unet", init), ("--vae-decoder", decoder)):
        if folder and not Path(folder, "config.json").is_file():
            raise SnapFusionError(f"{flag} {folder}: no config.json there")
    if a.sample_every and not decoder and load_json(Path(vae, "config.json")).get("kind") != "vae":
        raise SnapFusionError(f"--vae {vae} holds no decoder: pass --vae-decoder for the sample grids "
                              "(or --sample-every 0)")
    return vae, text, init, decoder


def cmd_train_unet(a: argparse.Namespace) -> None:
    import dataclasses

    from snapfusion.config import load_json
    from snapfusion.models.presets import base_unet
    from snapfusion.train.stages import train_unet
    from snapfusion.train.tasks import UNetTaskConfig

    vae, text, init, decoder = _parts(a)
    data_folder = options.data_folder(a, a.image_size)
    model = base_unet()
    if init:  # continuing a trained UNet: keep its prediction type (e.g. the v-tuned base)
        model = dataclasses.replace(model, prediction_type=load_json(Path(init, "config.json"))["config"].get(
            "prediction_type", model.prediction_type))
    cfg = UNetTaskConfig(model=model, vae=vae, text_encoder=text, image_size=a.image_size,
                         data=options.scene_config(a), latent_pool=a.latent_pool, pool_workers=a.num_workers,
                         init_unet=init or "", vae_decoder=decoder or "", offset_noise=a.offset_noise,
                         clip_skip=a.clip_skip, offset_noise_grid=a.offset_noise_grid,
                         loss_weighting=a.loss_weighting, data_folder=data_folder, **_timestep_bias_options(a),
                         **_mix_options(a))
    train_unet(options.loop_config(a), cfg, resume=a.resume)


def _timestep_bias_options(a: argparse.Namespace) -> dict:
    """train-unet's --timestep-bias* flags as UNetTaskConfig fields."""
    begin, end = a.timestep_bias_range if a.timestep_bias_range else (0, MAX_STEPS)
    if bool(a.timestep_bias_range) != (a.timestep_bias == "range"):
        raise SnapFusionError("--timestep-bias range and --timestep-bias-range BEGIN END go together")
    if begin >= end:
        raise InputError(f"--timestep-bias-range: BEGIN {begin} must be below END {end}")
    return dict(timestep_bias=a.timestep_bias, timestep_bias_multiplier=a.timestep_bias_multiplier,
                timestep_bias_portion=a.timestep_bias_portion, timestep_bias_begin=begin, timestep_bias_end=end)


def _mix_options(a: argparse.Namespace) -> dict:
    """train-unet's --mix-* flags as UNetTaskConfig fields, their defaults filled in (none without --mix-size)."""
    if not a.mix_size:
        return {}
    return dict(mix_size=a.mix_size, mix_prob=a.mix_prob,
                mix_batch=a.mix_batch_size or max(1, a.batch_size * a.image_size ** 2 // a.mix_size ** 2),
                mix_pool=a.mix_pool or max(1, a.latent_pool // 4))


def _prior_encoder(a: argparse.Namespace) -> Path:
    """The VAE encoder folder of train-prior (--encoder, else the pipeline's), checked."""
    from snapfusion.pipeline import part_folder

    encoder_dir = Path(a.encoder) if a.encoder else part_folder(model_folder(a.model), "vae_encoder")
    if not (encoder_dir / "config.json").is_file():
        raise SnapFusionError(f"the layout prior needs a VAE encoder of {a.model}'s latent space: none at "
                              f"{encoder_dir} (--encoder)")
    return encoder_dir


def check_train_prior(a: argparse.Namespace) -> None:
    """train-prior's cross-option checks: --calibrate within --scenes, the model and its encoder."""
    from snapfusion.data.folder import read_metadata

    folder = options.data_folder(a, a.encode_size)
    if folder and len(read_metadata(folder)) < 10:
        raise SnapFusionError(f"--data {folder}: train-prior needs at least 10 images (the last 10% are held out)")
    if a.calibrate > a.scenes:
        raise InputError(f"--calibrate must be between 0 and --scenes ({a.scenes}), got {a.calibrate}")
    check_model(a.model)
    _prior_encoder(a)


def cmd_train_prior(a: argparse.Namespace) -> None:
    from snapfusion.models.autoencoder import Encoder, load_autoencoder
    from snapfusion.prior import PriorData, PriorTrainConfig, fit_pipeline_prior

    folder = options.data_folder(a, a.encode_size)
    device = options.device(a.device)
    pipe = resolve_model(a.model, device=device)
    encoder_dir = _prior_encoder(a)
    encoder = load_autoencoder(encoder_dir, Encoder, device=device).eval()
    data = PriorData(scenes=a.scenes, encode_size=a.encode_size, calibrate=a.calibrate, grid=a.grid,
                     num_emoji=a.num_emoji, seed=a.seed, data_folder=folder)
    train = PriorTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every,
                             keep_best=not a.keep_last)
    out = Path(a.out)
    report = fit_pipeline_prior(pipe, encoder, out, Path(a.cache), data, train, source=str(encoder_dir.resolve()),
                                model=str(a.model))
    print(f"wrote {out} (step {report['kept_step']}): held-out R^2 {report['held_out_r2']:.3f} (MSE "
          f"{report['held_out_mse']:.4f}, target variance {report['held_out_variance']:.4f}; "
          f"{report['unselected_r2']:.3f} on the half that did not choose the step); put it in the pipeline folder "
          "as prior/ to use it")


def cmd_assemble(a: argparse.Namespace) -> None:
    from snapfusion.train.stages import assemble_pipeline

    out = assemble_pipeline(a.text_encoder, a.vae, a.unet, a.out, name=a.name, with_encoder=a.with_encoder,
                            clip_skip=a.clip_skip)
    print(f"wrote pipeline {out}")


def _power_of_two(name: str):
    """A positive power of 2 (1, 2, 4, ..)."""
    def parse(text: str) -> int:
        value = types.integer(name, minimum=1, maximum=MAX_SIDE)(text)
        if value & (value - 1):
            raise InputError(f"{name} must be a power of 2, got {value}")
        return value
    return parse


def _add_unet_options(t: argparse.ArgumentParser) -> None:
    """train-unet's own options: its frozen parts, the noise and timestep sampling, the loss weighting, mixing."""
    t.add_argument("--vae", default=None, help="folder of the trained autoencoder (its final/ export)")
    t.add_argument("--text-encoder", default=None, help="folder of the trained text encoder")
    t.add_argument("--init-unet", default=None, help="start from this UNet folder instead of random weights")
    t.add_argument("--vae-decoder", default=None, help="decoder for sample grids when --vae is an encoder alone")
    t.add_argument("--from-pipeline", default=None, metavar="MODEL",
                   help="'base' or a pipeline folder: continue its UNet on its text encoder and autoencoder")
    t.add_argument("--image-size", type=types.side("--image-size"), default=512,
                   help="training image side in pixels (default %(default)s)")
    t.add_argument("--clip-skip", type=types.integer("--clip-skip", minimum=0, maximum=64), default=0, metavar="K",
                   help="condition on the text tower without its last K layers (diffusers' clip_skip; SD 2 uses the "
                   "penultimate layer, K = 1); pass the same K to assemble")
    options.add_noise_data_options(t)
    t.add_argument("--offset-noise-grid", type=_power_of_two("--offset-noise-grid"), default=1, metavar="G",
                   help="also add the --offset-noise on coarse grids 2x2, 4x4, .. GxG, bilinearly upsampled (G a power "
                   "of 2): lets the model choose a gradient background's direction, as --offset-noise its color")
    t.add_argument("--loss-weighting", choices=["min-snr", "v", "hybrid"], default="min-snr",
                   help="min-snr (default): Min-SNR-5 weights on the eps error; v: the plain v MSE's weights 1 + 1/SNR "
                   "rescaled to mean 1 over t, so the noisiest steps, which choose the layout, weigh up to 10x more; "
                   "hybrid: per sample the larger of the two, rescaled to mean 1 (the noisy end as v, the middle "
                   "nearly as min-snr)")
    t.add_argument("--timestep-bias", choices=["none", "later", "earlier", "range"], default="none",
                   help="draw some timesteps more often (diffusers' --timestep_bias_strategy): later = the noisiest "
                   "--timestep-bias-portion of them, earlier = the least noisy, range = --timestep-bias-range")
    t.add_argument("--timestep-bias-multiplier", type=types.number("--timestep-bias-multiplier", minimum=0.0,
                                                                   maximum=1000.0), default=2.0,
                   help="how many times as often the favoured timesteps are drawn (0: never)")
    t.add_argument("--timestep-bias-portion", type=types.probability("--timestep-bias-portion"), default=0.25,
                   help="later / earlier: their share of the "
                   "timesteps (default 0.25)")
    t.add_argument("--timestep-bias-range", type=types.integer("--timestep-bias-range", minimum=0, maximum=MAX_STEPS),
                   nargs=2, default=None, metavar=("BEGIN", "END"),
                   help="range: the favoured timesteps, BEGIN <= t < END")
    t.add_argument("--mix-size", type=types.side("--mix-size", zero=True), default=0,
                   help="mixed-resolution training (with --latent-pool): some "
                   "steps train at this size instead of --image-size, e.g. --image-size 256 --mix-size 512")
    t.add_argument("--mix-prob", type=types.probability("--mix-prob"), default=0.25,
                   help="share of the steps at --mix-size (default 0.25)")
    t.add_argument("--mix-batch-size", type=types.non_negative("--mix-batch-size", maximum=MAX_BATCH), default=0,
                   help="scenes per --mix-size step (default: "
                   "--batch-size x (image-size / mix-size)², the same latent positions as a normal step)")
    t.add_argument("--mix-pool", type=types.non_negative("--mix-pool"), default=0,
                   help="scenes in the --mix-size latent pool (default: "
                   "--latent-pool / 4)")


def _add_prior_options(t: argparse.ArgumentParser) -> None:
    t.add_argument("--model", default="base", help="the pipeline whose text states and latent space it serves")
    t.add_argument("--out", required=True, type=types.output_dir(),
                   help="the prior's folder (copy it to <pipeline>/prior to use it)")
    t.add_argument("--encoder", default=None, help="the VAE encoder folder of the model's latent space (default: "
                   "the pipeline's vae_encoder/; the SnapFusion student has none, it shares base's)")
    t.add_argument("--scenes", type=types.integer("--scenes", minimum=10), default=10000,
                   help="training renders (the last 10%% are held out); with --data the folder's first N images")
    options.add_data(t)
    t.add_argument("--encode-size", type=types.side("--encode-size", multiple=8), default=128,
                   help="renders are encoded at this size (cheap)")
    t.add_argument("--calibrate", type=types.non_negative("--calibrate"), default=64,
                   help="renders also encoded at full size, for a per-channel "
                   "affine map of the reduced-size block means (0: none)")
    t.add_argument("--grid", type=types.positive("--grid", maximum=MAX_SIDE // 8), default=2,
                   help="predict the latent's G x G block means")
    t.add_argument("--steps", type=types.positive("--steps"), default=3000,
                   help="optimizer steps (default %(default)s)")
    t.add_argument("--batch-size", type=types.positive("--batch-size", maximum=MAX_BATCH), default=256,
                   help="scenes per step (default %(default)s)")
    t.add_argument("--lr", type=types.lr(), default=1e-3, help="AdamW learning rate (default %(default)s)")
    t.add_argument("--eval-every", type=types.positive("--eval-every"), default=250,
                   help="held-out MSE every N steps (default %(default)s)")
    t.add_argument("--keep-last", action="store_true", help="keep the last step's weights (default: early stopping, "
                   "the evaluated step with the lowest MSE on the first half of the held-out scenes)")
    t.add_argument("--num-emoji", type=types.positive("--num-emoji"), default=None,
                   help="as the UNet trained (the base: 40)")
    t.add_argument("--seed", type=types.seed(), default=16, help="the training scenes' seed")
    t.add_argument("--cache", default="runs/prior_cache", type=types.output_dir("--cache"),
                   help="encoded block means, in chunks (a killed run resumes)")
    options.add_device(t, "cpu")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training commands of the base model's parts."""
    t = sub.add_parser("train-autoencoder", help="train the KL-f8 autoencoder on rendered scenes (or --data)",
                       epilog="example: snapfusion train-autoencoder --run-dir runs/ae --max-minutes 60")
    options.add_train_options(t, steps=6000, batch=32, lr=2e-4)
    t.add_argument("--init", default=None, metavar="MODEL",
                   help="start from this autoencoder: 'base', a pipeline folder or a train-autoencoder final/")
    t.add_argument("--decoder-only", action="store_true",
                   help="with --init: freeze the encoder and train the decoder alone, so that the latent space and "
                   "every UNet trained on it stay valid (as SD's ft-MSE decoder)")
    t.set_defaults(func=cmd_train_autoencoder, check=check_train_autoencoder)

    t = sub.add_parser("train-text", help="pretrain the CLIP text tower contrastively (then it stays frozen)",
                       epilog="example: snapfusion train-text --run-dir runs/text --max-minutes 30")
    options.add_train_options(t, steps=4000, batch=256, lr=5e-4)
    t.set_defaults(func=cmd_train_text, check=check_train_text)

    t = sub.add_parser("train-unet", help="train the base UNet (frozen text tower and autoencoder): eps-prediction "
                       "from scratch; a --init-unet / --from-pipeline UNet keeps its own prediction type",
                       epilog="example: snapfusion train-unet --run-dir runs/unet --vae runs/ae/final "
                       "--text-encoder runs/text/final --num-emoji 40")
    options.add_train_options(t, steps=40000, batch=64, lr=2e-4)
    _add_unet_options(t)
    t.set_defaults(func=cmd_train_unet, check=check_train_unet)

    t = sub.add_parser("train-prior", help="train a pipeline's terminal layout prior (prior/): the prompt's coarse "
                       "layout, which SD's schedule leaks into the starting latent (CPU: minutes)",
                       epilog="example: snapfusion train-prior --model base --num-emoji 40 --out runs/prior")
    _add_prior_options(t)
    t.set_defaults(func=cmd_train_prior, check=check_train_prior)

    s = sub.add_parser("assemble", help="put trained parts together into a pipeline folder (fp16)",
                       epilog="example: snapfusion assemble --text-encoder runs/text/final --vae runs/ae/final "
                       "--unet runs/unet/final --out my-pipeline")
    s.add_argument("--text-encoder", required=True, help="text encoder folder (train-text's final/)")
    s.add_argument("--vae", required=True, help="autoencoder folder (train-autoencoder's final/)")
    s.add_argument("--unet", required=True, help="UNet folder (train-unet's final/)")
    s.add_argument("--out", required=True, type=types.output_dir(), help="the pipeline folder to write")
    s.add_argument("--name", default="base", help="the pipeline's name in its model_index.json (default %(default)s)")
    s.add_argument("--with-encoder", action="store_true", help="also ship the VAE encoder")
    s.add_argument("--clip-skip", type=types.integer("--clip-skip", minimum=0, maximum=64), default=0, metavar="K",
                   help="ship the text tower without its last K layers: the train-unet --clip-skip of the UNet")
    s.set_defaults(func=cmd_assemble)
