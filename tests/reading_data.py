"""Pictures that must be read at their own size: bar charts with letters, numbers, tables.

Used through `shapes_data.records` (the question kinds pick the family). Every picture is drawn
with PIL's own scalable font at a random size, so the data never matches one resolution:
- chart (160x100, or a random size with `vary`): 3-5 bars, a capital letter under each (11-14 px);
  kinds `tallest` (the letter), `bars` (how many), `bar_colour` (a named bar's colour), `compare`
  (is bar X taller than bar Y: yes / no);
- text (128x96): a number of 1-3 digits written 18-34 px high in one of five colours, a grey
  distractor shape beside it; kinds `read` (the number), `text_colour`;
- table (180x120): a 3 x 2 grid of numbers; kind `cell` (the number in row r, column c).
Numbers split by a fixed rule: `held_out=True` draws only numbers that `held_out=False` never
draws (one in ten), so accuracy on them needs reading digits, not remembering answers.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (210, 40, 40), "green": (30, 150, 60), "blue": (40, 70, 210), "orange": (240, 140, 20),
           "purple": (130, 50, 170)}
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
CHART_KINDS = ("tallest", "bars", "bar_colour", "compare")
TEXT_KINDS = ("read", "text_colour")
TABLE_KINDS = ("cell",)
KINDS = CHART_KINDS + TEXT_KINDS + TABLE_KINDS
BACKGROUND = (250, 250, 246)


def held_out_number(n: int) -> bool:
    """About one number in ten, by a hash: every digit still appears in every place in training."""
    return (n * 2654435761 % 2**32) % 97 < 10


def number(rng: random.Random, held_out: bool, low: int = 0, high: int = 999) -> int:
    while True:
        n = rng.randint(low, high)
        if held_out_number(n) == held_out:
            return n


def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def chart(rng: random.Random, kinds: list[str], held_out: bool, size: tuple[int, int] = (160, 100)):
    w, h = size
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    n = rng.randint(3, 5)
    letters = rng.sample(LETTERS, n)
    colours = [rng.choice(list(COLOURS)) for _ in range(n)]
    heights = rng.sample(range(int(h * 0.15), int(h * 0.7)), n)  # distinct: one tallest bar
    font = _font(rng.randint(11, 14))
    slot = (w - 8) // n
    base = h - 18
    for i in range(n):
        x0 = 4 + i * slot + slot // 5
        x1 = 4 + (i + 1) * slot - slot // 5
        draw.rectangle((x0, base - heights[i], x1, base), fill=COLOURS[colours[i]])
        draw.text(((x0 + x1) // 2, base + 2), letters[i], font=font, fill=(20, 20, 20), anchor="mt")
    draw.line((2, base, w - 2, base), fill=(90, 90, 90))
    tallest = max(range(n), key=lambda i: heights[i])
    a, b = rng.sample(range(n), 2)
    qa = []
    for kind in kinds:
        if kind == "tallest":
            qa.append((kind, "Which letter is under the tallest bar?", letters[tallest]))
        elif kind == "bars":
            qa.append((kind, "How many bars are there?", str(n)))
        elif kind == "bar_colour":
            qa.append((kind, f"What colour is bar {letters[a]}?", colours[a]))
        elif kind == "compare":
            qa.append((kind, f"Is bar {letters[a]} taller than bar {letters[b]}?",
                       "yes" if heights[a] > heights[b] else "no"))
    return img, qa


def text(rng: random.Random, kinds: list[str], held_out: bool, size: tuple[int, int] = (128, 96)):
    w, h = size
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    value = number(rng, held_out)
    colour = rng.choice(list(COLOURS))
    font = _font(rng.randint(18, 34))
    left, top, right, bottom = draw.textbbox((0, 0), str(value), font=font)
    x = rng.randint(2, max(2, w - (right - left) - 2)) - left
    y = rng.randint(2, max(2, h - (bottom - top) - 2)) - top
    # A distractor that is not text: a grey shape away from the number.
    side = rng.randint(10, 18)
    dx = rng.choice([4, w - side - 4])
    dy = rng.choice([4, h - side - 4])
    box = (x + left, y + top, x + right, y + bottom)
    if not (dx + side < box[0] or box[2] < dx or dy + side < box[1] or box[3] < dy):
        dx = w - side - 4 if dx == 4 else 4
    draw.ellipse((dx, dy, dx + side, dy + side), fill=(160, 160, 160))
    draw.text((x, y), str(value), font=font, fill=COLOURS[colour])
    qa = []
    for kind in kinds:
        if kind == "read":
            qa.append((kind, "What number is written in the picture?", str(value)))
        elif kind == "text_colour":
            qa.append((kind, "What colour is the number?", colour))
    return img, qa


def table(rng: random.Random, kinds: list[str], held_out: bool, size: tuple[int, int] = (180, 120)):
    w, h = size
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    rows, cols = 3, 2
    font = _font(rng.randint(13, 17))
    cells = [[number(rng, held_out, 0, 99) for _ in range(cols)] for _ in range(rows)]
    cw, ch = (w - 8) // cols, (h - 8) // rows
    for r in range(rows + 1):
        draw.line((4, 4 + r * ch, 4 + cols * cw, 4 + r * ch), fill=(120, 120, 120))
    for c in range(cols + 1):
        draw.line((4 + c * cw, 4, 4 + c * cw, 4 + rows * ch), fill=(120, 120, 120))
    for r in range(rows):
        for c in range(cols):
            draw.text((4 + c * cw + cw // 2, 4 + r * ch + ch // 2), str(cells[r][c]), font=font, fill=(20, 20, 20),
                      anchor="mm")
    qa = []
    if "cell" in kinds:
        r, c = rng.randrange(rows), rng.randrange(cols)
        qa.append(("cell", f"What number is in row {r + 1}, column {c + 1}?", str(cells[r][c])))
    return img, qa


def family(kinds: list[str]):
    """The drawing function for these question kinds (None: shapes_data's scenes)."""
    for members, draw in ((CHART_KINDS, chart), (TEXT_KINDS, text), (TABLE_KINDS, table)):
        if set(kinds) & set(members):
            if not set(kinds) <= set(members):
                raise ValueError(f"kinds {kinds} mix families; ask one of {CHART_KINDS}, {TEXT_KINDS}, {TABLE_KINDS}")
            return draw
    return None
