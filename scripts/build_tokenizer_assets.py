"""Build snapfusion/assets/tokenizer/{vocab.json, merges.txt} from CLIP's BPE file.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel (MIT; the file is
OpenAI CLIP's, MIT). Get it with ``pip download --no-deps -d /tmp/oc open_clip_torch`` and run:

    python scripts/build_tokenizer_assets.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The vocabulary is defined as in CLIP's ``simple_tokenizer.py``: 256 byte-level unicode symbols, the same 256
with a ``</w>`` suffix, the merged symbol of each of the first 48,894 merges, then ``<|startoftext|>`` (49406)
and ``<|endoftext|>`` (49407): 49,408 tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP simple_tokenizer: 48,894 merges used
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
VOCAB_SIZE = 49408
OUT_DIR = Path(__file__).resolve().parents[1] / "snapfusion" / "assets" / "tokenizer"


def byte_symbols() -> list[str]:
    """The 256 printable unicode symbols standing for bytes 0..255 (GPT-2/CLIP byte-level BPE), in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    others = [b for b in range(256) if b not in printable]
    symbols += [chr(256 + i) for i in range(len(others))]  # non-printable bytes map to code points 256, 257, ...
    return symbols  # CLIP lists the symbols in this order (printable first), not by byte value


def read_bpe_text(source: Path) -> str:
    """The decompressed BPE merge list, from the .txt.gz itself or from an open_clip_torch wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            return gzip.decompress(whl.read(BPE_MEMBER)).decode("utf-8")
    return gzip.decompress(source.read_bytes()).decode("utf-8")


def build(text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and its merge list from the BPE file text."""
    lines = text.split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError("unexpected BPE file: expected 48,894 merges of two symbols after the header line")
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: Path) -> None:
    """Write vocab.json and merges.txt in the layout of openai/clip-vit-large-patch14's tokenizer folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    body = "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + body, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args()
    vocab, merges = build(read_bpe_text(args.source))
    write(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
