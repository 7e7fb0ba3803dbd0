"""Markdown tables of a suite result (snapfusion.bench.suite): levers, anchors with ratios, SDPA kernels,
throughput."""

from __future__ import annotations


def _ms(r: dict, key: str) -> float | None:
    s = r.get("latency_s", {}).get(key)
    return None if s is None else s["median"] * 1e3


def _total(r: dict) -> str:
    s = r.get("latency_s", {}).get("total")
    if s is None:
        return r.get("error", r.get("skipped", r.get("note", "—")))[:160]
    return f"**{s['median'] * 1e3:.1f}** [{s['min'] * 1e3:.1f}, {s['max'] * 1e3:.1f}]"


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _anchor_total(rows: list[dict], steps: int) -> float | None:
    for r in rows:
        if r["group"] == "anchor" and r.get("preset") == "diffusers-sd15" and r.get("steps") == steps:
            return _ms(r, "total")
    return None


def latency_markdown(result: dict) -> str:
    """The lever table, then the anchor table, then the SDPA probe and the GroupNorm+SiLU check."""
    cfg, rows, floors = result["config"], result["rows"], result["floors"]
    ref = _anchor_total(rows, cfg["anchor_steps"])
    env = result["environment"]
    lines = [f"GPU: {env['device']}; torch {env['torch']}, diffusers {env.get('diffusers')}, transformers "
             f"{env.get('transformers')}, CUDA {env.get('cuda')}; {cfg['dtype']}, {cfg['size']}x{cfg['size']}, "
             f"guidance {cfg['guidance']}, median of {cfg['runs']} runs after {cfg['warmup']} warm-up runs; "
             f"measured matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s.", "",
             f"| # | {cfg['preset']} preset, {cfg['steps']} steps: lever (cumulative) | text ms | UNet ms/step | "
             "decoder ms | total ms, median [min, max] | × vs eager | total / floor | diffusers "
             f"{cfg['anchor_steps']}-step / this | peak MiB | first run s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    eager = None
    for i, r in enumerate(x for x in rows if x["group"] == "lever" and "sdpa" not in x and
                          "compiled_kernels" not in x):
        total = _ms(r, "total")
        eager = total if eager is None else eager
        floor = floors.get(r.get("floor", ""), {}).get("floor_s")
        lines.append(
            f"| {i + 1} | {r['row']} | {_f(_ms(r, 'text_encoder'))} | {_f(_ms(r, 'unet_per_step'), '.2f')} | "
            f"{_f(_ms(r, 'decoder'))} | {_total(r)} | {_f(total and eager / total, '.2f')} | "
            f"{_f(total and floor and total / (floor * 1e3), '.2f')} | {_f(total and ref and ref / total, '.1f')} | "
            f"{_f(r.get('peak_memory_mb'), ',.0f')} | {_f(r.get('first_run_s'), '.1f')} |")
    lines += ["", "| anchor | steps | total ms, median [min, max] | floor ms | total / floor | "
              f"diffusers {cfg['anchor_steps']}-step / this | peak MiB |", "|---|---|---|---|---|---|---|"]
    best = [r for r in rows if r["group"] == "lever" and _ms(r, "total")]
    picks = [r for r in rows if r["group"] == "anchor"]
    standard = [r for r in best if "guidance-embedded" not in r["row"]]
    picks += [min(standard, key=lambda r: _ms(r, "total"))] if standard else []
    picks += [r for r in best if "guidance-embedded" in r["row"]]
    for r in picks:
        total = _ms(r, "total")
        floor = floors.get(r.get("floor", ""), {}).get("floor_s")
        name = r["row"] if r["group"] == "anchor" else f"ours, {r.get('preset')} preset: {r['row']}"
        lines.append(f"| {name} | {r.get('steps', '—')} | {_total(r)} | {_f(floor and floor * 1e3)} | "
                     f"{_f(total and floor and total / (floor * 1e3), '.2f')} | "
                     f"{_f(total and ref and ref / total, '.1f')} | {_f(r.get('peak_memory_mb'), ',.0f')} |")
    for r in rows:
        if "sdpa" in r:
            lines += ["", "| SDPA shape (B, heads, Nq, Nk, d) | PyTorch's pick | fastest | flash µs | efficient µs | "
                      "cudnn µs | math µs |", "|---|---|---|---|---|---|---|"]
            for s in r["sdpa"]:
                us = {k: _f(v and v * 1e6) for k, v in s["seconds"].items()}
                lines.append(f"| {tuple(s['shape'])} | {s['default']} | {s['best']} | {us.get('flash')} | "
                             f"{us.get('efficient')} | {us.get('cudnn')} | {us.get('math')} |")
        if "compiled_kernels" in r:
            lines += ["", f"GroupNorm + SiLU ({r['note']}): inductor emits {r['compiled_kernels']} kernel(s); eager "
                      f"{r['eager_ms']:.3f} ms, compiled {r['compiled_ms']:.3f} ms."]
    problems = [r for r in rows if "error" in r or "skipped" in r]
    if problems:
        lines += ["", "Not measured: " + "; ".join(f"{r['row']}: {r.get('error', r.get('skipped'))}"[:300]
                                                   for r in problems)]
    return "\n".join(lines) + "\n"


def throughput_markdown(result: dict) -> str:
    """Images/s and peak memory per batch size, ours against diffusers'."""
    cfg, rows = result["config"], result["rows"]
    ours = {r.get("batch"): r for r in rows if r.get("preset") != "diffusers-sd15"}
    theirs = {r.get("batch"): r for r in rows if r.get("preset") == "diffusers-sd15"}
    mode = "torch.compile + " if cfg.get("compile", True) else "no torch.compile; "
    lines = [f"{mode}CUDA graphs (ours), channels-last, fp16, SDPA; median of {cfg['throughput_runs']} runs (diffusers "
             "at 64 prompts: one fewer).", "",
             f"| prompts per call | ours ({cfg['preset']}, {cfg['steps']} steps) images/s | ours peak MiB | diffusers "
             f"({cfg['anchor_steps']} steps) images/s | diffusers peak MiB | ours / diffusers |",
             "|---|---|---|---|---|---|"]
    for b in cfg["batches"]:
        o, d = ours.get(b, {}), theirs.get(b, {})
        io = o.get("latency_s") and b / o["latency_s"]["total"]["median"]
        idf = d.get("latency_s") and b / d["latency_s"]["total"]["median"]
        lines.append(f"| {b} | {_f(io)} | {_f(o.get('peak_memory_mb'), ',.0f')} | {_f(idf, '.2f')} | "
                     f"{_f(d.get('peak_memory_mb'), ',.0f')} | {_f(io and idf and io / idf, '.1f')} |")
    problems = [r for r in rows if "error" in r or "skipped" in r]
    if problems:
        lines += ["", "Not measured: " + "; ".join(f"{r['row']} (batch {r.get('batch')}): "
                                                   f"{r.get('error', r.get('skipped'))}"[:300] for r in problems)]
    return "\n".join(lines) + "\n"


def profile_markdown(result: dict) -> str:
    """GPU milliseconds per kernel category, one column per profiled configuration."""
    rows = [r for r in result["rows"] if "kernels" in r]
    kinds = sorted({k for r in rows for k in r["kernels"]})
    lines = ["| kernel category | " + " | ".join(f"{r['row']} ms (kernels)" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for k in kinds:
        cells = [r["kernels"].get(k) for r in rows]
        lines.append(f"| {k} | " + " | ".join("—" if c is None else f"{c['seconds'] * 1e3:.2f} ({c['count']})"
                                             for c in cells) + " |")
    lines.append("| GPU busy | " + " | ".join(f"{r['gpu_busy_s'] * 1e3:.2f}" for r in rows) + " |")
    lines.append("| wall, one call | " + " | ".join(f"{r['wall_s'] * 1e3:.2f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"
