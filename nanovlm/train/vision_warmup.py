"""Vision warm-up: a vision encoder trained from scratch first learns to answer the data's
questions through a small readout of its own, before the VLM stage.

nanoVLM starts from a pretrained SigLIP. A vision encoder trained from scratch through the
language model learns slowly: on the packaged shapes data the shape of the object stayed near
chance after 900 steps (docs/benchmarks.md, rounds 2-6), where the same encoder with a direct
readout learned it in minutes. This stage gives it that direct readout, built from nothing but the training
samples every data layout yields (an image, questions, supervised answer tokens), as classic
VQA models were trained:

- targets: the answers the data repeats (`answers`: one class per answer that occurs at least
  twice, cross-entropy), when they cover most questions; otherwise (captions, long free-form
  answers) the answer's tokens as a bag of words (`words`: multi-label, binary cross-entropy);
  with neither (fewer than two classes), or a pretrained encoder, the stage is skipped;
- the readout (`ReadoutHead`): the question's tokens through one transformer block, mean
  pooled, key an attention over the encoder's patch tokens (several heads: where things are
  matters for positions and "which of several objects"), plus a sigmoid-gated sum over the
  patches (softmax attention normalises counts away), then an MLP to the targets;
- several questions of one image share one encoder pass: a step takes `batch_size` images and
  up to `MAX_PAIRS_PER_IMAGE` of each image's questions.

- each training tile moves by a random offset of a few pixels (`image_shift`, 5% of its side
  in the default preset; `nanovlm.data.augment`): the answers stay true and the encoder cannot learn each image's exact pixels (on
  3,000 drawn images the readout then scored 90% on held-out counting questions where it scored
  67% without, docs/benchmarks.md);
- its length: `vision_warmup_epochs` passes over the images, then more cycles of the same
  schedule while the readout has not learned its training batches (`vision_warmup_extend`):
  counting takes several times the steps colours need.

The head is dropped afterwards; only the encoder goes on. The stage has its own AdamW (weight
decay 0.1 on matrices), a linear warm-up over the first 2% of steps, the full rate, then a cosine
decay over the last quarter, bf16 autocast where training uses it, gradient clipping at 1.0, and
its own seeded generators, so it does not move the random state of the stage after it. Under torchrun every rank runs the same
warm-up (the same numbers on each). A resumed run skips it: its checkpoint holds the encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.augment import shift_pixels, shift_tiles
from nanovlm.train.optim import WarmupStableDecay, clip_and_step

WEIGHT_DECAY = 0.1
MAX_QUESTION_TOKENS = 32  # the last tokens before an answer: the question (and the template's few)
MAX_PAIRS_PER_IMAGE = 8
MAX_CLASSES = 2000
MIN_COVERAGE = 0.5  # answer classes must cover this share of the questions, else bag of words
WARMUP_SHARE_OF_TIME = 0.6  # of max_train_time, at most (the VLM stage needs less: docs/benchmarks.md)
CALIBRATION_STEPS = 20  # steps timed before a time budget fixes the step count
DECAY_SHARE = 0.25  # of the steps: the rate's cosine decay at the end
EXTEND_BELOW = 0.97  # readout accuracy on the last tenth's training batches under which the warm-up goes on
MAX_EXTENSION = 5  # at most this many times the planned steps in all


@dataclass
class ReadoutData:
    """What the warm-up trains on: images (uint8 tiles), and (image, question, target) pairs."""
    images: torch.Tensor  # (n_images, max_tiles, 3, S, S) uint8
    n_tiles: torch.Tensor  # (n_images,) tiles of each image set (the rest is padding)
    pair_image: torch.Tensor  # (n_pairs,) image index of each question
    questions: torch.Tensor  # (n_pairs, MAX_QUESTION_TOKENS) compact token ids, 0 = padding
    targets: torch.Tensor  # answers: (n_pairs,) class index; words: (n_pairs, n_words) 0/1
    mode: str  # "answers" | "words"
    classes: list[tuple[int, ...]]  # the answer (or word) token ids of each class
    question_vocab: dict[int, int]  # tokenizer id -> compact id (1..)
    coverage: float  # share of the training questions whose answer is a class (answers mode)
    n_questions: int  # all questions seen, covered or not

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class _Pairs:
    images: list[torch.Tensor] = field(default_factory=list)
    image_of_key: dict[bytes, int] = field(default_factory=dict)
    pair_image: list[int] = field(default_factory=list)
    questions: list[list[int]] = field(default_factory=list)
    answers: list[tuple[int, ...]] = field(default_factory=list)


def _spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of supervised positions of a (shifted) label row."""
    sup = (labels != IGNORE_INDEX).tolist()
    spans, start = [], None
    for t, s in enumerate(sup + [False]):
        if s and start is None:
            start = t
        elif not s and start is not None:
            spans.append((start, t))
            start = None
    return spans


def sample_pairs(sample: dict, drop_ids: set[int]) -> list[tuple[list[int], tuple[int, ...]]]:
    """(question token ids, answer token ids) of each supervised answer of a processed sample.

    The answer is the supervised span (labels are shifted: labels[t] is token t + 1), without
    the special tokens that end a turn; the question is what stands between the previous answer
    (or the start) and this one, without image and other special tokens."""
    ids = sample["input_ids"].tolist()
    labels = sample["labels"]
    out, prev_end = [], 0
    for start, end in _spans(labels):
        answer = tuple(t for t in labels[start:end].tolist() if t not in drop_ids)
        question = [t for t in ids[prev_end:start + 1] if t not in drop_ids]
        prev_end = end + 1
        if answer and question:
            out.append((question[-MAX_QUESTION_TOKENS:], answer))
    return out


def special_ids(tokenizer: Any, cfg) -> set[int]:
    """Token ids that are never question or answer words: image and tile tokens, EOS, pad, BOS."""
    ids = {cfg.lm_base_vocab_size + k for k in range(len(cfg.vlm_extra_tokens))}
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return ids


def collect_pairs(dataset, indices: Sequence[int], drop_ids: set[int], pairs: _Pairs | None = None,
                  is_skip: Callable[[Any], bool] = lambda s: "skip" in s) -> _Pairs:
    """Every (image, question, answer) of `dataset[i]` for i in `indices`; one image per distinct
    set of pixels, however many samples hold it."""
    pairs = pairs or _Pairs()
    for i in indices:
        sample = dataset[i]
        if is_skip(sample) or sample.get("images") is None or sample["images"].numel() == 0:
            continue
        tiles = (sample["images"].float().clamp(0, 1) * 255).round().to(torch.uint8)  # (n_tiles, 3, S, S)
        key = hashlib.blake2b(tiles.numpy().tobytes(), digest_size=16).digest()
        k = pairs.image_of_key.get(key)
        if k is None:
            k = pairs.image_of_key[key] = len(pairs.images)
            pairs.images.append(tiles)
        for question, answer in sample_pairs(sample, drop_ids):
            pairs.pair_image.append(k)
            pairs.questions.append(question)
            pairs.answers.append(answer)
    return pairs


def _stack_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n_tiles = torch.tensor([t.shape[0] for t in images])
    out = torch.zeros((len(images), int(n_tiles.max()), *images[0].shape[1:]), dtype=torch.uint8)
    for k, t in enumerate(images):
        out[k, :t.shape[0]] = t
    return out, n_tiles


def _question_tensor(questions: list[list[int]], vocab: dict[int, int]) -> torch.Tensor:
    out = torch.zeros((len(questions), MAX_QUESTION_TOKENS), dtype=torch.long)
    for p, q in enumerate(questions):
        ids = [vocab.get(t, 0) for t in q][-MAX_QUESTION_TOKENS:]
        out[p, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _encode_targets(pairs: _Pairs, mode: str, index: dict) -> tuple[list[int], torch.Tensor]:
    """(kept pairs, targets): a class index per pair (answers), or 0/1 per known word (words);
    pairs without a known answer / word are left out."""
    if mode == "answers":
        keep = [p for p, a in enumerate(pairs.answers) if a in index]
        return keep, torch.tensor([index[pairs.answers[p]] for p in keep], dtype=torch.long)
    keep = [p for p, a in enumerate(pairs.answers) if any(t in index for t in a)]
    targets = torch.zeros((len(keep), len(index)))
    for row, p in enumerate(keep):
        for t in pairs.answers[p]:
            if t in index:
                targets[row, index[t]] = 1.0
    return keep, targets


def _readout_data(pairs: _Pairs, keep: list[int], targets: torch.Tensor, **fields) -> ReadoutData:
    images, n_tiles = _stack_images(pairs.images)
    return ReadoutData(images=images, n_tiles=n_tiles,
                       pair_image=torch.tensor([pairs.pair_image[p] for p in keep], dtype=torch.long),
                       questions=_question_tensor([pairs.questions[p] for p in keep], fields["question_vocab"]),
                       targets=targets, n_questions=len(pairs.answers), **fields)


def build_targets(pairs: _Pairs, mode: str = "auto") -> ReadoutData | str:
    """The warm-up's data, or a sentence saying why there is nothing to learn."""
    if not pairs.answers:
        return "the training samples hold no image with a supervised answer"
    counts = Counter(pairs.answers)
    classes = [a for a, c in counts.most_common(MAX_CLASSES) if c >= 2]
    covered = sum(counts[a] for a in classes)
    coverage = covered / len(pairs.answers)
    if mode == "auto":
        mode = "answers" if len(classes) >= 2 and coverage >= MIN_COVERAGE else "words"
    vocab: dict[int, int] = {}
    for q in pairs.questions:
        for t in q:
            vocab.setdefault(t, len(vocab) + 1)
    if mode == "answers":
        if len(classes) < 2:
            return f"the answers hold {len(classes)} repeated answer(s), too few to classify"
        keep, targets = _encode_targets(pairs, mode, {a: c for c, a in enumerate(classes)})
    else:
        words = Counter(t for a in pairs.answers for t in set(a))
        common = [w for w, c in words.most_common(MAX_CLASSES) if c >= 2]
        if len(common) < 2:
            return "the answers repeat fewer than two words"
        keep, targets = _encode_targets(pairs, mode, {w: c for c, w in enumerate(common)})
        classes = [(w,) for w in common]
    return _readout_data(pairs, keep, targets, mode=mode, classes=classes, question_vocab=vocab, coverage=coverage)


def held_out_targets(pairs: _Pairs, train: ReadoutData) -> ReadoutData | None:
    """Held-out pairs in the training targets' terms (classes and question vocabulary)."""
    if not pairs.answers:
        return None
    index = {a: c for c, a in enumerate(train.classes)} if train.mode == "answers" \
        else {w[0]: c for c, w in enumerate(train.classes)}
    keep, targets = _encode_targets(pairs, train.mode, index)
    if not keep:
        return None
    return _readout_data(pairs, keep, targets, mode=train.mode, classes=train.classes,
                         question_vocab=train.question_vocab, coverage=len(keep) / len(pairs.answers))


class QuestionBlock(nn.Module):
    """One pre-norm self-attention + MLP block over a question's tokens (word order matters:
    "is the circle left of the square?"). Attention as two matmuls: SDPA's fused CPU backward
    is several times slower on such short rows (docs/benchmarks.md, seventh round)."""

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
        scores = scores.masked_fill(~present.view(B, 1, 1, L), float("-inf"))
        attn = scores.float().softmax(-1).to(v.dtype)
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
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, n_out))

    def question_vector(self, questions: torch.Tensor) -> torch.Tensor:
        """(Q, L) token ids (0: padding) -> (Q, C)."""
        present = questions != 0  # (Q, L)
        present[:, 0] = True  # a padding question must not be all-masked (its softmax would be NaN)
        x = self.token(questions) + self.position[:questions.shape[1]]  # (Q, L, C)
        x = self.encoder(x, present)
        x = (x * present.unsqueeze(-1)).sum(1) / present.sum(1, keepdim=True)  # (Q, C)
        return self.norm(x)

    def forward(self, patches: torch.Tensor, patch_mask: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """patches (B, N, C), patch_mask (B, N), questions (B, P, L) -> logits (B, P, n_out)."""
        B, N, C = patches.shape
        P, L = questions.shape[1:]
        H, D = self.n_heads, C // self.n_heads
        # Each distinct question once: data repeats its questions (templates, the same question
        # about many images), and the question block is most of the head's cost.
        # index_select, not `[inverse]`: the backward of advanced indexing adds the repeated rows'
        # gradients with parallel atomic adds on a multi-threaded CPU (fp32), in an order that
        # changes from run to run; index_select's backward (index_add_) adds them in order.
        unique, inverse = torch.unique(questions.reshape(B * P, L), dim=0, return_inverse=True)
        q = self.question_vector(unique).index_select(0, inverse).view(B, P, C)
        k = self.key(patches).view(B, N, H, D)
        v = self.value(patches).view(B, N, H, D)
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


def _encode(model: nn.Module, data: ReadoutData, image_idx: torch.Tensor, device,
            shift: int = 0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens (b, tiles x patches, C), mask (b, tiles x patches)) of the chosen images,
    each tile moved by up to `shift` pixels (training batches)."""
    tiles = data.images[image_idx]  # (b, T, 3, S, S) uint8
    b, T = tiles.shape[:2]
    if shift and generator is not None:
        tiles = shift_tiles(tiles.flatten(0, 1), shift, generator).view(tiles.shape)
    pixels = model.normalize_pixels(tiles.flatten(0, 1).to(device).float().div_(255.0))  # as the VLM feeds it
    out = model.vision_encoder(pixels)  # (b * T, patches, C)
    n = out.shape[1]
    mask = (torch.arange(T).view(1, T) < data.n_tiles[image_idx].view(b, 1)).repeat_interleave(n, dim=1)
    return out.view(b, T * n, out.shape[-1]), mask.to(device)


def _pairs_for(image_idx: torch.Tensor, pairs_by_image: list[torch.Tensor], cap: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) indices of up to `cap` questions of each chosen image (-1: none), and their mask;
    a random `cap` of them where an image has more (all, in order, without a generator)."""
    own = []
    for k in image_idx.tolist():
        pairs = pairs_by_image[k]
        if len(pairs) > cap:
            pairs = pairs[torch.randperm(len(pairs), generator=generator)[:cap]] if generator is not None \
                else pairs[:cap]
        own.append(pairs)
    P = max(1, max(len(o) for o in own))
    idx = torch.full((len(own), P), -1, dtype=torch.long)
    for row, pairs in enumerate(own):
        idx[row, :len(pairs)] = pairs
    return idx, idx >= 0


def _by_image(data: ReadoutData) -> list[torch.Tensor]:
    n_images = int(data.images.shape[0])
    order = torch.argsort(data.pair_image, stable=True)
    return list(torch.split(order, torch.bincount(data.pair_image, minlength=n_images).tolist()))


def _logits(model, head: "ReadoutHead", data: ReadoutData, image_idx: torch.Tensor, pair_idx: torch.Tensor,
            device, shift: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, P, n_out) logits of the chosen images' questions."""
    patches, mask = _encode(model, data, image_idx, device, shift, generator)
    questions = data.questions[pair_idx.clamp(min=0)]  # (B, P, L)
    questions[pair_idx < 0] = 0
    return head(patches, mask, questions.to(device))


@torch.no_grad()
def readout_accuracy(model, head: ReadoutHead, data: ReadoutData, amp: dict, batch_size: int = 64) -> float:
    """Share of `data`'s questions the encoder + head answer right."""
    device = next(model.parameters()).device
    was = model.vision_encoder.training
    model.vision_encoder.eval()
    by_image = _by_image(data)
    images = torch.unique(data.pair_image)
    autocast = torch.autocast(**amp) if amp.get("enabled") else contextlib.nullcontext()
    right = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pair_idx, valid = _pairs_for(chunk, by_image, len(data.pair_image), None)
        with autocast:
            logits = _logits(model, head, data, chunk, pair_idx, device)
        right += readout_right(logits[valid.to(device)].float(), data.targets[pair_idx[valid]].to(device), data.mode)
    model.vision_encoder.train(was)
    return right / max(1, len(data.pair_image))


def _optimizer(params: list, lr: float, fused: bool) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only."""
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY, "lr": lr, "base_lr": lr},
                              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr}],
                             betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


class _ImageOrder:
    """`batch_size` images a step, in a fresh seeded order each pass over them."""

    def __init__(self, images: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.images, self.batch_size, self.generator = images, batch_size, generator
        self.order, self.pos = torch.randperm(len(images), generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.images), generator=self.generator), 0
        self.pos += self.batch_size
        return self.images[self.order[self.pos - self.batch_size:self.pos]]


def _targets_text(data: ReadoutData) -> str:
    if data.mode == "answers":
        return f"{data.n_classes} answer classes covering {data.coverage:.0%} of {data.n_questions} questions"
    return f"a bag of {data.n_classes} answer words"


def vision_warmup(model: nn.Module, data: ReadoutData, steps: int, lr: float, batch_size: int, *, seed: int,
                  amp: dict, fused: bool, say: Callable[[str], None], progress: bool = True,
                  held_out: ReadoutData | None = None, log: Callable[[dict], None] | None = None,
                  time_budget_s: float = 0.0, shift: float = 0.0, extend: bool = False) -> dict[str, Any]:
    """Train `model.vision_encoder` with a readout head on `data`; returns a summary (steps,
    seconds, loss, accuracy on the last tenth of the training batches and on `held_out`) and the
    trained `head` (the VLM stage does not use it; a benchmark can).

    The rate warms up over 2% of `steps`, stays, and decays (cosine) over the last DECAY_SHARE.
    Each training tile moves by up to `shift` x its side. With a `time_budget_s`, the step count
    is cut (after CALIBRATION_STEPS timed steps) to what fits. With `extend`, when the steps end
    while the readout has not learned its training batches (accuracy on the last tenth's below
    EXTEND_BELOW), another cycle of the same schedule follows, up to MAX_EXTENSION x `steps` in
    all and within the time budget (answer classes only: a bag of words is rarely all right).
    (Accuracy at the full rate says little: on easy-VQA it was 92% before the decay, 99% after.)"""
    device = next(model.parameters()).device
    encoder = model.vision_encoder
    with torch.random.fork_rng(devices=[]):  # seeded, and no draw from the global generator
        torch.manual_seed(seed)
        head = ReadoutHead(model.cfg.vit_hidden_dim, len(data.question_vocab), data.n_classes).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = _optimizer(params, lr, fused)
    length = _Length(optimizer, steps, time_budget_s, extend and data.mode == "answers", say)
    generator = torch.Generator().manual_seed(seed)
    pairs_by_image = _by_image(data)
    with_pairs = torch.tensor([k for k, p in enumerate(pairs_by_image) if len(p)], dtype=torch.long)
    batches = _ImageOrder(with_pairs, batch_size, generator)
    autocast = torch.autocast(**amp) if amp.get("enabled") else contextlib.nullcontext()
    pixels = shift_pixels(data.images.shape[-1], shift)
    say(f"vision warm-up: {steps} steps of the vision encoder with a question-keyed readout of {_targets_text(data)}, "
        f"{len(with_pairs)} images, {batch_size} per step, lr {lr:g}"
        + (f", tiles moved by up to {pixels} px" if pixels else ""))
    bar = _progress_bar(steps) if progress else None
    t0 = time.perf_counter()
    scores: list[tuple[int, int]] = []  # (right, questions) of each step's training batch
    encoder.train()
    loss = torch.zeros(())
    try:
        step = 0
        while step < length.total_steps:
            length.before(step, time.perf_counter() - t0)
            image_idx = batches.next()
            pair_idx, valid = _pairs_for(image_idx, pairs_by_image, MAX_PAIRS_PER_IMAGE, generator)
            targets = data.targets[pair_idx[valid]].to(device)
            with autocast:
                logits = _logits(model, head, data, image_idx, pair_idx, device, pixels, generator)[valid.to(device)]
            loss = readout_loss(logits, targets, data.mode)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(optimizer, params, 1.0)
            scores.append((readout_right(logits.detach().float(), targets, data.mode), len(targets)))
            if step % 50 == 0 or step == length.total_steps - 1:
                value = loss.item()
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if log is not None:
                    log({"warmup_step": step + 1, "warmup_loss": value})
            step += 1
            length.after(step, scores, time.perf_counter() - t0)
            if bar is not None:
                bar.total = length.total_steps
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for p in head.parameters():
        p.grad = None
    encoder.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    held = readout_accuracy(model, head, held_out, amp) if held_out is not None else None
    steps = length.total_steps
    result = {"steps": steps, "planned_steps": length.planned, "cycles": length.cycles, "time_s": round(seconds, 1),
              "loss": round(loss.item(), 4), "mode": data.mode, "classes": data.n_classes, "coverage": round(data.coverage, 4),
              "questions": data.n_questions, "images": len(with_pairs), "shift_px": pixels,
              "train_accuracy": _window_accuracy(scores, max(1, steps // 10)), "held_out_accuracy": held}
    say(_done_text(result, held_out))
    return {**result, "head": head}


def _progress_bar(steps: int):
    from tqdm import tqdm

    return tqdm(total=steps, unit="step", dynamic_ncols=True, desc="vision warm-up")


def _schedule(optimizer, steps: int, warmup_steps: int | None = None, start: int = 0) -> WarmupStableDecay:
    warm = int(round(0.02 * steps)) if warmup_steps is None else warmup_steps
    return WarmupStableDecay(optimizer, steps, warm, int(round(DECAY_SHARE * steps)), start=start)


class _Length:
    """The warm-up's schedule and step count: cut to the time budget after CALIBRATION_STEPS
    steps (`before`), another cycle when one ends unlearned (`after`, with `extend`)."""

    def __init__(self, optimizer, steps: int, budget_s: float, extend: bool, say: Callable[[str], None]):
        self.optimizer, self.budget_s, self.extend, self.say = optimizer, budget_s, extend, say
        self.planned, self.cycles = steps, 1
        self.schedule = _schedule(optimizer, steps)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def before(self, step: int, elapsed_s: float) -> None:
        """Set the rate of `step`, after cutting the steps to the budget at CALIBRATION_STEPS."""
        if self.budget_s and step == CALIBRATION_STEPS:
            fitted = fit_steps(self.total_steps, step, elapsed_s, self.budget_s)
            if fitted < self.total_steps:
                self.say(f"vision warm-up: {fitted} of {self.total_steps} steps fit the time budget "
                         f"({self.budget_s:.0f} s)")
                self.planned = fitted
                self.schedule = _schedule(self.optimizer, fitted, warmup_steps=self.schedule.warmup_steps)
        self.schedule.apply(step)

    def after(self, step: int, scores: list[tuple[int, int]], elapsed_s: float) -> None:
        """At the end of a cycle, another one while the readout has not learned its batches."""
        if not self.extend or step != self.total_steps:
            return
        more = _extension(scores, self.planned, step, elapsed_s, self.budget_s)
        if more:
            recent = _window_accuracy(scores, max(1, self.planned // 10))
            self.schedule = _schedule(self.optimizer, more, start=step)
            self.cycles += 1
            self.say(f"vision warm-up: the readout answers {recent:.1%} of its training batches' questions: "
                     f"another {more} steps, the rate up again ({self.total_steps} in all)")


def _window_accuracy(scores: list[tuple[int, int]], window: int) -> float:
    """Accuracy over the last `window` steps' batches."""
    chosen = scores[-window:]
    return sum(r for r, _ in chosen) / max(1, sum(n for _, n in chosen))


def _extension(scores: list[tuple[int, int]], planned: int, step: int, elapsed_s: float, budget_s: float) -> int:
    """The steps of another cycle once one has ended (0: none): while the readout answers fewer
    than EXTEND_BELOW of the last tenth's training questions, at most `planned` steps, within
    MAX_EXTENSION x `planned` in all and the time budget (at the pace so far), and at least a
    quarter of `planned` (a shorter cycle would be mostly warm-up and decay)."""
    window = max(1, planned // 10)
    if len(scores) < window or _window_accuracy(scores, window) >= EXTEND_BELOW:
        return 0
    more = min(planned, MAX_EXTENSION * planned - step)
    if budget_s:
        more = min(more, int((budget_s - elapsed_s) / (elapsed_s / max(1, step))))
    return more if more >= max(1, planned // 4) else 0


def _done_text(result: dict, held_out: ReadoutData | None) -> str:
    held = result["held_out_accuracy"]
    return (f"vision warm-up done in {result['time_s']:.0f} s: loss {result['loss']:.4f}, readout accuracy "
            f"{result['train_accuracy']:.1%} on training batches"
            + (f", {held:.1%} on {len(held_out.pair_image)} held-out questions" if held is not None else ""))


def fit_steps(total: int, done: int, elapsed_s: float, budget_s: float) -> int:
    """The steps that fit a time budget, measured after `done` steps took `elapsed_s` (never more
    than `total`, never fewer than `done`)."""
    if budget_s <= 0 or done <= 0:
        return total
    per_step = elapsed_s / done
    return max(done, min(total, done + int((budget_s - elapsed_s) / per_step)))


def run_warmup(model, data, cfg, amp: dict, fused: bool, info, say: Callable[[str], None], progress: bool,
               tokenizer=None, threads=None) -> dict:
    """The warm-up stage of a new run as `cfg` asks (`vision_warmup`: auto | answers | words);
    returns its summary, or {"skipped": why} after a one-line notice."""
    def skip(why: str) -> dict:
        say(f"vision warm-up: skipped ({why}).")
        return {"skipped": why}

    vcfg = model.cfg
    if cfg.vision_warmup == "auto" and cfg.init_from:
        return skip(f"the model starts from {cfg.init_from}")
    if cfg.vision_warmup == "auto" and vcfg.vlm_load_backbone_weights and vcfg.vit_model_type:
        return skip(f"the vision encoder starts from pretrained weights ({vcfg.vit_model_type})")
    if data.source is None or not hasattr(data.source, "__getitem__"):
        return skip("the training data cannot be read sample by sample")
    drop = special_ids(tokenizer if tokenizer is not None else model.tokenizer, vcfg)
    t0 = time.perf_counter()
    indices = data.train_indices or range(len(data.source))
    targets = build_targets(collect_pairs(data.source, indices, drop), "auto" if cfg.vision_warmup == "auto"
                            else cfg.vision_warmup)
    if isinstance(targets, str):
        return skip(targets)
    held = None
    if data.val is not None and len(data.val):
        held = held_out_targets(collect_pairs(data.val, range(len(data.val)), drop), targets)
    n_images = int(torch.unique(targets.pair_image).numel())
    steps = cfg.vision_warmup_steps or max(1, math.ceil(cfg.vision_warmup_epochs * n_images
                                                         / cfg.vision_warmup_batch_size))
    curve: list[tuple[int, float]] = []

    def log(record: dict) -> None:  # every 50 steps
        curve.append((record["warmup_step"], record["warmup_loss"]))
        if threads is not None:
            threads.adjust()

    result = vision_warmup(model, targets, steps, cfg.vision_warmup_lr, cfg.vision_warmup_batch_size, seed=cfg.seed,
                           amp=amp, fused=fused, say=say, progress=progress and info.is_main, held_out=held,
                           log=log, shift=cfg.image_shift,
                           extend=cfg.vision_warmup_extend and not cfg.vision_warmup_steps,
                           time_budget_s=cfg.max_train_time * WARMUP_SHARE_OF_TIME if cfg.max_train_time else 0.0)
    result.pop("head")
    result["prepare_s"] = round(time.perf_counter() - t0 - result["time_s"], 1)
    result["curve"] = curve
    return result
