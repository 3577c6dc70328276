"""Datasets: the records of a split (`data/records.py`) -> processed samples by random access
(`ConversationDataset`, through `SampleProcessor.sample`). A sample that cannot be used is a
skip marker `{"skip", "id", "error"}` that collators drop and `SkipCounter` counts once
(`strict`: it raises). `ShardedBatchSampler` and `ResumableLoader` make the order seeded, sharded and resumable.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from nanovlm.data.processors import IMAGE_PLACEHOLDER, ChatRenderer, RenderError
from nanovlm.data.records import DataError, Records, SampleError, describe, open_records, record_to_chat, source_key

CACHE_BYTES = 512 << 20  # decoded tiles kept per process: a run passes over small data many times


def skip_marker(reason: str, message: str, sample_id: str | None) -> dict[str, Any]:
    return {"skip": reason, "id": sample_id, "error": message}


def is_skip(item: Any) -> bool:
    return isinstance(item, dict) and "skip" in item


class SkipCounter:
    """Skipped samples by reason, each (by id) counted once, with an example per reason."""

    def __init__(self, strict: bool = False):
        self.strict, self.counts, self.examples, self.seen = strict, Counter(), {}, set()

    def skip(self, reason: str, message: str = "", sample_id: str | None = None) -> None:
        if self.strict:
            raise SampleError(reason, message, sample_id)
        if sample_id in self.seen:
            return
        if sample_id is not None:
            self.seen.add(sample_id)
        self.counts[reason] += 1
        self.examples.setdefault(reason, f"{sample_id}: {message}" if sample_id is not None else message)

    def update(self, markers: Sequence[dict[str, Any]]) -> None:
        for m in markers:
            self.skip(m["skip"], m.get("error", ""), m.get("id"))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} sample(s): {parts}"

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.as_dict(), "examples": dict(self.examples), "seen": sorted(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts, self.examples = Counter(state["counts"]), dict(state["examples"])
        self.seen = set(state.get("seen", ()))


def check_texts(messages: list[dict[str, Any]]) -> None:
    """A SampleError unless every text is a string and some answer is there to learn from."""
    if not messages:
        raise SampleError("empty_text", "the sample has no messages.")
    for m in messages:
        if not isinstance(m.get("content"), str):
            raise SampleError("non_string_text", f"a {m.get('role')} text is {type(m.get('content')).__name__}, "
                                                 "not a string.")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise SampleError("empty_text", "the sample has no assistant answer to learn from.")
    if any(not a.strip() for a in answers):
        raise SampleError("empty_text", "an assistant answer is empty.")


def _strip_placeholders(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").lstrip()
             if isinstance(m["content"], str) else m["content"]} for m in messages]


def merge_chats(chats: Sequence[tuple[list, list[dict[str, Any]], bool]]) -> tuple[list, list[dict[str, Any]], bool]:
    """Chats about one image -> one: the first chat's image and placeholder, then the later chats' turns."""
    images, messages, required = chats[0]
    return images, list(messages) + [m for _, more, _ in chats[1:] for m in _strip_placeholders(more)], required


class SampleProcessor:
    """Image sources + messages -> a processed sample (or a SampleError with a reason)."""

    def __init__(self, vlm_cfg, tokenizer, *, base_dir: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 independent_turns: bool = False):
        self.renderer = ChatRenderer(tokenizer, vlm_cfg)
        self.base_dir, self.max_image_pixels, self.independent_turns = base_dir, max_image_pixels, independent_turns
        # Text must not smuggle in tokens that only the image string may place; Idefics3's image
        # token is spelt like the placeholder, which marks where images go.
        reserved = {*tokenizer.extra_tokens.values(), tokenizer.eos_token, tokenizer.bos_token}
        reserved -= {IMAGE_PLACEHOLDER, None}
        self._reserved = sorted(reserved, key=len, reverse=True)
        self._tiles: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        self._cached = 0

    def check_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        check_texts(messages)
        out = []
        for m in messages:
            text = m["content"]
            for token in self._reserved:
                text = text.replace(token, "")
            out.append({"role": m["role"], "content": text})
        return out

    def load(self, source: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """(uint8 tiles, grid) of an image source, decoded once per process while the cache has room."""
        key = source_key(source)
        hit = self._tiles.get(key)
        if hit is None:
            try:
                image = load_image(source, base_dir=self.base_dir, max_pixels=self.max_image_pixels)
            except ImageError as e:
                raise SampleError(e.reason, str(e)) from e
            try:
                hit = self.renderer.image_processor.tiles_uint8(image)
            except Exception as e:  # the picture's own fault (a shape the processor cannot tile)
                raise SampleError("bad_image", f"the image cannot be processed ({e}).") from e
            if key is not None and self._cached < CACHE_BYTES:
                self._tiles[key] = hit
                self._cached += hit[0].numel()
        return hit

    def process(self, images: Sequence[Any], messages: list[dict[str, Any]], placeholders_required: bool,
                sample_id: str | None = None) -> dict[str, Any]:
        try:
            messages = self.check_messages(messages)
            self.renderer.check_images(messages, len(images), placeholders_required)  # before decoding any image
            loaded = [self.load(s) for s in images]
            norm, side = self.renderer.image_processor.normalize, self.renderer.tile
            tiles = torch.cat([norm(t) for t, _ in loaded]) if loaded else torch.zeros(0, 3, side, side)
            chat = self.renderer.lay_out(messages, tiles, [g for _, g in loaded],
                                         placeholders_required=placeholders_required,
                                         independent_turns=self.independent_turns)
        except (SampleError, RenderError) as e:
            raise SampleError(e.reason, getattr(e, "detail", str(e)), sample_id) from e
        if all(label == IGNORE_INDEX for label in chat.labels):
            raise SampleError("empty_text", "no token of the sample is supervised.", sample_id)
        sample = {"input_ids": torch.tensor(chat.input_ids), "labels": torch.tensor(chat.labels), "images": chat.tiles,
                  "id": sample_id}
        if chat.position_ids is not None:
            sample["position_ids"] = torch.tensor(chat.position_ids)
        return sample

    def sample(self, load: Callable[[], list], where: str, strict: bool) -> dict[str, Any]:
        """The sample of the records `load()` returns (several: merged), or its skip marker."""
        sample_id = where
        try:
            records = load()
            rid = records[0].get("id") if isinstance(records[0], dict) else None
            sample_id = where + (f" (id {rid})" if rid is not None else "")
            chats = [record_to_chat(r) for r in records]
            return self.process(*(chats[0] if len(chats) == 1 else merge_chats(chats)), sample_id)
        except Exception as e:  # noqa: BLE001 - odd data must not end a long run: counted and reported
            error = e if isinstance(e, SampleError) else SampleError("unexpected_error", f"{type(e).__name__}: {e}")
            if strict:
                raise SampleError(error.reason, error.detail, sample_id) from e
            return skip_marker(error.reason, error.detail, sample_id)


def check_records(records: Records, base_dir: str | None = None) -> SkipCounter:
    """Every record checked without decoding an image: layout, texts, placeholders, image files."""
    skips, base_dir = SkipCounter(), base_dir or records.base_dir
    for where, record in records.items():
        try:
            images, messages, required = record_to_chat(record)
            check_texts(messages)
            ChatRenderer.check_images(messages, len(images), required)
            for s in images:
                path = s.get("path") if isinstance(s, dict) and not s.get("bytes") else s
                if isinstance(path, str) and not os.path.isfile(path := os.path.join(base_dir or "", path)):
                    raise SampleError("missing_image", f"image file {path} does not exist.")
        except (SampleError, RenderError) as e:
            skips.skip(e.reason, getattr(e, "detail", str(e)), where)
    return skips


def check_data(data: str, image_folder: str | None = None, strict: bool = False) -> str:
    """The line saying what a run reads, once the train split opens (`strict`: and passes `check_records`)."""
    records = open_records(data, "train", image_folder)
    if strict:
        skips = check_records(records)
        if skips.total:
            raise DataError(f"{skips.total} record(s) of {data} cannot be used ({skips.summary().split(': ', 1)[1]}); "
                            f"the first: {next(iter(skips.examples.values()))} Fix them, or set strict=false to "
                            "train without them.")
    return describe(data)


def merge_plan(records: Records, processor: SampleProcessor, max_turns: int, max_length: int) -> list[list[int]]:
    """The records of each sample (`multi_turn`): records sharing one image merge, in file order,
    into samples of at most `max_turns` questions (0: any) within `max_length` tokens (bounded
    with the largest grid's image string); every other record is a sample of its own."""
    keys, chats = [], {}
    for i in range(len(records)):
        try:
            chat = record_to_chat(records[i])
            processor.check_messages(chat[1])
            processor.renderer.check_images(chat[1], len(chat[0]), chat[2])
            image = source_key(chat[0][0]) if len(chat[0]) == 1 and _image_first(chat) else None
            key = None if image is None else f"{int(chat[2])}{image}"
        except Exception:  # noqa: BLE001 - a faulty record stays a sample of its own; processing reports it
            key = None
        keys.append(key)
        chats[i] = chat if key is not None else None
    shared = {k for k, n in Counter(k for k in keys if k is not None).items() if n > 1}
    renderer = processor.renderer
    image_len = len(renderer.tokenizer.encode(renderer.image_strings([renderer.image_processor.largest_grid()])[0])) \
        if shared else 0
    samples: list[list[int]] = []
    open_samples: dict[str, list] = {}  # key -> [record indices, questions, length bound]
    for i, key in enumerate(keys):
        current = open_samples.get(key) if key in shared else None
        questions, length = (sum(m["role"] == "user" for m in chats[i][1]), _text_length(renderer, chats[i][1])) \
            if key in shared else (0, 0)
        if current is not None and (not max_turns or current[1] + questions <= max_turns) \
                and current[2] + length <= max_length:
            current[0].append(i)
            current[1] += questions
            current[2] += length
        else:
            open_samples[key] = [[i], questions, image_len + length]
            samples.append(open_samples[key][0])
    return samples


def _image_first(chat: tuple[list, list[dict[str, Any]], bool]) -> bool:
    """Whether the chat's image comes with its first question (merging keeps it there)."""
    _, messages, required = chat
    return not required or (IMAGE_PLACEHOLDER in messages[0]["content"]
                            and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages[1:]))


def _text_length(renderer: ChatRenderer, messages: list[dict[str, Any]]) -> int:
    try:
        texts = [{"role": m["role"], "content": str(m["content"])} for m in _strip_placeholders(messages)]
        return len(renderer.encoder.encode_lists(texts)[0])
    except Exception:  # noqa: BLE001 - a text the template refuses: never merge it
        return 1 << 30


class ConversationDataset(Dataset):
    """Map-style dataset over one split's records; `multi_turn` on the train split: see `merge_plan`."""

    def __init__(self, records: Records, vlm_cfg, tokenizer, train_cfg, split: str = "train"):
        cfg, self.records, self.strict = train_cfg, records, train_cfg.strict
        self.processor = SampleProcessor(vlm_cfg, tokenizer, base_dir=records.base_dir,
                                         max_image_pixels=cfg.max_image_pixels or DEFAULT_MAX_PIXELS,
                                         independent_turns=cfg.independent_turns)
        self.plan = None
        if cfg.multi_turn and split == "train":  # samples too long for a packed row are never merged
            length = vlm_cfg.lm_max_length
            if cfg.packing and cfg.pack_length:
                length = min(cfg.pack_length, length)
            samples = merge_plan(records, self.processor, cfg.max_turns, length)
            self.plan = samples if len(samples) < len(records) else None

    def __len__(self) -> int:
        return len(self.plan) if self.plan is not None else len(self.records)

    def records_of(self, i: int) -> list[int]:
        return list(self.plan[i]) if self.plan is not None else [i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        indices = self.records_of(i)
        return self.processor.sample(lambda: [self.records[r] for r in indices], self.records.where(*indices),
                                     self.strict)

    def group_keys(self) -> list[str]:
        """One key per sample: its images' identity (`source_key`s, nothing decoded), or the sample itself."""
        keys = []
        for i in range(len(self)):
            try:
                images = record_to_chat(self.records[self.records_of(i)[0]])[0]
                key = "|".join(filter(None, map(source_key, images)))
            except Exception:  # noqa: BLE001 - an unreadable record is its own group
                key = None
            keys.append(key or f"#{i}")
        return keys

    def describe(self, i: int) -> dict[str, Any]:
        """The raw sample for people: decoded images (or the error), messages without image tokens."""
        indices = self.records_of(i)
        info = {"id": self.records.where(*indices), "images": [], "messages": [], "image_errors": []}
        try:
            chats = [record_to_chat(self.records[r]) for r in indices]
        except SampleError:
            return info
        images, messages, _ = chats[0] if len(chats) == 1 else merge_chats(chats)
        for s in images:
            try:
                info["images"].append(load_image(s, base_dir=self.records.base_dir))
            except ImageError as e:
                info["image_errors"].append(e.reason)
        info["messages"] = [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, "").strip()
                             if isinstance(m["content"], str) else repr(m["content"])} for m in messages]
        return info


def build_dataset(train_cfg, vlm_cfg, tokenizer, split: str = "train"):
    return ConversationDataset(open_records(train_cfg.data, split, train_cfg.image_folder), vlm_cfg, tokenizer,
                               train_cfg, split)


class ShardedBatchSampler:
    """Seeded per-epoch shuffle cut into global batches, rank r of W taking the r-th slice of each
    (together exactly the single-process batch); `index`: the batch the next pass starts at.
    `groups` + `counts` (a weighted mixture): each epoch draws `counts[k]` of the positions in
    `groups[k]` (all of them before any repeats), from the seed and the epoch alone."""

    def __init__(self, n: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, groups: Sequence[Sequence[int]] = (),
                 counts: Sequence[int] = ()):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        if global_batch_size < world_size:
            raise ValueError(f"the global batch ({global_batch_size}) must hold at least one sample per rank "
                             f"({world_size} ranks).")
        self.groups, self.counts = [list(g) for g in groups], list(counts)
        n = sum(self.counts) if self.groups else n
        self.n, self.global_batch_size, self.rank, self.world_size = n, global_batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = self.index = 0
        self._perm: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return self.n // self.global_batch_size if self.drop_last else math.ceil(self.n / self.global_batch_size)

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """A fresh generator for `epoch`, from the seed alone (never the global RNG)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def rank_batch(self, epoch: int, b: int) -> list[int]:
        if self._perm[0] != epoch:
            self._perm = (epoch, self.order(epoch))
        g = self._perm[1][b * self.global_batch_size:(b + 1) * self.global_batch_size]
        return g[self.rank * len(g) // self.world_size:(self.rank + 1) * len(g) // self.world_size]

    def order(self, epoch: int) -> list[int]:
        g = self.epoch_generator(epoch)
        if not self.groups:
            return torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        drawn = []
        for members, count in zip(self.groups, self.counts):
            repeats = -(-count // len(members))
            drawn += [members[i] for i in torch.cat([torch.randperm(len(members), generator=g)
                                                     for _ in range(repeats)])[:count].tolist()]
        return [drawn[i] for i in torch.randperm(len(drawn), generator=g).tolist()] if self.shuffle else drawn

    def batches(self) -> list[list[int]]:
        """This rank's batches of the rest of the current epoch."""
        return [self.rank_batch(self.epoch, b) for b in range(self.index, len(self))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"the saved data order used seed {state['seed']}, this run seed {self.seed}; "
                             "resume with the same seed.")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class ResumableLoader:
    """Batches of a dataset, an epoch per pass; `state_dict()`: the position after the last batch
    yielded, not the prefetched ones."""

    def __init__(self, dataset, sampler: ShardedBatchSampler, collate_fn: Callable, *, num_workers: int = 0,
                 pin_memory: bool = False):
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.sampler
        # Worker seeds from the epoch's generator: the global RNG stays as a resumed run needs it.
        loader = DataLoader(self.dataset, batch_sampler=p.batches(), generator=p.epoch_generator(p.epoch),
                            collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in loader:
            p.index += 1
            yield batch
        p.set_epoch(p.epoch + 1)

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
