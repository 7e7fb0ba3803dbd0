"""``snapfusion robust-train``, ``evolve`` and ``bk-sdm``: robust training, Alg. 1 and the fixed-rule baseline."""

from __future__ import annotations

import argparse
import dataclasses
import zlib
from pathlib import Path


def _encoders(a: argparse.Namespace) -> tuple[str, str]:
    """The frozen VAE encoder and text tower folders (default: inside the --model pipeline folder)."""
    from snapfusion.cli import EMBEDDED
    from snapfusion.errors import SnapFusionError
    from snapfusion.pipeline import part_folder

    root = EMBEDDED / a.model if a.model in ("base", "snapfusion") else Path(a.model)
    vae = a.vae or str(part_folder(root, "vae_encoder"))
    text = a.text_encoder or str(part_folder(root, "text_encoder"))
    for what, folder in (("--vae", vae), ("--text-encoder", text)):
        if not (Path(folder) / "config.json").is_file():
            raise SnapFusionError(f"{what}: no model folder at {folder} (a pipeline saved without its VAE encoder "
                                  "needs --vae pointing at the autoencoder's final/ folder)")
    return vae, text


def _unet_cfg(a: argparse.Namespace, init: str):
    from snapfusion.config import from_dict, load_json
    from snapfusion.models.unet_config import UNetConfig

    data = load_json(Path(init) / "config.json")
    return from_dict(UNetConfig, data["config"], where=f"{init}/config.json")


def _task_cfg(a: argparse.Namespace, unet_cfg, init: str | None):
    from snapfusion.cli import check_noise_data_options
    from snapfusion.data import SceneConfig
    from snapfusion.evolve.robust import RobustConfig, RobustTaskConfig
    from snapfusion.train.tasks import UNetTaskConfig

    check_noise_data_options(a)
    vae, text = _encoders(a)
    unet = UNetTaskConfig(model=unet_cfg, vae=vae, text_encoder=text, image_size=a.image_size,
                          data=SceneConfig(num_emoji=a.num_emoji), offset_noise=a.offset_noise,
                          latent_pool=a.latent_pool, pool_workers=max(1, a.num_workers))
    return RobustTaskConfig(unet=unet, init=init, robust=RobustConfig(a.p_res, a.p_attn, a.granularity))


def _init_folder(a: argparse.Namespace) -> str:
    """The UNet folder to start from: --init, else the --model pipeline's unet/."""
    from snapfusion.cli import EMBEDDED
    from snapfusion.pipeline import part_folder

    if a.init:
        return a.init
    root = EMBEDDED / a.model if a.model in ("base", "snapfusion") else Path(a.model)
    return str(part_folder(root, "unet"))


def cmd_robust_train(a: argparse.Namespace) -> None:
    from snapfusion.cli import _loop_cfg, kd_options
    from snapfusion.evolve.robust import RobustTask
    from snapfusion.train.loop import train

    init = _init_folder(a)
    cfg = _task_cfg(a, _unet_cfg(a, init), init)
    kd = kd_options(a)
    if kd:
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, **kd))
    train(_loop_cfg(a), RobustTask(cfg), resume=a.resume)


def _train_chunk(a: argparse.Namespace, device: str):
    """The evolution's robust-training chunk: the one loop, started from the current UNet, resumable."""
    import torch

    from snapfusion.evolve.robust import RobustTask
    from snapfusion.models.unet import UNet
    from snapfusion.train import state as ckpt_io
    from snapfusion.train.loop import loop_config, train

    def chunk(unet: UNet, run_dir: Path) -> UNet:
        if a.train_steps <= 0:
            return unet
        init = run_dir.parent / "train_init"
        if not (init / "config.json").is_file():
            unet.save(init)
        cfg = loop_config(run_dir=str(run_dir), max_steps=a.train_steps, batch_size=a.batch_size, lr=a.lr,
                          warmup_steps=0, ema_decay=0.0, mixed_precision=a.mixed_precision, log_every=25,
                          sample_every=0, checkpoint_every=max(50, a.train_steps // 2), seed=a.seed,
                          num_workers=a.num_workers)
        task_cfg = _task_cfg(a, unet.config, str(init))
        # each chunk (its own run dir) sees new scenes, not the first train_steps x batch of the stream again
        task_cfg = dataclasses.replace(task_cfg, unet=dataclasses.replace(
            task_cfg.unet, seed=task_cfg.unet.seed + zlib.crc32(run_dir.name.encode())))
        task = RobustTask(task_cfg)
        with torch.enable_grad():  # the evolution around it runs under no_grad (cmd_evolve)
            train(cfg, task, resume=ckpt_io.latest_checkpoint(run_dir) is not None if run_dir.exists() else False)
        return UNet.load(ckpt_io.latest_checkpoint(run_dir) / "model", device=device)

    return chunk


def clip_scorer(evaluators):
    """Per-image domain CLIP score of (images, prompts) with the shipped scene CLIP."""
    from snapfusion.eval.evaluators import clip_scores

    return lambda images, prompts: clip_scores(evaluators.clip, images.to(next(evaluators.clip.parameters()).device),
                                               prompts)


def cmd_evolve(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.evolve.evolution import EvolveConfig, evolve
    from snapfusion.evolve.latency import load_table

    device, pipe, start, ev, records, scorer = _scoring(a)
    cfg = EvolveConfig(budget_fraction=a.budget, iterations=a.iterations, actions_per_step=a.actions_per_step,
                       allow_add=not a.no_add, eval=ev, max_minutes=a.max_minutes)
    with torch.no_grad():
        state = evolve(a.run_dir, start, pipe, records, scorer, load_table(a.table), cfg, _train_chunk(a, device))
    print(f"evolution: {state['iteration']} iteration(s), done={state['done']}, budget {state['budget_ms']:.1f} ms "
          f"of {state['start_ms']:.1f} ms; log {Path(a.run_dir) / 'evolve.jsonl'}")


def _scoring(a: argparse.Namespace):
    """(device, pipeline, start UNet, EvalConfig, prompt records, scorer) of evolve and block-importance."""
    from snapfusion.cli import _device, resolve_model
    from snapfusion.data import load_prompt_set
    from snapfusion.errors import SnapFusionError
    from snapfusion.eval.evaluators import load_evaluators
    from snapfusion.evolve.actions import EvalConfig
    from snapfusion.evolve.robust import load_matching
    from snapfusion.models.unet import UNet

    device = _device(a.device)
    pipe = resolve_model(a.model, device=device)
    init = _init_folder(a)
    start = load_matching(UNet(_unet_cfg(a, init)), init).to(device)
    ev = EvalConfig(prompt_set=a.prompt_set, num_prompts=a.num_prompts, steps=a.eval_steps, guidance=a.guidance,
                    size=a.image_size, batch=a.eval_batch)
    records = load_prompt_set(a.prompt_set, num_emoji=a.num_emoji)[: a.num_prompts]  # prompts the model can read
    if not records:
        raise SnapFusionError(f"no prompt of '{a.prompt_set}' uses only the first {a.num_emoji} emoji")
    scorer = clip_scorer(load_evaluators(a.evaluators, device=device))
    return device, pipe, start, ev, records, scorer


def cmd_block_importance(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.config import save_json
    from snapfusion.errors import SnapFusionError
    from snapfusion.evolve.evolution import block_importance, plot_importance
    from snapfusion.evolve.latency import load_table

    if Path(a.out).suffix != ".json":
        raise SnapFusionError(f"--out {a.out}: expected a .json path (the chart goes beside it as .png)")
    _, pipe, start, ev, records, scorer = _scoring(a)
    table = load_table(a.table) if a.table else None
    with torch.no_grad():
        report = block_importance(pipe, start.eval(), records, scorer, ev, table, label=a.label or _init_folder(a))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(report, out)
    plot_importance([report], out.with_suffix(".png"))
    worst = min(report["blocks"], key=lambda r: r["delta_clip"], default=None)
    print(f"{a.out}: CLIP {report['clip']:.2f} with every block; {len(report['blocks'])} blocks dropped one at a "
          f"time" + (f"; largest drop {worst['block']} ({worst['delta_clip']:+.2f})" if worst else ""))


def cmd_bk_sdm(a: argparse.Namespace) -> None:
    from snapfusion.evolve.actions import transplant
    from snapfusion.evolve.baselines import bk_sdm
    from snapfusion.evolve.latency import load_table
    from snapfusion.evolve.robust import load_matching
    from snapfusion.models.unet import UNet

    table = load_table(a.table) if a.table else None  # checked before anything is written
    src = load_matching(UNet(_unet_cfg(a, a.init)), a.init)
    cfg, removed = bk_sdm(src.config, drop_mid=a.drop_mid)
    model = UNet(cfg)
    sliced, fresh = transplant(model, src.state_dict())
    msg = (f"wrote {a.out}: removed {len(removed)} blocks ({', '.join(removed)}); {len(sliced)} tensors sliced"
           + _predicted(table, cfg, src.config))
    model.save(a.out)
    print(msg)


def cmd_evolve_apply(a: argparse.Namespace) -> None:
    from snapfusion.evolve.evolution import read_log, replay
    from snapfusion.evolve.latency import load_table
    from snapfusion.evolve.robust import load_matching
    from snapfusion.models.unet import UNet, num_parameters

    log = read_log(a.log)  # every input is checked before anything is written
    table = load_table(a.table) if a.table else None
    start = load_matching(UNet(_unet_cfg(a, a.init)), a.init)
    model, n = replay(log, start)
    msg = (f"wrote {a.out}: {n} actions replayed on {a.init}; {num_parameters(model):,} of "
           f"{num_parameters(start):,} parameters" + _predicted(table, model.config, start.config))
    model.save(a.out)
    print(msg)


def _predicted(table: dict | None, new, old) -> str:
    """"; predicted X ms vs Y ms" of an edited UNet config against its source, from a latency table (or "")."""
    from snapfusion.evolve.latency import predict_ms

    if table is None:
        return ""
    return f"; predicted {predict_ms(new, table)[0]:.1f} ms vs {predict_ms(old, table)[0]:.1f} ms"


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    """How a UNet is scored: CLIP score of images for a fixed prompt subset (evolve, block-importance)."""
    p.add_argument("--prompt-set", default="test200")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=10, help="DDIM steps per candidate image (default 10)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--evaluators", default=None, help="evaluator folder (default: the shipped ones)")
    p.add_argument("--device", default="auto")


def _add_model_options(p: argparse.ArgumentParser, *, num_emoji: bool = False) -> None:
    from snapfusion.cli import add_noise_data_options

    p.add_argument("--model", default="base", help="teacher pipeline: 'base' or a pipeline folder (default base)")
    p.add_argument("--init", default=None, help="UNet folder to start from (default: the model's unet/)")
    p.add_argument("--vae", default=None, help="VAE encoder or autoencoder folder (default: <model>/vae_encoder)")
    p.add_argument("--text-encoder", default=None, help="text tower folder (default: <model>/text_encoder)")
    p.add_argument("--image-size", type=int, default=512)
    if num_emoji:  # robust-train has it from the shared training options
        p.add_argument("--num-emoji", type=int, default=None, help="train on the first N atlas emoji")
    p.add_argument("--p-res", type=float, default=0.9, help="probability a res block runs (default 0.9)")
    p.add_argument("--p-attn", type=float, default=0.9, help="probability an attn block runs (default 0.9)")
    p.add_argument("--granularity", choices=["sample", "batch"], default="sample")
    add_noise_data_options(p)


def register_runs(sub: argparse._SubParsersAction) -> None:
    """Add ``robust-train``, ``evolve`` and ``bk-sdm``."""
    from snapfusion.cli import _add_train_options, add_kd_options

    r = sub.add_parser("robust-train", help="train a UNet with random block skips (SnapFusion §3.1); "
                       "--p-res 1 --p-attn 1 is plain fine-tuning", epilog="example: snapfusion robust-train "
                       "--run-dir runs/robust --model base --max-steps 2000")
    _add_train_options(r, steps=2000, batch=32, lr=5e-5)
    _add_model_options(r)
    add_kd_options(r)
    r.set_defaults(func=cmd_robust_train)

    e = sub.add_parser("evolve", help="architecture evolution under a latency budget (SnapFusion Alg. 1)",
                       epilog="example: snapfusion evolve --run-dir runs/evo --table "
                       "snapfusion/assets/latency/base_cpu_torch.json --budget 0.3 --device cuda")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--table", required=True, help="latency lookup table JSON (bench-blocks) of the target device")
    e.add_argument("--budget", type=float, default=0.3, help="fraction of the start UNet's latency (default 0.3)")
    e.add_argument("--iterations", type=int, default=8)
    e.add_argument("--actions-per-step", type=int, default=1)
    e.add_argument("--no-add", action="store_true", help="never add blocks under budget")
    _add_eval_options(e)
    e.add_argument("--max-minutes", type=float, default=0.0, help="stop after the iteration passing this time")
    e.add_argument("--train-steps", type=int, default=200, help="robust-training steps between evolution steps")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--lr", type=float, default=5e-5)
    e.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    e.add_argument("--num-workers", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    _add_model_options(e, num_emoji=True)
    e.set_defaults(func=cmd_evolve)

    i = sub.add_parser("block-importance", help="ΔCLIP of dropping each block alone (SnapFusion Fig. 5 probe)",
                       epilog="example: snapfusion block-importance --init runs/robust/final --out importance.json")
    i.add_argument("--out", required=True, help="output JSON (a bar chart is written beside it)")
    i.add_argument("--table", default=None, help="latency table: adds each block's ΔLatency and value")
    i.add_argument("--label", default=None, help="name of the UNet in the JSON and chart (default: --init)")
    _add_eval_options(i)
    _add_model_options(i, num_emoji=True)
    i.set_defaults(func=cmd_block_importance)

    b = sub.add_parser("bk-sdm", help="BK-SDM-style fixed-rule block removal of a UNet (baseline)")
    b.add_argument("--init", required=True, help="UNet folder")
    b.add_argument("--out", required=True)
    b.add_argument("--drop-mid", action="store_true", help="also drop the mid block's attn and second res")
    b.add_argument("--table", default=None, help="latency table, to print the predicted latency")
    b.set_defaults(func=cmd_bk_sdm)

    x = sub.add_parser("evolve-apply", help="apply an evolution run's actions to a UNet of the config it started "
                       "from (e.g. the teacher's weights, or a retrained base)",
                       epilog="example: snapfusion evolve-apply --log runs/evo --init "
                       "snapfusion/assets/models/base/unet --out runs/evo_on_base")
    x.add_argument("--log", required=True, help="evolution run folder, or its evolve.jsonl (a copy anywhere)")
    x.add_argument("--init", required=True, help="UNet folder whose weights the evolved UNet inherits")
    x.add_argument("--out", required=True)
    x.add_argument("--table", default=None, help="latency table, to print the predicted latency")
    x.set_defaults(func=cmd_evolve_apply)
