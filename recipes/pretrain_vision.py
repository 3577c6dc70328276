"""How the small preset's packaged vision encoder (`packaged:small-vit`) was made: a long vision stage on
generated pictures.

    python recipes/pretrain_vision.py [--pictures 40000] [--steps 8000] [--out nanovlm/weights/small_vit]

The small preset's ViT learns colours, shapes and places from a user's few thousand pictures, but not
glyphs (docs/results.md), so it learns to read once, here. Pictures of random sizes and layouts show a
string of letters and digits (this machine's fonts and PIL's own, many sizes and colours) beside shapes;
the questions ask to spell the text, say it, name its colour and place, count the shapes and name their
colours. They are written as a LLaVA file and trained by `nanovlm train` itself (its vision stage alone,
each picture fitted to one 64 px tile); the encoder is then saved alone as a SigLIP vision folder.
Nothing here knows any dataset.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

from nanovlm.export.idefics3 import idefics3_config_dict
from nanovlm.fileio import written_dir
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.sources import SMALL_VIT_DIR
from nanovlm.weights.idefics3 import to_transformers

COLOURS = {"red": (205, 35, 35), "green": (35, 145, 55), "blue": (35, 65, 205), "orange": (235, 135, 20),
           "purple": (125, 45, 165), "black": (20, 20, 20), "brown": (120, 75, 35), "pink": (230, 100, 170),
           "grey": (128, 128, 128), "yellow": (225, 200, 30), "cyan": (30, 180, 200)}
BACKGROUNDS = [(255, 255, 255), (250, 250, 244), (236, 240, 246), (244, 236, 224), (225, 232, 225), (40, 40, 46)]
CHARACTERS = "0123456789" * 3 + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SHAPES = ("circle", "square", "triangle")


def fonts() -> list[str | None]:
    """PIL's own font (None) and whatever TrueType fonts this machine has: more faces, less overfitting."""
    found = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    return [None] + [f for f in found if "Oblique" not in f and "Italic" not in f][:24]


def font(path: str | None, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px) if path is None else ImageFont.truetype(path, px)


def contrast(rng: random.Random, background: tuple[int, int, int]) -> str:
    dark = sum(background) < 300
    names = [n for n, c in COLOURS.items() if abs(sum(c) - sum(background)) > 250 and (not dark or sum(c) > 300)]
    return rng.choice(names or ["yellow"])


def picture(rng: random.Random, faces: list[str | None]) -> tuple[Image.Image, list[tuple[str, str]]]:
    """One picture (a random size and aspect) and its questions."""
    w = rng.randint(48, 256)
    h = max(32, min(256, int(w * rng.uniform(0.5, 1.6))))
    background = rng.choice(BACKGROUNDS)
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    # The text's height as a share of the picture's long side: glyphs of 4-30 px once fitted to 64 px.
    px = max(8, int(max(w, h) * rng.uniform(0.07, 0.45)))
    word = "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(1, 5)))
    face = font(rng.choice(faces), px)
    colour = contrast(rng, background)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=face)
    while right - left > w - 4 and len(word) > 1:  # too wide for the picture: shorter
        word = word[:-1]
        left, top, right, bottom = draw.textbbox((0, 0), word, font=face)
    x = rng.randint(2, max(2, w - (right - left) - 2)) - left
    y = rng.randint(2, max(2, h - (bottom - top) - 2)) - top
    box = (x + left, y + top, x + right, y + bottom)
    shapes = []
    for _ in range(rng.randint(0, 3)):
        side = rng.randint(max(6, min(w, h) // 8), max(7, min(w, h) // 3))
        for _ in range(20):  # a free place beside the text and the other shapes
            sx, sy = rng.randint(1, w - side - 1), rng.randint(1, h - side - 1)
            taken = [box] + [s[2] for s in shapes]
            if all(sx + side < a or c < sx or sy + side < b or d < sy for a, b, c, d in taken):
                shapes.append((rng.choice(SHAPES), contrast(rng, background), (sx, sy, sx + side, sy + side)))
                break
    for shape, name, (a, b, c, d) in shapes:
        fill = COLOURS[name]
        if shape == "circle":
            draw.ellipse((a, b, c, d), fill=fill)
        elif shape == "square":
            draw.rectangle((a, b, c, d), fill=fill)
        else:
            draw.polygon([((a + c) // 2, b), (c, d), (a, d)], fill=fill)
    draw.text((x, y), word, font=face, fill=COLOURS[colour], stroke_width=rng.choice([0, 0, 0, 1]),
              stroke_fill=COLOURS[colour])
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    place = ("top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle") + " " + \
            ("left" if cx < 0.4 else "right" if cx > 0.6 else "centre")
    qa = [("Spell what is written, character by character.", " ".join(word)),
          ("What is written in the picture?", word),
          ("What colour is the text?", colour),
          ("Where is the text?", place),
          ("How many shapes are there besides the text?", str(len(shapes)))]
    kinds = [s[0] for s in shapes]
    qa += [(f"What colour is the {s}?", n) for s, n, _ in shapes if kinds.count(s) == 1]
    return img, qa


def write_data(folder: str, n: int, seed: int) -> str:
    rng, faces = random.Random(seed), fonts()
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            img, qa = picture(rng, faces)
            name = f"images/{i:06d}.png"
            img.save(os.path.join(folder, name))
            turns = []
            for k, (q, a) in enumerate(qa):
                turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
            f.write(json.dumps({"image": name, "conversations": turns}) + "\n")
    return path


def save_encoder(run_final: str, out: str) -> None:
    """The trained model's vision encoder as a SigLIP vision folder (config.json + model.safetensors)."""
    model = VisionLanguageModel.from_pretrained(run_final)
    cfg, prefix = model.cfg, "model.vision_model."
    tensors = to_transformers(cfg, {k: v.detach() for k, v in model.state_dict_for_saving().items()})
    vision = {k[len(prefix):]: v.contiguous() for k, v in tensors.items() if k.startswith(prefix)}
    # The transformers export's vision config, as a SigLIP vision model's.
    config = {**idefics3_config_dict(cfg, {})["vision_config"], "model_type": "siglip_vision_model"}
    with written_dir(out) as tmp:
        save_file(vision, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    print(f"wrote {len(vision)} tensors to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pictures", type=int, default=40000)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--out", default=SMALL_VIT_DIR, help="folder to write (replaced)")
    ap.add_argument("--work", default=None, help="folder for the pictures and the run (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="pretrain_vision_")
    data = write_data(os.path.join(work, "data"), args.pictures, seed=0)
    run = os.path.join(work, "run")
    # The vision stage alone (its steps fixed, no time budget); one VLM step so that a checkpoint is written.
    subprocess.run([sys.executable, "-m", "nanovlm.cli", "train", "--preset", "small", "--out", run, f"data={data}",
                    "vit_model_type=", "vision_warmup=on", f"vision_warmup_steps={args.steps}", "max_img_size=64",
                    "max_train_time=0", "max_training_steps=1", "val_fraction=0.02"], check=True)
    save_encoder(os.path.join(run, "final"), args.out)


if __name__ == "__main__":
    main()
