"""Build snapfusion/assets/emoji/{atlas.png, atlas.json, LICENSE-OFL.txt} from Debian's Noto Color Emoji + CLDR.

Run once (needs `apt-get install fonts-noto-color-emoji unicode-cldr-core`); the outputs are committed and the
runtime never needs the font. Every synonym must appear in CLDR's English annotations for that emoji.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR = "/usr/share/unicode/cldr/common/annotations/en.xml"
FONT_COPYRIGHT = "/usr/share/doc/fonts-noto-color-emoji/copyright"
OUT = Path(__file__).resolve().parent.parent / "snapfusion" / "assets" / "emoji"
TEXT_DEFAULT = {"2602", "2708", "2600", "2601", "2744"}  # need FE0F for emoji presentation

# group, codepoint, canonical name, CLDR synonyms (";"-separated). Curated for distinct, recognisable sprites;
# no flags, people, text-like symbols, or names that clash with shape or color words.
CURATED = """
animal 1F431 cat | cat face
animal 1F436 dog | dog face
animal 1F430 rabbit | bunny
animal 1F98A fox |
animal 1F43B bear |
animal 1F43C panda |
animal 1F42F tiger | tiger face
animal 1F981 lion |
animal 1F42E cow | cow face
animal 1F437 pig | pig face
animal 1F438 frog |
animal 1F435 monkey | monkey face
animal 1F414 chicken |
animal 1F427 penguin |
animal 1F986 duck |
animal 1F989 owl |
animal 1F434 horse | horse face
animal 1F984 unicorn |
animal 1F41D bee | honeybee
animal 1F98B butterfly |
animal 1F41E ladybug | ladybird; lady beetle
animal 1F422 turtle | tortoise
animal 1F40D snake | serpent
animal 1F419 octopus |
animal 1F980 crab |
animal 1F420 fish | tropical fish
animal 1F42C dolphin |
animal 1F433 whale | spouting whale
animal 1F418 elephant |
animal 1F992 giraffe |
animal 1F993 zebra |
animal 1F996 dinosaur | T-Rex
animal 1F9A9 flamingo |
food 1F34E red apple |
food 1F34F green apple |
food 1F34C banana |
food 1F347 bunch of grapes | grapes
food 1F353 strawberry | berry
food 1F349 watermelon |
food 1F34A tangerine |
food 1F34B lemon |
food 1F34D pineapple |
food 1F951 avocado |
food 1F955 carrot |
food 1F33D ear of corn |
food 1F336 chili pepper | hot pepper
food 1F966 broccoli |
food 1F344 mushroom | toadstool
food 1F346 eggplant | aubergine
food 1F355 pizza |
food 1F354 hamburger | burger
food 1F32D hot dog | hotdog; frankfurter
food 1F369 doughnut | donut
food 1F36A cookie |
food 1F382 birthday cake | cake
food 1F366 ice cream | soft ice cream
food 1F95A egg |
vehicle 1F697 car | automobile
vehicle 1F68C bus |
vehicle 1F691 ambulance |
vehicle 1F695 taxi |
vehicle 1F69A truck | delivery truck
vehicle 1F69C tractor |
vehicle 1F682 locomotive | train
vehicle 1F6B2 bicycle | bike
vehicle 2708 airplane | aeroplane
vehicle 1F681 helicopter |
vehicle 1F680 rocket |
vehicle 26F5 sailboat | boat
vehicle 1F6F8 flying saucer | UFO
object 2602 umbrella |
object 23F0 alarm clock | clock
object 1F514 bell |
object 1F4A1 light bulb | bulb
object 1F511 key |
object 1F381 gift | present; wrapped gift
object 1F388 balloon |
object 1F3C0 basketball |
object 26BD soccer ball | football
object 1F3B8 guitar |
object 1F941 drum |
object 1F4BB laptop | computer
object 1F4F7 camera |
object 1F4FA television | TV
object 1F3A9 top hat | hat
object 1F451 crown |
object 1F453 pair of glasses |
object 1F45F sneaker | running shoe
object 1F455 t-shirt | shirt
object 1F48E gem stone | gem; jewel
object 2693 anchor |
object 1F3AE game controller | controller
object 1F3B2 dice | game die
object 1F9F8 teddy bear |
object 1FA81 kite |
object 1F3C6 trophy | prize
object 1F3AF dartboard | target; bullseye
object 1F528 hammer |
object 1F47B ghost |
object 1F916 robot |
object 1F47D alien | extraterrestrial
object 1F383 jack-o-lantern |
nature 1F333 tree | deciduous tree
nature 1F334 palm tree | palm
nature 1F384 Christmas tree |
nature 1F335 cactus |
nature 1F33B sunflower |
nature 1F337 tulip |
nature 1F340 four leaf clover | four-leaf clover; clover
nature 1F341 maple leaf |
nature 2600 sun |
nature 2601 cloud |
nature 26A1 lightning bolt |
nature 2744 snowflake |
nature 1F525 fire | flame
nature 1F308 rainbow |
nature 1F30B volcano |
nature 1F3E0 house | home
nature 1F3F0 castle |
nature 26FA tent |
nature 1F3A1 ferris wheel |
nature 26C4 snowman |
nature 1F4A7 water drop | droplet; drop
"""

PLURAL = {
    "fish": "fish", "tropical fish": "tropical fish", "dice": "dice", "game die": "game dice", "cactus": "cacti",
    "bunch of grapes": "bunches of grapes", "pair of glasses": "pairs of glasses", "ear of corn": "ears of corn",
    "grapes": "bunches of grapes", "broccoli": "broccoli", "maple leaf": "maple leaves", "volcano": "volcanoes",
    "octopus": "octopuses",
}


def plural(name: str) -> str:
    """English plural of a caption noun (curated exceptions, then the regular rules on the last word)."""
    if name in PLURAL:
        return PLURAL[name]
    if name.endswith(("s", "x", "ch", "sh", "z")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def cldr_terms() -> dict[str, set[str]]:
    """Emoji -> lower-cased CLDR English keywords and tts name."""
    terms: dict[str, set[str]] = {}
    for m in re.finditer(r'<annotation cp="([^"]+)"(?: type="tts")?>([^<]*)</annotation>', Path(CLDR).read_text()):
        terms.setdefault(m.group(1), set()).update(t.strip().lower() for t in m.group(2).split("|"))
    return terms


def render_sprite(font: ImageFont.FreeTypeFont, ch: str, cell: int) -> tuple[Image.Image, tuple[float, float]]:
    """The emoji tightly cropped, scaled to fit ``cell`` and centered; returns (sprite, content extent)."""
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((20, 20), ch, font=font, embedded_color=True)
    box = canvas.getchannel("A").point(lambda v: 255 if v > 4 else 0).getbbox()
    if box is None:
        raise SystemExit(f"font renders nothing for U+{ord(ch[0]):X}")
    crop = canvas.crop(box)
    scale = cell / max(crop.size)
    w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    crop = crop.resize((w, h), Image.Resampling.LANCZOS)
    sprite = Image.new("RGBA", (cell, cell), (0, 0, 0, 0))
    sprite.paste(crop, ((cell - w) // 2, (cell - h) // 2))
    return sprite, (w / cell, h / cell)


def interleave(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Round-robin over groups so that any prefix (num_emoji) mixes animals, food, vehicles, objects, nature."""
    groups: dict[str, list[tuple[str, ...]]] = {}
    for r in rows:
        groups.setdefault(r[0], []).append(r)
    out = []
    while any(groups.values()):
        for g in list(groups):
            if groups[g]:
                out.append(groups[g].pop(0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", type=int, default=128, help="sprite side in pixels")
    ap.add_argument("--columns", type=int, default=12)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    font = ImageFont.truetype(FONT, 109)
    terms = cldr_terms()
    rows = []
    for line in CURATED.strip().splitlines():
        head, syn = line.split("|")
        group, cp, name = head.split(None, 2)
        rows.append((group, cp, name.strip(), syn.strip()))
    rows = interleave(rows)
    n_rows = -(-len(rows) // args.columns)
    sheet = Image.new("RGBA", (args.columns * args.cell, n_rows * args.cell), (0, 0, 0, 0))
    entries = []
    for i, (group, cp, name, syn) in enumerate(rows):
        ch = chr(int(cp, 16))
        synonyms = [s.strip() for s in syn.split(";") if s.strip()]
        for s in synonyms:
            if s.lower() not in terms.get(ch, set()):
                raise SystemExit(f"synonym '{s}' of '{name}' is not in CLDR for U+{cp}: {terms.get(ch)}")
        sprite, extent = render_sprite(font, ch, args.cell)
        col, row = i % args.columns, i // args.columns
        sheet.paste(sprite, (col * args.cell, row * args.cell))
        entries.append({
            "name": name, "plural": plural(name), "synonyms": synonyms,
            "synonym_plurals": [plural(s) for s in synonyms],
            "codepoints": cp + (" FE0F" if cp in TEXT_DEFAULT else ""), "group": group,
            "cell": [col, row], "extent": [round(extent[0], 4), round(extent[1], 4)],
        })
    names = [e["name"] for e in entries] + [s for e in entries for s in e["synonyms"]]
    if len(set(n.lower() for n in names)) != len(names):
        raise SystemExit("emoji names and synonyms must be unique")
    args.out.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out / "atlas.png", optimize=True)
    index = {
        "source": "Noto Color Emoji 2.042 (Debian fonts-noto-color-emoji), names from CLDR 41 annotations/en.xml",
        "license": "SIL Open Font License 1.1, see LICENSE-OFL.txt",
        "cell": args.cell, "columns": args.columns, "entries": entries,
    }
    (args.out / "atlas.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    (args.out / "LICENSE-OFL.txt").write_text(Path(FONT_COPYRIGHT).read_text())
    print(f"wrote {len(entries)} emoji to {args.out} ({(args.out / 'atlas.png').stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
