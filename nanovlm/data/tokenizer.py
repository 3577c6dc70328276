"""The tokenizer: a thin layer over `tokenizers`, from a transformers tokenizer directory, a
`.gguf` file (its byte-level BPE rebuilt), `packaged:smollm2-135m` or a hub id (resolved as the
weights are). The VLM's extra tokens follow the base vocabulary and are attributes:
`tok.image_token`, `tok.image_token_id`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from nanovlm.fileio import atomic_write_json
from nanovlm.sources import PACKAGED_SMOLLM2, resolve
from nanovlm.weights.gguf import gguf_value, open_gguf

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]  # what a hub download fetches


class TokenizerError(ValueError):
    """A tokenizer source cannot be used; the message says why."""


class VLMTokenizer:
    """Encode / decode / chat template, with the VLM's extra tokens as attributes."""

    def __init__(self, tok: Tokenizer, *, eos_token: str | None, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 extra_tokens: dict[str, str] | None = None):
        self._tok, self.eos_token, self.bos_token, self.pad_token = tok, eos_token, bos_token, pad_token or eos_token
        self.chat_template = chat_template
        self.extra_tokens: dict[str, str] = {}
        self.add_extra_tokens(extra_tokens or {})

    def add_extra_tokens(self, extra_tokens: dict[str, str]) -> None:
        new = [t for t in extra_tokens.values() if self._tok.token_to_id(t) is None]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        self.extra_tokens.update(extra_tokens)

    def __getattr__(self, name: str) -> Any:
        # image_token, image_token_id, r1c1, r1c1_id, ... for every extra token.
        extra = self.__dict__.get("extra_tokens", {})
        if name in extra:
            return extra[name]
        if name.endswith("_id") and name[:-3] in extra:
            return self._tok.token_to_id(extra[name[:-3]])
        raise AttributeError(name)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    eos_token_id = property(lambda self: self.token_to_id(self.eos_token))
    bos_token_id = property(lambda self: self.token_to_id(self.bos_token))
    pad_token_id = property(lambda self: self.token_to_id(self.pad_token))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = False):
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; pass one to get_tokenizer.")
        text = _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        return self.encode(text) if tokenize else text

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """A directory transformers reads too (`PreTrainedTokenizerFast`)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "bos_token": self.bos_token, "pad_token": self.pad_token, "chat_template": self.chat_template,
                  "model_max_length": 8192, "nanovlm_extra_tokens": self.extra_tokens}
        atomic_write_json(os.path.join(directory, "tokenizer_config.json"), config)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """Compiling a jinja template costs more than rendering it; evaluation renders thousands."""
    return jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)


TEXT_PART = [{"type": "text", "text": "q7x"}]  # a user message's content as typed parts (SmolVLM's templates)


def template_shows(template: str, content: str | list) -> bool:
    """Whether a chat template shows the text "q7x" of a user message whose content is `content`."""
    try:
        return "q7x" in _compiled_template(template).render(messages=[{"role": "user", "content": content}],
                                                           add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:  # a template for strings fails on parts (string concatenation of a list), and back
        return False


def _from_directory(directory: str) -> VLMTokenizer:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise TokenizerError(f"{directory} has no tokenizer.json; give a transformers tokenizer directory, "
                             f"a .gguf file or {PACKAGED_SMOLLM2}.")
    config: dict[str, Any] = {}
    if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers allows named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    token = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k.endswith("_token")}
    return VLMTokenizer(Tokenizer.from_file(path), eos_token=token.get("eos_token"), bos_token=token.get("bos_token"),
                        pad_token=token.get("pad_token"), chat_template=template,
                        extra_tokens=config.get("nanovlm_extra_tokens"))


def _gguf_pre_tokenizer(pre: str):
    """llama.cpp's pre-tokenizer name -> the `tokenizers` pre-tokenizer that splits text the same way."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", ""):
        return byte_level
    if pre == "llama-bpe":
        regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt2, llama-bpe).")


@functools.lru_cache(maxsize=1)
def _gguf_tokenizer(path: str, mtime_ns: int, size: int) -> tuple[str, dict[str, Any]]:
    try:
        reader = open_gguf(path)  # shares the parsed file with the weight loader
    except Exception as e:
        raise TokenizerError(f"{path} is not a readable GGUF file ({e}).") from e
    kind = gguf_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2').")
    tokens: list[str] = gguf_value(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges", [])]
    types: list[int] = gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(gguf_value(reader, "tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    specials = [AddedToken(t, special=(ty == 3), normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_tokens([s for s in specials if not s.special])
    tok.add_special_tokens([s for s in specials if s.special])

    def token(key: str) -> str | None:
        i = gguf_value(reader, key)
        return None if i is None or int(i) >= len(tokens) else tokens[int(i)]

    return tok.to_str(), dict(eos_token=token("tokenizer.ggml.eos_token_id"),
                              bos_token=token("tokenizer.ggml.bos_token_id"),
                              pad_token=token("tokenizer.ggml.padding_token_id"),
                              chat_template=gguf_value(reader, "tokenizer.chat_template"))


def get_tokenizer(name_or_path: str, extra_tokens: dict[str, str] | None = None,
                  chat_template: str | None = None) -> VLMTokenizer:
    """A tokenizer from a directory, a .gguf file, `packaged:smollm2-135m` or a hub id, with `extra_tokens`."""
    if not name_or_path:
        raise TokenizerError("no tokenizer given; set lm_tokenizer to a directory, a .gguf file or "
                             f"{PACKAGED_SMOLLM2}.")
    source = resolve(name_or_path, allow_patterns=TOKENIZER_FILES)
    if os.path.isdir(source):
        tok = _from_directory(source)
    elif source.endswith(".gguf") and os.path.isfile(source):
        st = os.stat(source)  # each call a fresh tokenizer from the one rebuilt (in seconds) per file version
        serialized, kwargs = _gguf_tokenizer(os.path.realpath(source), st.st_mtime_ns, st.st_size)
        tok = VLMTokenizer(Tokenizer.from_str(serialized), **kwargs)
    else:
        raise TokenizerError(f"{source} is neither a tokenizer directory nor a .gguf file.")
    tok.chat_template = chat_template or tok.chat_template
    tok.add_extra_tokens(extra_tokens or {})
    return tok


def has_tokenizer(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "tokenizer.json"))


def tokenizer_for(cfg: Any, directory: str | None = None) -> VLMTokenizer:
    """The tokenizer saved in a checkpoint `directory`, else `cfg.lm_tokenizer`'s, set up as `cfg` says;
    its turns end with the token the model stops at (`lm_eos_token_id`: Idefics3's `<end_of_utterance>`)."""
    tok = get_tokenizer(directory if directory and has_tokenizer(directory) else cfg.lm_tokenizer,
                        cfg.vlm_extra_tokens, cfg.lm_chat_template)
    tok.eos_token = tok._tok.id_to_token(cfg.lm_eos_token_id) or tok.eos_token
    return tok
