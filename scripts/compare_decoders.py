"""Decode one pipeline's own latents with several decoders, side by side: what PSNR on held-out latents hides
(frames, halos, color shifts). Rows: the first --count held-out test prompts (their seeds); columns: the teacher
decoder, then each --decoder. Writes the grid PNG and a JSON of per-image PSNR against the teacher decoder.

    python scripts/compare_decoders.py --model snapfusion --teacher snapfusion/assets/models/base/vae_decoder \
        --decoder old=/tmp/old_half --decoder new=snapfusion/assets/models/parts/vae_decoder_half \
        --out docs/img/halved_decoder_on_student_latents.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from snapfusion.loading import resolve_model
from snapfusion.data import load_prompt_set
from snapfusion.decoder.evaluate import decode_unit, psnr
from snapfusion.decoder.io import load_decoder


def student_latents(model: str, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The pipeline's final latents at its default steps and guidance (captured at its decode call)."""
    pipe = resolve_model(model).eval()
    captured = []
    decode = pipe.decode
    pipe.decode = lambda z: captured.append(z.detach().cpu()) or decode(z)
    with torch.no_grad():
        pipe.generate(prompts, seeds)
    return torch.cat(captured)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="snapfusion", help="the pipeline whose latents are decoded")
    p.add_argument("--teacher", required=True, help="the reference decoder folder")
    p.add_argument("--decoder", action="append", required=True, metavar="NAME=FOLDER")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--num-emoji", type=int, default=40)
    p.add_argument("--side", type=int, default=256, help="cell size in the grid")
    p.add_argument("--out", required=True, help="grid PNG (the JSON goes beside it)")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    if any("=" not in d for d in a.decoder):
        p.error("--decoder takes NAME=FOLDER")
    records = load_prompt_set("test", num_emoji=a.num_emoji)[: a.count]
    z = student_latents(a.model, [r["prompt"] for r in records], [r["seed"] for r in records])
    named = dict(d.split("=", 1) for d in a.decoder)
    reference = decode_unit(load_decoder(a.teacher), z)
    columns = {"teacher": reference} | {n: decode_unit(load_decoder(f), z) for n, f in named.items()}
    report = {"model": a.model, "teacher": a.teacher, "decoders": named,
              "prompts": [r["prompt"] for r in records],
              "psnr_db": {n: [round(float(v), 2) for v in psnr(im, reference)] for n, im in columns.items()
                          if n != "teacher"}}
    canvas = Image.new("RGB", (len(columns) * a.side, len(z) * a.side + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, images) in enumerate(columns.items()):
        draw.text((c * a.side + 6, 4), name, fill="black")
        for r in range(len(z)):
            arr = (images[r].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(arr).resize((a.side, a.side), Image.LANCZOS), (c * a.side, 20 + r * a.side))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["psnr_db"]))


if __name__ == "__main__":
    main()
