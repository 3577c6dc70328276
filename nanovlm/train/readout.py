"""The vision stage's readout: what a from-scratch vision encoder first learns to answer.

Targets are each answer's first tokens in order; the head reads the patches keyed by the question.
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
MAX_ANSWER_TOKENS = 12  # an answer's first tokens are the readout's targets; the rest are left out
MAX_VOCAB = 2000  # answer tokens, the most frequent
MIN_COVERAGE = 0.5  # whole answers that repeat on this share of the questions: the stage may run longer
END = 0  # the target after an answer's last token


@dataclass
class ReadoutData:
    """What the stage trains on: images (uint8 tiles), and (image, question, answer tokens in order) triples."""
    images: torch.Tensor  # (n_images, max_tiles, 3, S, S) uint8
    n_tiles: torch.Tensor  # (n_images,) tiles of each image (the rest is padding)
    pair_image: torch.Tensor  # (n_pairs,) image index of each question
    questions: torch.Tensor  # (n_pairs, MAX_QUESTION_TOKENS) compact token ids, 0 = padding
    targets: torch.Tensor  # (n_pairs, n_slots) answer tokens as vocab index + 1, then END, then IGNORE_INDEX
    vocab: list[int]  # the answer tokens (tokenizer ids) the readout writes
    question_vocab: dict[int, int]  # tokenizer id -> compact id (1..)
    coverage: float  # share of the questions whose whole answer repeats (training) or can be written (held out)
    n_questions: int  # all questions seen, kept or not

    @property
    def n_slots(self) -> int:
        return self.targets.shape[1]

    def describe(self) -> str:
        return (f"answers of up to {self.n_slots - 1} tokens from {len(self.vocab)} answer tokens "
                f"({self.coverage:.0%} of {self.n_questions} questions repeat a whole answer)")


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


def _encode_targets(pairs: Pairs, vocab: list[int], n_slots: int, whole: bool) -> tuple[list[int], torch.Tensor]:
    """(kept pairs, targets): each answer's first tokens in order, then END; a token outside `vocab` is left
    out of the loss (`whole`: the pair is left out instead, as a held-out answer it cannot write)."""
    index = {t: k + 1 for k, t in enumerate(vocab)}
    keep = [p for p, a in enumerate(pairs.answers)
            if any(t in index for t in a) and not (whole and any(t not in index for t in a[:n_slots - 1]))]
    targets = torch.full((len(keep), n_slots), IGNORE_INDEX, dtype=torch.long)
    for row, p in enumerate(keep):
        answer = pairs.answers[p][:n_slots - 1]
        targets[row, :len(answer)] = torch.tensor([index.get(t, IGNORE_INDEX) for t in answer], dtype=torch.long)
        if len(answer) < n_slots:
            targets[row, len(answer)] = END
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


def build_targets(pairs: Pairs) -> ReadoutData | str:
    """The stage's data, or a sentence saying why there is nothing to learn. One readout for every kind of
    answer: it writes an answer's tokens in order, so a fixed set of answers is the case of one token each,
    and a number or word never seen whole is written from tokens that were."""
    if not pairs.answers:
        return "the training samples hold no image with a supervised answer"
    words = Counter(t for a in pairs.answers for t in a[:MAX_ANSWER_TOKENS])
    vocab = [t for t, c in words.most_common(MAX_VOCAB) if c >= 2]
    if len(vocab) < 2:
        return "the answers repeat fewer than two tokens"
    counts = Counter(pairs.answers)
    coverage = sum(c for c in counts.values() if c >= 2) / len(pairs.answers)
    question_vocab: dict[int, int] = {}
    for t in (t for q in pairs.questions for t in q):
        question_vocab.setdefault(t, len(question_vocab) + 1)
    n_slots = min(MAX_ANSWER_TOKENS, max(len(a) for a in pairs.answers)) + 1
    keep, targets = _encode_targets(pairs, vocab, n_slots, whole=False)
    return _readout_data(pairs, keep, targets, vocab=vocab, question_vocab=question_vocab, coverage=coverage)


def held_out_targets(pairs: Pairs, train: ReadoutData) -> ReadoutData | None:
    """Held-out pairs in the training targets' terms (answer tokens, slots and question vocabulary)."""
    keep, targets = _encode_targets(pairs, train.vocab, train.n_slots, whole=True)
    if not keep:
        return None
    return _readout_data(pairs, keep, targets, vocab=train.vocab, question_vocab=train.question_vocab,
                         coverage=len(keep) / len(pairs.answers))


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
    """(patch tokens of each image, questions about each image) -> logits of each answer slot: the slot's query
    (the question plus the slot's place) reads the patches, so the encoder learns where each token is drawn."""

    def __init__(self, dim: int, n_question_tokens: int, n_out: int, n_slots: int, n_heads: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.token = nn.Embedding(n_question_tokens + 1, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(MAX_QUESTION_TOKENS, dim) * 0.02)
        # At the question vector's own scale: places that start nearly alike are told apart only slowly.
        self.slot = nn.Parameter(torch.randn(n_slots, dim))
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
        """patches (B, N, C), patch_mask (B, N), questions (B, P, L) -> logits (B, P, n_slots, n_out)."""
        B, N, C = patches.shape
        P, L = questions.shape[1:]
        M, H, D = self.slot.shape[0], self.n_heads, C // self.n_heads
        # Each distinct question once (data repeats its questions), spread with index_select:
        # its backward adds the repeats in order, where `[inverse]`'s parallel atomic adds do not.
        unique, inverse = torch.unique(questions.reshape(B * P, L), dim=0, return_inverse=True)
        q = self.question_vector(unique).index_select(0, inverse).view(B, P, 1, C) + self.slot  # (B, P, M, C)
        k, v = self.key(patches).view(B, N, H, D), self.value(patches).view(B, N, H, D)
        query = self.query(q).view(B, P * M, H, D)
        scores = torch.einsum("bphd,bnhd->bhpn", query, k) / math.sqrt(D)  # (B, H, P * M, N)
        mask = patch_mask.view(B, 1, 1, N)
        attn = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        gate = torch.sigmoid(scores) * mask / N  # grows with the number of patches that match
        pooled = torch.einsum("bhpn,bnhd->bphd", attn, v).reshape(B, P, M, C)
        summed = torch.einsum("bhpn,bnhd->bphd", gate.to(v.dtype), v).reshape(B, P, M, C)
        return self.mlp(torch.cat([pooled, summed, q], dim=-1))


def readout_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each slot's token, summed over a question's slots (a one-token answer weighs as a
    class did, its end aside); logits (Q, M, V), targets (Q, M)."""
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / targets.shape[0]


def readout_right(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Questions whose every slot's token is right (a whole answer written)."""
    return int(((logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(-1).sum())
