"""Data pipeline: sources -> text -> tokens -> packed blocks.

One run reads every configured source (a file, a directory or a glob of plain text, jsonl or
JSON-array files), turns each record into one training text, tokenizes all texts once into a
memory-mapped *token store* (a flat token array plus document offsets) under a content-addressed
cache key, then cuts `block_size` windows over the stream of training documents (EOS between
documents, no padding). The train/eval split is by document and is a cheap view over the store,
so changing `block_size`, `eval_fraction` or the seed re-packs in milliseconds without
re-tokenizing, while any change to a file's content, the formatting or the tokenizer builds a new
store.

The module is also a command line tool:
    python data_utils.py prepare CONFIG.yaml [--any_field value ...]   # build the stores only
"""
from __future__ import annotations

import dataclasses
import difflib
import glob as globlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

STORE_VERSION = 1  # bump when the on-disk layout or the text formatting rules change
CHUNK_LINES = 2048  # records per unit of work sent to a tokenizer process
POOL_MIN_BYTES = 8 << 20  # below this, starting worker processes costs more than it saves
DATA_EXTENSIONS = (".txt", ".text", ".jsonl", ".json")


class DataError(ValueError):
    """Bad input data or data settings. The message names the source, file, line and a fix."""


def closest_key_hint(key: str, valid: list[str] | set[str]) -> str:
    """' Did you mean `x`?' for a misspelt key, or '' when nothing is close."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


# --------------------------------------------------------------------------------------------
# Source configuration
# --------------------------------------------------------------------------------------------
@dataclass
class SourceConfig:
    """One entry of `sources:` in the YAML. Fields that change the produced text enter the cache key."""

    path: str | list[str]  # file, directory or glob (or a list of them)
    name: str = ""  # used in logs, eval metric names (eval_<name>_ppl) and reports
    format: str = "auto"  # auto (by content) | text | jsonl | json (a JSON array of objects)
    encoding: str = "utf-8"  # a BOM is accepted and removed
    text_field: str = "text"  # json/jsonl: the field that holds the document text
    eval_fraction: float | None = None  # held-out share of documents; None: DataArguments.eval_fraction
    eval_path: str | list[str] | None = None  # explicit eval files instead of a held-out fraction
    on_bad_record: str = "error"  # error: stop with a message | skip: count, report and go on

    FORMATS = ("auto", "text", "jsonl", "json")

    @classmethod
    def from_dict(cls, raw: Any, index: int) -> "SourceConfig":
        where = f"sources[{index}]"
        if isinstance(raw, str):
            raw = {"path": raw}
        if not isinstance(raw, dict):
            raise DataError(f"{where} must be a mapping such as {{path: data/x.txt}}, got {type(raw).__name__}.")
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in valid:
                raise DataError(
                    f"{where}: unknown key `{key}`.{closest_key_hint(key, valid)} "
                    f"Valid keys: {', '.join(sorted(valid))}."
                )
        if not raw.get("path"):
            raise DataError(f"{where}: `path` is required (a file, a directory or a glob).")
        spec = cls(**raw)
        if not spec.name:
            first = spec.path if isinstance(spec.path, str) else spec.path[0]
            spec.name = Path(first.rstrip("/*")).stem or f"source{index}"
        if spec.format not in cls.FORMATS:
            raise DataError(f"{where} ({spec.name}): format `{spec.format}` is not one of {', '.join(cls.FORMATS)}.")
        if spec.on_bad_record not in ("error", "skip"):
            raise DataError(f"{where} ({spec.name}): on_bad_record must be `error` or `skip`.")
        if spec.eval_fraction is not None and not 0 <= spec.eval_fraction < 1:
            raise DataError(f"{where} ({spec.name}): eval_fraction must be in [0, 1), got {spec.eval_fraction}.")
        return spec

    def text_settings(self) -> dict:
        """The settings that decide which text a record becomes (part of the cache key)."""
        return {"format": self.format, "encoding": self.encoding, "text_field": self.text_field,
                "on_bad_record": self.on_bad_record}


def parse_sources(raw_sources: Any) -> list[SourceConfig]:
    if not raw_sources:
        raise DataError("No data sources: set `sources:` in the config, e.g. `sources: [{path: data/}]`.")
    if not isinstance(raw_sources, list):
        raw_sources = [raw_sources]
    specs = [SourceConfig.from_dict(raw, i) for i, raw in enumerate(raw_sources)]
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"Two sources are named `{name}`: give each source a unique `name:`.")
    return specs


def resolve_files(patterns: str | list[str], source_name: str) -> list[Path]:
    """Expand files, directories (recursively, data extensions only) and globs, in sorted order."""
    files: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        path = Path(os.path.expanduser(pattern))
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"source `{source_name}`: directory `{pattern}` holds no data files "
                                f"({', '.join(DATA_EXTENSIONS)}). Add files or point `path` elsewhere.")
            files.extend(found)
        elif globlib.has_magic(pattern):
            found = sorted(Path(p) for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
                           if Path(p).is_file())
            if not found:
                raise DataError(f"source `{source_name}`: glob `{pattern}` matches no file. Check the pattern.")
            files.extend(found)
        else:
            raise DataError(f"source `{source_name}`: path `{pattern}` does not exist. "
                            f"Fix `path` (a file, a directory or a glob), relative to {os.getcwd()}.")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"source `{source_name}`: file `{f}` is empty. Remove it or fill it.")
    return files


# --------------------------------------------------------------------------------------------
# Reading and formatting: raw records -> clean training texts
# --------------------------------------------------------------------------------------------
def detect_format(path: Path, declared: str) -> str:
    """`auto` looks at the content, not the extension: `[` -> JSON array, `{` line -> jsonl, else text."""
    if declared != "auto":
        return declared
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        first_line = head.split(b"\n", 1)[0]
        try:
            if isinstance(json.loads(first_line), dict):
                return "jsonl"
        except ValueError:
            pass
        raise DataError(f"file `{path}` starts with `{{` but its first line is not a JSON object: "
                        "a pretty-printed JSON object is not a supported layout. Write one JSON object "
                        "per line (jsonl), a JSON array, or set `format: text` for this source.")
    return "text"


@dataclass
class Chunk:
    """A unit of work: consecutive records of one file (raw bytes lines, or parsed JSON-array items)."""

    file_index: int
    path: str
    fmt: str
    first_record: int  # 1-based line number (text/jsonl) or 0-based array index (json)
    records: list
    nbytes: int  # input bytes this chunk covers (progress bar)


def read_chunks(files: list[Path], spec: SourceConfig) -> Iterator[Chunk]:
    for file_index, path in enumerate(files):
        fmt = detect_format(path, spec.format)
        if fmt == "json":
            raw = path.read_bytes()
            try:
                items = json.loads(raw.decode(spec.encoding).removeprefix("\ufeff"))
            except UnicodeDecodeError as e:
                raise DataError(_decode_error_message(spec, str(path), None, e)) from None
            except ValueError as e:
                raise DataError(f"source `{spec.name}`: file `{path}` is not a valid JSON array "
                                f"({e}). If it holds one object per line, set `format: jsonl`.") from None
            if not isinstance(items, list):
                raise DataError(f"source `{spec.name}`: file `{path}` holds a JSON {type(items).__name__}, "
                                "expected an array of objects (or use jsonl, one object per line).")
            for start in range(0, len(items), CHUNK_LINES):
                part = items[start:start + CHUNK_LINES]
                yield Chunk(file_index, str(path), fmt, start, part, len(raw) * len(part) // max(1, len(items)))
            continue
        with open(path, "rb") as f:
            line_no = 1
            while True:
                lines = list(itertools.islice(f, CHUNK_LINES))
                if not lines:
                    break
                yield Chunk(file_index, str(path), fmt, line_no, lines, sum(map(len, lines)))
                line_no += len(lines)


def _decode_error_message(spec: SourceConfig, path: str, line_no: int | None, err: UnicodeDecodeError) -> str:
    where = f"line {line_no}" if line_no is not None else f"byte {err.start}"
    return (f"source `{spec.name}`: file `{path}` {where} is not valid {spec.encoding} "
            f"(byte 0x{err.object[err.start]:02x} at offset {err.start}). If the file is GBK/GB18030 "
            f"encoded, set `encoding: gb18030` for this source; otherwise re-save it as UTF-8.")


def clean_text(text: str) -> str:
    """Normalise line endings and strip surrounding whitespace; inner whitespace is kept."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


def _record_text(spec: SourceConfig, chunk: Chunk, index: int, record: Any) -> str | None:
    """One record -> its text, or None for a blank line. Raises DataError naming file, line and field."""
    if chunk.fmt == "json":
        where, obj = f"record {chunk.first_record + index} (0-based) of `{chunk.path}`", record
    else:
        line_no = chunk.first_record + index
        where = f"`{chunk.path}` line {line_no}"
        try:
            line = record.decode(spec.encoding)
        except UnicodeDecodeError as e:
            raise DataError(_decode_error_message(spec, chunk.path, line_no, e)) from None
        if line_no == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            return None
        if chunk.fmt == "text":
            return line
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"source `{spec.name}`: {where} is not valid JSON ({e}). Fix or remove the "
                            "line, or set `on_bad_record: skip` for this source.") from None
    if not isinstance(obj, dict):
        raise DataError(f"source `{spec.name}`: {where} is a JSON {type(obj).__name__}, not an object. "
                        "Each record must be an object such as {\"text\": \"...\"}.")
    if spec.text_field not in obj:
        fields = ", ".join(f"`{k}`" for k in list(obj)[:20]) or "none"
        raise DataError(f"source `{spec.name}`: {where} has no field `{spec.text_field}`; its fields are "
                        f"{fields}. Set `text_field:` for this source to the field that holds the text.")
    value = obj[spec.text_field]
    if not isinstance(value, str):
        raise DataError(f"source `{spec.name}`: {where} field `{spec.text_field}` is a "
                        f"{type(value).__name__} ({str(value)[:40]!r}), not a string. Fix the record or set "
                        "`on_bad_record: skip` for this source.")
    return value


def format_chunk(spec: SourceConfig, chunk: Chunk) -> tuple[list[str], list[int], dict[str, int]]:
    """Records -> (texts, their line/record numbers, counts). Blank and empty records are counted."""
    texts, record_ids, counts = [], [], {"records": 0, "blank_lines": 0, "empty_texts": 0}
    for i, record in enumerate(chunk.records):
        try:
            text = _record_text(spec, chunk, i, record)
        except DataError as e:
            if spec.on_bad_record != "skip":
                raise
            counts["skipped_bad_records"] = counts.get("skipped_bad_records", 0) + 1
            if counts["skipped_bad_records"] <= 3:
                logger.warning("skipped: %s", e)
            continue
        if text is None:
            counts["blank_lines"] += 1
            continue
        counts["records"] += 1
        text = clean_text(text)
        if not text:
            counts["empty_texts"] += 1
            continue
        texts.append(text)
        record_ids.append(chunk.first_record + i)
    return texts, record_ids, counts


def iter_texts(spec: SourceConfig, files: list[Path] | None = None) -> Iterator[str]:
    """All training texts of one source, in order (used to train a tokenizer)."""
    for chunk in read_chunks(files or resolve_files(spec.path, spec.name), spec):
        yield from format_chunk(spec, chunk)[0]


# --------------------------------------------------------------------------------------------
# Tokenization into a token store
# --------------------------------------------------------------------------------------------
@dataclass
class TokenizerInfo:
    """What the token store needs from a tokenizer; picklable, so worker processes rebuild it fast."""

    backend_json: str | None  # a `tokenizers` JSON (fast tokenizers); None: use `slow` in-process
    bos_id: int | None  # prepended to each document when the BOS policy says so
    eos_id: int
    vocab_size: int
    fingerprint: str
    slow: Any = None

    @classmethod
    def from_tokenizer(cls, tokenizer, add_bos: str) -> "TokenizerInfo":
        if tokenizer.eos_token_id is None:
            raise DataError("The tokenizer has no EOS token, but every document must end with one. "
                            "Set `eos_token` in the tokenizer's tokenizer_config.json.")
        bos_id = resolve_bos(tokenizer, add_bos)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        backend_json = backend.to_str() if backend is not None else None
        h = hashlib.sha256()
        h.update((backend_json or json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)).encode())
        h.update(f"{type(tokenizer).__name__}|{bos_id}|{tokenizer.eos_token_id}".encode())
        return cls(backend_json, bos_id, tokenizer.eos_token_id, len(tokenizer), h.hexdigest()[:16],
                   None if backend_json else tokenizer)


def resolve_bos(tokenizer, add_bos: str) -> int | None:
    """BOS policy. `auto`: follow the tokenizer (prepend BOS iff it adds one itself, as Llama-2's
    does), `always` / `never`: as said. EOS always ends every document."""
    if add_bos == "never":
        return None
    if add_bos == "always":
        if tokenizer.bos_token_id is None:
            raise DataError("add_bos: always, but the tokenizer has no BOS token. Use `add_bos: never`.")
        return tokenizer.bos_token_id
    if add_bos != "auto":
        raise DataError(f"add_bos must be auto, always or never, got `{add_bos}`.")
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and probe[:1] == [bos] else None


_worker_tokenizer = None


def _init_worker(info: TokenizerInfo) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(info.backend_json)


def _encode(info: TokenizerInfo, texts: list[str]) -> list[list[int]]:
    if info.backend_json is None:
        return info.slow(texts, add_special_tokens=False)["input_ids"]
    global _worker_tokenizer
    if _worker_tokenizer is None:
        _init_worker(info)
    return [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]


def tokenize_chunk(spec: SourceConfig, info: TokenizerInfo, chunk: Chunk):
    """Worker: format, clean and tokenize one chunk. Returns flat tokens, doc lengths, record ids, counts."""
    texts, record_ids, counts = format_chunk(spec, chunk)
    prefix = [info.bos_id] if info.bos_id is not None else []
    docs = [prefix + ids + [info.eos_id] for ids in _encode(info, texts)] if texts else []
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum()))
    return chunk.file_index, flat, lengths, np.asarray(record_ids, dtype=np.int64), counts, chunk.nbytes


class FileDigests:
    """Content hashes of input files, memoised by (size, mtime_ns) like git's index, so a rerun
    with unchanged inputs reads no file twice. Kept in `cache_dir/file_digests.json`."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / "file_digests.json"
        self.memo = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        entry = self.memo.get(key)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
        self.memo[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        return self.memo[key][2]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.memo))


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TokenStore:
    """A source's documents as one flat memory-mapped token array plus document offsets.

    Layout of a store directory: tokens.bin (uint16 when the vocab fits, else uint32), offsets.npy
    (int64, n_docs + 1), doc_files.npy / doc_records.npy (where each document came from), meta.json
    (written last; a directory without it is never used).
    """

    def __init__(self, directory: Path):
        self.dir = directory
        self.meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        self.offsets = np.load(directory / "offsets.npy")
        n_tokens = int(self.offsets[-1])
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = (np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(n_tokens,))
                       if n_tokens else np.zeros(0, dtype=dtype))

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @staticmethod
    def build(directory: Path, spec: SourceConfig, files: list[Path], info: TokenizerInfo,
              num_proc: int, key_material: dict) -> None:
        """Tokenize every record of `files` into a new store at `directory`, atomically."""
        dtype = np.uint16 if info.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        counts: dict[str, int] = {}
        lengths, doc_files, doc_records = [], [], []
        total_bytes = sum(f.stat().st_size for f in files)
        start = time.time()
        work = ((spec, info, chunk) for chunk in read_chunks(files, spec))
        use_pool = num_proc > 1 and info.backend_json is not None and total_bytes >= POOL_MIN_BYTES
        pool = (multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (info,))
                if use_pool else None)
        from tqdm.auto import tqdm

        try:
            results = pool.imap(_tokenize_star, work, chunksize=1) if pool else map(_tokenize_star, work)
            with open(tmp / "tokens.bin", "wb") as out, \
                    tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {spec.name}") as bar:
                for file_index, flat, doc_lengths, record_ids, chunk_counts, nbytes in results:
                    flat.astype(dtype, copy=False).tofile(out)
                    lengths.append(doc_lengths)
                    doc_files.append(np.full(len(doc_lengths), file_index, dtype=np.int32))
                    doc_records.append(record_ids)
                    for k, v in chunk_counts.items():
                        counts[k] = counts.get(k, 0) + v
                    bar.update(nbytes)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if pool:
                pool.terminate()
        doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "doc_files.npy", np.concatenate(doc_files) if doc_files else np.zeros(0, np.int32))
        np.save(tmp / "doc_records.npy", np.concatenate(doc_records) if doc_records else np.zeros(0, np.int64))
        meta = {
            "version": STORE_VERSION, "source": spec.name, "dtype": np.dtype(dtype).name,
            "files": [str(f) for f in files], "n_docs": int(len(doc_lengths)), "n_tokens": int(offsets[-1]),
            "counts": counts, "seconds": round(time.time() - start, 3), "key": key_material,
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same store first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not (directory / "meta.json").exists():
                raise


def _tokenize_star(args):
    return tokenize_chunk(*args)


def store_key(spec: SourceConfig, files: list[Path], info: TokenizerInfo, digests: FileDigests) -> tuple[str, dict]:
    material = {
        "version": STORE_VERSION,
        "text": spec.text_settings(),
        "files": [digests(f) for f in files],
        "tokenizer": info.fingerprint,
        "bos": info.bos_id,
        "eos": info.eos_id,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    return digest, material


def load_or_build_store(spec: SourceConfig, files: list[Path], info: TokenizerInfo, cache_dir: Path,
                        num_proc: int, digests: FileDigests) -> tuple[TokenStore, bool]:
    """The store for these files and settings; returns (store, cache_hit)."""
    key, material = store_key(spec, files, info, digests)
    directory = cache_dir / "token_stores" / f"{spec.name}-{key}"
    hit = (directory / "meta.json").exists()
    if not hit:
        logger.info("source `%s`: tokenizing %d file(s) into %s", spec.name, len(files), directory)
        TokenStore.build(directory, spec, files, info, num_proc, material)
    store = TokenStore(directory)
    if store.n_docs == 0:
        raise DataError(f"source `{spec.name}`: no text left in {', '.join(map(str, files))} "
                        f"(counts: {store.meta['counts']}). Check `text_field` and the files' content.")
    return store, hit


# --------------------------------------------------------------------------------------------
# Packing: documents -> fixed-size blocks
# --------------------------------------------------------------------------------------------
class PackedBlocks:
    """`block_size` windows over the concatenation of the chosen documents of a store (a map-style
    torch dataset; torch is imported lazily so tokenizer worker processes start fast).

    Documents keep their EOS (and BOS, per policy) so blocks carry document boundaries; windows
    do not overlap; only the final remainder of fewer than `block_size` tokens is not used.
    """

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, block_size: int):
        self.store, self.block_size = store, block_size
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        lengths = store.offsets[self.doc_ids + 1] - store.offsets[self.doc_ids]
        self.cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self.cum[-1])
        self.n_blocks = self.n_tokens // block_size
        self.unused_tail_tokens = self.n_tokens - self.n_blocks * block_size

    def __len__(self) -> int:
        return self.n_blocks

    def block_tokens(self, index: int) -> np.ndarray:
        if not 0 <= index < self.n_blocks:
            raise IndexError(index)
        start, end = index * self.block_size, (index + 1) * self.block_size
        d = int(np.searchsorted(self.cum, start, side="right")) - 1
        pieces = []
        while start < end:
            doc = self.doc_ids[d]
            doc_start = self.store.offsets[doc] + (start - self.cum[d])
            take = min(end - start, int(self.cum[d + 1] - start))
            pieces.append(self.store.tokens[doc_start:doc_start + take])
            start += take
            d += 1
        return np.concatenate(pieces)

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = torch.from_numpy(self.block_tokens(index).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def split_documents(n_docs: int, eval_fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, eval_ids) by document, seeded per source; train keeps the original order."""
    if eval_fraction <= 0:
        return np.arange(n_docs), np.zeros(0, dtype=np.int64)
    n_eval = max(1, round(n_docs * eval_fraction))
    if n_eval >= n_docs:
        raise DataError(f"source `{name}`: eval_fraction {eval_fraction} of {n_docs} document(s) leaves no "
                        "training documents. Lower `eval_fraction` or give `eval_path`.")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    eval_mask = np.zeros(n_docs, dtype=bool)
    eval_mask[rng.choice(n_docs, size=n_eval, replace=False)] = True
    return np.flatnonzero(~eval_mask), np.flatnonzero(eval_mask)


@dataclass
class PreparedData:
    train: Any  # a map-style dataset of {"input_ids", "labels"} blocks
    eval: dict[str, PackedBlocks]
    report: dict = field(default_factory=dict)


def build_datasets(data_args, tokenizer, block_size: int, seed: int) -> PreparedData:
    """Sources -> token stores (cached) -> train blocks of all sources + eval blocks per source."""
    start = time.time()
    specs = parse_sources(data_args.sources)
    info = TokenizerInfo.from_tokenizer(tokenizer, data_args.add_bos)
    cache_dir = Path(data_args.cache_dir)
    digests = FileDigests(cache_dir)
    num_proc = data_args.preprocessing_num_workers or min(8, os.cpu_count() or 1)
    train_parts, evals, report_sources = [], {}, {}
    for spec in specs:
        files = resolve_files(spec.path, spec.name)
        store, hit = load_or_build_store(spec, files, info, cache_dir, num_proc, digests)
        fraction = data_args.eval_fraction if spec.eval_fraction is None else spec.eval_fraction
        if spec.eval_path:
            eval_files = resolve_files(spec.eval_path, spec.name)
            eval_store, eval_hit = load_or_build_store(spec, eval_files, info, cache_dir, num_proc, digests)
            train = PackedBlocks(store, np.arange(store.n_docs), block_size)
            held_out = PackedBlocks(eval_store, np.arange(eval_store.n_docs), block_size)
            hit = hit and eval_hit
        else:
            train_ids, eval_ids = split_documents(store.n_docs, fraction, seed, spec.name)
            train = PackedBlocks(store, train_ids, block_size)
            held_out = PackedBlocks(store, eval_ids, block_size) if len(eval_ids) else None
        if len(train) == 0:
            raise DataError(f"source `{spec.name}`: {train.n_tokens} training tokens make no block of "
                            f"block_size {block_size}. Add data or lower `block_size`.")
        if held_out is not None:
            if len(held_out) == 0:
                raise DataError(f"source `{spec.name}`: its eval split has {held_out.n_tokens} tokens, fewer than "
                                f"one block of {block_size}. Raise `eval_fraction`, give `eval_path`, or lower "
                                "`block_size`.")
            evals[spec.name] = held_out
        train_parts.append(train)
        report_sources[spec.name] = {
            "files": [str(f) for f in files], "cache": "hit" if hit else "built", "store": str(store.dir),
            "documents": store.n_docs, "tokens": int(store.offsets[-1]), "counts": store.meta["counts"],
            "train_documents": len(train.doc_ids), "train_tokens": train.n_tokens, "train_blocks": len(train),
            "unused_tail_tokens": train.unused_tail_tokens,
            "eval_documents": len(held_out.doc_ids) if held_out else 0,
            "eval_blocks": len(held_out) if held_out else 0,
        }
        logger.info("source `%s`: %s, %d docs, %d tokens -> %d train blocks, %d eval blocks",
                    spec.name, "cache hit" if hit else "tokenized", store.n_docs, store.offsets[-1],
                    len(train), report_sources[spec.name]["eval_blocks"])
    digests.save()
    from torch.utils.data import ConcatDataset

    train_set = train_parts[0] if len(train_parts) == 1 else ConcatDataset(train_parts)
    report = {
        "block_size": block_size, "tokenizer": info.fingerprint, "bos": info.bos_id, "eos": info.eos_id,
        "train_blocks": len(train_set), "train_tokens": len(train_set) * block_size,
        "seconds": round(time.time() - start, 3), "sources": report_sources,
    }
    return PreparedData(train_set, evals, report)


# --------------------------------------------------------------------------------------------
# Tokenizer training (SentencePiece BPE with byte fallback), cached by content
# --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def train_sentencepiece_tokenizer(sources: Any, cache_dir: str, vocab_size: int, model_type: str = "bpe",
                                  character_coverage: float = 0.9995, max_chars: int = 200_000_000) -> Path:
    """Train a SentencePiece tokenizer on the sources' texts and save it as a Hugging Face tokenizer dir.

    Byte fallback means no text is ever <unk>; coverage 0.9995 keeps rare CJK characters as bytes
    instead of spending the vocabulary on them. The directory is cached under a key of the
    sources' content and the settings, and loads offline with `AutoTokenizer.from_pretrained`.
    """
    import sentencepiece as spm

    specs = parse_sources(sources)
    digests = FileDigests(Path(cache_dir))
    files_per_spec = [(spec, resolve_files(spec.path, spec.name)) for spec in specs]
    settings = {"vocab_size": vocab_size, "model_type": model_type, "character_coverage": character_coverage,
                "max_chars": max_chars, "sentencepiece": spm.__version__, "version": STORE_VERSION}
    material = {"settings": settings, "sources": [
        {"text": spec.text_settings(), "files": [digests(f) for f in files]} for spec, files in files_per_spec]}
    digests.save()
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    out_dir = Path(cache_dir) / "tokenizers" / f"sp-{model_type}-{vocab_size}-{key}"
    if (out_dir / "tokenizer_config.json").exists():
        logger.info("tokenizer: cache hit %s", out_dir)
        return out_dir
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        corpus, written = tmp / "corpus.txt", 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in itertools.chain.from_iterable(iter_texts(s, fs) for s, fs in files_per_spec):
                f.write(text + "\n")  # SentencePiece reads one sentence per line
                written += len(text)
                if written >= max_chars:
                    break
        logger.info("tokenizer: training SentencePiece %s, vocab %d, on %d characters", model_type, vocab_size, written)
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(tmp / "sp"), vocab_size=vocab_size, model_type=model_type,
                byte_fallback=True, character_coverage=character_coverage, split_digits=True,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                unk_piece=SPECIAL_TOKENS["unk"], bos_piece=SPECIAL_TOKENS["bos"], eos_piece=SPECIAL_TOKENS["eos"],
                pad_piece=SPECIAL_TOKENS["pad"], max_sentence_length=1 << 16, input_sentence_size=5_000_000,
                shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            fix = ("Raise `tokenizer_vocab_size` (it must hold every kept character plus 256 bytes) or lower "
                   "`tokenizer_character_coverage`" if "smaller than required_chars" in str(e)
                   else "Lower `tokenizer_vocab_size` or add data")
            raise DataError(f"SentencePiece could not train a {vocab_size}-token vocabulary on {written} "
                            f"characters ({e}). {fix}.") from None
        corpus.unlink()
        hf_dir = tmp / "hf"
        hf_dir.mkdir()
        os.replace(tmp / "sp.model", hf_dir / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": False, "add_prefix_space": False, "model_max_length": 1 << 30,
                  **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}}
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)  # converts tokenizer.model to a fast tokenizer
        final = tmp / "final"
        tokenizer.save_pretrained(final)
        shutil.copy(hf_dir / "tokenizer.model", final / "tokenizer.model")  # kept for vocabulary extension
        if not out_dir.exists():  # else another process finished first: keep theirs
            os.replace(final, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("prepare",):
        print(__doc__.split("The module is also")[1].strip(), file=sys.stderr)
        return 2
    import pretrain

    return pretrain.main(argv[1:], job=pretrain.prepare_only)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
