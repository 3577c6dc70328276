"""`nanovlm data preview`: look at data before training on it.

`preview(data, out_png)` draws a grid of a few samples (first image, then each question and
answer) and counts samples, tokens per sample and skips by reason. `run_preview(options)` is
the command-line entry (`key=value` overrides, as the CLI passes them).
"""

from __future__ import annotations

import dataclasses
import math
import random
import textwrap
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from nanovlm.data.datasets import SkipCounter, build_dataset, is_skip

CELL_W, THUMB = 320, 160
LINE_H, MAX_LINES, WRAP = 14, 12, 50


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _cell(info: dict[str, Any], font) -> Image.Image:
    lines: list[tuple[str, str]] = [(str(info.get("id", "")), "gray")]
    if info.get("skip"):
        lines.append((f"SKIPPED: {info['skip']}", "red"))
        lines += [(t, "red") for t in textwrap.wrap(info.get("error", ""), WRAP)[:3]]
    for m in info.get("messages", []):
        prefix, color = {"user": ("Q: ", "black"), "assistant": ("A: ", "blue")}.get(m["role"], ("S: ", "gray"))
        for k, t in enumerate(textwrap.wrap(prefix + " ".join(str(m["content"]).split()), WRAP) or [prefix]):
            lines.append((t if k == 0 else "   " + t, color))
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [(f"... ({len(lines) - MAX_LINES + 1} more lines)", "gray")]
    cell = Image.new("RGB", (CELL_W, THUMB + 12 + LINE_H * MAX_LINES), "white")
    images = info.get("images") or []
    if images:
        thumb = images[0]
        s = THUMB / max(thumb.size)
        # Small pictures (easy-VQA's 64x64) are scaled up with hard edges, large ones down smoothly.
        thumb = thumb.resize((max(1, round(thumb.width * s)), max(1, round(thumb.height * s))),
                             Image.NEAREST if s > 1 else Image.BICUBIC)
        cell.paste(thumb, ((CELL_W - thumb.width) // 2, 4))
        if len(images) > 1:
            ImageDraw.Draw(cell).text((4, 4), f"+{len(images) - 1} image(s)", fill="gray", font=font)
    else:
        ImageDraw.Draw(cell).text((CELL_W // 2 - 30, THUMB // 2), "(no image)", fill="gray", font=font)
    draw = ImageDraw.Draw(cell)
    for k, (text, color) in enumerate(lines):
        draw.text((6, THUMB + 8 + k * LINE_H), text, fill=color, font=font)
    draw.rectangle([0, 0, cell.width - 1, cell.height - 1], outline=(200, 200, 200))
    return cell


def _describe(ds, i: int) -> dict[str, Any]:
    info = ds.describe(i) if hasattr(ds, "describe") else {"id": str(i), "images": [], "messages": []}
    item = ds[i]
    if is_skip(item):
        info.update(skip=item["skip"], error=item.get("error", ""))
    return info


def _say_merged(ds) -> None:
    if getattr(ds, "plan", None) is not None:
        print(f"  made of {len(ds.records)} records: those that share an image are one sample "
              "(multi_turn=false keeps them apart)")


def preview(data, out_png: str, n: int = 8, *, vlm_cfg=None, train_cfg=None, tokenizer=None, split: str = "train",
            seed: int = 0, max_count: int = 2000, verbose: bool = True) -> dict[str, Any]:
    """Draw `n` random samples of `data` (a data spec such as "easyvqa" or a path, or a built
    dataset) into `out_png`, and count samples, tokens and skips over at most `max_count`
    samples. Returns {"samples", "counted", "tokens_mean", "tokens_max", "skips", "out"}."""
    from nanovlm.config import DEFAULT_PRESET, TrainConfig, VLMConfig

    if vlm_cfg is None:
        vlm_cfg = VLMConfig.from_preset(DEFAULT_PRESET)
    if isinstance(data, str):
        train_cfg = dataclasses.replace(train_cfg or TrainConfig(), data=data)
        if tokenizer is None:
            from nanovlm.data.processors import get_tokenizer

            tokenizer = get_tokenizer(vlm_cfg.lm_tokenizer, vlm_cfg.vlm_extra_tokens, vlm_cfg.lm_chat_template)
        ds = build_dataset(train_cfg, vlm_cfg, tokenizer, split=split)
    else:
        ds = data

    skips = SkipCounter()
    lengths: list[int] = []
    shown: list[dict[str, Any]] = []
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        total = len(ds)
        rng = random.Random(seed)
        picks = rng.sample(range(total), min(n, total))
        shown = [_describe(ds, i) for i in picks]
        counted = range(total) if total <= max_count else sorted(rng.sample(range(total), max_count))
        items = (ds[i] for i in counted)
    else:  # a stream: the first samples
        total = None
        items = (item for _, item in zip(range(max_count), iter(ds)))
    n_counted = 0
    for item in items:
        n_counted += 1
        if is_skip(item):
            skips.skip(item["skip"], item.get("error", ""), item.get("id"))
        elif len(item["input_ids"]) > vlm_cfg.lm_max_length:
            skips.skip("too_long", f"{len(item['input_ids'])} tokens", item.get("id"))
        else:
            lengths.append(len(item["input_ids"]))
            if total is None and len(shown) < n:
                shown.append({"id": item.get("id"), "images": [], "messages": []})

    font = _font()
    cols = max(1, min(4, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    cells = [_cell(info, font) for info in shown]
    cell_h = cells[0].height if cells else THUMB
    grid = Image.new("RGB", (cols * CELL_W, rows * cell_h), "white")
    for k, c in enumerate(cells):
        grid.paste(c, ((k % cols) * CELL_W, (k // cols) * cell_h))
    grid.save(out_png)

    stats = {
        "samples": total if total is not None else n_counted,
        "counted": n_counted,
        "tokens_mean": (sum(lengths) / len(lengths)) if lengths else 0.0,
        "tokens_max": max(lengths, default=0),
        "skips": skips.as_dict(),
        "skip_examples": dict(skips.examples),
        "out": out_png,
    }
    if verbose:
        over = ""
        if total is not None and total != n_counted:
            print(f"samples: {total}")
            over = f" (in {n_counted} of them drawn at random; max_count={total} measures all)"
        elif total is None and n_counted >= max_count:
            print(f"samples: at least {n_counted} (streamed data: only the first {n_counted} read)")
            over = f" (in the first {n_counted})"
        else:
            print(f"samples: {n_counted}")
        _say_merged(ds)
        print(f"tokens per sample{over}: mean {stats['tokens_mean']:.1f}, max {stats['tokens_max']}")
        print(f"skips{over}: {skips.summary()}")
        for reason, example in skips.examples.items():
            print(f"  {reason}: e.g. {example}")
        print(f"wrote {out_png}")
    return stats


def run_preview(options: dict[str, Any] | None = None, *, preset: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None, out: str | None = None, n: int | None = None) -> int:
    """The `nanovlm data preview` command; prints the counts, writes the PNG, returns 0.

    overrides: `key=value` strings (or a dict): `data` (required), `split` (train), `seed` (0),
    `max_count` (2000), and any TrainConfig / VLMConfig field (strings are parsed to the field's
    type by config.parse_value, as `nanovlm train key=value` is). preset (easyvqa): the model
    config whose tokenizer and image sizes are used.
    `options` is the same as a dict, and may also hold `preset`, `out` and `n`.
    """
    from nanovlm.config import DEFAULT_PRESET, ConfigError, TrainConfig, VLMConfig, check_value, field_types, get_preset, parse_value

    def typed(key: str, value: Any, tp: Any) -> Any:  # text is parsed, anything else checked
        return parse_value(key, value, tp) if isinstance(value, str) else check_value(key, value, tp)

    opts = dict(options or {})
    if isinstance(overrides, dict):
        opts.update(overrides)
    else:
        for item in overrides or []:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"expected key=value, got {item!r}.")
            opts[key.strip()] = value
    if not opts.get("data"):
        raise ConfigError("data preview needs data=..., e.g. data=easyvqa or data=path/to/file.jsonl.")
    data = opts.pop("data")
    out = out or opts.pop("out", None) or "preview.png"
    n = typed("n", n if n is not None else opts.pop("n", 8), int)
    preset = preset or opts.pop("preset", None) or DEFAULT_PRESET
    for key in ("out", "n", "preset"):  # given both ways: the keyword wins
        opts.pop(key, None)
    split = opts.pop("split", None) or "train"
    seed = typed("seed", opts.pop("seed", 0), int)
    max_count = typed("max_count", opts.pop("max_count", 2000), int)
    chosen = get_preset(preset)
    vlm_types, train_types = field_types(VLMConfig), field_types(TrainConfig)
    vlm_over, train_over = {}, {}
    for key, value in opts.items():
        if key in vlm_types:
            vlm_over[key] = typed(key, value, vlm_types[key])
        elif key in train_types:
            train_over[key] = typed(key, value, train_types[key])
        else:
            raise ConfigError(f"unknown option {key!r} for data preview: use data, split, seed, max_count, n, out, "
                              "preset or a VLMConfig / TrainConfig field (nanovlm train --list-settings).")
    vlm_cfg = VLMConfig.from_preset(preset, **vlm_over)
    train_cfg = TrainConfig.from_dict({**chosen.get("train", {}), **train_over, "data": data})
    preview(data, out, n, vlm_cfg=vlm_cfg, train_cfg=train_cfg, split=split, seed=seed, max_count=max_count)
    return 0
