"""``snapfusion export``, ``bench`` and ``convert-sd``: ship a model to other runtimes, time it, and bring a
Stable Diffusion v1.x checkpoint in."""

from __future__ import annotations

import argparse
from pathlib import Path

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
                       compile=a.compile, compile_mode=a.compile_mode, compile_all=a.compile_all, runs=a.runs,
                       warmup=a.warmup)


def check_bench(a: argparse.Namespace) -> None:
    """bench's cross-option checks: the config as a whole, and the model's files."""
    _bench_config(a)
    if a.model:
        check_model(a.model)


def cmd_bench(a: argparse.Namespace) -> None:
    from snapfusion.bench import dumps, markdown_table, run_bench

    result = run_bench(_bench_config(a))
    table = markdown_table([result])
    print(table, end="")
    for path, text in ((a.json, dumps(result)), (a.markdown, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)


def cmd_convert_sd(a: argparse.Namespace) -> None:
    import torch

    from snapfusion.sd15 import load_sd

    pipe = load_sd(a.path)
    pipe.save(a.out, dtype=torch.float16 if a.fp16 else None)
    print(f"wrote {a.out}")


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
    b.add_argument("--preset", choices=["sd15", "snapfusion", "base", "base-snapfusion", "tiny"], default=None,
                   help="random-weight architecture instead of --model")
    options.add_device(b, "cpu")
    b.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="the runtime timed (default %(default)s)")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="torch backend")
    b.add_argument("--size", type=types.bench_size(), default=512, help="image side in pixels (default %(default)s)")
    b.add_argument("--steps", type=types.steps(), default=8, help="sampling steps (default %(default)s)")
    b.add_argument("--guidance", type=types.guidance(), default=7.5, help="guidance scale; 1: no unconditional pass "
                   "(default %(default)s)")
    b.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    b.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile mode (reduce-overhead: CUDA graphs on the GPU)")
    b.add_argument("--compile-all", action="store_true", help="with --compile: also the text encoder and decoder")
    b.add_argument("--runs", type=types.positive("--runs", maximum=10_000), default=5,
                   help="timed generations (default %(default)s)")
    b.add_argument("--warmup", type=types.non_negative("--warmup", maximum=10_000), default=2,
                   help="untimed generations first (default %(default)s)")
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
