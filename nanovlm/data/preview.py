"""`nanovlm data preview`: a grid of a few samples, and counts of samples, tokens and skips by
reason (each sample once, with an example of each), made as training makes them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import textwrap
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from nanovlm.config import DEFAULT_PRESET, ConfigError, TrainConfig, VLMConfig, check_value, field_types, \
    get_preset, parse_value
from nanovlm.data.datasets import SkipCounter, build_dataset, is_skip
from nanovlm.data.records import describe
from nanovlm.data.tokenizer import tokenizer_for

CELL_W, THUMB, LINE_H, MAX_LINES, WRAP = 320, 160, 14, 12, 50


def _cell(info: dict[str, Any], font) -> Image.Image:
    lines: list[tuple[str, str]] = [(str(info.get("id", "")), "gray")]
    if info.get("skip"):
        lines += [(f"SKIPPED: {info['skip']}", "red")] + [(t, "red") for t in textwrap.wrap(info["error"], WRAP)[:3]]
    for m in info.get("messages", []):
        prefix, color = {"user": ("Q: ", "black"), "assistant": ("A: ", "blue")}.get(m["role"], ("S: ", "gray"))
        for k, t in enumerate(textwrap.wrap(prefix + " ".join(str(m["content"]).split()), WRAP) or [prefix]):
            lines.append((t if k == 0 else "   " + t, color))
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [(f"... ({len(lines) - MAX_LINES + 1} more lines)", "gray")]
    cell = Image.new("RGB", (CELL_W, THUMB + 12 + LINE_H * MAX_LINES), "white")
    draw = ImageDraw.Draw(cell)
    images = info.get("images") or []
    if images:
        s = THUMB / max(images[0].size)
        # Small pictures (easy-VQA's 64x64) are scaled up with hard edges, large ones down smoothly.
        thumb = images[0].resize((max(1, round(images[0].width * s)), max(1, round(images[0].height * s))),
                                 Image.NEAREST if s > 1 else Image.BICUBIC)
        cell.paste(thumb, ((CELL_W - thumb.width) // 2, 4))
        if len(images) > 1:
            draw.text((4, 4), f"+{len(images) - 1} image(s)", fill="gray", font=font)
    else:
        draw.text((CELL_W // 2 - 30, THUMB // 2), "(no image)", fill="gray", font=font)
    for k, (text, color) in enumerate(lines):
        draw.text((6, THUMB + 8 + k * LINE_H), text, fill=color, font=font)
    draw.rectangle([0, 0, cell.width - 1, cell.height - 1], outline=(200, 200, 200))
    return cell


def _draw(shown: list[dict[str, Any]], out_png: str) -> None:
    font = ImageFont.load_default(size=12)
    cells = [_cell(info, font) for info in shown]
    cols = max(1, min(4, len(cells)))
    cell_h = cells[0].height if cells else THUMB
    grid = Image.new("RGB", (cols * CELL_W, max(1, math.ceil(len(cells) / cols)) * cell_h), "white")
    for k, c in enumerate(cells):
        grid.paste(c, ((k % cols) * CELL_W, (k // cols) * cell_h))
    grid.save(out_png)


def preview(data, out_png: str, n: int = 8, *, vlm_cfg=None, train_cfg=None, tokenizer=None, split: str = "train",
            seed: int = 0, max_count: int = 2000, verbose: bool = True) -> dict[str, Any]:
    """Draw `n` random samples of `data` (a data spec such as "easyvqa" or a path, or a built
    dataset) into `out_png`, and count samples, tokens and skips over at most `max_count` samples
    drawn at random. Returns {"samples", "counted", "tokens_mean", "tokens_max", "skips", "out"}."""
    vlm_cfg = vlm_cfg or VLMConfig.from_preset(DEFAULT_PRESET)
    if isinstance(data, str):
        train_cfg = dataclasses.replace(train_cfg or TrainConfig(), data=data)
        if verbose:
            print(f"data: {describe(data)}")
        data = build_dataset(train_cfg, vlm_cfg, tokenizer or tokenizer_for(vlm_cfg), split=split)
    rng, skips, lengths, total = random.Random(seed), SkipCounter(), [], len(data)
    shown = [data.describe(i) | ({"skip": x["skip"], "error": x["error"]} if is_skip(x := data[i]) else {})
             for i in rng.sample(range(total), min(n, total))]
    counted = range(total) if total <= max_count else sorted(rng.sample(range(total), max_count))
    for item in (data[i] for i in counted):
        if is_skip(item):
            skips.skip(item["skip"], item["error"], item["id"])
        elif len(item["input_ids"]) > vlm_cfg.lm_max_length:
            skips.skip("too_long", f"{len(item['input_ids'])} tokens", item["id"])
        else:
            lengths.append(len(item["input_ids"]))
    _draw(shown, out_png)
    stats = {"samples": total, "counted": len(counted),
             "tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0, "tokens_max": max(lengths, default=0),
             "skips": skips.as_dict(), "skip_examples": dict(skips.examples), "out": out_png}
    if verbose:
        _say(stats, data, skips)
    return stats


def _say(stats: dict[str, Any], data, skips: SkipCounter) -> None:
    total, counted = stats["samples"], stats["counted"]
    print(f"samples: {total}")
    over = f" (in {counted} of them drawn at random; max_count={total} measures all)" if counted != total else ""
    if getattr(data, "plan", None) is not None:
        print(f"  made of {len(data.records)} records: those that share an image are one sample "
              "(multi_turn=false keeps them apart)")
    print(f"tokens per sample{over}: mean {stats['tokens_mean']:.1f}, max {stats['tokens_max']}")
    print(f"skips{over}: {skips.summary()}")
    for reason, example in skips.examples.items():
        print(f"  {reason}: e.g. {example}")
    print(f"wrote {stats['out']}")


def run_preview(*, preset: str | None = None, overrides: list[str] | None = None, out: str | None = None,
                n: int = 8) -> int:
    """`nanovlm data preview`: `key=value` overrides are `data` (required), `split` (train), `seed`
    (0), `max_count` (2000) and any VLMConfig / TrainConfig field, parsed as `nanovlm train`
    parses them; `preset` gives the model config whose tokenizer and image sizes are used."""
    opts: dict[str, Any] = {}
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {item!r}.")
        opts[key.strip()] = value
    if not opts.get("data"):
        raise ConfigError("data preview needs data=..., e.g. data=easyvqa or data=path/to/file.jsonl.")
    preset = preset or DEFAULT_PRESET
    data, split = opts.pop("data"), opts.pop("split", None) or "train"
    seed, max_count = (parse_value(k, str(opts.pop(k, d)), int) for k, d in (("seed", 0), ("max_count", 2000)))
    chosen, vlm_types, train_types = get_preset(preset), field_types(VLMConfig), field_types(TrainConfig)
    vlm_over, train_over = {}, {}
    for key, value in opts.items():
        if key not in vlm_types and key not in train_types:
            raise ConfigError(f"unknown option {key!r} for data preview: use data, split, seed, max_count, and "
                              "a VLMConfig / TrainConfig field (nanovlm train --list-settings).")
        target, types = (vlm_over, vlm_types) if key in vlm_types else (train_over, train_types)
        target[key] = parse_value(key, value, types[key])
    vlm_cfg = VLMConfig.from_preset(preset, **vlm_over)
    train_cfg = TrainConfig.from_dict({**chosen.get("train", {}), **train_over, "data": data})
    preview(data, out or "preview.png", check_value("n", n, int), vlm_cfg=vlm_cfg, train_cfg=train_cfg, split=split,
            seed=seed, max_count=max_count)
    return 0
