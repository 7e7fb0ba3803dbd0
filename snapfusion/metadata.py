"""Image metadata: the AUTOMATIC1111 ``parameters`` text that image tools and sites read from a PNG.

Format (AUTOMATIC1111 modules/processing.py ``create_infotext``): the prompt, an optional ``Negative prompt:`` line,
then one line of ``Key: value`` pairs joined by ", "; a value holding a comma, colon or quote is JSON-quoted.
"""

from __future__ import annotations

import json
import re

SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}  # our sampler -> AUTOMATIC1111's name for it


def _value(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def a1111_parameters(prompt: str, *, negative_prompt: str = "", steps: int, sampler: str, guidance: float,
                     seed: int, width: int, height: int, model: str, extra: dict | None = None) -> str:
    """The AUTOMATIC1111 ``parameters`` text of one generation (``extra``: more ``Key: value`` pairs, in order;
    None values are left out)."""
    from snapfusion import __version__

    pairs = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": float(guidance),
             "Seed": seed, "Size": f"{width}x{height}", "Model": model, **(extra or {}),
             "Version": f"snapfusion {__version__}"}
    lines = [prompt.strip()]
    if negative_prompt.strip():
        lines.append(f"Negative prompt: {negative_prompt.strip()}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in pairs.items() if v is not None and v != ""))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The ``Key: value`` pairs of a ``parameters`` text plus "prompt" and "negative_prompt" (for tests and tools)."""
    lines = text.split("\n")
    out = {"prompt": lines[0], "negative_prompt": ""}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            out["negative_prompt"] = line[len("Negative prompt: "):]
    for m in re.finditer(r'\s*([\w ]+): ("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', lines[-1]):
        key, value = m.group(1).strip(), m.group(2)
        out[key] = json.loads(value) if value.startswith('"') else value
    return out
