"""The from-scratch CPU recipe as the list of stages `train()` runs, in order.

The vision stage (where `vision_warmup` asks, in a new run only), then the VLM stage. A stage is
a function of the run.
"""

from __future__ import annotations

from typing import Callable

from nanovlm.train.vision import vision_stage
from nanovlm.train.vlm import train_vlm


def stages(run) -> list[Callable]:
    return ([warm_up_vision] if run.cfg.recipe.vision_warmup != "off" and run.resume_from is None else []) + [train_vlm]


def warm_up_vision(run) -> None:
    run.state.warmup = vision_stage(run.model, run.data, run.cfg.recipe, seed=run.cfg.seed, init_from=run.cfg.init_from,
                                    tokenizer=run.tokenizer, amp=run.amp, fused=run.fused, say=run.say,
                                    progress=run.progress and run.info.is_main, threads=run.threads)
