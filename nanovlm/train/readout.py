"""The vision stage's readout: what a from-scratch vision encoder first learns to answer.

`build_targets` makes targets from the samples' (image, question, answer) triples (`answers`: a class per
repeated answer, when they cover most questions; else `words`: a bag of answer tokens); `ReadoutHead`
reads the patches keyed by the question; `readout_loss` / `readout_right` score its logits.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import IGNORE_INDEX

MAX_QUESTION_TOKENS = 32  # the last tokens before an answer: the question (and the template's few)
MAX_CLASSES = 2000
MIN_COVERAGE = 0.5  # answer classes must cover this share of the questions, else a bag of words


@dataclass
class ReadoutData:
    """What the stage trains on: images (uint8 tiles), and (image, question, target) pairs."""
    images: torch.Tensor  # (n_images, max_tiles, 3, S, S) uint8
    n_tiles: torch.Tensor  # (n_images,) tiles of each image (the rest is padding)
    pair_image: torch.Tensor  # (n_pairs,) image index of each question
    questions: torch.Tensor  # (n_pairs, MAX_QUESTION_TOKENS) compact token ids, 0 = padding
    targets: torch.Tensor  # answers: (n_pairs,) class index; words: (n_pairs, n_words) 0/1
    mode: str  # "answers" | "words"
    classes: list[tuple[int, ...]]  # the answer (or word) token ids of each class
    question_vocab: dict[int, int]  # tokenizer id -> compact id (1..)
    coverage: float  # share of the questions whose answer is a class (answers mode)
    n_questions: int  # all questions seen, covered or not

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        if self.mode == "answers":
            return f"{self.n_classes} answer classes covering {self.coverage:.0%} of {self.n_questions} questions"
        return f"a bag of {self.n_classes} answer words"


@dataclass
class Pairs:
    images: list[torch.Tensor] = field(default_factory=list)
    image_of_key: dict[bytes, int] = field(default_factory=dict)
    pair_image: list[int] = field(default_factory=list)
    questions: list[list[int]] = field(default_factory=list)
    answers: list[tuple[int, ...]] = field(default_factory=list)


def sample_pairs(sample: dict, drop_ids: set[int]) -> list[tuple[list[int], tuple[int, ...]]]:
    """(question ids, answer ids) of each supervised span of a sample (the question: what precedes it)."""
    ids, sup = sample["input_ids"].tolist(), (sample["labels"] != IGNORE_INDEX).tolist() + [False]
    out, prev_end, start = [], 0, None
    for t, s in enumerate(sup):
        if s and start is None:
            start = t
        elif not s and start is not None:
            answer = tuple(x for x in sample["labels"][start:t].tolist() if x not in drop_ids)
            question = [x for x in ids[prev_end:start + 1] if x not in drop_ids]
            prev_end, start = t + 1, None
            if answer and question:
                out.append((question[-MAX_QUESTION_TOKENS:], answer))
    return out


def special_ids(tokenizer: Any, cfg) -> set[int]:
    """Token ids that are never question or answer words: image and tile tokens, EOS, pad, BOS."""
    ids = {cfg.lm_base_vocab_size + k for k in range(len(cfg.vlm_extra_tokens))}
    ids.update(v for v in (getattr(tokenizer, n, None) for n in ("eos_token_id", "pad_token_id", "bos_token_id"))
               if isinstance(v, int))
    return ids | {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def collect_pairs(dataset, indices: Sequence[int], drop_ids: set[int]) -> Pairs:
    """Every (image, question, answer) of `dataset[i]` for i in `indices`; one image per distinct set of pixels."""
    pairs = Pairs()
    for i in indices:
        sample = dataset[i]
        if "skip" in sample or sample.get("images") is None or sample["images"].numel() == 0:
            continue
        tiles = (sample["images"].float().clamp(0, 1) * 255).round().to(torch.uint8)  # (n_tiles, 3, S, S)
        key = hashlib.blake2b(tiles.numpy().tobytes(), digest_size=16).digest()
        if key not in pairs.image_of_key:
            pairs.image_of_key[key] = len(pairs.images)
            pairs.images.append(tiles)
        for question, answer in sample_pairs(sample, drop_ids):
            pairs.pair_image.append(pairs.image_of_key[key])
            pairs.questions.append(question)
            pairs.answers.append(answer)
    return pairs


def _encode_targets(pairs: Pairs, mode: str, classes: list) -> tuple[list[int], torch.Tensor]:
    """(kept pairs, targets): a class index (answers) or 0/1 per known word (words); the rest left out."""
    index = {(a if mode == "answers" else a[0]): c for c, a in enumerate(classes)}
    if mode == "answers":
        keep = [p for p, a in enumerate(pairs.answers) if a in index]
        return keep, torch.tensor([index[pairs.answers[p]] for p in keep], dtype=torch.long)
    keep = [p for p, a in enumerate(pairs.answers) if any(t in index for t in a)]
    targets = torch.zeros((len(keep), len(index)))
    for row, p in enumerate(keep):
        targets[row, [index[t] for t in pairs.answers[p] if t in index]] = 1.0
    return keep, targets


def _readout_data(pairs: Pairs, keep: list[int], targets: torch.Tensor, **fields) -> ReadoutData:
    n_tiles = torch.tensor([t.shape[0] for t in pairs.images])
    images = torch.zeros((len(pairs.images), int(n_tiles.max()), *pairs.images[0].shape[1:]), dtype=torch.uint8)
    for k, t in enumerate(pairs.images):
        images[k, :t.shape[0]] = t
    questions = torch.zeros((len(keep), MAX_QUESTION_TOKENS), dtype=torch.long)
    for row, p in enumerate(keep):
        ids = [fields["question_vocab"].get(t, 0) for t in pairs.questions[p]][-MAX_QUESTION_TOKENS:]
        questions[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return ReadoutData(images=images, n_tiles=n_tiles, questions=questions, targets=targets,
                       pair_image=torch.tensor([pairs.pair_image[p] for p in keep], dtype=torch.long),
                       n_questions=len(pairs.answers), **fields)


def build_targets(pairs: Pairs, mode: str = "auto") -> ReadoutData | str:
    """The stage's data, or a sentence saying why there is nothing to learn."""
    if not pairs.answers:
        return "the training samples hold no image with a supervised answer"
    counts = Counter(pairs.answers)
    classes = [a for a, c in counts.most_common(MAX_CLASSES) if c >= 2]
    coverage = sum(counts[a] for a in classes) / len(pairs.answers)
    if mode == "auto":
        mode = "answers" if len(classes) >= 2 and coverage >= MIN_COVERAGE else "words"
    vocab: dict[int, int] = {}
    for t in (t for q in pairs.questions for t in q):
        vocab.setdefault(t, len(vocab) + 1)
    if mode == "answers" and len(classes) < 2:
        return f"the answers hold {len(classes)} repeated answer(s), too few to classify"
    if mode == "words":
        words = Counter(t for a in pairs.answers for t in set(a))
        classes = [(w,) for w, c in words.most_common(MAX_CLASSES) if c >= 2]
        if len(classes) < 2:
            return "the answers repeat fewer than two words"
    keep, targets = _encode_targets(pairs, mode, classes)
    return _readout_data(pairs, keep, targets, mode=mode, classes=classes, question_vocab=vocab, coverage=coverage)


def held_out_targets(pairs: Pairs, train: ReadoutData) -> ReadoutData | None:
    """Held-out pairs in the training targets' terms (classes and question vocabulary)."""
    keep, targets = _encode_targets(pairs, train.mode, train.classes)
    if not keep:
        return None
    return _readout_data(pairs, keep, targets, mode=train.mode, classes=train.classes,
                         question_vocab=train.question_vocab, coverage=len(keep) / len(pairs.answers))


class QuestionBlock(nn.Module):
    """A pre-norm attention + MLP block over a question's tokens, attention as two matmuls (SDPA's fused CPU
    backward is slow on such short rows); word order matters: "is the circle left of the square?"."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, H, D).unbind(2)  # each (B, L, H, D)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(D)  # (B, H, L, L)
        attn = scores.masked_fill(~present.view(B, 1, 1, L), float("-inf")).float().softmax(-1).to(v.dtype)
        x = x + self.proj(torch.einsum("bhlm,bmhd->blhd", attn, v).reshape(B, L, C))
        return x + self.mlp(self.norm2(x))


class ReadoutHead(nn.Module):
    """(patch tokens of each image, questions about each image) -> logits over the targets."""

    def __init__(self, dim: int, n_question_tokens: int, n_out: int, n_heads: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.token = nn.Embedding(n_question_tokens + 1, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(MAX_QUESTION_TOKENS, dim) * 0.02)
        self.encoder = QuestionBlock(dim, n_heads)
        self.norm = nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, n_out))

    def question_vector(self, questions: torch.Tensor) -> torch.Tensor:
        """(Q, L) token ids (0: padding) -> (Q, C)."""
        present = questions != 0  # (Q, L)
        present[:, 0] = True  # a padding question must not be all-masked (its softmax would be NaN)
        x = self.encoder(self.token(questions) + self.position[:questions.shape[1]], present)  # (Q, L, C)
        return self.norm((x * present.unsqueeze(-1)).sum(1) / present.sum(1, keepdim=True))

    def forward(self, patches: torch.Tensor, patch_mask: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """patches (B, N, C), patch_mask (B, N), questions (B, P, L) -> logits (B, P, n_out)."""
        B, N, C = patches.shape
        P, L = questions.shape[1:]
        H, D = self.n_heads, C // self.n_heads
        # Each distinct question once (data repeats its questions), spread with index_select:
        # its backward adds the repeats in order, where `[inverse]`'s parallel atomic adds do not.
        unique, inverse = torch.unique(questions.reshape(B * P, L), dim=0, return_inverse=True)
        q = self.question_vector(unique).index_select(0, inverse).view(B, P, C)
        k, v = self.key(patches).view(B, N, H, D), self.value(patches).view(B, N, H, D)
        scores = torch.einsum("bphd,bnhd->bhpn", self.query(q).view(B, P, H, D), k) / math.sqrt(D)  # (B, H, P, N)
        mask = patch_mask.view(B, 1, 1, N)
        attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        gate = torch.sigmoid(scores) * mask / N  # grows with the number of patches that match
        pooled = torch.einsum("bhpn,bnhd->bphd", attn, v).reshape(B, P, C)
        summed = torch.einsum("bhpn,bnhd->bphd", gate.to(v.dtype), v).reshape(B, P, C)
        return self.mlp(torch.cat([pooled, summed, q], dim=-1))


def readout_loss(logits: torch.Tensor, targets: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "answers":
        return F.cross_entropy(logits.float(), targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / targets.shape[0]


def readout_right(logits: torch.Tensor, targets: torch.Tensor, mode: str) -> int:
    """Questions answered right: the top class (answers) or every word right (words)."""
    if mode == "answers":
        return int((logits.argmax(-1) == targets).sum())
    return int(((logits > 0) == (targets > 0.5)).all(-1).sum())
