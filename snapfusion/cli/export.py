"""``snapfusion export``, ``bench`` and ``convert-sd``: ship a model to other runtimes, time it, and bring a
Stable Diffusion v1.x checkpoint in."""

from __future__ import annotations

import argparse
from pathlib import Path

from snapfusion import validation as v
from snapfusion.cli import options, types
from snapfusion.fileio import atomic_write_text
from snapfusion.loading import check_model, resolve_model
from snapfusion.validation import MAX_IMAGES, MAX_STEPS


INTEROP = ("diffusers", "single-file")  # formats written by export.interop, without ExportConfig


def _export_config(a: argparse.Namespace):
    from snapfusion.export.components import ExportConfig

    return ExportConfig(format=a.format, precision=a.precision, opset=a.opset, batch=a.batch, resolution=a.size,
                        parity=not a.no_parity, parity_steps=a.parity_steps, min_psnr=a.min_psnr,
                        max_rel_diff=a.max_rel_diff)


def check_export(a: argparse.Namespace) -> None:
    """export's cross-option checks: the packages the format needs, the config as a whole, the model's files."""
    from snapfusion.export.requirements import require_export_packages

    require_export_packages(a.format)  # a missing onnx / onnxruntime / coremltools: one line naming the extra
    if a.format not in INTEROP:
        _export_config(a)
    check_model(a.model)


def cmd_export(a: argparse.Namespace) -> None:
    import torch

    torch.set_grad_enabled(False)
    if a.format in INTEROP:
        from snapfusion.export.interop import export_interop

        print(export_interop(a.model, a.out, a.format, a.precision))
        return
    cfg = _export_config(a)
    pipe = resolve_model(a.model, device="cpu")  # fp32 on the CPU: the reference the parity check compares with
    if cfg.format == "onnx":
        from snapfusion.export.onnx_export import export_onnx
        from snapfusion.export.ort import OrtPipeline
        from snapfusion.export.parity import check_parity

        out = export_onnx(pipe, a.out, cfg)
        print(f"wrote {out} (ONNX, {cfg.precision}, opset {cfg.opset})")
        if cfg.parity:
            print(check_parity(pipe, OrtPipeline.load(out), cfg, out).summary())
        return
    from snapfusion.export.coreml_export import can_run_coreml, export_coreml, package_interface

    out = export_coreml(pipe, a.out, cfg)
    print(f"wrote {out} (Core ML, {cfg.precision})")
    for package in sorted(Path(out).glob("*.mlpackage")):
        print(f"  {package.name}: {package_interface(package)}")
    if cfg.parity and not can_run_coreml():
        print("parity: not run (Core ML packages run only on macOS); interfaces checked above")


def _bench_config(a: argparse.Namespace):
    from snapfusion.bench import BenchConfig

    return BenchConfig(model=a.model or "", preset=a.preset or "", device=options.device(a.device),
                       backend=a.backend, dtype=a.dtype, size=a.size, steps=a.steps, guidance=a.guidance,
                       compile=True if a.compile else (False if a.no_compile else None),
                       compile_mode=a.compile_mode, compile_all=a.compile_all, runs=a.runs, warmup=a.warmup,
                       fast=False if a.no_fast else None, channels_last=not a.no_channels_last, sdpa=a.sdpa,
                       cfg=a.cfg)


def check_bench(a: argparse.Namespace) -> None:
    """bench's cross-option checks: the config as a whole (not for a --suite, which builds its own), the model."""
    if a.suite:
        return
    _bench_config(a)
    if a.model:
        check_model(a.model)


def cmd_bench(a: argparse.Namespace) -> None:
    from snapfusion.bench import dumps, markdown_table, run_bench

    if a.suite:
        from snapfusion.bench.suite import run_suite

        result, table = run_suite(a.suite, device=options.device(a.device), dtype=a.dtype, size=a.size, steps=a.steps,
                                  guidance=a.guidance, runs=a.runs, warmup=a.warmup, budget_s=a.budget_s,
                                  batches=a.batches, json_path=a.json, compile=not a.no_compile)
    else:
        result = run_bench(_bench_config(a))
        table = markdown_table([result])
    print(table, end="")
    for path, text in ((a.json, dumps(result)), (a.markdown, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)


def _batches(text: str) -> str:
    """--batches '1,4,16,64': each a count of images per call (1..MAX_IMAGES); kept as text for the suite."""
    for part in text.split(","):
        v.check_num_images(v.parse_int(part, name="--batches value"), name="--batches value")
    return text


def cmd_convert_sd(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.sd15 import load_sd

    pipe = load_sd(a.path)
    pipe.save(a.out, dtype=torch.float16 if a.fp16 else None)
    print(f"wrote {a.out}")


# snapfusion.fast.SDPA, spelled out so that --help imports no torch (tests/test_bench.py checks they agree)
SDPA = ("default", "flash", "efficient", "cudnn", "math", "tuned")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``bench`` and ``convert-sd``."""
    e = sub.add_parser("export", help="export text encoder, UNet and decoder to ONNX or Core ML, with parity check",
                       epilog="example: snapfusion export --model base --format onnx --precision fp16 --out base-onnx")
    e.add_argument("--model", default=None, help="'base', a pipeline folder or an SD-v1.5 path (default: embedded)")
    e.add_argument("--format", choices=["onnx", "coreml", "diffusers", "single-file"], default="onnx",
                   help="diffusers: a diffusers pipeline folder; single-file: one LDM-layout .safetensors (SD-shaped "
                   "models)")
    e.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="weights: fp32, fp16, or int8 (dynamic/linear weight quantization) (default %(default)s)")
    e.add_argument("--out", required=True, type=types.output_dir(), help="output folder")
    e.add_argument("--opset", type=types.opset(), default=17, help="ONNX opset (default %(default)s)")
    e.add_argument("--batch", type=types.positive("--batch", maximum=2 * MAX_IMAGES), default=2,
                   help="Core ML: fixed UNet batch (default %(default)s)")
    e.add_argument("--size", type=types.side("--size", zero=True), default=0,
                   help="Core ML shapes and parity image side (default: model's)")
    e.add_argument("--no-parity", action="store_true", help="skip the parity check against PyTorch")
    e.add_argument("--parity-steps", type=types.integer("--parity-steps", minimum=0, maximum=MAX_STEPS), default=0,
                   help="steps of the parity image (default: the model's, at most 8)")
    e.add_argument("--min-psnr", type=types.number("--min-psnr", minimum=0.0), default=0.0,
                   help="fail below this PSNR (default: 35/30/20 dB "
                   "for fp32/fp16/int8)")
    e.add_argument("--max-rel-diff", type=types.number("--max-rel-diff", minimum=0.0), default=0.0,
                   help="fail above this per-network max|diff|/max|ref| "
                   "(default: 1e-3/2e-2/0.2)")
    e.set_defaults(func=cmd_export, check=check_export)

    b = sub.add_parser("bench", help="per-component latency (median/min/max), peak memory, FLOPs, compute floor",
                       epilog="example: snapfusion bench --preset snapfusion --device cuda --dtype fp16 --steps 8")
    b.add_argument("--model", default=None, help="a pipeline (torch) or an ONNX export folder (onnxruntime)")
    b.add_argument("--preset", choices=list(options.ARCHITECTURES), default=None,
                   help="random-weight architecture instead of --model")
    options.add_device(b, "cpu")
    b.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="the runtime timed (default %(default)s)")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="torch backend")
    b.add_argument("--size", type=types.bench_size(), default=512, help="image side in pixels (default %(default)s)")
    b.add_argument("--steps", type=types.steps(), default=8, help="sampling steps (default %(default)s)")
    b.add_argument("--guidance", type=types.guidance(), default=7.5, help="guidance scale; 1: no unconditional pass "
                   "(default %(default)s)")
    b.add_argument("--compile", action="store_true", help="torch.compile the UNet (default with the CUDA fast path: "
                   "UNet, text encoder and decoder)")
    b.add_argument("--no-compile", action="store_true", help="no torch.compile, also on CUDA")
    b.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode (reduce-overhead: CUDA graphs on the GPU)")
    b.add_argument("--compile-all", action="store_true", help="with --compile: also the text encoder and decoder")
    b.add_argument("--runs", type=types.positive("--runs", maximum=10_000), default=5,
                   help="timed generations (default %(default)s)")
    b.add_argument("--warmup", type=types.non_negative("--warmup", maximum=10_000), default=2,
                   help="untimed generations first (default %(default)s)")
    b.add_argument("--no-fast", action="store_true", help="on CUDA: plain Pipeline.generate instead of "
                   "snapfusion.fast (CUDA graphs over the whole loop, channels-last, cached negative prompt)")
    b.add_argument("--no-channels-last", action="store_true", help="fast path: keep NCHW convolutions")
    b.add_argument("--sdpa", choices=list(SDPA), default="default", help="fast path: SDPA kernel (tuned: fastest "
                   "per attention shape)")
    b.add_argument("--cfg", choices=["batch2", "split"], default="batch2",
                   help="fast path: guidance as one batch-2 UNet call or two batch-1 calls")
    b.add_argument("--suite", choices=["latency", "throughput", "profile"], default=None,
                   help="SD-scale tables in one run: every latency lever plus the anchors (diffusers' "
                   "StableDiffusionPipeline at 50 and --steps steps, our sd15 preset at 50), throughput, or GPU "
                   "time per kernel category (profile)")
    b.add_argument("--budget-s", type=types.number("--budget-s", minimum=0.0, low_open=True), default=480.0,
                   help="--suite: skip rows not started by then")
    b.add_argument("--batches", type=_batches, default="1,4,16,64", help="--suite throughput: prompts per call")
    b.add_argument("--json", default=None, type=types.output_file("--json", [".json"]),
                   help="write the full result here")
    b.add_argument("--markdown", default=None, type=types.output_file("--markdown"), help="write the table here")
    b.set_defaults(func=cmd_bench, check=check_bench)

    c = sub.add_parser("convert-sd", help="convert a local SD-v1.x (diffusers folder or .safetensors) to our format",
                       epilog="example: snapfusion convert-sd path/to/sd-v1-5 --out sd15 --fp16")
    c.add_argument("path", help="a diffusers SD-v1.x folder or a single-file .safetensors checkpoint")
    c.add_argument("--out", required=True, type=types.output_dir(), help="the pipeline folder to write")
    c.add_argument("--fp16", action="store_true", help="store the weights in fp16 (default: as loaded)")
    c.set_defaults(func=cmd_convert_sd)
