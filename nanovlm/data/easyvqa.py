"""The packaged easy-VQA data (PyPI `easy-vqa`): 64x64 pictures of one shape, 13 answers.

Train: 4,000 images / 38,575 questions; test: 1,000 images / 9,673 questions. The package
exposes `get_{train,test}_questions()` -> (texts, answers, image_ids) and
`get_{train,test}_image_paths()` -> {image_id: png path}.

Questions come in three kinds, told apart by their first words: "what color ..." / "what is
the color of ..." ask for a color, the other "what ..." questions ask for a shape, and
everything else ("is there ...", "does the image ...") is answered yes or no.

Made to be fast on a 2-core CPU: the images are decoded and tiled once per process into one
uint8 tensor, and every conversation is tokenized once, into flat tensors; `__getitem__` only
slices. (Decoding all 5,000 PNGs takes about half a second, so there is no disk cache.)
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.utils.data import Dataset

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.images import ImageTargets, load_image
from nanovlm.data.processors import ChatEncoder, get_image_string, image_processor_for, share_prefix

QTYPES = ("shape", "color", "yes/no")
SPLITS = ("train", "test")

_TILE_CACHE: dict[tuple, tuple[torch.Tensor, tuple[int, int]]] = {}


def question_type(question: str) -> str:
    """shape | color | yes/no, from the wording of an easy-VQA question."""
    q = question.strip().lower()
    if q.startswith(("what color", "what is the color")):
        return "color"
    if q.startswith("what"):
        return "shape"
    return "yes/no"


SHAPES = ("circle", "rectangle", "triangle")


def label_kinds() -> dict[str, tuple[str, ...]]:
    """What an easy-VQA image is labelled with: its shape (3) and its colour (8)."""
    return {"shape": SHAPES, "color": tuple(a for a in easyvqa_answers() if a not in SHAPES + ("yes", "no"))}


def image_labels(questions: list[tuple[str, str, str, str]]) -> dict[str, dict[str, str | None]]:
    """{image_path: {"shape": ..., "color": ...}} as far as each image's questions and answers tell.

    A "what ..." answer gives one attribute, and a value of the other one named in such a
    question is presupposed ("what is the yellow shape?"); a yes/no question says whether the
    value it names is present ("is there not a circle?" -> "no": there is one); all but one value
    ruled out leaves the last. None where an image's questions do not tell (or contradict)."""
    kinds = label_kinds()
    seen: dict[str, dict[str, tuple[set, set]]] = {}
    for path, q, a, qtype in questions:
        facts = seen.setdefault(path, {kind: (set(), set()) for kind in kinds})
        words = re.findall(r"[a-z]+", q.lower())
        if qtype in kinds:
            facts[qtype][0].add(a)
            present = True
        else:
            present = (a == "yes") != ("not" in words or "no" in words)
        for kind, values in kinds.items():
            facts[kind][0 if present else 1].update(w for w in words if w in values)
    labels = {}
    for path, facts in seen.items():
        labels[path] = {}
        for kind, values in kinds.items():
            yes, no = facts[kind]
            if not yes and len(no) == len(values) - 1:
                yes = set(values) - no
            labels[path][kind] = next(iter(yes)) if len(yes) == 1 and not yes & no else None
    return labels


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"easy-VQA has splits train and test, not {split!r}.")
    return split


def easyvqa_questions(split: str = "test") -> list[tuple[str, str, str, str]]:
    """(image_path, question, answer, qtype) for every question of the split, in file order."""
    import easy_vqa

    split = _check_split(split)
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return [(paths[i], q, a, question_type(q)) for q, a, i in zip(texts, answers, image_ids)]


def easyvqa_answers() -> list[str]:
    """The 13 possible answers."""
    import easy_vqa

    return list(easy_vqa.get_answers())


def _tiles_for(paths: list[str], processor, key: tuple) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 tiles (n_images, n_tiles, 3, S, S) of all images, cached for the process."""
    if key not in _TILE_CACHE:
        tiles, grids = zip(*(processor.tiles_uint8(load_image(p)) for p in paths))
        if len(set(grids)) != 1:
            raise ValueError(f"easy-VQA images gave different tile grids {sorted(set(grids))}.")
        _TILE_CACHE[key] = (torch.stack(tiles), grids[0])
    return _TILE_CACHE[key]


class EasyVQADataset(Dataset):
    """One question per sample, or (`multi_turn`) the questions of an image as conversations of
    at most `max_turns` questions each (0: all of them; split in two, recursively, where one
    would exceed `max_length`, by default `lm_max_length`).

    `independent_turns`: the questions of a sample are not a conversation but separate questions
    about its image, each seeing the image prompt and itself only (`share_prefix`): one vision
    pass for several questions, and no answer that the next question could copy ("what shape is
    in the image? circle" followed by "is there a circle?")."""

    def __init__(self, vlm_cfg, tokenizer, split: str = "train", multi_turn: bool = False, max_turns: int = 0,
                 independent_turns: bool = False, max_length: int | None = None):
        self.split = _check_split(split)
        self.multi_turn = multi_turn
        self.independent_turns = independent_turns
        max_length = max_length or vlm_cfg.lm_max_length
        if max_turns < 0:
            raise ValueError(f"max_turns must be >= 0 (0: all questions of an image), got {max_turns}.")
        self.processor = image_processor_for(vlm_cfg)
        self.questions = easyvqa_questions(self.split)

        paths = sorted({p for p, *_ in self.questions})
        self.image_paths = paths
        index_of = {p: k for k, p in enumerate(paths)}
        key = (self.split, self.processor.tile, self.processor.max_side, self.processor.resize_to_max_side_len,
               self.processor.max_grid)
        self.tiles, grid = _tiles_for(paths, self.processor, key)  # (n_images, n_tiles, 3, S, S) uint8
        image_string = get_image_string(tokenizer, [grid], vlm_cfg.mp_image_token_length)

        # Conversations: (image index, [(question, answer), ...]).
        if multi_turn:
            grouped: dict[int, list[tuple[str, str]]] = {}
            for p, q, a, _ in self.questions:
                grouped.setdefault(index_of[p], []).append((q, a))
            convs = [(k, qa[i:i + (max_turns or len(qa))]) for k, qa in sorted(grouped.items())
                     for i in range(0, len(qa), max_turns or len(qa))]
        else:
            convs = [(index_of[p], [(q, a)]) for p, q, a, _ in self.questions]

        encoder = ChatEncoder(tokenizer)

        def conversation(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
            messages = []
            for t, (q, a) in enumerate(turns):
                messages.append({"role": "user", "content": (image_string if t == 0 else "") + q})
                messages.append({"role": "assistant", "content": a})
            return messages

        def encode(turns: list[tuple[str, str]]) -> list[tuple[list[tuple[str, str]], list[int], list[int], list[int]]]:
            if independent_turns:
                ids, labels, positions = share_prefix([encoder.encode_lists(conversation([qa])) for qa in turns])
            else:
                ids, labels = encoder.encode_lists(conversation(turns))
                positions = []
            if len(ids) <= max_length or len(turns) == 1:
                return [(turns, ids, labels, positions)]
            # Too long: two samples about the same image instead of a dropped one.
            half = len(turns) // 2
            return encode(turns[:half]) + encode(turns[half:])

        ids_parts, label_parts, position_parts, lengths, image_index, all_turns = [], [], [], [], [], []
        for k, turns in convs:
            for part, ids, labels, positions in encode(turns):
                ids_parts.extend(ids)
                label_parts.extend(labels)
                position_parts.extend(positions)
                lengths.append(len(ids))
                image_index.append(k)
                all_turns.append(part)
        self.image_index = torch.tensor(image_index, dtype=torch.long)
        self.turns = all_turns
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(self.lengths, 0)
        self.input_ids = torch.tensor(ids_parts, dtype=torch.int32)  # flat; vocab < 2**31
        self.labels = torch.tensor(label_parts, dtype=torch.int32)
        self.positions = torch.tensor(position_parts, dtype=torch.int32) if independent_turns else None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        sample = {
            "input_ids": self.input_ids[a:b].long(),
            "labels": self.labels[a:b].long(),
            "images": self.processor.normalize(self.tiles[int(self.image_index[i])]),
            "id": f"easyvqa-{self.split}[{i}]",
        }
        if self.positions is not None:
            sample["position_ids"] = self.positions[a:b].long()
        return sample

    def image_targets(self) -> ImageTargets:
        """Every image of the split with its shape and colour class (IGNORE_INDEX where its questions do
        not tell): what a vision warm-up (`vision_warmup_steps`) trains on."""
        kinds = label_kinds()
        labels = image_labels(self.questions)
        targets = torch.tensor([[values.index(labels[p][kind]) if labels[p][kind] else IGNORE_INDEX
                                 for kind, values in kinds.items()] for p in self.image_paths], dtype=torch.long)
        return ImageTargets(self.tiles, targets, {kind: len(values) for kind, values in kinds.items()},
                            self.processor.normalize)

    def describe(self, i: int) -> dict[str, Any]:
        from PIL import Image

        messages = []
        for q, a in self.turns[i]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        image = Image.open(self.image_paths[int(self.image_index[i])]).convert("RGB")
        return {"id": f"easyvqa-{self.split}[{i}]", "images": [image], "messages": messages, "image_errors": []}
