"""``snapfusion bench-blocks``, ``robust-train``, ``evolve``, ``block-importance``, ``evolve-apply`` and ``bk-sdm``:
the efficient UNet (SnapFusion §3.1: latency tables, robust training, Alg. 1, and the fixed-rule baseline)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from snapfusion.cli import options, types
from snapfusion.errors import InputError, SnapFusionError
from snapfusion.loading import check_model
from snapfusion.validation import MAX_BATCH, MAX_EVAL_BATCH, MAX_IMAGES
from snapfusion.evolve.runs import (ChunkConfig, clip_scorer, frozen_parts, start_folder,
                                    training_chunk, unet_config_of, unet_preset)


def _unet_of(model: str | None, preset: str | None):
    """The UNet to time: a preset at random weights, a UNet folder, or a model's UNet."""
    import torch

    from snapfusion.loading import resolve_model
    from snapfusion.models.unet import UNet

    if preset is not None:
        torch.manual_seed(0)
        return UNet(unet_preset(preset)), f"preset:{preset}"
    path = Path(model)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return UNet.load(path), str(path)  # a UNet folder
    return resolve_model(model).unet, model


def check_bench_blocks(a: argparse.Namespace) -> None:
    """bench-blocks' cross-option checks: one UNet source, a known preset or an existing model."""
    if (a.model is None) == (a.preset is None):
        raise InputError("give exactly one of --model or --preset")
    if a.preset is not None:
        unet_preset(a.preset)  # a known preset (a config, nothing built)
    if a.model is not None:
        check_model(a.model)
    if a.clock == "cpu" and (a.threads != 1 or options.device(a.device) != "cpu"):
        raise InputError("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    if a.cuda_graphs and (not options.device(a.device).startswith("cuda") or a.backend != "torch"):
        raise InputError("--cuda-graphs times torch modules on a CUDA device: use it with --device cuda "
                         "--backend torch")


def check_model_options(a: argparse.Namespace) -> None:
    """--data, then the model and its parts (robust-train, evolve, block-importance), without loading them."""
    options.data_folder(a, a.image_size)
    check_model(a.model)
    init = start_folder(a.model, a.init)
    if not (Path(init) / "config.json").is_file():
        raise InputError(f"--init: no UNet folder at {init} (expected a folder with config.json)")
    frozen_parts(a.model, a.vae, a.text_encoder)


def check_robust_train(a: argparse.Namespace) -> None:
    options.check_train_options(a)
    check_model_options(a)
    options.kd_options(a)


def check_evolve(a: argparse.Namespace) -> None:
    from snapfusion.evolve.latency import load_table

    check_model_options(a)
    load_table(a.table)


def check_tables(a: argparse.Namespace) -> None:
    """A --table given is a latency table (block-importance, bk-sdm, evolve-apply)."""
    from snapfusion.evolve.latency import load_table

    if a.table:
        load_table(a.table)


def check_evolve_apply(a: argparse.Namespace) -> None:
    from snapfusion.evolve.evolution import read_log

    read_log(a.log)
    _unet_folder("--init")(a.init)
    check_tables(a)


def check_block_importance(a: argparse.Namespace) -> None:
    check_model_options(a)
    check_tables(a)


def cmd_bench_blocks(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.evolve.latency import TableConfig, measure_table, save_table

    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = options.device(a.device)
    unet, source = _unet_of(a.model, a.preset)
    inner = a.inner or (10 if device.startswith("cuda") else 1)
    cfg = TableConfig(size=a.size, batch=a.batch, warmup=a.warmup, repeats=a.repeats, inner=inner,
                      backend=a.backend, dtype=a.dtype, clock=a.clock, cuda_graphs=a.cuda_graphs,
                      separate_whole=a.separate_whole)
    table = measure_table(unet, cfg, device=device, meta={"model": source})
    save_table(table, a.out)
    top = sorted(table["blocks"].items(), key=lambda kv: -kv[1]["ms"])[:5]
    print(f"wrote {a.out}: {len(table['blocks'])} blocks; whole UNet {table['whole_ms']:.2f} ms, sum of parts "
          f"{table['predicted_ms']:.2f} ms ({100 * table['relative_error']:+.1f}%); slowest: "
          + ", ".join(f"{n} {v['ms']:.2f}" for n, v in top))


def _task_cfg(a: argparse.Namespace, unet_cfg, init: str | None):
    """The ``RobustTaskConfig`` of robust-train's and evolve's options."""
    from snapfusion.evolve.robust import RobustConfig, RobustTaskConfig
    from snapfusion.train.tasks import UNetTaskConfig

    folder = options.data_folder(a, a.image_size)
    vae, text = frozen_parts(a.model, a.vae, a.text_encoder)
    unet = UNetTaskConfig(model=unet_cfg, vae=vae, text_encoder=text, image_size=a.image_size,
                          data=options.scene_config(a), offset_noise=a.offset_noise,
                          latent_pool=a.latent_pool, pool_workers=max(1, a.num_workers), data_folder=folder)
    return RobustTaskConfig(unet=unet, init=init, robust=RobustConfig(a.p_res, a.p_attn, a.granularity))


def cmd_robust_train(a: argparse.Namespace) -> None:
    from snapfusion.evolve.robust import RobustTask
    from snapfusion.train.loop import train

    options.data_folder(a, a.image_size)  # a bad --data folder fails before any model loads
    init = start_folder(a.model, a.init)
    cfg = _task_cfg(a, unet_config_of(init), init)
    kd = options.kd_options(a)
    if kd:
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, **kd))
    train(options.loop_config(a), RobustTask(cfg), resume=a.resume)


def _train_chunk(a: argparse.Namespace, device: str):
    """The evolution's robust-training chunk of evolve's options."""
    chunk = ChunkConfig(steps=a.train_steps, batch_size=a.batch_size, lr=a.lr, mixed_precision=a.mixed_precision,
                        seed=a.seed, num_workers=a.num_workers)
    return training_chunk(lambda unet_cfg, init: _task_cfg(a, unet_cfg, init), chunk, device)


def _scoring(a: argparse.Namespace):
    """(device, pipeline, start UNet, EvalConfig, prompt records, scorer) of evolve and block-importance."""
    from snapfusion.data import load_prompt_set
    from snapfusion.eval.evaluators import load_evaluators
    from snapfusion.evolve.actions import EvalConfig
    from snapfusion.evolve.robust import load_matching
    from snapfusion.loading import resolve_model
    from snapfusion.models.unet import UNet

    device = options.device(a.device)
    pipe = resolve_model(a.model, device=device)
    init = start_folder(a.model, a.init)
    start = load_matching(UNet(unet_config_of(init)), init).to(device)
    ev = EvalConfig(prompt_set=a.prompt_set, num_prompts=a.num_prompts, steps=a.eval_steps, guidance=a.guidance,
                    size=a.image_size, batch=a.eval_batch)
    records = load_prompt_set(a.prompt_set, num_emoji=a.num_emoji)[: a.num_prompts]  # prompts the model can read
    if not records:
        raise SnapFusionError(f"no prompt of '{a.prompt_set}' uses only the first {a.num_emoji} emoji")
    scorer = clip_scorer(load_evaluators(a.evaluators, device=device))
    return device, pipe, start, ev, records, scorer


def cmd_evolve(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.evolve.evolution import EvolveConfig, evolve
    from snapfusion.evolve.latency import load_table

    options.data_folder(a, a.image_size)  # a bad --data folder fails before any model loads
    device, pipe, start, ev, records, scorer = _scoring(a)
    cfg = EvolveConfig(budget_fraction=a.budget, iterations=a.iterations, actions_per_step=a.actions_per_step,
                       allow_add=not a.no_add, eval=ev, max_minutes=a.max_minutes)
    with torch.no_grad():
        state = evolve(a.run_dir, start, pipe, records, scorer, load_table(a.table), cfg, _train_chunk(a, device))
    print(f"evolution: {state['iteration']} iteration(s), done={state['done']}, budget {state['budget_ms']:.1f} ms "
          f"of {state['start_ms']:.1f} ms; log {Path(a.run_dir) / 'evolve.jsonl'}")


def cmd_block_importance(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.config import save_json
    from snapfusion.evolve.evolution import block_importance, plot_importance
    from snapfusion.evolve.latency import load_table

    _, pipe, start, ev, records, scorer = _scoring(a)
    table = load_table(a.table) if a.table else None
    with torch.no_grad():
        report = block_importance(pipe, start.eval(), records, scorer, ev, table,
                                  label=a.label or start_folder(a.model, a.init))
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
    src = load_matching(UNet(unet_config_of(a.init)), a.init)
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
    start = load_matching(UNet(unet_config_of(a.init)), a.init)
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


def _unet_folder(name: str):
    """A model part folder (with config.json)."""
    return types.existing(name, folder=True, marker="config.json")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    """How a UNet is scored: CLIP score of images for a fixed prompt subset (evolve, block-importance)."""
    p.add_argument("--prompt-set", default="test200", help="shipped prompt set of the scores (default %(default)s)")
    p.add_argument("--num-prompts", type=types.positive("--num-prompts", maximum=100_000), default=32,
                   help="its first N prompts (default %(default)s)")
    p.add_argument("--eval-steps", type=types.steps("--eval-steps"), default=10,
                   help="DDIM steps per candidate image (default 10)")
    p.add_argument("--eval-batch", type=types.positive("--eval-batch", maximum=MAX_EVAL_BATCH), default=16,
                   help="images per generate call (default %(default)s)")
    p.add_argument("--guidance", type=types.guidance(), default=7.5,
                   help="guidance scale of the images (default %(default)s)")
    p.add_argument("--evaluators", default=None, type=types.existing("--evaluators", folder=True),
                   help="evaluator folder (default: the shipped ones)")
    options.add_device(p)


def _add_model_options(p: argparse.ArgumentParser, *, num_emoji: bool = False) -> None:
    p.add_argument("--model", default="base", help="teacher pipeline: 'base' or a pipeline folder (default base)")
    p.add_argument("--init", default=None,
                   help="UNet folder to start from (default: the model's unet/)")
    p.add_argument("--vae", default=None,
                   help="VAE encoder or autoencoder folder (default: <model>/vae_encoder)")
    p.add_argument("--text-encoder", default=None,
                   help="text tower folder (default: <model>/text_encoder)")
    p.add_argument("--image-size", type=types.side("--image-size"), default=512,
                   help="image side in pixels (default %(default)s)")
    if num_emoji:  # robust-train has them from the shared training options
        p.add_argument("--num-emoji", type=types.positive("--num-emoji"), default=None,
                       help="train on the first N atlas emoji")
        options.add_data(p)
    p.add_argument("--p-res", type=types.probability("--p-res"), default=0.9,
                   help="probability a res block runs (default 0.9)")
    p.add_argument("--p-attn", type=types.probability("--p-attn"), default=0.9,
                   help="probability an attn block runs (default 0.9)")
    p.add_argument("--granularity", choices=["sample", "batch"], default="sample",
                   help="draw the block skips per sample or once per batch (default %(default)s)")
    options.add_noise_data_options(p)


def _register_runs(sub: argparse._SubParsersAction) -> None:
    """Add ``robust-train``, ``evolve``, ``block-importance``, ``bk-sdm`` and ``evolve-apply``."""
    r = sub.add_parser("robust-train", help="train a UNet with random block skips (SnapFusion §3.1); "
                       "--p-res 1 --p-attn 1 is plain fine-tuning", epilog="example: snapfusion robust-train "
                       "--run-dir runs/robust --model base --max-steps 2000")
    options.add_train_options(r, steps=2000, batch=32, lr=5e-5)
    _add_model_options(r)
    options.add_kd_options(r)
    r.set_defaults(func=cmd_robust_train, check=check_robust_train)

    e = sub.add_parser("evolve", help="architecture evolution under a latency budget (SnapFusion Alg. 1)",
                       epilog="example: snapfusion evolve --run-dir runs/evo --table "
                       "snapfusion/assets/latency/base_cpu_torch.json --budget 0.3 --device cuda")
    e.add_argument("--run-dir", required=True, type=types.output_dir("--run-dir"),
                   help="the evolution's log, candidates and training chunks go here")
    e.add_argument("--table", required=True, type=types.existing("--table", folder=False),
                   help="latency lookup table JSON (bench-blocks) of the target device")
    e.add_argument("--budget", type=types.number("--budget", minimum=0.0, maximum=1.0, low_open=True), default=0.3,
                   help="fraction of the start UNet's latency (default 0.3)")
    e.add_argument("--iterations", type=types.positive("--iterations", maximum=10_000), default=8,
                   help="evolution steps at most (default %(default)s)")
    e.add_argument("--actions-per-step", type=types.positive("--actions-per-step", maximum=1000), default=1,
                   help="block removals (or additions) per evolution "
                   "step (default %(default)s)")
    e.add_argument("--no-add", action="store_true", help="never add blocks under budget")
    _add_eval_options(e)
    e.add_argument("--max-minutes", type=types.number("--max-minutes", minimum=0.0), default=0.0,
                   help="stop after the iteration passing this time")
    e.add_argument("--train-steps", type=types.non_negative("--train-steps"), default=200,
                   help="robust-training steps between evolution steps")
    e.add_argument("--batch-size", type=types.positive("--batch-size", maximum=MAX_BATCH), default=32,
                   help="robust-training batch (default %(default)s)")
    e.add_argument("--lr", type=types.lr(), default=5e-5, help="robust-training learning rate (default %(default)s)")
    e.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16",
                   help="robust-training autocast precision (default %(default)s)")
    e.add_argument("--num-workers", type=types.non_negative("--num-workers", maximum=256), default=4,
                   help="data loader workers (default %(default)s)")
    e.add_argument("--seed", type=types.seed(), default=0, help="robust-training seed (default %(default)s)")
    _add_model_options(e, num_emoji=True)
    e.set_defaults(func=cmd_evolve, check=check_evolve)

    i = sub.add_parser("block-importance", help="ΔCLIP of dropping each block alone (SnapFusion Fig. 5 probe)",
                       epilog="example: snapfusion block-importance --init runs/robust/final --out importance.json")
    i.add_argument("--out", required=True, type=types.output_file("--out", [".json"]),
                   help="output JSON (a bar chart is written beside it)")
    i.add_argument("--table", default=None, type=types.existing("--table", folder=False),
                   help="latency table: adds each block's ΔLatency and value")
    i.add_argument("--label", default=None, help="name of the UNet in the JSON and chart (default: --init)")
    _add_eval_options(i)
    _add_model_options(i, num_emoji=True)
    i.set_defaults(func=cmd_block_importance, check=check_block_importance)

    b = sub.add_parser("bk-sdm", help="BK-SDM-style fixed-rule block removal of a UNet (baseline)",
                       epilog="example: snapfusion bk-sdm --init snapfusion/assets/models/base/unet --out runs/bk")
    b.add_argument("--init", required=True, type=_unet_folder("--init"), help="UNet folder")
    b.add_argument("--out", required=True, type=types.output_dir(), help="the pruned UNet's folder")
    b.add_argument("--drop-mid", action="store_true", help="also drop the mid block's attn and second res")
    b.add_argument("--table", default=None, type=types.existing("--table", folder=False),
                   help="latency table, to print the predicted latency")
    b.set_defaults(func=cmd_bk_sdm, check=check_tables)

    x = sub.add_parser("evolve-apply", help="apply an evolution run's actions to a UNet of the config it started "
                       "from (e.g. the teacher's weights, or a retrained base)",
                       epilog="example: snapfusion evolve-apply --log runs/evo --init "
                       "snapfusion/assets/models/base/unet --out runs/evo_on_base")
    x.add_argument("--log", required=True, help="evolution run folder, or its evolve.jsonl (a copy anywhere)")
    x.add_argument("--init", required=True, help="UNet folder whose weights the evolved UNet inherits")
    x.add_argument("--out", required=True, type=types.output_dir(), help="the evolved UNet's folder")
    x.add_argument("--table", default=None, type=types.existing("--table", folder=False),
                   help="latency table, to print the predicted latency")
    x.set_defaults(func=cmd_evolve_apply, check=check_evolve_apply)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the efficient-UNet commands."""
    b = sub.add_parser("bench-blocks", help="per-block latency lookup table of a UNet (JSON)",
                       epilog="example: snapfusion bench-blocks --preset base --device cpu --out base_cpu.json")
    b.add_argument("--model", default=None, help="'base', a pipeline folder or a UNet folder")
    b.add_argument("--preset", default=None, help="a UNet preset at random weights: "
                   f"{', '.join(options.ARCHITECTURES)} (as bench --preset)")
    options.add_device(b, "cpu")
    b.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="the runtime the blocks are timed in (default %(default)s)")
    b.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="precision (default %(default)s)")
    b.add_argument("--size", type=types.bench_size(), default=512,
                   help="image side in pixels; latent = size / 8 (default 512)")
    b.add_argument("--batch", type=types.positive("--batch", maximum=2 * MAX_IMAGES), default=2,
                   help="UNet batch; 2 = one image with guidance (default 2)")
    b.add_argument("--warmup", type=types.non_negative("--warmup", maximum=10_000), default=3,
                   help="untimed calls per piece first (default %(default)s)")
    b.add_argument("--repeats", type=types.positive("--repeats", maximum=10_000), default=10,
                   help="timings per block; the median is kept (default 10)")
    b.add_argument("--inner", type=types.non_negative("--inner", maximum=10_000), default=0,
                   help="calls per timing (default: 1 on cpu, 10 on cuda)")
    b.add_argument("--threads", type=types.non_negative("--threads", maximum=1024), default=0,
                   help="torch CPU threads (default: torch's)")
    b.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, robust to load from other processes (needs --threads 1)")
    b.add_argument("--cuda-graphs", action="store_true", help="cuda: time every piece as a replayed CUDA graph "
                   "(GPU time without Python dispatch, as a deployed engine runs)")
    b.add_argument("--separate-whole", action="store_true", help="time the whole UNet in its own phase, freed "
                   "before the parts: about half the peak memory (SD-v1.5 with onnxruntime in 24 GiB); use with "
                   "--clock cpu, as the whole and its parts no longer share timing rounds")
    b.add_argument("--out", required=True, type=types.output_file("--out", [".json"]), help="output JSON")
    b.set_defaults(func=cmd_bench_blocks, check=check_bench_blocks)
    _register_runs(sub)
