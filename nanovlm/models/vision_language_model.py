"""The vision-language model: ViT -> modality projector -> language model.

Images are encoded, projected to `mp_image_token_length` embeddings each, and written over the
`<|image|>` placeholder tokens of the prompt (as in the current nanoVLM and Idefics3), so
prompts decide where images go and a sample may hold several images or none. Training computes
the vocabulary projection only at supervised positions.

State-dict names are the original nanoVLM's (`vision_encoder.*`, `MP.*`, `decoder.*`), so its
checkpoint directories load unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.config import VLMConfig
from nanovlm.fileio import make_temp_dir_beside, replace_dir
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.linear_cross_entropy import linear_cross_entropy
from nanovlm.models.modality_projector import ModalityProjector
from nanovlm.models.vision_transformer import ViT

IGNORE_INDEX = -100

# Buffers the original nanoVLM saved that hold no learned state (recomputed from the config).
_NON_LEARNED_KEYS = ("decoder.rotary_embd.inv_freq",)


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        self.load_backbone = load_backbone
        if load_backbone and cfg.vit_model_type:
            self.vision_encoder = ViT.from_pretrained(cfg)
        else:
            self.vision_encoder = ViT(cfg)
        if load_backbone and cfg.lm_model_type:
            self.decoder = LanguageModel.from_pretrained(cfg)
        else:
            self.decoder = LanguageModel(cfg)
        self.MP = ModalityProjector(cfg)
        self._tokenizer = None
        self._source_dir: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def image_token_id(self) -> int:
        """The extra tokens follow the base vocabulary in `vlm_extra_tokens` order."""
        return self.cfg.lm_base_vocab_size + list(self.cfg.vlm_extra_tokens).index("image_token")

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    @property
    def tokenizer(self):
        """The tokenizer saved with the checkpoint, else the one `cfg.lm_tokenizer` names."""
        if self._tokenizer is None:
            from nanovlm.data.processors import get_tokenizer

            source = self._source_dir if self._source_dir and _has_tokenizer(self._source_dir) else self.cfg.lm_tokenizer
            self._tokenizer = get_tokenizer(source, self.cfg.vlm_extra_tokens, self.cfg.lm_chat_template)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    # ------------------------------------------------------------------ forward
    def _flatten_images(self, images) -> torch.Tensor | None:
        if images is None:
            return None
        if isinstance(images, torch.Tensor):
            imgs = [images]
        else:
            imgs = [img for img in images if img is not None and (not isinstance(img, Sequence) or len(img))]
        parts = []
        for img in imgs:
            if isinstance(img, (list, tuple)):
                parts.extend(i.unsqueeze(0) if i.dim() == 3 else i for i in img)
            else:
                parts.append(img.unsqueeze(0) if img.dim() == 3 else img)
        parts = [p for p in parts if p.shape[0] > 0]
        if not parts:
            return None
        return torch.cat(parts, dim=0).to(device=self.device, dtype=self.dtype)  # (n_images, 3, H, W)

    def embed(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions."""
        x = self.decoder.token_embedding(input_ids)  # (B, T, C)
        pixels = self._flatten_images(images)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        n_images = 0 if pixels is None else pixels.shape[0]
        if n_slots != n_images * self.cfg.mp_image_token_length:
            raise ValueError(
                f"the prompts hold {n_slots} image tokens but {n_images} image(s) x "
                f"{self.cfg.mp_image_token_length} tokens = {n_images * self.cfg.mp_image_token_length} "
                "were expected; build prompts with the image processor's image string.")
        if n_images == 0:
            return x
        if self.cfg.vit_pixel_mean is not None:
            pixels = (pixels - self.cfg.vit_pixel_mean) / self.cfg.vit_pixel_std
        image_embd = self.MP(self.vision_encoder(pixels))  # (n_images, mp_image_token_length, C)
        x = x.clone()
        x[is_image] = image_embd.reshape(-1, image_embd.shape[-1]).to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, images=None, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                position_ids: torch.Tensor | None = None, return_logits: bool = True):
        """Returns (logits, loss).

        Without targets: logits (B, T, vocab) and loss None.
        With targets (B, T), aligned with the logits (targets[t] is the token after position t;
        IGNORE_INDEX = -100 where unsupervised): logits only for the supervised positions,
        (n_supervised, vocab), and the cross-entropy, averaged over them (`loss_reduction="mean"`)
        or summed (`"sum"`, for exact averaging across micro-batches and ranks).
        `attention_mask` holds segment ids: 0 padding, 1 for one sample per row, 1..k for packed rows.
        `return_logits=False` (training) returns (None, loss) and never builds the
        (n_supervised, vocab) logits: see `linear_cross_entropy`.
        """
        x = self.embed(input_ids, images)
        hidden, _ = self.decoder(x, attention_mask=attention_mask, position_ids=position_ids)
        if self.decoder.lm_use_tokens:
            raise ValueError("VisionLanguageModel needs lm_use_tokens=False (the decoder takes embeddings).")
        if targets is None:
            return self.decoder.head(hidden), None
        supervised = targets != IGNORE_INDEX  # (B, T)
        if return_logits:
            logits = self.decoder.head(hidden[supervised])  # (n_supervised, vocab)
            loss = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
        else:
            logits = None
            loss = linear_cross_entropy(hidden[supervised], self.decoder.head.weight, targets[supervised])
        if loss_reduction == "mean":
            loss = loss / supervised.sum().clamp(min=1)
        return logits, loss

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, images=None, attention_mask=None, max_new_tokens: int = 32,
                 top_k: int = 50, top_p: float = 0.9, temperature: float = 0.5, greedy: bool = False,
                 **kwargs) -> torch.Tensor:
        """New tokens only, (B, <= max_new_tokens); rows that ended are padded with EOS.
        See `nanovlm.generation.generate` for the options."""
        from nanovlm.generation import generate

        return generate(self, input_ids, images, attention_mask, max_new_tokens=max_new_tokens,
                        top_k=top_k, top_p=top_p, temperature=temperature, greedy=greedy, **kwargs)

    def answer(self, images, questions, max_new_tokens: int = 32, greedy: bool = True, **kwargs) -> list[str]:
        """Answer each question about its image(s); see `nanovlm.generation.answer`."""
        from nanovlm.generation import answer

        return answer(self, images, questions, max_new_tokens=max_new_tokens, greedy=greedy, **kwargs)

    # ------------------------------------------------------------------ saving / loading
    def state_dict_for_saving(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        if self.cfg.lm_tie_weights:
            sd.pop("decoder.head.weight", None)  # the same tensor as the token embedding
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Write config.json, model.safetensors and the tokenizer files; atomically (a temp
        directory renamed into place), so a crash never leaves a half-written checkpoint."""
        from safetensors.torch import save_file

        save_directory = os.fspath(save_directory)
        tmp = make_temp_dir_beside(save_directory)
        try:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self.cfg.to_dict(), f, indent=2)
            save_file(self.state_dict_for_saving(), os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt", "library": "nanovlm"})
            tok = tokenizer if tokenizer is not None else self._tokenizer_or_none()
            if tok is not None:
                tok.save_pretrained(tmp)
            replace_dir(tmp, save_directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _tokenizer_or_none(self):
        try:
            return self.tokenizer
        except Exception:  # an offline machine without the tokenizer: save weights and config only
            return None

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None
                        ) -> "VisionLanguageModel":
        """Load a checkpoint directory (ours or the original nanoVLM's) or a hub repo."""
        path = os.fspath(repo_id_or_path)
        if os.path.isdir(path):
            directory = path
        elif os.path.exists(path):
            raise ValueError(f"{path} is a file; --model / from_pretrained expects a checkpoint directory "
                             "with config.json and model.safetensors.")
        else:
            directory = _download(path, revision)
        config_path = os.path.join(directory, "config.json")
        weights_path = os.path.join(directory, "model.safetensors")
        for p in (config_path, weights_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} is missing; a checkpoint directory needs config.json and "
                                        "model.safetensors (write one with save_pretrained or nanovlm train).")
        cfg = VLMConfig.from_json(config_path)
        model = cls(cfg, load_backbone=False)
        from safetensors.torch import load_file

        model.load_checkpoint_state(load_file(weights_path), source=weights_path)
        model._source_dir = directory
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Strictly load a nanoVLM-layout state dict; every problem is listed, none is skipped."""
        state = {k: v for k, v in state.items() if k not in _NON_LEARNED_KEYS}
        if self.cfg.lm_tie_weights and "decoder.token_embedding.weight" not in state and "decoder.head.weight" in state:
            state["decoder.token_embedding.weight"] = state["decoder.head.weight"]
        if self.cfg.lm_tie_weights:
            state.pop("decoder.head.weight", None)
        expected = self.state_dict_for_saving()
        from nanovlm.weights.common import check_state_dict

        check_state_dict(state, {k: tuple(v.shape) for k, v in expected.items()}, source)
        # head.weight is absent when tied (it is the embedding); everything else was checked above.
        self.load_state_dict(state, strict=False)

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str = "Upload nanovlm model"):
        """Upload this model as a checkpoint directory (needs `huggingface_hub` and a login)."""
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(os.path.join(tmp, "model"))
            return upload_folder(repo_id=repo_id, folder_path=os.path.join(tmp, "model"),
                                 commit_message=commit_message)

    def num_parameters(self) -> dict[str, Any]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"vision_encoder": count(self.vision_encoder), "MP": count(self.MP),
                "decoder": count(self.decoder), "total": count(self)}


def _has_tokenizer(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "tokenizer.json"))


def _download(repo_id: str, revision: str | None) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{repo_id} is not a local directory, and HF_HUB_OFFLINE=1 forbids a hub "
                                "download; give the path of a checkpoint directory.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(f"{repo_id} is not a local directory; install huggingface_hub to fetch "
                                "it from the hub.") from e
    return snapshot_download(repo_id, revision=revision)
