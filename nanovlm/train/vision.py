"""The vision stage: a from-scratch vision encoder first learns to answer the data's questions through a
readout of its own (`nanovlm.train.readout`); only the encoder goes on.

nanoVLM starts from a pretrained SigLIP; through the language model alone a new encoder learns slowly.
The stage runs on the shared trainer; its own: several questions per image, shifted tiles, and more
cycles while the readout is below its target. A resumed run skips it (the checkpoint holds the encoder).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from nanovlm.data.augment import sample_generator, shift_pixels, shift_tiles
from nanovlm.train.optim import Schedule, build_optimizer, decay_groups
from nanovlm.train.readout import (MIN_COVERAGE, ReadoutData, ReadoutHead, build_targets, collect_pairs,
                                   held_out_targets, readout_loss, readout_right, special_ids)
from nanovlm.train.step import Trainer, auto_skip, fit, vision_budget
from nanovlm.train.vlm import planned_seconds

WEIGHT_DECAY = 0.1
MAX_PAIRS_PER_IMAGE = 8
DECAY_SHARE = 0.25  # of the steps: the rate's cosine decay at the end
EXTEND_BELOW = 0.97  # the readout's target: accuracy on the last tenth's training batches
MAX_EXTENSION = 5  # at most this many times the planned steps in all


def _by_image(data: ReadoutData) -> list[torch.Tensor]:
    order = torch.argsort(data.pair_image, stable=True)
    return list(torch.split(order, torch.bincount(data.pair_image, minlength=len(data.images)).tolist()))


def _pairs_for(image_idx: torch.Tensor, by_image: list[torch.Tensor], cap: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) indices of up to `cap` questions of each image (-1: none; random where more), and their mask."""
    own = []
    for k in image_idx.tolist():
        pairs = by_image[k]
        if len(pairs) > cap:
            keep = torch.randperm(len(pairs), generator=generator)[:cap] if generator is not None else slice(cap)
            pairs = pairs[keep]
        own.append(pairs)
    idx = torch.full((len(own), max(1, max(len(o) for o in own))), -1, dtype=torch.long)
    for row, pairs in enumerate(own):
        idx[row, :len(pairs)] = pairs
    return idx, idx >= 0


def readout_logits(model, head: ReadoutHead, data: ReadoutData, image_idx: torch.Tensor, pair_idx: torch.Tensor,
                   shift: int = 0, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """(B, P, n_out) logits of the chosen images' questions, each tile moved by up to `shift` px."""
    device = next(model.parameters()).device
    tiles = data.images[image_idx]  # (b, T, 3, S, S) uint8
    b, T = tiles.shape[:2]
    if shift:
        tiles = torch.stack([shift_tiles(t, shift, sample_generator(seed, epoch, k))
                             for t, k in zip(tiles, image_idx.tolist())])
    out = model.vision_encoder(model.normalize_pixels(tiles.flatten(0, 1).to(device).float().div_(255.0)))
    n = out.shape[1]  # (b * T, patches, C)
    mask = (torch.arange(T).view(1, T) < data.n_tiles[image_idx].view(b, 1)).repeat_interleave(n, dim=1)
    questions = data.questions[pair_idx.clamp(min=0)]  # (B, P, L)
    questions[pair_idx < 0] = 0
    return head(out.view(b, T * n, out.shape[-1]), mask.to(device), questions.to(device))


@torch.no_grad()
def readout_accuracy(model, head: ReadoutHead, data: ReadoutData, amp: dict, batch_size: int = 64) -> float:
    """Share of `data`'s questions the encoder + head answer right."""
    was = model.vision_encoder.training
    model.vision_encoder.eval()
    by_image, images, right = _by_image(data), torch.unique(data.pair_image), 0
    for start in range(0, len(images), batch_size):
        pair_idx, valid = _pairs_for(images[start:start + batch_size], by_image, len(data.pair_image), None)
        with torch.autocast(**amp):
            logits = readout_logits(model, head, data, images[start:start + batch_size], pair_idx)
        right += readout_right(logits[valid.to(logits.device)].float(), data.targets[pair_idx[valid]].to(logits.device))
    model.vision_encoder.train(was)
    return right / max(1, len(data.pair_image))


class VisionStage:
    """The stage's own part of each step (its images, questions and readout loss), run by `fit`."""

    name = "vision warm-up"

    def __init__(self, model: nn.Module, data: ReadoutData, steps: int, lr: float, batch_size: int, *, seed: int,
                 amp: dict, fused: bool, say: Callable[[str], None], progress: bool = True, shift: float = 0.0,
                 extend: bool = False, budget_s: float | Callable[[float], float] | None = None,
                 log: Callable[[dict], None] | None = None):
        self.model, self.data, self.batch_size, self.seed, self.say, self.log = model, data, batch_size, seed, say, log
        self.extend, self.budget_s = extend and data.coverage >= MIN_COVERAGE, budget_s
        with torch.random.fork_rng(devices=[]):  # seeded, and no draw from the global generator
            torch.manual_seed(seed)
            self.head = ReadoutHead(model.cfg.vit_hidden_dim, len(data.question_vocab), len(data.vocab) + 1,
                                    data.n_slots)
        self.head.to(next(model.parameters()).device)
        params = list(model.vision_encoder.parameters()) + list(self.head.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = build_optimizer(decay_groups("vision", params, lr, WEIGHT_DECAY), fused, betas=(0.9, 0.999))
        self.trainer = Trainer(model, None, optimizer, Schedule(optimizer, steps, 0.02, DECAY_SHARE), amp, 1.0, say,
                               loss=self.loss)
        self.generator = torch.Generator().manual_seed(seed)
        self.by_image = _by_image(data)
        self.with_pairs = torch.tensor([k for k, p in enumerate(self.by_image) if len(p)], dtype=torch.long)
        self.order, self.pos, self.epoch = torch.randperm(len(self.with_pairs), generator=self.generator), 0, 0
        self.shift = shift_pixels(data.images.shape[-1], shift)
        self.scores: list[tuple[int, int]] = []  # (right, questions) of each step's training batch
        self.planned, self.cycles, self.last_loss = steps, 1, torch.zeros(())
        say(f"vision warm-up: {steps} steps of the vision encoder with a question-keyed readout of "
            f"{data.describe()}, {len(self.with_pairs)} images, {batch_size} per step, lr {lr:g}"
            + (f", tiles moved by up to {self.shift} px" if self.shift else ""))
        self.bar = tqdm(total=steps, unit="step", dynamic_ncols=True, desc="vision warm-up") if progress else None

    def run(self, held_out: ReadoutData | None = None) -> dict[str, Any]:
        """Train the encoder with the head; returns the summary and the trained `head`."""
        t0 = time.perf_counter()
        self.model.vision_encoder.train()
        try:
            steps = fit(self.trainer, self, 0, None if self.budget_s is None else self.fit_budget)
        finally:
            if self.bar is not None:
                self.bar.close()
        seconds = time.perf_counter() - t0
        held = readout_accuracy(self.model, self.head, held_out, self.trainer.amp) if held_out is not None else None
        data = self.data
        result = {"steps": steps, "planned_steps": self.planned, "cycles": self.cycles, "time_s": round(seconds, 1),
                  "loss": round(self.last_loss.item(), 4), "answer_tokens": len(data.vocab), "slots": data.n_slots,
                  "coverage": round(data.coverage, 4), "questions": data.n_questions, "images": len(self.with_pairs),
                  "shift_px": self.shift, "train_accuracy": _window_accuracy(self.scores, max(1, steps // 10)),
                  "held_out_accuracy": held}
        short = self.extend and result["train_accuracy"] < EXTEND_BELOW
        self.say(f"vision warm-up done in {seconds:.0f} s: {steps} steps in {self.cycles} cycle(s), loss "
                 f"{result['loss']:.4f}, readout accuracy {result['train_accuracy']:.1%} on training batches"
                 + (f" (below its {EXTEND_BELOW:.0%} target)" if short else "")
                 + (f", {held:.1%} on {len(held_out.pair_image)} held-out questions" if held is not None else ""))
        return {**result, "head": self.head}

    def fit_budget(self, planned_s: float) -> float | None:
        """The stage's seconds (None: no budget), once its planned steps' seconds are known."""
        self.budget_s = self.budget_s(planned_s) if callable(self.budget_s) else self.budget_s
        return self.budget_s

    def step(self, trainer: Trainer, step: int) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):  # a fresh seeded order each pass over the images
            self.order, self.pos = torch.randperm(len(self.with_pairs), generator=self.generator), 0
            self.epoch += 1
        image_idx = self.with_pairs[self.order[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        pair_idx, valid = _pairs_for(image_idx, self.by_image, MAX_PAIRS_PER_IMAGE, self.generator)
        (self.last_loss,) = trainer.accumulate([{"images": image_idx, "pairs": pair_idx, "valid": valid}], 1.0)
        trainer.update()
        return self.last_loss

    def loss(self, runner, batch: dict) -> torch.Tensor:
        logits = readout_logits(self.model, self.head, self.data, batch["images"], batch["pairs"], self.shift,
                                self.seed, self.epoch)
        logits = logits[batch["valid"].to(logits.device)]
        targets = self.data.targets[batch["pairs"][batch["valid"]]].to(logits.device)
        self.scores.append((readout_right(logits.detach().float(), targets), len(targets)))
        return readout_loss(logits, targets)

    def after(self, step: int, loss: torch.Tensor, lr_factor: float) -> None:
        total = self.trainer.schedule.total_steps
        if (step - 1) % 50 == 0 or step == total:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if self.log is not None:
                self.log({"warmup_step": step, "warmup_loss": loss.item()})
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(1)

    def more(self, step: int, elapsed_s: float) -> int:
        """Another cycle's steps when one ended unlearned (0: none; see `_extension`)."""
        self.planned = step if self.cycles == 1 else self.planned
        budget = self.fit_budget(elapsed_s)  # where the stage ran fewer steps than a calibration
        more = _extension(self.scores, self.planned, step, elapsed_s, budget) if self.extend else 0
        if more:
            self.cycles += 1
            self.say(f"vision warm-up: the readout answers {_window_accuracy(self.scores, self.planned // 10):.1%} "
                     f"of its training batches' questions: another {more} steps, the rate up again "
                     f"({step + more} in all)")
        return more


def _window_accuracy(scores: list[tuple[int, int]], window: int) -> float:
    chosen = scores[-max(1, window):]
    return sum(r for r, _ in chosen) / max(1, sum(n for _, n in chosen))


def _extension(scores: list[tuple[int, int]], planned: int, step: int, elapsed_s: float,
               budget_s: float | None) -> int:
    """At most the planned steps, within MAX_EXTENSION x them and the budget, at least a quarter of them;
    0 once the last tenth's accuracy reaches EXTEND_BELOW."""
    window = max(1, planned // 10)
    if len(scores) < window or _window_accuracy(scores, window) >= EXTEND_BELOW:
        return 0
    more = min(planned, MAX_EXTENSION * planned - step)
    if budget_s:
        more = min(more, int((budget_s - elapsed_s) / (elapsed_s / max(1, step))))
    return more if more >= max(1, planned // 4) else 0


def _budget(run) -> Callable[[float], float] | None:
    """The vision stage's seconds as a function of its planned seconds, beside the VLM stage's plan."""
    total = run.cfg.recipe.max_train_time
    if not total:
        return None
    vlm_s = run.vlm_plan_s or planned_seconds(run)
    return lambda planned_s: vision_budget(total, planned_s, vlm_s)


def warm_up_vision(run) -> None:
    """The stage as `vision_warmup` asks; its summary, or {"skipped": why} after a notice, in `run.state.warmup`."""
    model, data, recipe, say, init_from = run.model, run.data, run.cfg.recipe, run.say, run.cfg.init_from
    vcfg, mode = model.cfg, recipe.vision_warmup
    why = (auto_skip(vcfg, init_from) if mode == "auto" else None) or \
        ("the training data cannot be read sample by sample" if not hasattr(data.source, "__getitem__") else None)
    t0 = time.perf_counter()
    drop = special_ids(run.tokenizer, vcfg)
    targets = why or build_targets(collect_pairs(data.source, data.train_indices or range(len(data.source)), drop))
    if isinstance(targets, str):
        say(f"vision warm-up: skipped ({targets}).")
        run.state.warmup = {"skipped": targets}
        return
    held = held_out_targets(collect_pairs(data.val, range(len(data.val)), drop), targets) if data.val else None
    n_images = int(torch.unique(targets.pair_image).numel())
    steps = recipe.vision_warmup_steps or max(1, math.ceil(recipe.vision_warmup_epochs * n_images
                                                           / recipe.vision_warmup_batch_size))
    curve: list[tuple[int, float]] = []

    def log(record: dict) -> None:  # every 50 steps
        curve.append((record["warmup_step"], record["warmup_loss"]))
        if run.threads is not None:
            run.threads.adjust()

    stage = VisionStage(model, targets, steps, recipe.vision_warmup_lr, recipe.vision_warmup_batch_size,
                        seed=run.cfg.seed, amp=run.amp, fused=run.fused, say=say, log=log,
                        progress=run.progress and run.info.is_main, shift=recipe.image_shift,
                        extend=recipe.vision_warmup_extend and not recipe.vision_warmup_steps,
                        budget_s=_budget(run))
    result = stage.run(held)
    result.pop("head")
    run.state.warmup = {**result, "prepare_s": round(time.perf_counter() - t0 - result["time_s"], 1), "curve": curve}
