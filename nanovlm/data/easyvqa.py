"""The packaged easy-VQA data (PyPI `easy-vqa`) as records: 64x64 pictures of one shape.

Train: 4,000 images and 38,575 questions; test: 1,000 images and 9,673 questions. Each question
is a record `{image, question, answer, answer_type}`; its type (shape, color or yes/no, which the
accuracy breakdown groups by) follows from the answer.
"""

from __future__ import annotations

import easy_vqa

NAMES = ("easyvqa", "easy-vqa", "easy_vqa")
SPLITS = ("train", "test")
SHAPES = frozenset({"circle", "rectangle", "triangle"})


def answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "color"


def records(split: str) -> list[dict[str, str]]:
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [{"image": paths[i], "question": q, "answer": a, "answer_type": answer_type(a)}
            for q, a, i in zip(texts, answers, image_ids)]
