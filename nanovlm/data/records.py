"""Records: what `data=` names, split by split, each record named where a person finds it.

A source is packaged data (`data/easyvqa.py`), a local file or folder, or a hub dataset
(`name[:subset]`). A folder's files or sub-folders named by split (train*, val* / validation*,
test*) make those splits, as `datasets` does; unnamed files are the train split. Records stay
as stored (Cauldron, LLaVA, or question + answer), optionally with an `answer_type`;
`where(i)` says `a.jsonl line 21`, `a.parquet row 20` or `a.json[20]`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from array import array
from typing import Any, Callable, Iterator

from nanovlm.data import easyvqa
from nanovlm.sources import hub_offline

SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "jsonl", ".json": "json"}
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}  # in the order splits are listed
PACKAGED = {name: source for source in (easyvqa,) for name in source.NAMES}  # name -> its loader
PACKAGED_NAMES = tuple(dict.fromkeys(source.NAMES[0] for source in PACKAGED.values()))
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system"}
LAYOUTS = "expected Cauldron (images, texts) or LLaVA (image, conversations)"


class DataError(ValueError):
    """The source as a whole cannot be used (wrong path, unknown layout, ...)."""


class SampleError(ValueError):
    """One sample cannot be used (`reason`, `detail`); raised instead of a skip with `strict`."""

    def __init__(self, reason: str, message: str, sample_id: str | None = None):
        where = f"sample {sample_id}: " if sample_id is not None else ""
        super().__init__(f"{where}{message} (reason: {reason}; set strict=false to skip such samples)")
        self.reason, self.detail, self.sample_id = reason, message, sample_id


class _Part:
    """Records of one file: `items()` reads them in order; `len`, `[i]` and `where(i)` load an index."""

    def __init__(self, name: str, kind: str, load: Callable[[], Any], stream: Callable[[], Iterator] | None = None,
                 path: str = ""):
        self.name, self.kind, self.path, self._load, self._stream, self._data = name, kind, path, load, stream, None

    @property
    def data(self) -> Any:  # jsonl: (offsets, line numbers); json: a list; else an Arrow table
        if self._data is None:
            self._data = self._load()
        return self._data

    def __len__(self) -> int:
        return len(self.data[0]) if self.kind == "jsonl" else len(self.data) if self.kind == "json" \
            else self.data.num_rows

    def where(self, *indices: int) -> str:
        numbers = "+".join(str(self.data[1][i] if self.kind == "jsonl" else i) for i in indices)
        if self.kind == "json":
            return f"{self.name}[{numbers}]"
        return f"{self.name} {'line' if self.kind == 'jsonl' else 'row'}{'s' if len(indices) > 1 else ''} {numbers}"

    def __getitem__(self, i: int) -> Any:
        if self.kind == "jsonl":
            with open(self.path, "rb") as f:
                f.seek(self.data[0][i])
                return _parse(f.readline())
        return self.data[i] if self.kind == "json" else self.data.slice(i, 1).to_pylist()[0]

    def items(self) -> Iterator[tuple[str, Any]]:
        """(where, record) in order; a record that cannot be parsed is its SampleError."""
        if self.kind == "jsonl":
            with open(self.path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{self.name} line {n}", _parse(line)
                        except SampleError as e:
                            yield f"{self.name} line {n}", e
        elif self._stream is not None:
            for i, record in enumerate(self._stream()):
                yield self.where(i), record
        else:
            for i in range(len(self)):
                yield self.where(i), self[i]


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError("bad_record", f"the line is not valid JSON ({e}).") from e


def _jsonl_index(path: str) -> tuple[array, array]:
    offsets, lines, pos = array("q"), array("q"), 0  # 16 bytes a record: large files stay indexable
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                offsets.append(pos)
                lines.append(n)
            pos += len(line)
    return offsets, lines


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError("reading parquet / arrow data needs pyarrow; install it with `pip install nanovlm[hf]`.") from e
    return pyarrow


def _arrow_table(path: str):
    pa = _pyarrow()
    try:
        return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()  # what `datasets` writes


def _json_list(path: str, split: str) -> list:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); a LLaVA file is a JSON list of records.") from e
    if isinstance(data, dict):  # {"data": [...]} or a single split of records
        data = data.get(split, data.get("data", data.get("annotations")))
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records.")
    return data


def file_part(path: str, split: str = "train") -> _Part:
    kind, name = SUFFIXES[os.path.splitext(path)[1].lower()], os.path.basename(path)
    if kind == "jsonl":
        return _Part(name, kind, lambda: _jsonl_index(path), path=path)
    if kind == "json":
        return _Part(name, kind, lambda: _json_list(path, split))
    if kind == "arrow":
        return _Part(name, kind, lambda: _arrow_table(path), lambda: (r for b in _arrow_table(path).to_batches(256)
                                                                      for r in b.to_pylist()))
    pq = lambda: _pyarrow().parquet  # noqa: E731
    return _Part(name, kind, lambda: pq().read_table(path, memory_map=True),
                 lambda: (r for b in pq().ParquetFile(path).iter_batches(batch_size=256) for r in b.to_pylist()))


class Records:

    def __init__(self, parts: list[_Part], name: str, split: str, base_dir: str | None = None):
        self.parts, self.name, self.split, self.base_dir = parts, name, split, base_dir
        self._ends: list[int] = []

    def source_of(self, i: int) -> str:
        """The source record `i` comes from (a mixture's member; else the source itself)."""
        return self.name

    def _locate(self, i: int) -> tuple[_Part, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._ends, i) - 1
        return self.parts[k], i - self._ends[k]

    def __len__(self) -> int:
        if not self._ends:
            self._ends = [0]
            for p in self.parts:
                self._ends.append(self._ends[-1] + len(p))
        return self._ends[-1]

    def __getitem__(self, i: int) -> Any:
        part, j = self._locate(int(i))
        return part[j]

    def where(self, *indices: int) -> str:
        """Where records are: `a.jsonl line 3`, or for several `a.jsonl lines 3+5`."""
        located = [self._locate(int(i)) for i in indices]
        if all(p is located[0][0] for p, _ in located):
            return located[0][0].where(*(j for _, j in located))
        return " + ".join(p.where(j) for p, j in located)

    def items(self) -> Iterator[tuple[str, Any]]:
        for part in self.parts:
            yield from part.items()


class Mixture(Records):
    """Several sources' records of one split, one after another (`data=A,B`). Each keeps its own
    image folder: a record's relative image paths come out joined to its source's."""

    def __init__(self, members: list[Records], name: str, split: str):
        super().__init__([p for m in members for p in m.parts], name, split)
        self.members, self._owner = members, {id(p): m for m in members for p in m.parts}

    def _member(self, i: int) -> Records:
        return self._owner[id(self._locate(int(i))[0])]

    def source_of(self, i: int) -> str:
        return self._member(i).name

    def __getitem__(self, i: int) -> Any:
        return _rebase(super().__getitem__(i), self._member(i).base_dir)

    def items(self) -> Iterator[tuple[str, Any]]:
        for member in self.members:
            for where, record in member.items():
                yield where, _rebase(record, member.base_dir)


def _rebase(record: Any, base_dir: str | None) -> Any:
    """A record whose relative image paths are joined to `base_dir` (a copy; bytes stay as they are)."""
    if not base_dir or not isinstance(record, dict):
        return record
    key = "image" if "image" in record else "images" if "images" in record else None
    if key is None:
        return record

    def join(source: Any) -> Any:
        if isinstance(source, dict) and not source.get("bytes") and isinstance(source.get("path"), str):
            return {**source, "path": join(source["path"])}
        if isinstance(source, str) and not os.path.isabs(os.path.expanduser(source)):
            return os.path.join(base_dir, source)
        return source

    value = record[key]
    return {**record, key: [join(v) for v in value] if isinstance(value, (list, tuple)) else join(value)}


def mixture_sources(data: str) -> list[str]:
    return [s.strip() for s in str(data or "").split(",") if s.strip()]


def from_list(records: list, name: str = "records", base_dir: str | None = None) -> Records:
    return Records([_Part(name, "json", lambda: records)], name, "train", base_dir)


def split_of(name: str) -> str | None:
    """The split a file or folder name says (`train-00001.parquet`: train), or None."""
    return next((SPLIT_WORDS[w] for w in re.split(r"[^a-z]+", name.lower()) if w in SPLIT_WORDS), None)


def _save_to_disk_splits(directory: str) -> dict[str, list[str]] | None:
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        with open(os.path.join(directory, "dataset_dict.json")) as f:
            names = json.load(f).get("splits", [])
        return {s: _save_to_disk_splits(os.path.join(directory, s))["train"] for s in names}
    if os.path.isfile(os.path.join(directory, "state.json")):
        with open(os.path.join(directory, "state.json")) as f:
            return {"train": [os.path.join(directory, d["filename"]) for d in json.load(f).get("_data_files", [])]}
    return None


def local_splits(path: str) -> dict[str, list[str]]:
    """{split: data files} of a local file or folder (see the module docstring)."""
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in SUFFIXES:
            raise DataError(f"{path}: unknown data file type {ext or '(none)'}; use .parquet, .arrow, .json or .jsonl.")
        return {"train": [path]}
    saved = _save_to_disk_splits(path)
    if saved is not None:
        return saved
    found: list[tuple[str | None, str]] = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and split_of(entry):
            found += [(split_of(entry), os.path.join(full, f)) for f in sorted(os.listdir(full))
                      if os.path.splitext(f)[1].lower() in SUFFIXES]
        elif os.path.splitext(entry)[1].lower() in SUFFIXES:
            found.append((split_of(entry), full))
    if not found:
        raise DataError(f"{path} holds no .parquet, .arrow, .json or .jsonl files and is not a save_to_disk directory.")
    named = any(s for s, _ in found)
    splits: dict[str, list[str]] = {}
    for split, file in sorted(found, key=lambda sf: list(SPLIT_WORDS.values()).index(sf[0] or "train")):
        if split or not named:  # beside files named by split, a file named by none belongs to none
            splits.setdefault(split or "train", []).append(file)
    return splits


def is_local(data: str) -> bool:
    """Whether `data` names a local path (existing, or one that can only be meant as a path)."""
    return os.path.exists(os.path.expanduser(data)) or data.startswith((".", "/", "~")) \
        or os.path.splitext(data)[1].lower() in SUFFIXES


def splits(data: str) -> list[str]:
    """The splits a source offers (a mixture: those any of its sources offers)."""
    if len(mixture_sources(data)) > 1:
        return list(dict.fromkeys(s for d in mixture_sources(data) for s in splits(d)))
    if data.lower() in PACKAGED:
        return list(PACKAGED[data.lower()].SPLITS)
    if is_local(data):
        return list(_local(data))
    if hub_offline():
        return ["train"]
    import datasets

    repo, _, subset = data.partition(":")
    return datasets.get_dataset_split_names(repo, subset or None)


def validation_file(data: str) -> str | None:
    """A local folder's one validation* file (what a run validates on when val_data is not given)."""
    path = os.path.expanduser(str(data))
    if len(mixture_sources(data)) != 1 or not os.path.isdir(path):
        return None
    files = local_splits(path).get("validation", [])
    return files[0] if len(files) == 1 else None


def describe(data: str) -> str:
    """One line: the splits of a source and what each is read from."""
    if len(mixture_sources(data)) > 1:
        return " + ".join(describe(d) for d in mixture_sources(data))
    if data.lower() in PACKAGED:
        return f"{data} (packaged), splits {', '.join(PACKAGED[data.lower()].SPLITS)}"
    if not is_local(data):
        return f"{data} (hub dataset)"
    return f"{data}: " + "; ".join(f"{split} split from {', '.join(os.path.basename(f) for f in files)}"
                                   for split, files in _local(data).items())


def _local(data: str) -> dict[str, list[str]]:
    path = os.path.expanduser(data)
    if not os.path.exists(path):
        raise DataError(f"data file {data} does not exist.")
    return local_splits(path)


def open_records(data: str, split: str = "train", image_folder: str | None = None) -> Records:
    """The records of `split` of `data`; relative image paths start at `image_folder` (default: the data's)."""
    data = str(data or "").strip()
    if not mixture_sources(data):
        raise DataError("no training data given; set data=easyvqa, a data file or directory, or a hub dataset name.")
    if len(mixture_sources(data)) > 1:
        return _mixture(mixture_sources(data), split, image_folder)
    if image_folder is not None and not os.path.isdir(image_folder):
        raise DataError(f"image folder {image_folder} does not exist.")
    if data.lower() in PACKAGED:
        source = PACKAGED[data.lower()]
        if split not in source.SPLITS:
            raise DataError(f"{data} has no {split!r} split; it has splits {', '.join(source.SPLITS)}.")
        return Records([_Part(f"{data}-{split}", "json", lambda: source.records(split))], data, split)
    if not is_local(data):
        return _hub(data, split, image_folder)
    path, by_split = os.path.expanduser(data), _local(data)
    if split not in by_split:
        single = os.path.isfile(path) or list(by_split) == ["train"] and _save_to_disk_splits(path) is None
        raise DataError(f"{data} has no {split!r} split" + (" (a single file is the train split); hold out training "
                        "samples with val_size instead." if single else f"; it has splits {', '.join(by_split)}."))
    base = image_folder or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    name, files = os.path.basename(os.path.normpath(path)), by_split[split]
    records = Records([file_part(f, split) for f in files], name, split, base)
    check_layout(records, files)
    return records


def _mixture(sources: list[str], split: str, image_folder: str | None) -> Mixture:
    """The split from every source that has it; the train split from every source."""
    if len(set(sources)) < len(sources):
        raise DataError(f"data names {', '.join(s for s in dict.fromkeys(sources) if sources.count(s) > 1)} more than "
                        "once; weight a source with data_weights instead.")
    have = [d for d in sources if split == "train" or split in splits(d)]
    if not have:
        raise DataError(f"none of the sources {', '.join(sources)} has a {split!r} split.")
    members = [open_records(d, split, image_folder) for d in have]
    for d, member in zip(have, members):
        member.name = d  # reports name each source as data= wrote it
    return Mixture(members, ",".join(have), split)


def _hub(name: str, split: str, image_folder: str | None) -> Records:
    if hub_offline():
        raise DataError(f"data {name!r} is not a local file or directory, and offline mode forbids a hub download; "
                        "give a path, or data=easyvqa.")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data {name!r} is not local; loading hub datasets needs `pip install nanovlm[hf]`.") from e
    repo, _, subset = name.partition(":")

    def stream() -> Iterator:
        ds = datasets.load_dataset(repo, subset or None, split=split, streaming=True)
        return iter(ds.decode(False) if hasattr(ds, "decode") else ds)  # images stay bytes: load_image decodes

    load = lambda: datasets.load_dataset(repo, subset or None, split=split).with_format("arrow")[:]  # noqa: E731
    return Records([_Part(f"{name}:{split}", "hub", load, stream)], name, split, image_folder)


def check_layout(records: Records, files: list[str]) -> None:
    """Fail early, with the columns named, when the first record matches no known layout."""
    try:
        first = next(records.items(), (None, None))[1]  # reads no more than the first record
    except DataError:
        raise
    except Exception as e:  # pyarrow and OS errors: the whole file is unreadable
        raise DataError(f"cannot read {files[0] if files else records.name} ({type(e).__name__}: {e}).") from e
    if first is None:
        raise DataError(f"{records.name} holds no records.")
    keys = set(first) if isinstance(first, dict) else None
    if keys is not None and not ({"texts", "conversations"} & keys or {"question", "answer"} <= keys):
        raise DataError(f"{records.name}: records have keys {sorted(first)}; {LAYOUTS}.")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [v for v in value if v is not None] if isinstance(value, (list, tuple)) else [value]


def record_to_chat(record: Any) -> tuple[list[Any], list[dict[str, Any]], bool]:
    """A record -> (image sources, messages, placeholders required: LLaVA marks every image);
    contents unchecked, an answer carrying its record's (or Cauldron turn's) `answer_type`."""
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("bad_record", f"a record must be a JSON object / dict, got {type(record).__name__}.")
    kind, messages = record.get("answer_type"), []
    key = next((k for k in ("conversations", "texts") if k in record), None)
    if key is not None and (not isinstance(record[key], list) or not record[key]):
        raise SampleError("empty_text", f"the record has no {'conversation turns' if key == 'conversations' else key}.")
    if key == "conversations":
        for turn in record["conversations"]:
            if not isinstance(turn, dict):
                raise SampleError("bad_record", f"a conversation turn must be an object, got {type(turn).__name__}.")
            role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                raise SampleError("bad_record", f"unknown speaker {turn.get('from', turn.get('role'))!r} "
                                                "(expected human or gpt).")
            messages.append({"role": role, "content": turn.get("value", turn.get("content")), "answer_type": kind})
        return _as_list(record.get("image", record.get("images"))), messages, True
    if key == "texts":
        for t in record["texts"]:
            if not isinstance(t, dict) or "user" not in t or "assistant" not in t:
                raise SampleError("bad_record", "each entry of texts must be an object with user and assistant.")
            messages += [{"role": "user", "content": t["user"]},
                         {"role": "assistant", "content": t["assistant"], "answer_type": t.get("answer_type", kind)}]
    elif "question" in record and "answer" in record:
        messages = [{"role": "user", "content": record["question"]},
                    {"role": "assistant", "content": record["answer"], "answer_type": kind}]
    else:
        raise SampleError("bad_record", f"the record has keys {sorted(record)}; {LAYOUTS}.")
    return _as_list(record.get("images", record.get("image"))), messages, False


def source_key(source: Any) -> str | None:
    """An image source's identity: its path, or a hash of its bytes (None for a PIL image)."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(bytes(source), digest_size=12).hexdigest()
    return os.path.normpath(source) if isinstance(source, str) else None
