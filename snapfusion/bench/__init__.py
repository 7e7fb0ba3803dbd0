"""Latency of text -> image generation: one pipeline per run (``core``), the lever and anchor tables at SD scale
(``suite``) and diffusers' StableDiffusionPipeline as the anchor (``anchor``)."""

from snapfusion.bench.core import (  # noqa: F401  (the public names of the benchmark)
    COMPONENTS, PRESETS, PROMPT, BenchConfig, count_flops, dumps, markdown_table, matmul_peak, preset_pipeline,
    run_bench,
)
from snapfusion.fast import compile_pipeline  # noqa: F401
