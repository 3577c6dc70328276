"""Datasets: every source becomes a list of processed samples behind one entry point.

`build_dataset(train_cfg, vlm_cfg, tokenizer, split)` reads `train_cfg.data`:
- `easyvqa`: the packaged easy-VQA data (see `nanovlm.data.easyvqa`), pre-decoded and
  pre-tokenized once, so an epoch costs only tensor slicing;
- a Cauldron-layout parquet file (or folder of them), arrow file, or `datasets.save_to_disk`
  directory: records with `images` (list of images) and `texts` (list of {user, assistant});
- a LLaVA-layout `.json` / `.jsonl` file: records with `image` (a path, or a list of them,
  relative to `image_folder`, default the data file's folder) and `conversations`
  (`{from: human|gpt, value}`) whose text marks each image with an `<image>` placeholder;
- anything else is a hub dataset name (`name` or `name:config`), when online.
With `train_cfg.streaming`, files are read incrementally (an IterableDataset), so data larger
than memory trains too; arrow and save_to_disk data are memory-mapped either way.

A processed sample is `{"input_ids": (T,), "labels": (T,) already shifted, "images":
(n_tiles, 3, S, S), "id": str}`. A sample that cannot be used (a broken image, a bad text, a
placeholder mismatch, ...) comes back as a skip marker `{"skip": reason, "id", "error"}` that
the collator drops and counts, so a run never dies mid-epoch; `strict=True` raises a
`SampleError` naming the sample instead.

Determinism: `ShardedBatchSampler` (seeded shuffle, global batches sliced across ranks) and
`ResumableLoader` (DataLoader workers, a position that `state_dict` saves and resume restores).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from nanovlm.config import IGNORE_INDEX
from nanovlm.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from nanovlm.data.processors import IGNORE_INDEX, IMAGE_PLACEHOLDER, ChatRenderer, RenderError


class DataError(ValueError):
    """The data source as a whole cannot be used (wrong path, unknown layout, ...)."""


class SampleError(ValueError):
    """One sample cannot be used; raised instead of a skip when `strict` is on."""

    def __init__(self, reason: str, message: str, sample_id: str | None = None):
        where = f"sample {sample_id}: " if sample_id is not None else ""
        super().__init__(f"{where}{message} (reason: {reason}; set strict=false to skip such samples)")
        self.reason = reason
        self.detail = message
        self.sample_id = sample_id


def skip_marker(reason: str, message: str, sample_id: str | None) -> dict[str, Any]:
    return {"skip": reason, "id": sample_id, "error": message}


def is_skip(item: Any) -> bool:
    return isinstance(item, dict) and "skip" in item


class SkipCounter:
    """Skipped samples by reason, with the first message seen for each reason.

    Workers cannot share an object with the trainer, so collators put their counts in each batch
    (`batch["skips"]`) and the trainer adds them here with `update`.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, message: str = "", sample_id: str | None = None) -> None:
        if self.strict:
            raise SampleError(reason, message, sample_id)
        self.counts[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = f"{sample_id}: {message}" if sample_id is not None else message

    def update(self, counts: dict[str, int] | "SkipCounter") -> None:
        if isinstance(counts, SkipCounter):
            for reason, example in counts.examples.items():
                self.examples.setdefault(reason, example)
            counts = counts.counts
        for reason, n in counts.items():
            if n:
                self.counts[reason] += int(n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} sample(s): {parts}"

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.as_dict(), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = Counter(state.get("counts", {}))
        self.examples = dict(state.get("examples", {}))

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


# ---------------------------------------------------------------------------- records -> messages
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system"}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def record_to_chat(record: Any) -> tuple[list[Any], list[dict[str, Any]], bool]:
    """A raw record -> (image sources, messages, placeholders required).

    Cauldron (`texts`) and question/answer records put their images before the first question
    unless the text carries `<image>` placeholders; LLaVA (`conversations`) records must mark
    every image with a placeholder. Message contents are returned unchecked (maybe not strings).
    """
    if not isinstance(record, dict):
        raise SampleError("bad_record", f"a record must be a JSON object / dict, got {type(record).__name__}.")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise SampleError("empty_text", "the record has no conversation turns.")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise SampleError("bad_record", f"a conversation turn must be an object, got {type(turn).__name__}.")
            role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                raise SampleError("bad_record", f"unknown speaker {turn.get('from', turn.get('role'))!r} "
                                                "(expected human or gpt).")
            messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
        images = _as_list(record.get("image", record.get("images")))
        return images, messages, True
    if "texts" in record:
        texts = record["texts"]
        if not isinstance(texts, list) or not texts:
            raise SampleError("empty_text", "the record has no texts.")
        messages = []
        for t in texts:
            if not isinstance(t, dict) or "user" not in t or "assistant" not in t:
                raise SampleError("bad_record", "each entry of texts must be an object with user and assistant.")
            messages.append({"role": "user", "content": t["user"]})
            messages.append({"role": "assistant", "content": t["assistant"]})
        images = _as_list(record.get("images", record.get("image")))
        return images, messages, False
    if "question" in record and "answer" in record:
        messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
        return _as_list(record.get("images", record.get("image"))), messages, False
    raise SampleError("bad_record", f"the record has keys {sorted(record)}; expected Cauldron (images, texts) "
                                    "or LLaVA (image, conversations).")


def image_key(record: Any) -> str | None:
    """What identifies a record's images without decoding them (paths, or a hash of the bytes):
    records that share an image share a key, so a validation split can keep them together."""
    try:
        images = record_to_chat(record)[0]
    except SampleError:
        return None
    parts = []
    for source in images:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, (bytes, bytearray, memoryview)):
            parts.append(hashlib.blake2b(bytes(source), digest_size=12).hexdigest())
        elif isinstance(source, str):
            parts.append(os.path.normpath(source))
        elif hasattr(source, "tobytes"):  # a PIL image
            parts.append(hashlib.blake2b(source.tobytes(), digest_size=12).hexdigest())
    return "|".join(parts) or None


def _strip_placeholders(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages without their `<image>` placeholders (and the newline that follows one)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = content.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").lstrip()
        out.append({"role": m["role"], "content": content})
    return out


def merge_chats(chats: Sequence[tuple[list[Any], list[dict[str, Any]], bool]]
                ) -> tuple[list[Any], list[dict[str, Any]], bool]:
    """Chats about one and the same image -> one chat: the first chat's image and placeholder,
    then every later chat's turns without theirs."""
    images, messages, required = chats[0]
    messages = list(messages)
    for _, more, _ in chats[1:]:
        messages += _strip_placeholders(more)
    return images, messages, required


def _image_first(chat: tuple[list[Any], list[dict[str, Any]], bool]) -> bool:
    """Whether the chat's image comes with its first question (merging keeps it there)."""
    _, messages, required = chat
    return not required or (IMAGE_PLACEHOLDER in messages[0]["content"]
                            and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages[1:]))


class MergePlan:
    """Which records become one sample (`multi_turn` on file data): records with one image that
    others share (the same `image_key`) are merged, in file order, into samples of at most
    `max_turns` questions (0: no limit), never splitting a record, and only while an upper bound
    of the merged sample's length stays within `max_length` tokens: the records' texts without
    their image, plus the image string of the largest grid the processor makes. Every other
    record is a sample of its own. `samples[i]` lists the records of sample i.
    """

    def __init__(self, records: Any, processor: "SampleProcessor", max_turns: int, max_length: int):
        renderer = processor.renderer
        keys: list[str | None] = []
        chats: dict[int, tuple] = {}
        for i in range(len(records)):
            try:
                record = records[i]
                chat = record_to_chat(record)
                processor.check_messages(chat[1])
                renderer.check_images(chat[1], len(chat[0]), chat[2])
                key = image_key(record) if len(chat[0]) == 1 and _image_first(chat) else None
            except Exception:  # noqa: BLE001 - a faulty record stays a sample of its own; processing reports it
                key = None
            keys.append(None if key is None else f"{int(chat[2])}{key}")
            if key is not None:
                chats[i] = chat
        shared = {k for k, n in Counter(k for k in keys if k is not None).items() if n > 1}
        image_len = self._largest_image(renderer) if shared else 0
        self.samples: list[list[int]] = []
        open_samples: dict[str, list] = {}  # key -> [record indices, questions, length bound]
        for i, key in enumerate(keys):
            if key not in shared:
                self.samples.append([i])
                continue
            messages = chats[i][1]
            questions = sum(m["role"] == "user" for m in messages)
            length = self._text_length(renderer, messages)
            current = open_samples.get(key)
            if current is not None and (not max_turns or current[1] + questions <= max_turns) \
                    and current[2] + length <= max_length:
                current[0].append(i)
                current[1] += questions
                current[2] += length
            else:
                open_samples[key] = [[i], questions, image_len + length]
                self.samples.append(open_samples[key][0])

    @staticmethod
    def _largest_image(renderer: ChatRenderer) -> int:
        grid = renderer.image_processor.largest_grid()
        return len(renderer.tokenizer.encode(renderer.image_strings([grid])[0], add_special_tokens=False))

    @staticmethod
    def _text_length(renderer: ChatRenderer, messages: list[dict[str, Any]]) -> int:
        try:
            texts = [{"role": m["role"], "content": str(m["content"])} for m in _strip_placeholders(messages)]
            return len(renderer.encoder.encode_lists(texts)[0])
        except Exception:  # noqa: BLE001 - a text the template refuses: never merge it
            return 1 << 30


class SampleProcessor:
    """Image sources + messages -> a processed sample (or a SampleError with a reason)."""

    def __init__(self, vlm_cfg, tokenizer, *, base_dir: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 independent_turns: bool = False):
        self.cfg = vlm_cfg
        self.independent_turns = independent_turns
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, vlm_cfg)
        self.base_dir = base_dir
        self.max_image_pixels = max_image_pixels
        # Text must not smuggle in tokens that only the image string may place.
        reserved = list(getattr(tokenizer, "extra_tokens", {}).values())
        reserved += [t for t in (tokenizer.eos_token, getattr(tokenizer, "bos_token", None)) if t]
        # Idefics3's image token is spelt like the placeholder, which marks where images go.
        self._reserved = sorted(set(reserved) - {IMAGE_PLACEHOLDER}, key=len, reverse=True)

    def _clean(self, text: str) -> str:
        for token in self._reserved:
            if token in text:
                text = text.replace(token, "")
        return text

    def check_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        if not messages:
            raise SampleError("empty_text", "the sample has no messages.")
        out = []
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str):
                raise SampleError("non_string_text",
                                  f"a {m.get('role')} text is {type(content).__name__}, not a string.")
            out.append({"role": m["role"], "content": self._clean(content)})
        answers = [m for m in out if m["role"] == "assistant"]
        if not answers:
            raise SampleError("empty_text", "the sample has no assistant answer to learn from.")
        if any(not m["content"].strip() for m in answers):
            raise SampleError("empty_text", "an assistant answer is empty.")
        return out

    def process(self, images: Sequence[Any], messages: list[dict[str, Any]], placeholders_required: bool,
                sample_id: str | None = None) -> dict[str, Any]:
        """A processed sample; a SampleError (with the reason, naming `sample_id`) if unusable."""
        try:
            return self._process(images, messages, placeholders_required, sample_id)
        except SampleError as e:
            if e.sample_id is None and sample_id is not None:
                raise SampleError(e.reason, e.detail, sample_id) from e
            raise

    def _process(self, images, messages, placeholders_required, sample_id):
        messages = self.check_messages(messages)
        try:
            self.renderer.check_images(messages, len(images), placeholders_required)  # before decoding any image
            pil_images = []
            for source in images:
                try:
                    pil_images.append(load_image(source, base_dir=self.base_dir, max_pixels=self.max_image_pixels))
                except ImageError as e:
                    raise SampleError(e.reason, str(e)) from e
            chat = self.renderer.render(messages, pil_images, placeholders_required=placeholders_required,
                                        independent_turns=self.independent_turns)
        except RenderError as e:
            raise SampleError(e.reason, str(e)) from e
        if all(label == IGNORE_INDEX for label in chat.labels):
            raise SampleError("empty_text", "no token of the sample is supervised.")
        sample = {"input_ids": torch.tensor(chat.input_ids, dtype=torch.long),
                  "labels": torch.tensor(chat.labels, dtype=torch.long), "images": chat.tiles, "id": sample_id}
        if chat.position_ids is not None:
            sample["position_ids"] = torch.tensor(chat.position_ids, dtype=torch.long)
        return sample


# ---------------------------------------------------------------------------- record sources
class ListRecords:
    """Records held in memory (a LLaVA .json file, or a list given directly)."""

    def __init__(self, records: Sequence[Any], name: str = "records"):
        self.records = records
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        return self.records[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.records)


class JsonlRecords:
    """A .jsonl file indexed by line offsets: random access without holding the data in memory."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        offsets = []
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Any:
        if self._fh is None or self._pid != os.getpid():  # one handle per worker process
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return _parse_json_line(self._fh.readline())

    def __iter__(self) -> Iterator[Any]:
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield _parse_json_line(line)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fh": None, "_pid": None}


def _parse_json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError("bad_record", f"the line is not valid JSON ({e}).") from e


class ArrowRecords:
    """An Arrow table (memory-mapped where possible); a row becomes a dict of Python values.

    Image columns stay in their stored form ({bytes, path} structs): decoding happens in
    `load_image`, where a broken image is a counted skip, not an exception inside a library.
    """

    def __init__(self, table, name: str = "table"):
        self.table = table
        self.name = name

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> Any:
        return self.table.slice(int(i), 1).to_pylist()[0]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.table.to_batches(max_chunksize=256):
            yield from batch.to_pylist()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError("reading parquet / arrow data needs pyarrow; install it with `pip install nanovlm[hf]`.") from e
    return pyarrow


def _read_arrow_file(path: str):
    pa = _pyarrow()
    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(path, "r")
        try:
            return pa.ipc.open_stream(source).read_all()  # what `datasets` writes
        except pa.ArrowInvalid as e:
            raise DataError(f"{path} is not an Arrow IPC file or stream ({e}).") from e


def _save_to_disk_files(directory: str, split: str) -> list[str]:
    """The arrow files of a `datasets.save_to_disk` directory (a Dataset or a DatasetDict)."""
    dict_json = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(dict_json):
        with open(dict_json) as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            if split == "train" and len(splits) == 1:
                split = splits[0]
            else:
                raise DataError(f"{directory} has splits {splits}, not {split!r}.")
        return _save_to_disk_files(os.path.join(directory, split), split)
    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    return [os.path.join(directory, d["filename"]) for d in state.get("_data_files", [])]


def _is_save_to_disk(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "state.json"))
                                    or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def _local_files(path: str, split: str) -> tuple[str, list[str]]:
    """(kind, files) for a local data path; kind is parquet | arrow | json | jsonl."""
    if os.path.isdir(path):
        if _is_save_to_disk(path):
            return "arrow", _save_to_disk_files(path, split)
        for kind, ext in (("parquet", ".parquet"), ("arrow", ".arrow"), ("jsonl", ".jsonl"), ("json", ".json")):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(ext))
            if files:
                return kind, files
        raise DataError(f"{path} holds no .parquet, .arrow, .json or .jsonl files and is not a save_to_disk directory.")
    ext = os.path.splitext(path)[1].lower()
    kinds = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "jsonl", ".json": "json"}
    if ext not in kinds:
        raise DataError(f"{path}: unknown data file type {ext or '(none)'}; use .parquet, .arrow, .json or .jsonl.")
    return kinds[ext], [path]


def open_records(path: str, split: str = "train") -> Any:
    """Random-access records of a local data path."""
    try:
        return _open_records(path, split)
    except DataError:
        raise
    except Exception as e:  # pyarrow and OS errors: the whole file is unreadable
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}).") from e


def _open_records(path: str, split: str) -> Any:
    kind, files = _local_files(path, split)
    name = os.path.basename(os.path.normpath(path))
    if kind == "parquet":
        pa = _pyarrow()
        tables = [pa.parquet.read_table(f, memory_map=True) for f in files]
        return ArrowRecords(pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0], name)
    if kind == "arrow":
        pa = _pyarrow()
        tables = [_read_arrow_file(f) for f in files]
        if not tables:
            raise DataError(f"{path} lists no arrow files.")
        return ArrowRecords(pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0], name)
    if kind == "jsonl":
        if len(files) == 1:
            return JsonlRecords(files[0])
        return ListRecords([r for f in files for r in JsonlRecords(f)], name)
    records = []
    for f in files:
        with open(f) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise DataError(f"{f} is not valid JSON ({e}); a LLaVA file is a JSON list of records.") from e
        if isinstance(data, dict):  # {"data": [...]} or a single split of records
            data = data.get(split, data.get("data", data.get("annotations")))
        if not isinstance(data, list):
            raise DataError(f"{f} must hold a JSON list of records.")
        records.extend(data)
    return ListRecords(records, name)


def iter_records(path: str, split: str = "train") -> Iterator[Any]:
    """Records of a local data path read incrementally (parquet row groups, arrow batches, lines)."""
    kind, files = _local_files(path, split)
    for f in files:
        if kind == "parquet":
            pa = _pyarrow()
            for batch in pa.parquet.ParquetFile(f).iter_batches(batch_size=256):
                yield from batch.to_pylist()
        elif kind == "arrow":
            yield from ArrowRecords(_read_arrow_file(f))
        elif kind == "jsonl":
            with open(f, "rb") as fh:
                for line in fh:
                    if line.strip():
                        try:
                            yield _parse_json_line(line)
                        except SampleError as e:
                            yield _BadRecord(e)
        else:
            yield from open_records(f, split)


class _BadRecord:
    """A record that could not even be parsed; processing it reports the parse error."""

    def __init__(self, error: SampleError):
        self.error = error


def _check_layout(records: Any, name: str) -> None:
    """Fail early, with the columns named, when the first record matches no known layout."""
    try:
        first = records[0] if len(records) else None
    except SampleError:
        return  # a broken first line is a per-sample skip, not a layout problem
    if first is None:
        raise DataError(f"{name} holds no records.")
    try:
        record_to_chat(first)
    except SampleError as e:
        if e.reason == "bad_record" and isinstance(first, dict) and not (
                {"texts", "conversations"} & set(first) or {"question", "answer"} <= set(first)):
            raise DataError(f"{name}: records have keys {sorted(first)}; expected Cauldron (images, texts) "
                            "or LLaVA (image, conversations).") from None


# ---------------------------------------------------------------------------- datasets
class ConversationDataset(Dataset):
    """Map-style dataset over Cauldron / LLaVA / question-answer records."""

    def __init__(self, records: Any, vlm_cfg, tokenizer, *, base_dir: str | None = None, strict: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None, independent_turns: bool = False,
                 merge_turns: int | None = None, max_length: int | None = None):
        """`merge_turns` (not None): records that share an image become samples of at most that
        many questions (0: no limit) and at most `max_length` tokens (see `MergePlan`)."""
        self.records = records
        self.name = name or getattr(records, "name", "data")
        self.strict = strict
        self.processor = SampleProcessor(vlm_cfg, tokenizer, base_dir=base_dir, max_image_pixels=max_image_pixels,
                                         independent_turns=independent_turns)
        self.plan = None
        if merge_turns is not None:
            plan = MergePlan(records, self.processor, merge_turns, max_length or vlm_cfg.lm_max_length)
            self.plan = plan.samples if len(plan.samples) < len(records) else None

    def __len__(self) -> int:
        return len(self.plan) if self.plan is not None else len(self.records)

    def records_of(self, i: int) -> list[int]:
        """The records sample i is made of."""
        return list(self.plan[i]) if self.plan is not None else [i]

    def sample_id(self, i: int, record: Any = None) -> str:
        rid = record.get("id") if isinstance(record, dict) else None
        where = "+".join(str(r) for r in self.records_of(i))
        return f"{self.name}[{where}]" + (f" (id {rid})" if rid is not None else "")

    def _chat(self, i: int) -> tuple[Any, tuple[list[Any], list[dict[str, Any]], bool]]:
        """(the first record, the sample's chat)."""
        records = [self.records[r] for r in self.records_of(i)]
        chats = [record_to_chat(r) for r in records]
        return records[0], (chats[0] if len(chats) == 1 else merge_chats(chats))

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = None
        try:
            record, (images, messages, required) = self._chat(i)
            return self.processor.process(images, messages, required, self.sample_id(i, record))
        except SampleError as e:
            sid = self.sample_id(i, record)
            if self.strict:
                raise SampleError(e.reason, e.detail, sid) from e
            return skip_marker(e.reason, e.detail, sid)
        except Exception as e:  # noqa: BLE001 - odd data must not end a long run; counted and reported
            sid = self.sample_id(i, record)
            if self.strict:
                raise SampleError("unexpected_error", f"{type(e).__name__}: {e}", sid) from e
            return skip_marker("unexpected_error", f"{type(e).__name__}: {e}", sid)

    def group_keys(self) -> list[str]:
        """One key per sample: its images' identity (see `image_key`), or the sample itself."""
        keys = []
        for i in range(len(self)):
            try:
                key = image_key(self.records[self.records_of(i)[0]])
            except Exception:  # noqa: BLE001 - an unreadable record is its own group
                key = None
            keys.append(key or f"#{i}")
        return keys

    def describe(self, i: int) -> dict[str, Any]:
        """The raw sample for people: decoded images (or the error), messages without image tokens."""
        try:
            record, (images, messages, _) = self._chat(i)
        except SampleError:
            return {"id": self.sample_id(i), "images": [], "messages": [], "image_errors": []}
        pil, errors = [], []
        for s in images:
            try:
                pil.append(load_image(s, base_dir=self.processor.base_dir, max_pixels=self.processor.max_image_pixels))
            except ImageError as e:
                errors.append(e.reason)
        texts = [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, "").strip()
                  if isinstance(m["content"], str) else repr(m["content"])} for m in messages]
        return {"id": self.sample_id(i, record), "images": pil, "messages": texts, "image_errors": errors}


class StreamingConversationDataset(IterableDataset):
    """Records read incrementally, shuffled in a buffer, sharded over ranks and workers.

    Record k goes to the (rank, worker) pair k mod (world_size * num_workers). Every record
    yields one item (a sample or a skip marker), so positions count exactly: `set_position`
    drops the first `batches` per-rank batches on resume.
    """

    def __init__(self, open_stream: Callable[[], Iterator[Any]], vlm_cfg, tokenizer, *, base_dir: str | None = None,
                 strict: bool = False, max_image_pixels: int = DEFAULT_MAX_PIXELS, name: str = "stream",
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 independent_turns: bool = False):
        self.open_stream = open_stream
        self.name = name
        self.strict = strict
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skip_batches = 0
        self.batch_size = 1
        self.processor = SampleProcessor(vlm_cfg, tokenizer, base_dir=base_dir, max_image_pixels=max_image_pixels,
                                         independent_turns=independent_turns)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, batches: int, batch_size: int) -> None:
        self.skip_batches, self.batch_size = batches, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # In-order DataLoaders take batches from workers round-robin, starting with worker 0. On a
        # resume at batch k, worker 0 must make batch k: it plays the part of worker k mod n.
        worker = (worker + self.skip_batches) % n_workers
        shards, shard = self.world_size * n_workers, self.rank * n_workers + worker
        # Worker w of the uninterrupted run made batches w, w + n, w + 2n, ...
        done_batches = max(0, -(-(self.skip_batches - worker) // n_workers))
        to_drop = done_batches * self.batch_size
        rng = random.Random(self.seed * 1_000_003 + self.epoch * 7919 + shard)
        items = ((k, r) for k, r in enumerate(self.open_stream()) if k % shards == shard)
        for n, (k, record) in enumerate(_buffer_shuffle(items, self.shuffle_buffer, rng)):
            if n < to_drop:
                continue
            yield self._process(record, k)

    def _process(self, record: Any, k: int) -> dict[str, Any]:
        sid = f"{self.name}[{k}]"
        try:
            if isinstance(record, _BadRecord):
                raise record.error
            images, messages, required = record_to_chat(record)
            return self.processor.process(images, messages, required, sid)
        except SampleError as e:
            if self.strict:
                raise SampleError(e.reason, e.detail, sid) from e
            return skip_marker(e.reason, e.detail, sid)
        except Exception as e:  # noqa: BLE001 - as in ConversationDataset
            if self.strict:
                raise SampleError("unexpected_error", f"{type(e).__name__}: {e}", sid) from e
            return skip_marker("unexpected_error", f"{type(e).__name__}: {e}", sid)


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """The items in a shuffled order, holding at most `size` of them at a time."""
    buffer: list[Any] = []
    for item in items:
        if size <= 1:
            yield item
            continue
        buffer.append(item)
        if len(buffer) >= size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------- the entry point
def build_dataset(train_cfg, vlm_cfg, tokenizer, split: str = "train", *, rank: int = 0, world_size: int = 1):
    """The dataset `train_cfg.data` names (see the module docstring)."""
    data = str(train_cfg.data or "").strip()
    strict = train_cfg.strict
    max_pixels = int(train_cfg.max_image_pixels or DEFAULT_MAX_PIXELS)
    streaming = train_cfg.streaming
    independent = train_cfg.independent_turns
    if not data:
        raise DataError("no training data given; set data=easyvqa, a data file or directory, or a hub dataset name.")
    if data.lower() in ("easyvqa", "easy-vqa", "easy_vqa"):
        from nanovlm.data.easyvqa import EasyVQADataset

        multi_turn = train_cfg.multi_turn and split == "train"
        # Conversations too long for a packed row are split, not dropped.
        return EasyVQADataset(vlm_cfg, tokenizer, split=split, multi_turn=multi_turn,
                              max_turns=train_cfg.max_turns, independent_turns=independent,
                              max_length=_max_length(train_cfg, vlm_cfg))
    path = os.path.expanduser(data)
    if os.path.exists(path):
        base_dir = train_cfg.image_folder or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        name = os.path.basename(os.path.normpath(path))
        common = dict(base_dir=base_dir, strict=strict, max_image_pixels=max_pixels, name=name,
                      independent_turns=independent)
        if split != "train" and not _is_save_to_disk(path):
            raise DataError(f"{data} has no {split!r} split (only save_to_disk directories have splits); "
                            "hold out training samples with val_size instead.")
        if streaming:
            _local_files(path, split)  # fail now, not in a worker
            return StreamingConversationDataset(lambda: iter_records(path, split), vlm_cfg, tokenizer, rank=rank,
                                                world_size=world_size, seed=train_cfg.seed, **common)
        records = open_records(path, split)
        _check_layout(records, name)
        return ConversationDataset(records, vlm_cfg, tokenizer, **common, **_merging(train_cfg, vlm_cfg, split))
    if data.startswith((".", "/", "~")) or data.endswith((".json", ".jsonl", ".parquet", ".arrow")):
        raise DataError(f"data file {data} does not exist.")
    return _hub_dataset(data, train_cfg, vlm_cfg, tokenizer, split, strict, max_pixels, streaming, rank, world_size)


def _hub_dataset(name: str, train_cfg, vlm_cfg, tokenizer, split, strict, max_pixels, streaming, rank, world_size):
    from nanovlm.sources import env_flag, hub_offline

    if hub_offline() or env_flag("HF_DATASETS_OFFLINE"):
        raise DataError(f"data {name!r} is not a local file or directory, and offline mode forbids a hub download; "
                        "give a path, or data=easyvqa.")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data {name!r} is not local; loading hub datasets needs `pip install nanovlm[hf]`.") from e
    repo, _, subset = name.partition(":")
    common = dict(base_dir=train_cfg.image_folder, strict=strict, max_image_pixels=max_pixels, name=name,
                  independent_turns=train_cfg.independent_turns)
    if streaming:
        def open_stream() -> Iterator[Any]:
            ds = datasets.load_dataset(repo, subset or None, split=split, streaming=True)
            if hasattr(ds, "decode"):
                ds = ds.decode(False)  # image bytes reach load_image, where failures are counted
            return iter(ds)

        return StreamingConversationDataset(open_stream, vlm_cfg, tokenizer, rank=rank, world_size=world_size,
                                            seed=train_cfg.seed, **common)
    ds = datasets.load_dataset(repo, subset or None, split=split)
    return ConversationDataset(ArrowRecords(ds.with_format("arrow")[:], name), vlm_cfg, tokenizer, **common,
                               **_merging(train_cfg, vlm_cfg, split))


def _merging(train_cfg, vlm_cfg, split: str) -> dict[str, Any]:
    """`multi_turn` for file data: merge the training records that share an image (`MergePlan`)."""
    if not (train_cfg.multi_turn and split == "train"):
        return {}
    return {"merge_turns": train_cfg.max_turns, "max_length": _max_length(train_cfg, vlm_cfg)}


def _max_length(train_cfg, vlm_cfg) -> int:
    """The longest sample a batch takes: a packed row, or the language model's context."""
    if train_cfg.packing and train_cfg.pack_length:
        return min(int(train_cfg.pack_length), vlm_cfg.lm_max_length)
    return vlm_cfg.lm_max_length


# ---------------------------------------------------------------------------- sampling and loading
class ShardedBatchSampler:
    """Seeded per-epoch shuffle, cut into global batches of `global_batch_size`; rank r of W
    takes the r-th contiguous slice of each global batch, so the union over ranks is exactly
    the single-process batch and every sample is seen once per epoch across ranks.

    The last, short global batch is kept (`drop_last=False`) and split as evenly as the ranks
    allow; a rank may then get an empty batch, which the collators turn into an empty batch
    (every rank still takes the same number of steps). `index` is the global batch the next
    iteration starts at; `state_dict` / `load_state_dict` save and restore it with the epoch.
    """

    def __init__(self, n: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        if global_batch_size < world_size:
            raise ValueError(f"the global batch ({global_batch_size}) must hold at least one sample per rank "
                             f"({world_size} ranks).")
        self.n = n
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.index = 0
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch_size
        return math.ceil(self.n / self.global_batch_size)

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """A fresh generator for `epoch`, from the seed alone (never the global RNG)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                perm = torch.randperm(self.n, generator=self.epoch_generator(epoch)).tolist()
            else:
                perm = list(range(self.n))
            self._perm = (epoch, perm)
        return self._perm[1]

    def global_batch(self, epoch: int, b: int) -> list[int]:
        G = self.global_batch_size
        return self.order(epoch)[b * G:(b + 1) * G]

    def rank_batch(self, epoch: int, b: int) -> list[int]:
        g = self.global_batch(epoch, b)
        m, W, r = len(g), self.world_size, self.rank
        return g[r * m // W:(r + 1) * m // W]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.index
        for b in range(start, len(self)):
            yield self.rank_batch(epoch, b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"the saved data order used seed {state['seed']}, this run seed {self.seed}; "
                             "resume with the same seed.")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class ResumableLoader:
    """A DataLoader over a `ShardedBatchSampler` that knows how many batches it has handed out.

    Iterating gives the rest of the current epoch, then moves to the next epoch. `state_dict()`
    is the position after the last batch *yielded* (prefetched batches do not count), so a
    checkpoint written after step k resumes at batch k + 1.
    """

    def __init__(self, dataset, sampler: ShardedBatchSampler, collate_fn: Callable, *, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.sampler
        epoch_batches = _EpochBatches(s, s.epoch, s.index)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        # Worker seeds come from this generator, not from the global RNG: a DataLoader built
        # from the global one draws from it, so a resumed run (which builds one at a different
        # step) would continue with a shifted stream (dropout masks, sampling).
        loader = DataLoader(self.dataset, batch_sampler=epoch_batches, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=s.epoch_generator(s.epoch), **kwargs)
        for batch in loader:
            s.index += 1
            yield batch
        s.set_epoch(s.epoch + 1)

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class StreamingLoader:
    """The `ResumableLoader` interface for a `StreamingConversationDataset`: one pass over the
    stream per epoch, `batch_size` samples per batch, a resumable (epoch, batch) position.
    Ranks may end an epoch a batch apart when the record count does not divide evenly."""

    def __init__(self, dataset: StreamingConversationDataset, batch_size: int, collate_fn: Callable, *,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.epoch = 0
        self.index = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        self.dataset.set_position(self.index, self.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in loader:
            self.index += 1
            yield batch
        self.epoch, self.index = self.epoch + 1, 0

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def make_loader(dataset, collate_fn: Callable, *, global_batch_size: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, num_workers: int = 0, shuffle: bool = True, drop_last: bool = False,
                pin_memory: bool = False):
    """The loader for a dataset from `build_dataset`: `ResumableLoader` (map-style data) or
    `StreamingLoader` (streams, which `build_dataset` already sharded by rank). Both iterate one
    epoch at a time (`forever()` for endless) and save / restore their position with
    `state_dict()` / `load_state_dict()`. Each rank gets `global_batch_size / world_size` samples
    per batch."""
    if isinstance(dataset, IterableDataset):
        if global_batch_size % world_size:
            raise ValueError(f"the global batch ({global_batch_size}) must divide evenly over {world_size} ranks.")
        return StreamingLoader(dataset, global_batch_size // world_size, collate_fn, num_workers=num_workers,
                               pin_memory=pin_memory, seed=seed)
    sampler = ShardedBatchSampler(len(dataset), global_batch_size, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=shuffle, drop_last=drop_last)
    return ResumableLoader(dataset, sampler, collate_fn, num_workers=num_workers, pin_memory=pin_memory)


class _EpochBatches:
    """A fixed slice of one epoch's batches: what one DataLoader pass draws from."""

    def __init__(self, sampler: ShardedBatchSampler, epoch: int, start: int):
        self.sampler, self.epoch, self.start = sampler, epoch, start

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, len(self.sampler)):
            yield self.sampler.rank_batch(self.epoch, b)
