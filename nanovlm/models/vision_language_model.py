"""The vision-language model: ViT -> modality projector -> language model.

Images are encoded, projected to `mp_image_token_length` embeddings each, and written over the
`<|image|>` placeholder tokens of the prompt (as in the current nanoVLM and Idefics3), so
prompts decide where images go and a sample may hold several images or none. Pixels arrive in
[0, 1] and are normalised in one place, `encode_images`. One loss path: the vocabulary projection
and cross-entropy at the supervised positions only, fused and chunked (`linear_cross_entropy`).
The training forward reads no tensor back to the host (no `.item()`, no boolean indexing), so on
an accelerator it never waits for the device and `torch.compile` sees one graph.

State-dict names are the original nanoVLM's (`vision_encoder.*`, `MP.*`, `decoder.*`), so its
checkpoint directories load unchanged. `from_pretrained`, `save_pretrained`, `push_to_hub`,
`generate`, `answer` and `tokenizer` are entry points into `weights`, `data.tokenizer` and
`generation`, imported when called: this module imports only torch, `config` and `models`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from nanovlm.config import IGNORE_INDEX, VLMConfig  # noqa: F401  (IGNORE_INDEX: also read from here)
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.lora import adapter_files_payload, adapter_state, add_lora, is_adapter_parameter, target_of
from nanovlm.models.linear_cross_entropy import linear_cross_entropy, supervised_index as find_supervised
from nanovlm.models.modality_projector import ModalityProjector
from nanovlm.models.quantization import check_quantize
from nanovlm.models.vision_transformer import ViT
from nanovlm.runtime import may_read_back


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        self.load_backbone = load_backbone
        self.vision_encoder = ViT.from_pretrained(cfg) if load_backbone and cfg.vit_model_type else ViT(cfg)
        self.decoder = LanguageModel.from_pretrained(cfg) if load_backbone and cfg.lm_model_type else LanguageModel(cfg)
        self.MP = ModalityProjector(cfg)
        self._tokenizer = None  # attached by from_pretrained and training, else built on first use

    @property
    def tokenizer(self):
        """The tokenizer attached, else `cfg.lm_tokenizer`'s, built on first use (as the original's)."""
        if self._tokenizer is None:
            from nanovlm.data.tokenizer import tokenizer_for

            self._tokenizer = tokenizer_for(self.cfg)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    # ------------------------------------------------------------------ properties
    @property
    def image_token_id(self) -> int:
        """The config's (derived: the extra tokens follow the base vocabulary in `vlm_extra_tokens` order)."""
        return self.cfg.vlm_image_token_id

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    # ------------------------------------------------------------------ forward
    def _flatten_images(self, images) -> torch.Tensor | None:
        """A tensor, or one entry per sample (a tensor, a list of (3, H, W) tensors, or None) -> one tensor."""
        samples = [images] if images is None or isinstance(images, torch.Tensor) else images
        parts = [i.unsqueeze(0) if i.dim() == 3 else i for img in samples if img is not None
                 for i in (img if isinstance(img, (list, tuple)) else [img])]
        parts = [p for p in parts if p.shape[0] > 0]
        return torch.cat(parts).to(device=self.device, dtype=self.dtype) if parts else None  # (n_images, 3, H, W)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The one place pixels are normalised: (x - vit_pixel_mean) / vit_pixel_std when the
        config sets them (the image processor always gives [0, 1])."""
        if self.cfg.vit_pixel_mean is not None:
            pixels = (pixels - self.cfg.vit_pixel_mean) / self.cfg.vit_pixel_std
        return pixels

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) pixels in [0, 1] -> (n_images, mp_image_token_length, C)."""
        return self.MP(self.vision_encoder(self.normalize_pixels(pixels)))

    def embed(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        """Token embeddings (B, T, C) with the image features written over the image tokens:
        image i fills the i-th run of `mp_image_token_length` image tokens, row by row."""
        x = self.decoder.token_embedding(input_ids)  # (B, T, C)
        pixels = self._flatten_images(images)
        n_images = 0 if pixels is None else pixels.shape[0]
        n_slots = n_images * self.cfg.mp_image_token_length  # from shapes alone
        is_image = input_ids == self.image_token_id  # (B, T)
        found = int(is_image.sum()) if may_read_back(input_ids) else n_slots  # unchecked: no host sync
        if found != n_slots:
            raise ValueError(
                f"the prompts hold {found} image tokens but {n_images} image(s) x "
                f"{self.cfg.mp_image_token_length} tokens = {n_slots} were expected; build prompts "
                "with the image processor's image string.")
        if n_images == 0:
            return x
        features = self.encode_images(pixels)  # (n_images, mp_image_token_length, C)
        # The slots' flat indices with their count known in advance (`nonzero_static`), so no
        # host sync. Unchecked (a training step on an accelerator), too few image tokens give an
        # out-of-range index error; extra ones keep their token embedding.
        slots = torch.nonzero_static(is_image.flatten(), size=n_slots).squeeze(1)  # (n_slots,)
        x = x.flatten(0, 1).index_copy(0, slots, features.reshape(n_slots, -1).to(x.dtype))  # (B * T, C)
        return x.view(*input_ids.shape, -1)  # (B, T, C)

    def forward(self, input_ids: torch.Tensor, images=None, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                position_ids: torch.Tensor | None = None, return_logits: bool = True,
                supervised_index: torch.Tensor | None = None):
        """Returns (logits (B, T, vocab), loss): one contract; loss is None without targets.

        targets (B, T), aligned with the logits (targets[t] is the token after position t;
        IGNORE_INDEX where unsupervised): the cross-entropy over the supervised positions, averaged
        or summed (`loss_reduction="sum"`: exact averaging across micro-batches and ranks), from
        those positions' hidden states only (`linear_cross_entropy`). `return_logits=False`
        (training): logits None; the head never runs over every position.

        attention_mask: (B, T), a 0/1 padding mask, or segment ids (0 padding, 1..k for the
        documents of a packed row; see `LanguageModel.forward`); None when every token is real.
        position_ids: (B, T) explicit positions (a shared prefix with branches; `LanguageModel`).
        supervised_index: `supervised_index(targets)`, computed by the collators on the CPU; without
        it the forward finds the supervised positions itself, a host sync on an accelerator.
        """
        if self.decoder.lm_use_tokens:
            raise ValueError("VisionLanguageModel needs lm_use_tokens=False (the decoder takes embeddings).")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        x = self.embed(input_ids, images)
        hidden, _ = self.decoder(x, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.decoder.head(hidden) if return_logits else None  # (B, T, vocab)
        if targets is None:
            return logits, None
        if supervised_index is None:
            supervised_index = find_supervised(targets)
        hidden = hidden.flatten(0, 1).index_select(0, supervised_index)  # (n_supervised, C)
        labels = targets.flatten().index_select(0, supervised_index)  # (n_supervised,)
        loss = linear_cross_entropy(hidden, self.decoder.head.weight, labels)
        if loss_reduction == "mean":
            loss = loss / max(supervised_index.shape[0], 1)
        return logits, loss

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, images=None, attention_mask=None, max_new_tokens: int = 32,
                 top_k: int = 50, top_p: float = 0.9, temperature: float = 0.5, greedy: bool = False,
                 compile: bool = False, **kwargs) -> torch.Tensor:
        """New tokens only, (B, <= max_new_tokens), ended rows padded with EOS. `compile=True`:
        the decode step `torch.compile`d (the first call per shape compiles); see `generation.stream`."""
        from nanovlm.generation import generate

        return generate(self, input_ids, images, attention_mask, max_new_tokens=max_new_tokens, top_k=top_k,
                        top_p=top_p, temperature=temperature, greedy=greedy, compile=compile, **kwargs)

    def answer(self, images, questions, max_new_tokens: int = 32, greedy: bool = True, **kwargs) -> list[str]:
        """Answer each question about its image(s); see `nanovlm.generation.answer`."""
        from nanovlm.generation import answer

        return answer(self, images, questions, max_new_tokens=max_new_tokens, greedy=greedy, **kwargs)

    def quantize(self, mode: str | None = "int8") -> "VisionLanguageModel":
        """Run the language model's linear layers and head on int8 weights with per-channel scales
        (`models.quantization`), in place (where this torch cannot, a warning; the weights stay float).
        "none": q/k/v and gate/up fusion only, as `generate` does. State dict and saving unchanged."""
        self.decoder.prepare_for_inference(mode)
        return self

    # ------------------------------------------------------------------ saving / loading
    def state_dict_for_saving(self) -> dict[str, torch.Tensor]:
        """The model's weights by nanoVLM name, without LoRA adapters (saved apart, in PEFT's layout)."""
        sd = self.state_dict()
        if self.cfg.lm_tie_weights:
            sd.pop("decoder.head.weight", None)  # the same tensor as the token embedding
        # A weight that is a view into a larger matrix (fused by `quantize`) gets its own storage:
        # safetensors refuses tensors that share memory.
        return {k: v.detach().clone() if v.untyped_storage().nbytes() > v.nbytes else v.detach().contiguous()
                for k, v in sd.items() if not is_adapter_parameter(k)}

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Write config.json, model.safetensors and the tokenizer files, atomically (see
        `nanovlm.weights.nanovlm.write_checkpoint`). Without a tokenizer given or attached, the
        one the config names is saved; when it cannot be built (offline), weights and config only."""
        from nanovlm.weights.nanovlm import write_checkpoint

        try:
            tok = self.tokenizer if tokenizer is None else tokenizer
        except (ValueError, OSError):  # e.g. offline with a hub tokenizer: the files are optional
            tok = None
        write_checkpoint(save_directory, self.cfg, self.state_dict_for_saving(), tok,
                         adapter=adapter_files_payload(self))  # LoRA adapters (+ projector), PEFT's layout

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike, *, revision: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        require_tokenizer: bool = False, quantize: str | None = None) -> "VisionLanguageModel":
        """Load a checkpoint directory (ours, the original nanoVLM's, or a transformers Idefics3 / SmolVLM
        one) or a hub repo with its tokenizer: the one saved beside the weights, else the config's; one that
        cannot be built (offline) is left out (`answer` then says why) unless `require_tokenizer`. LoRA
        adapters beside the weights are attached unmerged (`models.lora.merge_lora` folds them in)."""
        from nanovlm.data.tokenizer import has_tokenizer, tokenizer_for
        from nanovlm.weights.nanovlm import check_state_dict, read_model

        check_quantize(quantize)  # a bad value fails before the weights load
        model, directory, adapter = read_model(cls, repo_id_or_path, revision)
        if adapter is not None:  # LoRA adapters beside the weights (PEFT's layout): attached unmerged
            settings, tensors, source = adapter
            add_lora(model, settings["rank"], settings["alpha"], settings["dropout"],
                     [target_of(m) for m in settings["modules"]])
            check_state_dict(tensors, {k: tuple(v.shape) for k, v in adapter_state(model).items()}, source)
            model.load_state_dict(tensors, strict=False)
        try:
            model.tokenizer = tokenizer_for(model.cfg, directory)
        except (ValueError, OSError):
            if require_tokenizer or has_tokenizer(directory):  # a checkpoint's own broken tokenizer: an error
                raise
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        if check_quantize(quantize) != "none":
            model.quantize(quantize)
        return model.eval()

    def push_to_hub(self, repo_id: str, private: bool = False, commit_message: str = "Upload nanovlm model"):
        """Upload this model as a checkpoint directory (needs `huggingface_hub` and a login)."""
        from nanovlm.weights.nanovlm import push_checkpoint

        return push_checkpoint(repo_id, self.save_pretrained, private=private, commit_message=commit_message)
