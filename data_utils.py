"""Data pipeline: sources -> text -> tokens -> packed blocks.

One run reads every configured source (a file, a directory or a glob of text, jsonl, JSON, csv, tsv or
parquet files, or a dataset on the Hugging Face hub or ModelScope), turns each record into one training
text, tokenizes all texts once into a memory-mapped *token store* (a flat token array plus document
offsets) under a content-addressed cache key, then cuts `block_size` windows over the stream of
training documents (EOS between documents, no padding). The train/eval split is by document and is
a cheap view over the store, so changing `block_size`, `eval_fraction` or the seed re-packs in
milliseconds without re-tokenizing, while any change to a file's content, the formatting or the
tokenizer builds a new store.

The module is also a command line tool (`python data_utils.py` prints its usage): preview
rendered texts, convert sources to one jsonl, prepare the token stores ahead of training, search the hub.
"""
from __future__ import annotations

import argparse
import bisect
import bz2
import codecs
import collections
import contextlib
import csv
import dataclasses
import difflib
import errno
import fnmatch
import functools
import glob as globlib
import gzip
import hashlib
import heapq
import io
import itertools
import json
import logging
import lzma
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import string
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

STORE_VERSION = 6  # bump when the on-disk layout or the text formatting rules change
CHUNK_LINES = 2048  # records per unit of work sent to a tokenizer process
PROBE_RECORDS = 4 * CHUNK_LINES  # records a streaming source may skip before its first text
POOL_MIN_BYTES = 8 << 20  # below this, starting worker processes costs more than it saves
csv.field_size_limit(2**31 - 1)  # csv's default 131,072 characters would refuse a long document, not skip it
DATA_EXTENSIONS = (".txt", ".text", ".jsonl", ".json", ".csv", ".tsv", ".parquet")  # not .md: dataset READMEs
COMPRESSIONS = {b"\x1f\x8b": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"), b"BZh": bz2.BZ2File,
                b"\xfd7zXZ\x00": lzma.LZMAFile}  # by magic bytes; .gz/.bz2/.xz after a data extension in a directory


def is_data_file(path: Path) -> bool:
    """What a directory source reads: the data extensions, also compressed (`a.jsonl.gz`)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    return bool(suffixes) and (suffixes[-1] in DATA_EXTENSIONS or suffixes[-1] in (".gz", ".bz2", ".xz")
                               and len(suffixes) == 2 and suffixes[0] in DATA_EXTENSIONS)


@contextlib.contextmanager
def open_input(path: Path) -> Iterator[tuple[Any, Any]]:
    """(a data file's bytes, decompressed when its magic bytes say gzip, bz2 or xz; the file on disk, whose
    position says how much of it has been read)."""
    with open(path, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        opener = next((opener for prefix, opener in COMPRESSIONS.items() if magic.startswith(prefix)), None)
        if opener is None:
            yield raw, raw
            return
        with opener(raw) as stream:
            yield stream, raw


@contextlib.contextmanager
def open_text(path: Path, encoding: str, errors: str = "strict") -> Iterator[tuple[io.TextIOWrapper, Any]]:
    """open_input as text, its line breaks as they are (LF, CRLF or a lone CR), and the file on disk."""
    with open_input(path) as (stream, raw):
        text = io.TextIOWrapper(stream, encoding=encoding, errors=errors, newline="")
        try:
            yield text, raw
        finally:
            text.detach()  # the stream is open_input's to close


def yaml_left_as_string(text: str) -> bool:
    """Would YAML read `text` unquoted as a string? True for numbers that YAML 1.2 knows and PyYAML's
    YAML 1.1 does not (`5e-2`, `2e7`): the user may have written them without quotes. False for `3` or
    `0.1`, which only quotes keep a string."""
    import yaml

    try:
        return isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return True


class DataError(ValueError):
    """Bad input data or data settings. The message names the source, file, line and a fix."""


def a_kind(value: Any) -> str:
    """A value's type with its article, for messages: `an int`, `a list`, `null`."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def counted(n: int, noun: str) -> str:
    """`1 document`, `2 documents`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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

    path: str | list[str] | None = None  # file, directory or glob (or a list of them)
    hub: str | None = None  # instead of `path`: a hub dataset id, or a local directory in hub layout
    hub_config: str | None = None  # hub: the dataset's config name
    split: str = "train"  # hub: the split to train on
    eval_split: str | None = None  # hub: a split to evaluate on instead of a held-out fraction
    revision: str | None = None  # hub: branch, tag or commit
    data_files: Any = None  # hub: passed to datasets.load_dataset
    streaming: bool = False  # hub: read as a stream (see StreamedSource, StreamingMixture)
    name: str = ""  # used in logs, eval metric names (eval_<name>_ppl) and reports
    weight: float | None = None  # share of training TOKENS; unset on every source: natural sizes
    group: str | None = None  # paragraph | document | wikitext_articles: several lines make one document (README)
    watch_forgetting: bool = False  # warn when this source's eval perplexity rises over its baseline
    format: str = "auto"  # auto (by content) | text | jsonl | json | csv | tsv | parquet
    encoding: str = "auto"  # auto (utf-8, else gb18030) | utf-8 | utf-8-sig | gbk | gb18030 | ...
    text_field: str = "text"  # structured records without a template: the field that holds the text
    template: str | dict | None = None  # qa_concat | qa_instruction | dialog | record | format (see README)
    columns: list[str] | None = None  # csv/tsv without a header row: the column names
    records_field: str | None = None  # json: the field of a file's top-level object that holds the records
    min_chars: int = 1  # texts shorter than this (after cleaning) are dropped and counted
    max_document_chars: int = 10_000_000  # a longer text is a bad record (a file without line breaks?)
    collapse_spaces: bool = True  # runs of spaces/tabs -> one space
    keep_newlines: bool = True  # False: line breaks inside a document become spaces (none beside CJK text)
    eval_fraction: float | None = None  # held-out share of documents; None: DataArguments.eval_fraction
    eval_path: str | list[str] | None = None  # explicit eval files instead of a held-out fraction
    on_error: str = "raise"  # raise: stop with a message | skip: count, report and go on
    max_records: int | None = None  # read only the first N records (a quick run on a slice of a large source)

    from_per_file = False  # expanded from a `per_file` entry (not a field: no part of keys or settings)
    FORMATS = ("auto", "text", "jsonl", "json", "csv", "tsv", "parquet")
    STRINGS = ((str, list), "a string or a list of strings")
    KEY_TYPES = {"path": STRINGS, "eval_path": STRINGS, "columns": ((list,), "a list of strings"),
                 "template": ((str, dict), "a template name or a mapping"),
                 **dict.fromkeys(("streaming", "watch_forgetting", "collapse_spaces", "keep_newlines"),
                                 ((bool,), "true or false")),
                 **dict.fromkeys(("min_chars", "max_document_chars", "max_records"), ((int,), "a whole number")),
                 **dict.fromkeys(("weight", "eval_fraction"), ((int, float), "a number"))}  # others: strings

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
        raw = dict(raw)
        for key, value in raw.items():
            types, description = cls.KEY_TYPES.get(key, ((str,), "a string"))
            if str not in types and isinstance(value, str) and yaml_left_as_string(value):
                with contextlib.suppress(ValueError):  # `5e-2`: YAML 1.1 reads it as a string, yet it is a number
                    number = float(value)
                    raw[key] = value = number if math.isfinite(number) else value
            if types == (int,) and isinstance(value, float) and value.is_integer():
                raw[key] = value = int(value)  # YAML reads 2.0e+7 as a float
            elif str in types and isinstance(value, (int, float)) and not isinstance(value, bool):
                raw[key] = value = str(value)  # `name: 2023`
            wrong = (not isinstance(value, types) or isinstance(value, bool) and bool not in types
                     or isinstance(value, list) and not all(isinstance(v, str) for v in value))
            if value is not None and key != "data_files" and wrong:
                hint = (" Write it without quotes." if isinstance(value, str) and str not in types and list not in types
                        else " Quote it." if types == (str,) else "")
                raise DataError(f"{where}: `{key}` must be {description}, got {value!r}.{hint}")
        if bool(raw.get("path")) == bool(raw.get("hub")):
            raise DataError(f"{where}: set either `path` (a file, a directory or a glob) or `hub` (a dataset id).")
        spec = cls(**raw)
        if not spec.name:
            spec.name = (unnamed_hub_source_name(spec.hub, spec.data_files) if spec.hub else re.sub(r"\W+", "_", Path(
                (spec.path if isinstance(spec.path, str) else spec.path[0]).rstrip("/*")).stem).strip("_"))
            spec.name = spec.name or f"source{index}"  # (kept as it was: the name prefixes stores and data plans)
        if spec.name.startswith(("/", "~")) or ".." in re.split(r"[/\\]", spec.name):
            raise DataError(f"{where}: name `{spec.name}` would put the source's cache folders outside `cache_dir` "
                            "(it names them, and eval_<name>_ppl): use letters, digits, `_` or `-`.")
        where = f"{where} ({spec.name})"
        if spec.weight is not None and not (isinstance(spec.weight, (int, float)) and spec.weight > 0):
            raise DataError(f"{where}: weight must be a number above 0 (a share of training tokens), got "
                            f"{spec.weight!r}. Remove the source instead of giving it weight 0.")
        if spec.group is not None and spec.group not in LINE_GROUPS:
            raise DataError(f"{where}: group `{spec.group}` is not known: use {', '.join(LINE_GROUPS)}.")
        if spec.group in ("paragraph", "document") and spec.hub is not None and not read_by_text_builder(spec):
            raise DataError(f"{where}: group `{spec.group}` on a hub source needs `hub: text` or a local hub directory "
                            "of .txt files (their builder groups each file's lines; rows of other builders do not say "
                            "where a file ends).")
        if spec.group is not None and spec.template is not None:
            raise DataError(f"{where}: `group` joins lines (or `text_field` values) into documents, `template` "
                            "renders whole records: use one.")
        if spec.hub is None and any((spec.hub_config, spec.eval_split, spec.revision, spec.data_files,
                                     spec.streaming)):
            raise DataError(f"{where}: hub_config, eval_split, revision, data_files and streaming need `hub:`.")
        if spec.eval_path and spec.eval_split:
            raise DataError(f"{where}: set `eval_path` (eval files) or `eval_split` (a split of the hub dataset), "
                            "not both.")
        if spec.format not in cls.FORMATS:
            raise DataError(f"{where}: format `{spec.format}` is not one of {', '.join(cls.FORMATS)}.")
        if spec.on_error not in ("raise", "skip"):
            raise DataError(f"{where}: on_error must be `raise` or `skip`, got `{spec.on_error}`.")
        if spec.max_records is not None and spec.max_records < 1:
            raise DataError(f"{where}: max_records must be at least 1 (the number of records to read), got "
                            f"{spec.max_records}; remove it to read them all.")
        if spec.eval_fraction is not None and not 0 <= spec.eval_fraction < 1:
            raise DataError(f"{where}: eval_fraction must be in [0, 1), got {spec.eval_fraction}.")
        if spec.encoding != "auto":
            try:
                codecs.lookup(spec.encoding)
            except LookupError:
                raise DataError(f"{where}: unknown encoding `{spec.encoding}`. Use auto, utf-8, gb18030, ...") from None
        make_renderer(spec.template, spec.text_field, where)  # validate the template now, not mid-run
        for key, value in spec.template.items() if isinstance(spec.template, dict) else ():
            if isinstance(value, str) and "\\n" in value:
                warn_once(f"{where}: template option `{key}` holds a backslash and an n ({value!r}), trained as "
                          "those two characters: YAML turns \\n into a line break only in double quotes")
        return spec

    def text_settings(self) -> dict:
        """The settings that decide which text a record becomes (part of the cache key)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items()
                    if k not in ("path", "name", "eval_fraction", "eval_path", "eval_split", "weight", "streaming",
                                 "watch_forgetting") and not (k == "records_field" and v is None)}  # (keys kept)
        if not self.keep_newlines:  # stores built when every line break became a space are not reused
            settings["line_breaks"] = "no space beside CJK"
        return settings


def hub_source_name(hub: str) -> str:
    """The name of a hub source without `name`: its id with every run of other characters one `_`, OWNER/NAME
    -> OWNER_NAME. A local copy of it (hub_local_dir) keeps that name: it names the source's stores, data plan
    and eval_<name>_ppl, which must not change when the copy is downloaded."""
    return re.sub(r"\W+", "_", modelscope_id(hub) or hub).strip("_")


def unnamed_hub_source_name(hub: str, data_files: Any) -> str:
    """The name of a hub source without `name`: hub_source_name of its id; where it is a packaged loader (`hub:
    json`, `text`, ...), of the repository its `hf://` data files come from, else of its first local data file
    (`notes` for notes.txt; a glob's folder), not the loader's name that every such source would share."""
    repo = hub_repo_id(hub, data_files)
    entries = [str(entry) for entry in data_file_entries(data_files)] if hub in PACKAGED_BUILDERS else []
    if repo != hub or not entries:
        return hub_source_name(repo)
    parts = Path(entries[0]).parts
    plain = next((i for i, part in enumerate(parts) if globlib.has_magic(part)), len(parts))  # a glob: its folder
    return source_stem(Path(parts[plain - 1])) if plain else hub_source_name(hub)


def source_stem(path: Path) -> str:
    """A source name from a file or folder name: `medical_zh` from medical_zh.txt or medical_zh.jsonl.gz."""
    name = re.sub(r"\.(gz|bz2|xz)$", "", path.name, flags=re.IGNORECASE)
    if Path(name).suffix.lower() in DATA_EXTENSIONS:
        name = Path(name).stem
    return re.sub(r"\W+", "_", name).strip("_")


def paths_named_by(raw_sources: list) -> set[Path]:
    """The files and folders the entries other than `per_file` ones name in `path` or `eval_path` (globs
    expanded), resolved."""
    named = set()
    for raw in raw_sources:
        if isinstance(raw, dict) and raw.get("per_file") is True:
            continue
        values = ([raw] if isinstance(raw, str) else
                  [raw.get("path"), raw.get("eval_path")] if isinstance(raw, dict) else [])
        for value in values:
            for pattern in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
                pattern = os.path.expanduser(str(pattern))
                for match in globlib.glob(pattern, recursive=True) if globlib.has_magic(pattern) else [pattern]:
                    named.add(Path(match).resolve())
    return named


PER_FILE_MAX_EVAL_FRACTION = 0.2  # a per_file source holds out up to this share to get two eval blocks


def sources_per_file(raw: Any, index: int, named: set[Path] = frozenset()) -> list:
    """A `per_file: true` directory source -> one source per data file directly in the directory and per folder
    in it (all data files below), named by it, each with the entry's other settings: files dropped into data/
    train under the default config, each with its own eval perplexity. Left out: dot-files, a `hub` folder
    (where hub datasets are downloaded, read through `hub:` sources), a `benchmarks` folder (questions the
    evaluations score, never trained on), and what other entries name (`named`:
    a file given its own settings, another source's eval files), which would otherwise be read twice."""
    if not isinstance(raw, dict) or "per_file" not in raw:
        return [raw]
    where, settings = f"sources[{index}]", {k: v for k, v in raw.items() if k != "per_file"}
    if raw["per_file"] is False:
        return [settings]
    if raw["per_file"] is not True:
        raise DataError(f"{where}: `per_file` must be true or false, got {raw['per_file']!r}.")
    for key in ("name", "weight", "eval_path", "hub"):
        if key in raw:
            raise DataError(f"{where}: `per_file` names each source by its file or folder, so `{key}` cannot apply "
                            "to all of them: list those files as sources of their own to set it.")
    directory = Path(os.path.expanduser(str(raw.get("path", ""))))
    if not isinstance(raw.get("path"), str) or not directory.is_dir():
        raise DataError(f"{where}: `per_file` needs `path` to be one directory, got {raw.get('path')!r} (relative "
                        f"to {os.getcwd()}).{started_elsewhere_hint(raw.get('path', ''))}")
    entries, names, others = [], set(), []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.is_dir() and entry.name in ("hub", "benchmarks") or entry.resolve() in named:
            continue
        inside = sorted(str(p) for p in named if entry.is_dir() and p.is_relative_to(entry.resolve()))
        if inside:
            raise DataError(f"{where}: `{inside[0]}`, which another source names, lies in folder `{entry}`, which "
                            "`per_file` reads as one source: it would be read twice. Give that folder a source entry "
                            "of its own (its files listed), or move the file out of it.")
        if entry.is_file() and not is_data_file(entry) or entry.is_dir() and not any(
                p.is_file() and is_data_file(p) for p in entry.rglob("*")):
            others.append(entry.name)
            continue
        name = source_stem(entry)
        if name in names:  # a.txt beside a.jsonl
            name = re.sub(r"\W+", "_", entry.name).strip("_")
        name = next(f"{name}{k}" for k in ("", *range(2, len(names) + 3)) if f"{name}{k}" not in names)  # 病历 2023
        names.add(name)                                                                         # beside 病历-2023
        entries.append({**settings, "path": str(entry), "name": name})
    if others:
        office = " (save Word documents as .txt, Excel sheets as CSV UTF-8)" if any(
            re.search(r"\.(docx?|xlsx?|pdf)$", name, re.IGNORECASE) for name in others) else ""
        warn_once(f"sources[{index}] (per_file): in `{directory}`, "
                  f"{'this holds' if len(others) == 1 else f'these {len(others)} hold'} no data file, not read: "
                  f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}{office}")
    if not entries:
        raise DataError(f"{where}: directory `{directory}` holds no data files ({', '.join(DATA_EXTENSIONS)}). Add "
                        "files or point `path` elsewhere.")
    return entries


def parse_sources(raw_sources: Any) -> list[SourceConfig]:
    if not raw_sources:
        raise DataError("No data sources: set `sources:` in the config, e.g. `sources: [{path: data/}]`.")
    if not isinstance(raw_sources, list):
        raw_sources = [raw_sources]
    specs, named = [], None
    for i, raw in enumerate(raw_sources):
        if named is None and isinstance(raw, dict) and raw.get("per_file") is True:
            named = paths_named_by(raw_sources)
        expanded = sources_per_file(raw, i, named or frozenset())
        for one in expanded:
            specs.append(SourceConfig.from_dict(one, i))
            specs[-1].from_per_file = isinstance(raw, dict) and raw.get("per_file") is True
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            paths = [str(s.path or (f"{s.hub} {data_file_entries(s.data_files)}" if s.data_files else s.hub))
                     for s in specs if s.name == name]
            raise DataError(f"Two sources are named `{name}` ({paths[0]}, {paths[1]}): give each source a unique "
                            "`name:` (a `per_file` entry names its files itself: name the other one).")
    weighted = [s.name for s in specs if s.weight is not None]
    if weighted and len(weighted) != len(specs):
        missing = [s.name for s in specs if s.weight is None]
        raise DataError(f"sources {', '.join(weighted)} have a `weight` but {', '.join(missing)} do not: give every "
                        "source a weight (shares of training tokens), or none (natural sizes).")
    return specs


def started_elsewhere_hint(relative: Any) -> str:
    """For a relative path the run did not find: the shell scripts run from the repository root, so a path
    given relative to the directory the user started them from (PRETRAIN_CALLER_DIR, which they set) is missed;
    named, with the fix, when it is there."""
    caller, relative = os.environ.get("PRETRAIN_CALLER_DIR"), os.path.expanduser(str(relative))
    if not caller or os.path.isabs(relative) or Path(caller).resolve() == Path.cwd().resolve():
        return ""
    there = Path(caller) / relative
    if not globlib.glob(str(there), recursive=True):
        return ""
    return (f" It is there relative to the directory the script was started from: pass `{there}` (the scripts run "
            f"from the repository root, {os.getcwd()}, where relative paths start).")


def resolve_files(patterns: str | list[str], source_name: str, skip_empty: bool = False) -> list[Path]:
    """Expand files, directories (recursively, data extensions only) and globs, in sorted order. An empty file
    is an error, or with `skip_empty` (on_error: skip) read as no records and counted (`skipped:empty_file`)."""
    files: list[Path] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        path = Path(os.path.expanduser(pattern))
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            visible = [p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            found = sorted(p for p in visible if is_data_file(p))
            if len(found) < len(visible):
                others = sorted(str(p.relative_to(path)) for p in visible if not is_data_file(p))
                warn_once(f"source `{source_name}`: directory `{pattern}`: {counted(len(others), 'file')} without a "
                          f"data extension {'is' if len(others) == 1 else 'are'} not read ({', '.join(others[:5])}"
                          f"{', ...' if len(others) > 5 else ''}); name them in `path` to read them")
            if not found:
                raise DataError(f"source `{source_name}`: directory `{pattern}` holds no data files "
                                f"({', '.join(DATA_EXTENSIONS)}). Add files or point `path` elsewhere.")
            files.extend(found)
        elif globlib.has_magic(pattern):
            found = sorted(Path(p) for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
                           if Path(p).is_file())
            if not found:
                raise DataError(f"source `{source_name}`: glob `{pattern}` matches no file. Check the pattern."
                                f"{started_elsewhere_hint(pattern)}")
            files.extend(found)
        else:
            raise DataError(f"source `{source_name}`: path `{pattern}` does not exist. "
                            f"Fix `path` (a file, a directory or a glob), relative to {os.getcwd()}."
                            f"{started_elsewhere_hint(pattern)}")
    for f in files:
        if f.stat().st_size == 0 and not skip_empty:
            raise DataError(f"source `{source_name}`: file `{f}` is empty. Remove it or fill it, or set `on_error: "
                            "skip` for this source to skip empty files (counted in the data report).")
    return files


# --------------------------------------------------------------------------------------------
# Hub sources (Hugging Face `datasets`): a hub id or a local directory in hub layout
# --------------------------------------------------------------------------------------------
def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def env_flag(name: str) -> bool:
    """An environment switch set on: 1, true, yes or on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    return env_flag("HF_HUB_OFFLINE")


def hub_reachable(timeout: float = 3.0, endpoint: str | None = None) -> bool:
    """Can a TCP connection to the hub endpoint (HF_ENDPOINT, or `endpoint`) be opened? Answers within
    `timeout`, where the hub client itself retries for tens of seconds before giving up."""
    from urllib.parse import urlparse

    url = urlparse(endpoint or hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def must_use_cache(name: str) -> bool:
    """A hub id (not a local directory) while the hub is offline or unreachable: only the cache can answer."""
    return not Path(os.path.expanduser(name)).is_dir() and (hub_offline() or not hub_reachable())


@contextlib.contextmanager
def offline_hub():
    """Run `datasets`/`huggingface_hub` in offline mode (local cache only) for the duration."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def looks_like_path(name: str) -> bool:
    """A model or tokenizer name that can only be a local path, not a hub's OWNER/NAME."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.strip("/").count("/") > 1
            or os.path.isdir(name.split("/")[0])  # outputs/run1: a path, not the hub's OWNER/NAME
            or name.split("/")[0] in ("models", "model", "outputs", "output", "checkpoints"))  # the README's


@contextlib.contextmanager
def hub_access(name: str, what: str, option: str, error: type[Exception] | None = None):
    """Load a model or tokenizer (the body of the `with`) from a local directory or the hub, failing within seconds
    with the fixes when the hub cannot be reached (the hub client alone retries for tens of seconds). A name that can
    only be a path (absolute, ./, ../, ~, or deeper than owner/name) and is missing is named as such. `option` is the
    setting to give a downloaded copy to; `error` the exception to raise (DataError by default)."""
    error = error or DataError
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise error(f"{what} directory `{name}` does not exist (relative paths start from {os.getcwd()}; the "
                    f"shell scripts run from the repository root). Fix the path.{started_elsewhere_hint(name)}")
    offline = must_use_cache(name)
    try:
        with offline_hub() if offline else contextlib.nullcontext():
            yield
    except OSError as e:
        if os.path.isdir(name):
            raise error(f"{what} directory `{name}` cannot be loaded: {e}") from None
        reason = "the hub is unreachable or HF_HUB_OFFLINE is set, and it is not in the local cache" if offline \
            else str(e).splitlines()[0]
        modelscope = "" if option == "model_config" else f" (3) if it is on ModelScope, `{MODELSCOPE}{name}`;"
        raise error(f"{what} `{name}` cannot be loaded: {reason}. Fixes: (1) set HF_ENDPOINT to a reachable mirror, "
                    f"e.g. HF_ENDPOINT=https://hf-mirror.com; (2) download it first: `hf download {name} --local-dir "
                    f"models/{name.split('/')[-1]}` and pass that directory as `{option}`;{modelscope} "
                    f"({4 if modelscope else 3}) check the id (no directory `{name}` under {os.getcwd()} either) and, "
                    "for gated models, HF_TOKEN.") from None


# --------------------------------------------------------------------------------------------
# ModelScope (modelscope.cn): `modelscope:OWNER/NAME` models and datasets, fetched into local directories
# --------------------------------------------------------------------------------------------
MODELSCOPE = "modelscope:"
MODELSCOPE_FETCHED = ".modelscope.json"  # in a dataset's local copy: what a completed download put there


def is_modelscope(name: Any) -> bool:
    """Named `modelscope:...` (checked_modelscope_id says whether the rest is an id)."""
    return isinstance(name, str) and name.startswith(MODELSCOPE)


def modelscope_id(name: Any) -> str | None:
    """OWNER/NAME of a `modelscope:OWNER/NAME` id; None for anything else."""
    return name[len(MODELSCOPE):].strip().strip("/") if is_modelscope(name) else None


MODELSCOPE_ID = re.compile(r"(?!\.\.?/)[\w.-]+/(?!\.\.?$)[\w.-]+")  # OWNER/NAME; `.` or `..` would leave its folder


def checked_modelscope_id(name: str, what: str, error: type[Exception]) -> str:
    found = modelscope_id(name)
    if not MODELSCOPE_ID.fullmatch(found):
        raise error(f"{what} `{name}` is not a ModelScope id: write `modelscope:OWNER/NAME` (as on "
                    f"{modelscope_endpoint()}, e.g. modelscope:Qwen/Qwen2.5-0.5B).")
    return found


def modelscope_endpoints() -> list[str]:
    """Where the modelscope client reads from, in its order: MODELSCOPE_ENDPOINT (or the older MODELSCOPE_DOMAIN)
    alone, else modelscope.cn and then modelscope.ai (.ai first under MODELSCOPE_PREFER_AI_SITE=true)."""
    url = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN")
    if url:
        return [(url if "://" in url else f"https://{url}").rstrip("/")]
    sites = ["https://modelscope.cn", "https://www.modelscope.ai"]
    return sites[::-1] if env_flag("MODELSCOPE_PREFER_AI_SITE") else sites


def modelscope_endpoint() -> str:
    """The first of modelscope_endpoints: the site a model's or dataset's page is named on."""
    return modelscope_endpoints()[0]


def modelscope_online() -> bool:
    """One of ModelScope's endpoints answers within seconds (its client retries for minutes); asked once per
    process and endpoint list. HF_HUB_OFFLINE does not apply: it is often set because Hugging Face is out of
    reach where ModelScope is not."""
    return endpoints_reachable(tuple(modelscope_endpoints()))


@functools.lru_cache(maxsize=None)
def endpoints_reachable(endpoints: tuple[str, ...]) -> bool:
    return any(hub_reachable(endpoint=url) for url in endpoints)


def modelscope_revision(revision: str | None) -> str | None:
    """`main`, Hugging Face's default branch (the default of `model_revision`), as ModelScope's (master): None."""
    return None if revision in (None, "main") else revision


def client_patterns(data_files: list[str]) -> list[str]:
    """`data_files` globs as the modelscope client matches them (fnmatch: `*` crosses `/`, `**/` needs a folder):
    each `**/` as `*` and a leading `./` dropped, so it downloads at least the files `datasets` then selects."""
    return [pattern.removeprefix("./").replace("**/", "*") for pattern in data_files]


def modelscope_client(what: str, error: type[Exception]):
    try:
        import modelscope
    except ImportError:
        raise error(f"{what} is read from ModelScope, which needs its client: `pip install modelscope`.") from None
    return modelscope


def modelscope_failure(e: Exception) -> str:
    """A modelscope client error in one line: its kind (NotExistError, AuthenticationError, ...) and message."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"


def fetch_modelscope_model(name: str, revision: str | None, what: str, option: str, error: type[Exception],
                           cached_first: bool = False) -> str:
    """The local directory of ModelScope model `name` (modelscope:OWNER/NAME), from the modelscope cache
    (MODELSCOPE_CACHE) where the hub cannot be reached, else downloaded (the client skips files it has).
    `cached_first`: the cache is tried before the hub (a rank after the one that downloaded it)."""
    model_id = checked_modelscope_id(name, what, error)
    client = modelscope_client(f"{what} `{name}`", error)
    revision = modelscope_revision(revision)
    fixes = (f"Fixes: (1) set MODELSCOPE_ENDPOINT to a reachable endpoint (now "
             f"{', '.join(modelscope_endpoints())}); (2) "
             f"download it where there is network: `modelscope download --model {model_id} --local_dir "
             f"models/{model_id.split('/')[-1]}`, and pass that directory as `{option}`; (3) check the id at "
             f"{modelscope_endpoint()}/models/{model_id} and, for a private model, MODELSCOPE_API_TOKEN.")
    if cached_first or not modelscope_online():  # (the probe costs seconds where the endpoints are out of reach)
        try:
            return client.snapshot_download(model_id, revision=revision, local_files_only=True)
        except Exception as e:  # the client's own kinds of error: not found in the cache
            if not modelscope_online():
                raise error(f"{what} `{name}` cannot be loaded: ModelScope ({', '.join(modelscope_endpoints())}) is "
                            f"unreachable, and it is not in the ModelScope cache ({modelscope_failure(e)}). {fixes}"
                            ) from None
    logger.info("downloading %s `%s` from ModelScope (%s)", what, model_id, modelscope_endpoint())
    try:
        return client.snapshot_download(model_id, revision=revision)
    except Exception as e:  # NotExistError, AuthenticationError, a network error ...: named, with the fixes
        raise error(f"{what} `{name}` cannot be downloaded from ModelScope: {modelscope_failure(e)}. {fixes}") from None


def fetch_modelscope_dataset(raw: dict, root: Path) -> tuple[dict, str]:
    """A `hub: modelscope:OWNER/NAME` source as the local hub directory ROOT/OWNER/NAME, downloaded there (only
    what its `data_files`, paths or globs inside the repository, select, when given) unless a download of the
    same revision and files completed there before: then it is read as it is, without asking the hub. The record
    of the download (.modelscope.json) is written before it starts and marked complete after, so an interrupted
    or failed one is never read as a whole."""
    name = raw.get("name") or hub_source_name(raw["hub"])
    dataset_id = checked_modelscope_id(raw["hub"], f"source `{name}`: hub", DataError)
    where, local = f"source `{name}`: ModelScope dataset `{dataset_id}`", root / dataset_id
    if local.is_symlink() or local.parent.is_symlink():
        raise DataError(f"{where}: {local} is a symbolic link; a download there could replace what it points to. "
                        "Replace it by a folder, or set `hub_local_dir` to another place.")
    files = [str(f) for f in data_file_entries(raw.get("data_files"))] or None
    if any("://" in f or os.path.isabs(os.path.expanduser(f)) for f in files or []):
        raise DataError(f"{where}: `data_files` of a ModelScope source are paths or patterns inside its repository "
                        f"(e.g. data/train.jsonl), got {files}. Read other files with a source of their own.")
    revision, record = modelscope_revision(raw.get("revision")), local / MODELSCOPE_FETCHED
    done = {"dataset": dataset_id, "revision": revision, "data_files": files, "complete": True}
    try:
        fetched = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        fetched = None
    if fetched in (done, {**done, "data_files": None}):  # (a whole copy holds any of its files)
        pass
    elif modelscope_online():
        client = modelscope_client(where, DataError)
        if isinstance(fetched, dict) and fetched.get("dataset") == dataset_id and fetched.get("revision") != revision:
            shutil.rmtree(local)  # files the other revision has and this one lacks would be read as its data
        elif fetched is None and local.is_dir() and local_hub_files(local):
            logger.warning("%s: %s already holds files no ModelScope download recorded (an `hf download`, or copied "
                           "by hand): the download joins them, and all are read as this dataset.", where, local)
        atomic_write_text(record, json.dumps({**done, "complete": False}, ensure_ascii=False))
        logger.info("%s: downloading into %s", where, local)
        try:
            client.dataset_snapshot_download(dataset_id, revision=revision, local_dir=str(local),
                                             allow_patterns=client_patterns(files) if files else None)
        except Exception as e:  # NotExistError, AuthenticationError, a network error ...: named, with the fixes
            raise DataError(f"{where} cannot be downloaded: {modelscope_failure(e)}. Check the id at "
                            f"{modelscope_endpoint()}/datasets/{dataset_id} (and `revision`, `data_files`) and, "
                            "for a private dataset, MODELSCOPE_API_TOKEN; rerunning resumes the download.") from None
        unmatched = [f for f in files or [] if not globlib.glob(str(local / f), recursive=True)]
        if unmatched:
            raise DataError(f"{where}: `data_files` {', '.join(unmatched)} match no file of the repository (revision "
                            f"{revision or 'default'}). Fix them: paths or globs inside it, as listed at "
                            f"{modelscope_endpoint()}/datasets/{dataset_id}/files.")
        atomic_write_text(record, json.dumps(done, ensure_ascii=False))
    elif fetched is not None:
        state = ("did not complete" if not isinstance(fetched, dict) or not fetched.get("complete") else
                 f"holds revision {fetched.get('revision') or 'default'} with data_files {fetched.get('data_files')}")
        raise DataError(f"{where}: the download into {local} {state}, and ModelScope "
                        f"({', '.join(modelscope_endpoints())}) is unreachable. Rerun where it can be reached (the download resumes), or set `revision` / "
                        "`data_files` to what the folder holds.")
    elif local.is_dir() and local_hub_files(local):  # copied by hand (`modelscope download --dataset`)
        logger.warning("%s: ModelScope (%s) is unreachable; the files in %s are read as they are (copied by hand: "
                       "no download of this revision and these files is recorded there).", where,
                       ", ".join(modelscope_endpoints()), local)
    else:
        raise DataError(f"{where} cannot be loaded: ModelScope ({', '.join(modelscope_endpoints())}) is unreachable, "
                        f"and {local} holds no copy. Fixes: (1) set MODELSCOPE_ENDPOINT to a reachable endpoint; (2) "
                        f"download it where there is network: `modelscope download --dataset {dataset_id} --local_dir "
                        f"{local}` (found there through `hub_local_dir`); (3) point `path:` at a local copy of its "
                        "files.")
    raw = {**raw, "hub": str(local), "name": name}
    raw.pop("revision", None)  # fetched: the local copy holds it
    return raw, f"{MODELSCOPE}{dataset_id} -> {local}"


def modelscope_origin(spec: SourceConfig) -> dict:
    """{"modelscope": {"dataset", "revision", "data_files"}} for a source read from a completed ModelScope download
    (its record in the folder), so the data report names what was downloaded, not only the local folder."""
    try:
        record = json.loads((Path(spec.hub) / MODELSCOPE_FETCHED).read_text(encoding="utf-8")) if spec.hub else None
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or not record.get("complete"):
        return {}
    return {"modelscope": {k: record.get(k) for k in ("dataset", "revision", "data_files")}}


def fetch_modelscope_sources(raw_sources: Any, hub_local_dir: str | None) -> tuple[Any, list[str]]:
    """Every `hub: modelscope:OWNER/NAME` source fetched into HUB_LOCAL_DIR/OWNER/NAME (data/hub without one) and
    read from there. Returns the sources and a line per source fetched."""
    root, done, out = Path(os.path.expanduser(hub_local_dir or "data/hub")), [], []
    for raw in raw_sources if isinstance(raw_sources, list) else [raw_sources]:
        if isinstance(raw, dict) and is_modelscope(raw.get("hub")):
            raw, line = fetch_modelscope_dataset(raw, root)
            done.append(line)
        out.append(raw)
    return (out if isinstance(raw_sources, list) else out[0]), done


PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
HF_URL = re.compile(r"hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)")


def data_file_entries(data_files: Any) -> list:
    """Every path, pattern or URL of a `data_files` value: one, a list, or a dict of split -> one or a list."""
    groups = data_files.values() if isinstance(data_files, dict) else [data_files]
    return [entry for group in groups for entry in (group if isinstance(group, list) else [group])
            if entry is not None]


def hub_repo_id(hub: str, data_files: Any) -> str:
    """The dataset repository a hub source reads: the id itself, or the repo of `hf://` data files."""
    if hub not in PACKAGED_BUILDERS:
        return hub
    for url in data_file_entries(data_files):
        match = HF_URL.match(str(url))
        if match:
            return match.group(1)
    return hub


def use_local_hub_copies(raw_sources: Any, hub_local_dir: str | None) -> tuple[Any, list[str]]:
    """Point hub sources at local snapshots where `hub_local_dir/OWNER/NAME` exists (what
    `hf download --repo-type dataset OWNER/NAME --local-dir hub_local_dir/OWNER/NAME` makes), each `hf://`
    data file at the file inside its own repository's snapshot. Returns the sources and a line per substitution."""
    if not hub_local_dir:
        return raw_sources, []
    root, done, out = Path(os.path.expanduser(hub_local_dir)), [], []
    for raw in raw_sources if isinstance(raw_sources, list) else [raw_sources]:
        hub = raw.get("hub") if isinstance(raw, dict) else None
        if not isinstance(hub, str) or Path(os.path.expanduser(hub)).is_dir() or is_modelscope(hub):
            out.append(raw)
            continue
        raw = dict(raw)
        if hub in PACKAGED_BUILDERS:
            def to_local(url):
                match = HF_URL.match(str(url))
                local = root / match.group(1) if match else None
                if local is None or not globlib.glob(str(local / match.group(3)), recursive=True):
                    return url  # not downloaded (a partial copy may lack the file): read from the hub
                done.append(f"{match.group(1)} -> {local}")
                if match.group(2):
                    logger.warning("hub source `%s`: the revision `%s` of `%s` does not apply to the local copy %s, "
                                   "which is read as it is: check it holds that revision, or remove it from "
                                   "`hub_local_dir` to load the revision from the hub.", hub, match.group(2), url,
                                   local)
                return str(local / match.group(3))
            files = raw.get("data_files")
            raw["name"] = raw.get("name") or unnamed_hub_source_name(hub, files)  # the copy's paths do not name it
            raw["data_files"] = ({k: [to_local(u) for u in v] if isinstance(v, list) else to_local(v)
                                  for k, v in files.items()} if isinstance(files, dict)
                                 else [to_local(u) for u in files] if isinstance(files, list) else to_local(files))
            substituted = any(entry.startswith(str(root)) for entry in map(str, data_file_entries(raw["data_files"])))
        else:
            local = root / hub
            if not local.is_dir():
                out.append(raw)
                continue
            raw["hub"], substituted = str(local), True
            raw["name"] = raw.get("name") or hub_source_name(hub)
            done.append(f"{hub} -> {local}")
        if substituted and raw.get("revision"):
            logger.warning("hub source `%s`: `revision: %s` does not apply to the local copy under %s, which is read "
                           "as it is: check it holds that revision, or remove it from `hub_local_dir` to load the "
                           "revision from the hub.", hub, raw["revision"], root)
        out.append(raw)
    return (out if isinstance(raw_sources, list) else out[0]), list(dict.fromkeys(done))


def hub_read_error(source: str, what: str, error: Exception) -> DataError:
    cause = error.__cause__ or error
    if isinstance(cause, UnicodeDecodeError):
        return DataError(f"source `{source}`: {what} cannot be read: a file of it is not {cause.encoding} text "
                         f"({' '.join(str(cause).split())}; `datasets` logs the file above). Set `encoding:` to the "
                         "files' encoding (gbk, big5, utf-16, ...), or convert them to UTF-8.")
    return DataError(f"source `{source}`: {what} cannot be read: {type(cause).__name__}: "
                     f"{' '.join(str(cause).split())} (`datasets` logs the file above). Its files may disagree on "
                     "their columns or types (schema drift), or one may be damaged: make them agree, pick the files "
                     "that do with `data_files`, or read local files with `path:` (each file on its own, records may "
                     "differ in their fields; the error then names file and line).")


def unreachable_message(name: str, error: Exception | str) -> str:
    return (f"hub dataset `{name}` cannot be loaded: the hub ({hub_endpoint()}) is unreachable or offline and "
            f"the dataset is not in the local cache ({error}). Fixes: (1) set HF_ENDPOINT to a reachable mirror, "
            f"e.g. HF_ENDPOINT=https://hf-mirror.com; (2) download it first where there is network: "
            f"`hf download --repo-type dataset {name} --local-dir data/hub/{name}` (found there automatically "
            f"through `hub_local_dir`); (3) if it is on ModelScope, `hub: {MODELSCOPE}{name}`; (4) point `path:` at "
            "a local copy of its files.")


def local_hub_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def read_by_text_builder(spec: SourceConfig) -> bool:
    """`hub: text`, or a local hub directory whose data files are all text files (`datasets` reads it with the
    text builder, which takes `sample_by`)."""
    if spec.hub == "text":
        return True
    directory = Path(os.path.expanduser(spec.hub))
    files = [p for p in local_hub_files(directory) if is_data_file(p)] if directory.is_dir() else []
    return bool(files) and all(re.search(r"\.(txt|text)(\.(gz|bz2|xz))?$", p.name, re.IGNORECASE) for p in files)


HUB_SAMPLED_FILES = 32  # local files of a hub source whose encoding is detected (each open reads their first MB)


def hub_files_encoding(spec: SourceConfig, local_files: list[Path]) -> str | None:
    """The encoding `datasets` should read a hub source's text files (json, csv, text) in where it is not UTF-8,
    its default: `encoding`, or under `auto` the one detected in its local files (GBK text read as UTF-8 fails
    mid-read), which must agree (ASCII files agree with any). None: UTF-8, passed as no option at all, so the
    `datasets` cache of a source read before stays valid."""
    found = {}
    if spec.encoding != "auto":
        found[codecs.lookup(spec.encoding).name] = None
    else:  # the first files tell (a later one in another encoding fails the read, named by hub_read_error)
        for path in [p for p in local_files if is_data_file(p) and p.suffix.lower() != ".parquet"][:HUB_SAMPLED_FILES]:
            with open_input(path) as (f, _):
                head = f.read(1 << 20)
            if not head.isascii():
                encoding = "utf-8" if _decodes(head, "utf-8") else detect_encoding(path, "auto")
                found.setdefault(codecs.lookup(encoding).name, path)
    if len(found) > 1:
        (first, a), (second, b) = list(found.items())[:2]
        raise DataError(f"source `{spec.name}`: its data files are in different encodings (`{a}` {first}, `{b}` "
                        f"{second}), and `datasets` reads them all in one. Convert them to one, or read them with "
                        "`path:` (each file in its own encoding).")
    encoding = next(iter(found), "utf-8")
    return None if encoding == "utf-8" else encoding


def load_hub_dataset(spec: SourceConfig, split: str, local_files: list[Path], cache_dir: Path | None = None):
    """`datasets.load_dataset` for a hub source; fails within seconds, with the fixes, when offline.

    A local directory gets a `datasets` cache of its own, keyed by its files' sizes, modification and change
    times (as FileDigests): `datasets` keys local directories by name and config only, so two directories
    called `medical` (or one whose files changed) would otherwise share one stale Arrow cache, and a token
    store keyed by the new content would hold the old text."""
    import datasets

    local = Path(os.path.expanduser(spec.hub)).is_dir()
    name = os.path.expanduser(spec.hub) if local else spec.hub
    if not local and spec.hub not in PACKAGED_BUILDERS and (spec.hub.startswith((".", "/", "~"))
                                                           or spec.hub.count("/") > 1):  # not OWNER/NAME
        raise DataError(f"source `{spec.name}`: hub directory `{spec.hub}` does not exist (looked from "
                        f"{Path.cwd()}). Fix the path, or give a hub dataset id (OWNER/NAME)."
                        f"{started_elsewhere_hint(spec.hub)}")
    split_option = "split" if split == spec.split else "eval_split"
    offline = must_use_cache(name)
    hub_cache = None
    if spec.hub in PACKAGED_BUILDERS:
        check_local_data_files(spec)
    if local_files:  # hub_source_files(spec)  # every caller, with or without a cache_dir of its own, gets the content-keyed cache
        stats = [(str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns) for p in local_files for st in [p.stat()]]
        root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
        hub_cache = str(root / "hub_datasets" / hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16])
    if spec.hub in PACKAGED_BUILDERS:
        remote = [str(f) for f in data_file_entries(spec.data_files) if str(f).startswith("hf://")]
        if remote and must_use_cache(hub_repo_id(spec.hub, spec.data_files)):  # datasets fails on them offline
            raise DataError(f"source `{spec.name}`: " + unreachable_message(hub_repo_id(spec.hub, spec.data_files),
                                                                           f"data files {', '.join(remote)}"))
    logger.info("source `%s`: loading hub dataset %s (config %s, split %s)%s", spec.name, name, spec.hub_config,
                split, " from the local cache (hub unreachable or HF_HUB_OFFLINE)"
                if offline and spec.hub not in PACKAGED_BUILDERS else "")  # a builder's files are local here
    options = {}
    binary = any(path.suffix.lower() in (".parquet", ".arrow") for path in local_files)
    if spec.hub in ("text", "json", "csv") or local and not binary:  # a local directory of text files: its
        encoding = hub_files_encoding(spec, local_files)              # builder (json, csv, text) takes it too
        options.update({"encoding": encoding} if encoding else {})
    elif spec.encoding != "auto" and codecs.lookup(spec.encoding).name != "utf-8":
        raise DataError(f"source `{spec.name}`: `encoding` applies to files read by this toolkit (`path:`), to "
                        f"`hub: text`, `json` or `csv` and to local hub directories of text files; hub dataset "
                        f"`{spec.hub}` is read by its own builder. Drop `encoding`.")
    if spec.records_field is not None:
        if spec.hub != "json":
            raise DataError(f"source `{spec.name}`: `records_field` applies to JSON files (`path:`, or `hub: json`).")
        options["field"] = spec.records_field
    if spec.group in ("paragraph", "document"):  # (read_by_text_builder: checked when the source was read)
        options["sample_by"] = spec.group  # the builder knows where its files end; rows of several files do not
    try:
        with offline_hub() if offline else contextlib.nullcontext():
            return datasets.load_dataset(name, spec.hub_config, split=split, revision=spec.revision,
                                         data_files=spec.data_files, streaming=spec.streaming, cache_dir=hub_cache,
                                         **options)
    except ValueError as e:  # unknown config or split: datasets lists the valid ones
        raise DataError(f"source `{spec.name}`: hub dataset `{name}`: {str(e).rstrip('.')}. Fix `hub_config` / "
                        f"`{split_option}`.") from None
    except datasets.exceptions.DatasetGenerationError as e:  # reading the files into Arrow failed
        raise hub_read_error(spec.name, f"hub dataset `{name}`", e) from None
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        fix = ("point `path:` at the data files in it" if local else
               f"`hub: json` (or csv, parquet) with `data_files: hf://datasets/{name}/<file in the repository>`; "
               "configs/stage2_medical.yaml does this for shibing624/medical")
        raise DataError(f"source `{spec.name}`: hub dataset `{name}` is built by a loading script, which `datasets` 4 "
                        f"and later no longer run ({e}). Read its data files directly: {fix}.") from None
    except FileNotFoundError as e:  # a hub id the hub does not know (offline, datasets raises ConnectionError)
        if local or spec.hub in PACKAGED_BUILDERS:
            raise DataError(f"source `{spec.name}`: `{name}`: a file it names is missing: {e}") from None
        raise DataError(f"source `{spec.name}`: hub dataset `{name}` does not exist, or is private or gated ({e}). "
                        "Check the id (OWNER/NAME); for a gated one, accept its terms on the hub and log in "
                        "(`hf auth login`) or set HF_TOKEN.") from None
    except (ConnectionError, OSError) as e:
        if not local:
            raise DataError(f"source `{spec.name}`: " + unreachable_message(hub_repo_id(name, spec.data_files), e)
                            ) from None
        raise DataError(f"source `{spec.name}`: local hub directory `{name}` cannot be read: {e}") from None


def hub_reads_remote(spec: SourceConfig) -> bool:
    if Path(os.path.expanduser(spec.hub)).is_dir():
        return False
    return spec.hub not in PACKAGED_BUILDERS or any("://" in str(f) for f in data_file_entries(spec.data_files))


def hub_source_files(spec: SourceConfig) -> list[Path]:
    """The local files a hub source reads: a hub-layout directory's, or a packaged builder's local
    `data_files` (globs expanded). They key its token store and `datasets` cache by content: `datasets`
    fingerprints local files by path and modification time only, so a copy that keeps the time (cp -p,
    rsync -t, tar) would serve the old text."""
    directory = Path(os.path.expanduser(spec.hub))
    if directory.is_dir():
        return local_hub_files(directory)
    if spec.hub not in PACKAGED_BUILDERS:
        return []
    found = set()
    for pattern in data_file_entries(spec.data_files):
        if "://" not in str(pattern):
            for match in map(Path, globlib.glob(os.path.expanduser(str(pattern)), recursive=True)):
                found.update(local_hub_files(match) if match.is_dir() else [match] if match.is_file() else [])
    return sorted(found)


def check_local_data_files(spec: SourceConfig) -> None:
    """Each local `data_files` path or pattern of a packaged builder (`hub: json` ...) must match a file:
    `datasets` reports a missing one as a network problem, and an empty glob as a bare StopIteration."""
    for pattern in data_file_entries(spec.data_files):
        if "://" not in str(pattern) and not globlib.glob(os.path.expanduser(str(pattern)), recursive=True):
            raise DataError(f"source `{spec.name}`: `data_files` entry `{pattern}` matches no file (looked from "
                            f"{Path.cwd()}). Fix the path or pattern.{started_elsewhere_hint(pattern)}")


@dataclass
class SourceInput:
    """What a source reads: local files, or a hub dataset (map-style or streaming)."""

    files: list[Path] = field(default_factory=list)  # the local files read (a hub source's too)
    dataset: Any = None
    label: str = ""
    remote: bool = False  # a hub source reading files from the hub

    @classmethod
    def open(cls, spec: SourceConfig, eval_input: bool = False, cache_dir: Path | None = None) -> "SourceInput":
        if spec.hub and not (eval_input and spec.eval_path):
            split = spec.eval_split if eval_input else spec.split
            files = hub_source_files(spec)
            return cls(files=files, dataset=load_hub_dataset(spec, split, files, cache_dir),
                       label=f"hub:{spec.hub}/{spec.hub_config or ''}/{split}", remote=hub_reads_remote(spec))
        files = resolve_files(spec.eval_path if eval_input else spec.path, spec.name, spec.on_error == "skip")
        return cls(files=files, label=", ".join(map(str, files)))

    def identity(self, digests: "FileDigests") -> list:
        """What the token store key hashes: file contents, and for what is read from the hub the dataset's
        fingerprint (datasets keys it by revision)."""
        fingerprint = [getattr(self.dataset, "_fingerprint", None)] if self.remote else []
        return [self.label if self.dataset is not None else "", *fingerprint, *(digests(f) for f in self.files)]

    def size(self) -> int:
        return len(self.dataset) if self.dataset is not None else sum(f.stat().st_size for f in self.files)


# --------------------------------------------------------------------------------------------
# Templates: one structured record -> one training text
# --------------------------------------------------------------------------------------------
class RecordError(DataError):
    """A record that cannot become a text. `reason` names the count it lands in under `on_error: skip`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes
        return type(self), (str(self), self.reason)


def _fields_present(obj: dict) -> str:
    return ", ".join(f"`{k}`" for k in list(obj)[:20]) or "none"


def _require(obj: dict, field_name: str, option: str) -> Any:
    if field_name not in obj:
        where = "for this source" if option == "text_field" else "in the source's template (or `text_field`)"
        raise RecordError(f"has no field `{field_name}`; its fields are {_fields_present(obj)}. Set `{option}` "
                          f"{where} to the field that holds it.{template_hint(obj) if option == 'text_field' else ''}",
                          "missing_field")
    return obj[field_name]


def template_hint(obj: dict) -> str:
    """The template that renders a record of a well-known layout (alpaca, ShareGPT/OpenAI chat, QA pairs)."""
    if {"instruction", "output"} <= obj.keys():
        return " These are an instruction dataset's (alpaca): `template: qa_instruction` renders them."
    if "conversations" in obj or "messages" in obj:
        return " It holds a dialog (ShareGPT/OpenAI chat): `template: dialog` renders its turns."
    if {"question", "answer"} <= obj.keys():
        return " It is a question-answer pair: `template: qa_concat` renders it."
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if lists:
        return (f" If the file is one JSON object whose `{lists[0]}` holds the records, set `records_field: "
                f"{lists[0]}`.")
    return " For records of several fields, a `template` (record, format, ...) renders them into one text."


def _require_text(obj: dict, field_name: str, option: str) -> str:
    value = _require(obj, field_name, option)
    if not isinstance(value, str):
        raise RecordError(f"field `{field_name}` holds {a_kind(value)} ({str(value)[:40]!r}), "
                          "not a string. Fix the record, or point `text_field` (or a template) at a text field.",
                          "not_a_string")
    return value


SENTENCE_END = "。！？；.!?;…"
_CONTROL = "".join(chr(c) for c in range(32) if chr(c) not in "\n\t") + "\x7f"


def render_value(value: Any, list_separator: str = ",", unit: str = "") -> str:
    """A field value as text: str stripped; lists flattened and joined; dicts as key：value pairs;
    numbers with an optional unit; bools as 是/否; None and empty values as '' (the field is skipped)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "是" if value else "否"
    if isinstance(value, (int, float)):
        text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        return text + unit
    if isinstance(value, str):
        return value.strip().strip(_CONTROL).strip()
    if isinstance(value, (list, tuple)):
        items = (render_value(v, list_separator) for v in value)
        return list_separator.join(item for item in items if item)
    if isinstance(value, dict):
        pairs = ((render_value(k), render_value(v, list_separator)) for k, v in value.items())
        return "，".join(f"{k}：{v}" for k, v in pairs if k and v)
    return str(value).strip()


# Labels for the multi-field medical record schema (QASystemOnMedicalKG / nlp-guild medical-data).
MEDICAL_RECORD_LABELS = {
    "name": "名称", "desc": "描述", "category": "类别", "prevent": "预防", "cause": "病因", "symptom": "症状",
    "yibao_status": "医保", "get_prob": "患病比例", "easy_get": "易感人群", "get_way": "传播途径",
    "acompany": "并发症", "cure_department": "就诊科室", "cure_way": "治疗方式", "cure_lasttime": "治疗周期",
    "cured_prob": "治愈率", "common_drug": "常用药品", "cost_money": "治疗费用", "check": "检查项目",
    "do_eat": "宜吃", "not_eat": "忌吃", "recommand_eat": "推荐食谱", "recommand_drug": "推荐药品",
    "drug_detail": "药品明细",
}

TEMPLATE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qa_concat": {"question_field": "question", "answer_field": "answer", "question_label": "[QUESTION]",
                  "answer_label": "[ANSWER]", "separator": " "},
    "qa_instruction": {"instruction_field": "instruction", "input_field": "input", "output_field": "output",
                       "instruction_prefix": "", "instruction_label": "Instruction: ", "input_label": "Input: ",
                       "output_label": "Output: ", "separator": "\n"},
    "dialog": {"messages_field": "auto", "role_labels": {"system": "[System]", "user": "[User]",
                                                         "assistant": "[Assistant]"}, "separator": "\n"},
    "record": {"fields": None, "labels": {}, "prefixes": {}, "units": {}, "skip_fields": [],
               "list_separator": ",", "field_separator": "。", "label_separator": "："},
    "format": {"format": None},
}
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "chatgpt": "assistant", "bot": "assistant", "system": "system"}


def template_options(template: str | dict, where: str) -> tuple[str, dict]:
    """(kind, options) of a `template` setting: checked, a null option left at its default, a single string
    where a list is expected taken as a list of one (`fields: title`), merged over the defaults."""
    options = {"type": template} if isinstance(template, str) else {k: v for k, v in template.items() if v is not None}
    kind = options.pop("type", None)
    if kind not in TEMPLATE_DEFAULTS:
        raise DataError(f"{where}: template type `{kind}` is not one of {', '.join(TEMPLATE_DEFAULTS)}."
                        f"{closest_key_hint(str(kind), TEMPLATE_DEFAULTS)}")
    defaults = TEMPLATE_DEFAULTS[kind]
    for key, value in options.items():
        if key not in defaults:
            raise DataError(f"{where}: template `{kind}` has no option `{key}`.{closest_key_hint(key, defaults)} "
                            f"Options: {', '.join(defaults)}.")
        expected = type(defaults[key]) if defaults[key] is not None else list if key == "fields" else str
        if expected is list and isinstance(value, str):
            options[key] = value = [value]
        if not isinstance(value, expected):
            quote = (" In YAML a value starting with `{` is a mapping: quote it, with double quotes for \\n to be a "
                     "line break (\"{title}\\n{content}\")." if expected is str and isinstance(value, dict) else "")
            raise DataError(f"{where}: template `{kind}` option `{key}` must be a "
                            f"{ {str: 'string', list: 'list', dict: 'mapping'}[expected]}, got {value!r}.{quote}")
    return kind, {**defaults, **options}


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A warning about a setting, once per process however often the setting is read."""
    logger.warning(message)


def make_renderer(template: str | dict | None, text_field: str, where: str):
    """The function record(dict) -> text for a source, built from its `template` setting."""
    if template is None:
        return lambda obj: _require_text(obj, text_field, "text_field")
    kind, opts = template_options(template, where)
    if kind == "record":
        opts["labels"] = {**MEDICAL_RECORD_LABELS, **opts["labels"]}
    if kind == "dialog":  # labels for some roles keep the defaults of the others (a system turn needs one too)
        opts["role_labels"] = {**TEMPLATE_DEFAULTS["dialog"]["role_labels"],
                               **{ROLE_ALIASES.get(str(role).lower(), role): label
                                  for role, label in opts["role_labels"].items()}}
    if kind == "format":
        if not isinstance(opts["format"], str):
            raise DataError(f"{where}: template `format` needs `format: \"{{title}}\\n{{content}}\"`.")
        for _, name, spec, conversion in string.Formatter().parse(opts["format"]):
            if name is not None and (not re.fullmatch(r"[^.\[\]{}!:]+", name) or name.isdigit() or spec or conversion):
                whole = f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                raise DataError(f"{where}: format field `{whole}` must be a plain field name (no attributes, indexes, "
                                "positions, conversions, format specs or empty braces): the values are text.")
    return functools.partial(RENDERERS[kind], opts)


def labelled(label: str, text: str) -> str:
    """`[User] text`, but `患者：text`: no space after a label that ends in full-width punctuation (a CJK
    colon already separates) or in whitespace."""
    last = label[-1:]
    glued = not last or last.isspace() or (unicodedata.category(last).startswith("P")
                                           and unicodedata.east_asian_width(last) in ("W", "F"))
    return f"{label}{text}" if glued else f"{label} {text}"


def _render_qa_concat(o: dict, obj: dict) -> str:
    """An empty question or answer leaves out its label too (the gap is counted by the caller)."""
    question = render_value(_require(obj, o["question_field"], "question_field"))
    answer = render_value(_require(obj, o["answer_field"], "answer_field"))
    parts = [labelled(label, text) for label, text in ((o["question_label"], question), (o["answer_label"], answer))
             if text]
    return o["separator"].join(parts)


def _render_qa_instruction(o: dict, obj: dict) -> str:
    """One line per non-empty field: an empty instruction, input or output leaves out its label (and prefix)."""
    instruction = render_value(_require(obj, o["instruction_field"], "instruction_field"))
    output = render_value(_require(obj, o["output_field"], "output_field"))
    extra = render_value(obj.get(o["input_field"]))
    parts = [f"{label}{text}" for label, text in ((o["instruction_label"] + o["instruction_prefix"], instruction),
                                                  (o["input_label"], extra), (o["output_label"], output)) if text]
    return o["separator"].join(parts)


def _render_dialog(o: dict, obj: dict) -> str:
    field_name = o["messages_field"]
    if field_name == "auto":  # merged schemas (parquet, datasets) hold both, the unused one null
        field_name = next((f for f in ("conversations", "messages") if isinstance(obj.get(f), list)),
                          next((f for f in ("conversations", "messages") if f in obj), "conversations"))
    turns = _require(obj, field_name, "messages_field")
    if not isinstance(turns, list):
        raise RecordError(f"field `{field_name}` is {a_kind(turns)}, not a list of turns.", "bad_dialog")
    lines = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i} of `{field_name}` is {a_kind(turn)}, not an object.", "bad_dialog")
        role = turn.get("from") if turn.get("from") is not None else turn.get("role")  # ShareGPT's or OpenAI's keys;
        content = turn.get("value") if turn.get("value") is not None else turn.get("content")  # merged: others null
        if isinstance(content, list) and all(isinstance(part, dict) for part in content):  # OpenAI content parts
            content = "\n".join(part["text"] for part in content if isinstance(part.get("text"), str))
        content = render_value(content)
        label = o["role_labels"].get(role) or o["role_labels"].get(ROLE_ALIASES.get(str(role).lower(), ""))
        if label is None:
            raise RecordError(f"turn {i} has role `{role}`, which `role_labels` does not name. Add it, e.g. "
                              f"role_labels: {{{role}: '[{role}]'}}.", "unknown_role")
        if content:
            lines.append(labelled(label, content))
    return o["separator"].join(lines)


def _render_record(o: dict, obj: dict) -> str:
    names = o["fields"] or [k for k in obj if k != "_id" and k not in o["skip_fields"]]
    ends_sentences = o["field_separator"].strip()[:1] in tuple(SENTENCE_END)  # 。 or ；, not a line break or ", "
    parts = []
    for name in names:
        text = render_value(obj.get(name), o["list_separator"], str(o["units"].get(name, "")))
        if not text:
            continue  # missing or empty: skipped (counted by the caller)
        lead = o["prefixes"].get(name)
        part = f"{lead}{text}" if lead is not None else f"{o['labels'].get(name, name)}{o['label_separator']}{text}"
        if parts and not (ends_sentences and parts[-1].endswith(tuple(SENTENCE_END))):  # no 。。
            parts[-1] += o["field_separator"]
        parts.append(part)
    return "".join(parts)


def _render_format(o: dict, obj: dict) -> str:
    values = {}
    for _, name, _, _ in string.Formatter().parse(o["format"]):
        if name is not None:
            values[name] = render_value(_require(obj, name, "format"))
    return o["format"].format_map(values)


RENDERERS = {"qa_concat": _render_qa_concat, "qa_instruction": _render_qa_instruction, "dialog": _render_dialog,
             "record": _render_record, "format": _render_format}


def template_fields(template: str | dict | None) -> list[str]:
    """The fields whose content a template renders: an empty one leaves a gap in the text (counted)."""
    if template is None:
        return []
    kind, o = template_options(template, "template")
    if kind == "record":
        return o["fields"] or []
    if kind == "qa_concat":
        return [o["question_field"], o["answer_field"]]
    if kind == "qa_instruction":
        return [o["instruction_field"], o["output_field"]]
    if kind == "format":
        return [name for _, name, _, _ in string.Formatter().parse(o["format"] or "") if name]
    return []  # dialog: turns, each checked as it is rendered


def record_missing_fields(fields: list[str], obj: dict) -> list[str]:
    """Of a template's fields, those this record lacks or leaves empty (counted, not errors)."""
    return [f for f in fields if not render_value(obj.get(f))]


# --------------------------------------------------------------------------------------------
# Reading: bytes -> records, format and encoding detected by content
# --------------------------------------------------------------------------------------------
UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8"),
                (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32-LE's starts like UTF-16-LE's


def _decodes(data: bytes, encoding: str, final: bool = False) -> bool:
    """Whether `data` decodes; not `final`: a multi-byte character may be cut off at its end (a file's head)."""
    try:
        codecs.getincrementaldecoder(encoding)().decode(data, final=final)
        return True
    except UnicodeDecodeError:
        return False


_CJK_IDEOGRAPH = re.compile("[\u4e00-\u9fff]")
# What GB18030 byte pairs become when read as UTF-8: Latin Extended, IPA, Cyrillic to Greek Extended, CJK
# Extension A, Hangul, private use; rare in Chinese text, common in GB18030 text that happens to be valid UTF-8
_GB18030_READ_AS_UTF8 = re.compile("[\u0080-\u009f\u0100-\u036f\u0400-\u1fff\u3400-\u4dbf\uac00-\ud7ff\ue000-\uf8ff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that did not decode, kept by errors="surrogateescape"


def snippet(text: str, n: int = 30) -> str:
    """The start of a text on one line, quoted, for a message."""
    text = " ".join(text.split())
    return f"“{text[:n]}{'…' if len(text) > n else ''}”"


def _outside_gb2312(line: bytes) -> bool:
    """Whether the bytes, read as GB18030, hold a character outside GB2312's double-byte area (both bytes
    0xA1-0xFE), where nearly all Chinese text lies. UTF-8's continuation bytes are 0x80-0xBF, so a UTF-8
    character of three bytes (“ ” — … ℃ ① （ and every ideograph) reads as such a character. Bytes that are
    not GB18030 at all count too."""
    try:
        text = line.decode("gb18030")
    except UnicodeDecodeError:
        return True
    return any(len(b := c.encode("gb18030")) != 2 or min(b) < 0xA1 for c in text if not c.isascii())


def utf8_line(line: bytes) -> str | None:
    """The text of a line if it is UTF-8 in a file of GB18030 text, where it would decode, garbled, without an
    error: valid UTF-8 that holds nothing GB18030 text turns into when read as UTF-8, and either a common CJK
    ideograph or a character that reads as one outside GB2312. Of the 23,287 non-ASCII lines of ../shared/corpora
    saved as GB18030 none passes, of random three-character GB18030 lines 12 in 200,000; of their UTF-8
    originals that also decode as GB18030 all but 111 (English lines whose only non-ASCII characters are
    two-byte ones such as é ° £, which read as common GB2312 characters: 茅 掳 拢)."""
    if line.isascii():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _GB18030_READ_AS_UTF8.search(text):
        return None
    return text if _CJK_IDEOGRAPH.search(text) or _outside_gb2312(line) else None


def _cjk(text: str) -> list[str]:
    return [c for c in text if "\u4e00" <= c <= "\u9fff"]


def big5_rather_than_gbk(head: bytes) -> bool:
    """Whether bytes that decode as GB18030 are Big5 (Traditional Chinese; Windows' cp950): those decode too,
    garbled, with only about two in five of their ideographs among GB2312's 3,755 common ones (lead byte
    B0-D7, second byte A1-FE), where GBK text has nine in ten or more there. Read as cp950, Big5 text has
    its ideographs in Big5's common block (A440-C67E)."""
    try:
        big5 = _cjk(head.decode("cp950"))
    except UnicodeDecodeError:  # most GBK text: bytes Big5 has no characters for
        return False
    gbk = _cjk(head.decode("gb18030"))
    if len(gbk) < 20 or len(big5) < 20:
        return False
    common_gb2312 = sum(0xB0 <= b[0] <= 0xD7 and b[1] >= 0xA1 for b in (c.encode("gb18030") for c in gbk))
    common_big5 = sum(b"\xa4\x40" <= c.encode("cp950") <= b"\xc6\x7e" for c in big5)
    return common_gb2312 < 0.7 * len(gbk) and common_big5 > 0.9 * len(big5)


def detect_encoding(path: Path, declared: str, skip_bad_lines: bool = False) -> str:
    """`auto`: the encoding a byte-order mark names (UTF-8/16/32), else utf-8 if the first MB decodes as
    utf-8, else gb18030 (a superset of GBK). A file whose lines are each UTF-8 or GB18030, some one and some
    the other, has no one encoding: an error, or with `skip_bad_lines` (on_error: skip) the encoding of most
    of its lines, so that the other lines are skipped and counted rather than read garbled."""
    if declared != "auto":
        return declared
    with open_input(path) as (f, _):
        head = f.read(1 << 20)
    if head.startswith(b"PAR1"):
        return "utf-8"  # parquet: binary, strings inside are utf-8
    if head.startswith(b"PK\x03\x04"):
        raise DataError(f"file `{path}` is a zip archive (an Excel .xlsx, a .docx or a .zip), not text: save an Excel "
                        "sheet as \"CSV UTF-8\", unzip an archive, or remove it from the source.")
    for bom, encoding in UNICODE_BOMS:
        if head.startswith(bom):
            return encoding
    if _decodes(head, "utf-8"):
        return "utf-8"
    lines = head.splitlines()[:-1] if len(head) == 1 << 20 else head.splitlines()  # the last may be cut off
    gb18030 = _decodes(head, "gb18030")
    # in a head that is valid GB18030 a UTF-8 line must look like UTF-8 text; otherwise any non-ASCII one counts
    looks_utf8 = utf8_line if gb18030 else (lambda line: not line.isascii() and _decodes(line, "utf-8", True))
    utf8 = [bool(looks_utf8(line)) for line in lines]
    other = [not u and not line.isascii() for u, line in zip(utf8, lines)]
    if any(utf8) and any(other) and all(_decodes(line, "gb18030", True) for line, bad in zip(lines, other) if bad):
        first_utf8, first_other = utf8.index(True) + 1, other.index(True) + 1
        verb = "is" if sum(other) == 1 else "are"
        if skip_bad_lines:
            main, odd = ("utf-8", "GB18030") if sum(utf8) >= sum(other) else ("gb18030", "UTF-8")
            logger.warning("file `%s` mixes encodings: %d of its first %d lines are UTF-8 and %d GB18030; reading "
                           "it as %s and skipping the %s lines (`bad_encoding`)", path, sum(utf8), len(lines),
                           sum(other), main.upper(), odd)
            return main
        hatch = (f" If line {first_utf8} is GB18030 after all (it then reads "
                 f"{snippet(lines[first_utf8 - 1].decode('gb18030'))}), set `encoding: gb18030`." if gb18030 else "")
        raise DataError(f"file `{path}` mixes encodings: line {first_utf8} is UTF-8 but line {first_other} is not "
                        f"(it reads as GB18030), and {sum(other)} of the first {len(lines)} lines {verb} like it, so "
                        "no `encoding:` reads it all. Convert the file to one encoding (iconv converts a file "
                        "that is in one encoding: convert the GB18030 lines on their own), or set `on_error: skip` "
                        "for this source to read the lines of the encoding most of them have and skip the others "
                        f"(counted as `bad_encoding`).{hatch}")
    if gb18030:
        return "cp950" if big5_rather_than_gbk(b"\n".join(lines)) else "gb18030"
    text = head.decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 0.01 * sum(not c.isascii() for c in text):
        return "utf-8"  # UTF-8 but for a few bytes (a line cut inside a character, a record in another encoding):
        # reading names their lines, or skips and counts them under `on_error: skip`
    raise DataError(f"file `{path}`: the first MB is neither UTF-8 nor GB18030 text. If it is text, set "
                    "`encoding:` for this source (e.g. big5, utf-16); if it is binary, remove it.")


SAMPLE_LINES = 51  # lines read to detect a format (a header and 50 rows)
SAMPLE_CHARS = 1 << 20  # at most this much text of them: a line running past it is cut off


def sample_lines(path: Path, encoding: str) -> tuple[list[str], bool]:
    """The first lines of a file with their line breaks (LF, CRLF or a lone CR), for format detection,
    and whether the last one is cut off (SAMPLE_CHARS reached inside it; it is then the last one read)."""
    lines, budget = [], SAMPLE_CHARS
    with open_text(path, encoding, errors="replace") as (f, _):
        while len(lines) < SAMPLE_LINES and budget > 0 and (line := f.readline(budget)):
            lines.append(line.removeprefix("\ufeff") if not lines else line)
            budget -= len(line)
            if budget == 0 and not line.endswith(("\n", "\r")):
                return lines, True
    return lines, False


def table_quoting(fmt: str, lines: list[str]) -> int:
    """csv: fields may be quoted. tsv: only where the sample shows a writer's quoting: a wholly quoted field
    that holds what makes pandas or the csv module quote (a tab, a line break, a doubled quote), or a header
    of quoted names (quote-all writers); otherwise a `"` in a TSV is text (a headline's `"十大"评选`, or a
    whole title `"十大"`), which CSV quoting would eat together with the rows up to the next quote."""
    if fmt == "csv":
        return csv.QUOTE_MINIMAL
    sample = "".join(lines)
    quoted = re.findall(r'(?:^|\t)"((?:[^"]|"")*)"(?=\t|\r?\n|\r|$)', sample, re.MULTILINE)
    header = lines[0].rstrip("\r\n") if lines else ""
    if any(re.search(r'\t|\n|\r|""', field) for field in quoted) or (
            header and re.fullmatch(r'"(?:[^"]|"")*"(?:\t"(?:[^"]|"")*")*', header)):
        return csv.QUOTE_MINIMAL  # (a quoted field may hold tabs and line breaks)
    return csv.QUOTE_NONE


def json_list_lines_fix(path: str | Path, lists: list) -> str:
    """How to make jsonl (which the reader takes) of lines that hold JSON arrays: of objects, jq splits them."""
    if lists and all(isinstance(item, dict) for items in lists for item in items):
        return (f"Write one object per line instead, e.g. `jq -c '.[]' {path} > {Path(path).stem}_lines.jsonl` "
                "(each array's objects become lines of their own).")
    return "Write one JSON object per line instead, such as {\"text\": \"...\"}."


def _json_list(line: str) -> list | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def not_an_object(obj: Any, chunk: "Chunk") -> "RecordError":
    """A JSON record that is no object; an array on a jsonl line gets the conversion that makes it jsonl."""
    fix = "Each record must be an object such as {\"text\": \"...\"}."
    if isinstance(obj, list) and chunk.fmt.startswith("jsonl"):  # (grouped: "jsonl (paragraph)")
        fix = json_list_lines_fix(chunk.path, [obj])
    return RecordError(f"is a JSON {type(obj).__name__}, not an object. {fix}", "not_an_object")


def detect_format(path: Path, declared: str, encoding: str, text_field: str = "text",
                  columns: list[str] | None = None, records_field: str | None = None) -> str:
    """`auto` looks at the content, not the extension: parquet magic, `[` then an object, string or array
    -> JSON array, a `{...}` first line -> jsonl, a header of two or more tab- (comma-) separated fields that
    nine in ten of the next lines repeat -> tsv (csv), a one-column table (a .csv/.tsv file, or a header that
    is `text_field`, whose rows are each one CSV field; or `columns` given) -> csv, else plain text."""
    if declared != "auto":
        return declared
    with open_input(path) as (f, _):
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if b"\x00" in head and encoding.startswith("utf-8"):
        raise DataError(f"file `{path}` looks binary (NUL bytes), not text/json/csv/parquet. Remove it from the "
                        "source or set `format:` if it is UTF-16 text.")
    lines, cut_off = sample_lines(path, encoding)
    stripped = "".join(lines).lstrip()
    if re.match(r'\[\s*([{["\]]|$)', stripped):
        lists = [_json_list(line) for line in (lines[:-1] if cut_off else lines) if line.strip()]
        if len(lists) >= 2 and all(items is not None for items in lists):
            raise DataError(f"file `{path}` line 1 is a JSON array (a list) and so is every line after it: "
                            "neither JSON Lines (one object per line) nor one JSON array. "
                            + json_list_lines_fix(path, lists))
        return "json"
    if stripped.startswith("{") and records_field:
        return "json"  # one object, its records under records_field
    if stripped.startswith("{"):
        first = next(line for line in lines if line.strip())
        if cut_off and first is lines[-1]:
            return "jsonl"  # a first line too long to sample: the reader checks it
        try:
            if isinstance(json.loads(first), dict):
                return "jsonl"
        except ValueError:
            pass
        raise DataError(f"file `{path}` starts with `{{` but its first line is not a JSON object: "
                        "a pretty-printed JSON object. If it holds the records as a list under one of its fields "
                        "(`{\"data\": [...]}`), set `records_field` to that field; else write one JSON object per line "
                        "(jsonl) or a JSON array, or set `format: text` for this source.")
    whole = lines[:-1] if cut_off else lines
    for fmt, sep in (("tsv", "\t"), ("csv", ",")):
        try:
            rows = [row for row in csv.reader(whole, delimiter=sep, quoting=table_quoting(fmt, whole)) if row]
        except csv.Error:
            continue
        if len(rows) >= 2 and len(rows[0]) >= 2:
            matching = sum(len(row) == len(rows[0]) for row in rows[1:])
            if matching >= 0.9 * (len(rows) - 1):  # a ragged row is then the reader's `bad_row`, named
                return fmt
    filled = [line for line in whole if line.strip()]
    if columns:
        return "tsv" if "\t" in filled[0] else "csv"
    table_name = re.search(r"\.(csv|tsv)(\.(gz|bz2|xz))?$", path.name, re.IGNORECASE)
    if len(filled) >= 2 and (table_name or filled[0].strip().strip('"').strip() == text_field):
        with contextlib.suppress(csv.Error):  # one column: its quotes and line breaks are the table's
            if all(len(row) == 1 for row in csv.reader(whole) if row):
                return "csv"
    return "text"


@dataclass
class Chunk:
    """A unit of work: consecutive records of one file."""

    file_index: int
    path: str
    fmt: str
    encoding: str
    first_record: int  # 1-based line number (text/jsonl) or record number (json/csv/parquet, 1-based)
    records: list  # bytes lines (text/jsonl) or parsed records with their numbers (others)
    nbytes: int  # input bytes this chunk covers (progress bar)
    line_encoding: str | None = None  # the byte lines' encoding where it is not the file's (decoded, re-encoded)
    last_allowed: bool = False  # the chunk that ends at the source's max_records (it is counted in the report)


def json_records(spec: SourceConfig, path: Path, data: Any) -> list:
    """The records of a JSON file: its array, or with `records_field` the array under that field of its object
    (`{"version": 1, "data": [...]}`, as `datasets`' json builder reads with `field`)."""
    where = f"source `{spec.name}`: file `{path}`"
    if spec.records_field is None:
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            hint = (f" If its records are the list under `{lists[0]}`, set `records_field: {lists[0]}`." if lists
                    else "")
            raise DataError(f"{where} holds a JSON object (fields {_fields_present(data)}), expected an array of "
                            f"records (or jsonl, one object per line).{hint}")
        if not isinstance(data, list):
            raise DataError(f"{where} holds a JSON {type(data).__name__}, expected an array of objects (or use "
                            "jsonl, one object per line).")
        return data
    if not isinstance(data, dict) or not isinstance(data.get(spec.records_field), list):
        found = (f"its object's fields are {_fields_present(data)}" if isinstance(data, dict)
                 else f"it holds a JSON {type(data).__name__}, not an object")
        raise DataError(f"{where}: `records_field: {spec.records_field}` names no list of records: {found}. Fix "
                        "`records_field`, or remove it for a file that is one array.")
    return data[spec.records_field]


def _chunks_of(items: list, file_index: int, path: Path, fmt: str, encoding: str, size: int) -> Iterator[Chunk]:
    for start in range(0, len(items), CHUNK_LINES):
        part = items[start:start + CHUNK_LINES]
        yield Chunk(file_index, str(path), fmt, encoding, start + 1, part, size * len(part) // max(1, len(items)))


def _read_table(path: Path, fmt: str, encoding: str, spec: SourceConfig) -> list[tuple[int, dict]]:
    """csv/tsv rows as (the number of the row's first line, {column: value} | RecordError | None for a blank
    row); the first row that is not blank names the columns unless `columns` is given (then every row is
    data). A row is checked by decode_record where it holds bytes not in the file's encoding (or in a file
    detected as GB18030), as a line of a text file is: named by its line, or skipped under `on_error: skip`."""
    rows, escaped_lines = [], []  # the numbers of lines holding a byte that did not decode
    check_every_row = spec.encoding == "auto" and encoding == "gb18030"
    delimiter = "\t" if fmt == "tsv" else ","

    def lines(f: io.TextIOWrapper) -> Iterator[str]:
        for number, line in enumerate(f, 1):
            if not line.isascii() and _ESCAPED_BYTE.search(line):
                escaped_lines.append(number)
            yield line

    quoting = table_quoting(fmt, sample_lines(path, encoding)[0])
    with open_text(path, "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding,
                   errors="surrogateescape") as (f, _):
        reader = csv.reader(lines(f), delimiter=delimiter, quoting=quoting)
        names, start = spec.columns, 1  # the row's first line
        try:
            for row in reader:
                row_start, start = start, reader.line_num + 1
                if check_every_row or (escaped_lines and escaped_lines[-1] >= row_start):
                    first_bad = escaped_lines[bisect.bisect_left(escaped_lines, row_start):][:1] or [reader.line_num]
                    raw = delimiter.join(row).encode(encoding, "surrogateescape")
                    checked = decode_record(spec, str(path), f"line {first_bad[0]}", raw, encoding)
                    if isinstance(checked, RecordError):
                        if names is None:
                            raise DataError(f"source `{spec.name}`: `{path}` line {row_start}, the header, {checked}")
                        rows.append((first_bad[0], checked))
                        continue
                if not any(cell.strip() for cell in row):
                    rows.append((row_start, None))  # blank lines before the header too
                    continue
                if names is None:
                    names = [c.strip() for c in row]
                    if len(names) == 1 and spec.template is None and spec.text_field == "text" != names[0]:
                        logger.info("source `%s`: `%s` has one column, `%s`: its text", spec.name, path, names[0])
                        names = ["text"]  # a one-column table's column is its text (an Excel export's `病历内容`)
                    continue
                if len(row) != len(names):
                    rows.append((row_start, RecordError(
                        f"has {counted(len(row), 'column')} but the header has {len(names)} "
                        f"({', '.join(names)}). Quote "
                        "fields that contain the delimiter, or set `columns:`.", "bad_row")))
                    continue
                rows.append((row_start, dict(zip(names, row))))
        except UnicodeDecodeError as e:  # UTF-16/32 code units that surrogateescape cannot keep
            raise DataError(_decode_error_message(spec, str(path), f"line {reader.line_num + 1}", encoding, e,
                                                  near=True)) from None
        except csv.Error as e:
            raise DataError(f"source `{spec.name}`: `{path}` line {reader.line_num}: {e}.") from None
    return rows


WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$")


def _group_lines(lines: Iterator[tuple[int, str | RecordError]], starts: Callable[[str, bool], bool],
                 strip: bool) -> Iterator[tuple[int, str | RecordError]]:
    """Lines -> documents, numbered by their first line: a line for which `starts(line, after_a_blank_line)`
    holds begins the next document; blank lines are dropped. A line that is no text (a bad JSON line) passes
    through as its error, for the skip policy."""
    start, parts, after_blank = 0, [], False
    for number, line in lines:
        if isinstance(line, RecordError):
            yield number, line
            continue
        line = line.rstrip("\r\n")
        if not line.strip():
            after_blank = True
            continue
        if parts and starts(line, after_blank):
            yield start, "\n".join(parts)
            parts = []
        start = start if parts else number
        parts.append(line.strip() if strip else line)
        after_blank = False
    if parts:
        yield start, "\n".join(parts)


def group_wikitext_articles(lines: Iterator[tuple[int, str | RecordError]]) -> Iterator[tuple[int, str | RecordError]]:
    """WikiText's one-paragraph-per-line layout -> whole articles: each ` = Title = ` line starts a
    document holding the title, its ` = = Section = = ` headings and paragraphs."""
    return _group_lines(lines, lambda line, _: bool(WIKITEXT_TITLE.match(line)), strip=True)


def group_paragraphs(lines: Iterator[tuple[int, str | RecordError]]) -> Iterator[tuple[int, str | RecordError]]:
    """Blocks of lines between blank lines -> one document each (a textbook's paragraphs; `datasets`' text
    builder calls it sample_by: paragraph)."""
    return _group_lines(lines, lambda _, after_blank: after_blank, strip=False)


def group_document(lines: Iterator[tuple[int, str | RecordError]]) -> Iterator[tuple[int, str | RecordError]]:
    """A whole file -> one document, its blank lines (paragraph breaks) kept (sample_by: document)."""
    parts = []
    for number, line in lines:
        if isinstance(line, RecordError):
            yield number, line
            continue
        parts.append(line.rstrip("\r\n"))
    text = "\n".join(parts).strip("\n")
    if text:
        yield 1, re.sub(r"\n{3,}", "\n\n", text)


LINE_GROUPS = {"paragraph": group_paragraphs, "document": group_document,
               "wikitext_articles": group_wikitext_articles}


def _text_lines(chunks: Iterator[Chunk], spec: SourceConfig) -> Iterator[tuple[int, str | RecordError]]:
    """(number, text) of every line-like record of these chunks: decoded text lines, or the text field of
    jsonl records and hub rows; a record without one gives its RecordError instead."""
    for chunk in chunks:
        for i in range(len(chunk.records)):
            number, obj = _parse_record(spec, chunk, i)
            try:
                if isinstance(obj, dict):
                    obj = _require_text(obj, spec.text_field, "text_field")
                elif obj is not None and not isinstance(obj, (str, RecordError)):
                    raise not_an_object(obj, chunk)
            except RecordError as e:
                obj = e
            yield number, obj or ""


def read_chunks(inputs: "SourceInput | list[Path]", spec: SourceConfig) -> Iterator[Chunk]:
    """Chunks of records from a source's input; with `group`, chunks of whole grouped documents, file by
    file (an article never runs on into the next file); with `max_records`, its first N records only."""
    if isinstance(inputs, list):
        inputs = SourceInput(files=inputs)
    left = spec.max_records  # records still allowed; a source with more ends in a chunk marked last_allowed
    for chunk in _grouped_chunks(inputs, spec):
        if left is not None and len(chunk.records) > left:
            yield dataclasses.replace(chunk, records=chunk.records[:left], last_allowed=True,
                                      nbytes=chunk.nbytes * left // len(chunk.records))
            return
        left = None if left is None else left - len(chunk.records)
        yield chunk


def _grouped_chunks(inputs: "SourceInput", spec: SourceConfig) -> Iterator[Chunk]:
    chunks = _read_raw_chunks(inputs, spec)
    if spec.group is None or inputs.dataset is not None and spec.group in ("paragraph", "document"):
        yield from chunks  # (a hub text builder's sample_by grouped them, file by file)
        return
    for _, file_chunks in itertools.groupby(chunks, key=lambda chunk: chunk.file_index):
        first = next(file_chunks)
        if first.fmt == "empty":  # counted as skipped by format_chunk
            yield first
            continue
        articles = LINE_GROUPS[spec.group](_text_lines(itertools.chain([first], file_chunks), spec))
        while part := list(itertools.islice(articles, CHUNK_LINES)):
            yield Chunk(first.file_index, first.path, f"{first.fmt} ({spec.group})", first.encoding, part[0][0], part,
                        sum(len(t) for _, t in part if isinstance(t, str)))


def _read_raw_chunks(inputs: "SourceInput", spec: SourceConfig) -> Iterator[Chunk]:
    if inputs.dataset is not None:
        import datasets

        number = 1
        # .iter, not iter(): in a DataLoader worker, iter() of a streamed dataset reads only that worker's
        # files, and StreamedSource shards by document itself (a dataset of one file would starve workers)
        batches = inputs.dataset.iter(batch_size=CHUNK_LINES)
        while True:
            try:
                columns = next(batches, None)
            except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:  # a stream reads files lazily
                raise hub_read_error(spec.name, f"`{inputs.label}` (after record {number - 1:,})", e) from None
            if columns is None:
                return
            batch = [dict(zip(columns, row)) for row in zip(*columns.values())]
            yield Chunk(0, inputs.label, "hub", "utf-8", number, list(enumerate(batch, number)), len(batch))
            number += len(batch)
    for file_index, path in enumerate(inputs.files):
        if path.stat().st_size == 0:  # only under on_error: skip (resolve_files)
            yield Chunk(file_index, str(path), "empty", "-", 1, [], 0)
            continue
        try:
            encoding = detect_encoding(path, spec.encoding, skip_bad_lines=spec.on_error == "skip")
            fmt = detect_format(path, spec.format, encoding, spec.text_field, spec.columns, spec.records_field)
        except DataError as e:
            raise DataError(f"source `{spec.name}`: {e}") from None
        size = path.stat().st_size
        if fmt in ("text", "jsonl"):
            yield from _line_chunks(path, file_index, fmt, encoding, spec)
            continue
        if fmt == "json":
            with open_input(path) as (f, _):
                data = f.read()
            try:
                text = data.decode(encoding, "surrogateescape")
            except UnicodeDecodeError as e:  # UTF-16/32 code units that surrogateescape cannot keep
                raise DataError(_decode_error_message(spec, str(path), f"byte {e.start}", encoding, e)) from None
            escaped = _ESCAPED_BYTE.search(text)
            try:
                items = json.loads(text.removeprefix("\ufeff"))
            except ValueError as e:
                if escaped and spec.on_error != "skip":  # bytes not in the encoding where they break the JSON
                    _raise_for_escaped_byte(spec, str(path), text, escaped.start(), encoding)
                raise DataError(f"source `{spec.name}`: file `{path}` is not a valid JSON array "
                                f"({e}). If it holds one object per line, set `format: jsonl`.") from None
            items = json_records(spec, path, items)
            if escaped or (spec.encoding == "auto" and encoding == "gb18030"):  # named, or skipped, by record
                items = [checked_record(spec, str(path), f"record {n}", item, encoding)
                         for n, item in enumerate(items, 1)]
            records = list(enumerate(items, 1))
        elif fmt in ("csv", "tsv"):
            records = _read_table(path, fmt, encoding, spec)
        else:  # parquet
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise DataError(f"source `{spec.name}`: `{path}` is not a readable parquet file ({e}).") from None
            records = list(enumerate(table.to_pylist(), 1))
        yield from _chunks_of(records, file_index, path, fmt, encoding, size)


def _line_chunks(path: Path, file_index: int, fmt: str, encoding: str, spec: SourceConfig) -> Iterator[Chunk]:
    """A line-based file in chunks of byte lines, which the tokenizer processes decode. Where the byte \\n is
    not the line break (UTF-16/32, or a file breaking lines with a lone CR), the lines are decoded here
    and handed on as UTF-8; bytes that do not decode stay bytes (surrogateescape), so the line that holds
    them is named, or skipped, like a bad line of any file. The chunk keeps the file's encoding for the report."""
    with open_input(path) as (f, _):
        head = f.read(1 << 16)
    line_no, done = 1, 0
    if "a\n".encode(encoding).endswith(b"a\n") and (b"\n" in head or b"\r" not in head):
        with open_input(path) as (f, raw):
            while lines := list(itertools.islice(f, CHUNK_LINES)):
                yield Chunk(file_index, str(path), fmt, encoding, line_no, lines, raw.tell() - done)
                line_no, done = line_no + len(lines), raw.tell()
        return
    with open_text(path, encoding, errors="surrogateescape") as (f, raw):
        while True:
            lines = []
            try:
                lines.extend(line.encode("utf-8", "surrogateescape") for line in itertools.islice(f, CHUNK_LINES))
            except UnicodeDecodeError as e:  # decoded 8 KB at a time: the bad byte is at or after this line
                raise DataError(_decode_error_message(spec, str(path), f"line {line_no + len(lines)}", encoding, e,
                                                      near=True)) from None
            if not lines:
                return
            yield Chunk(file_index, str(path), fmt, encoding, line_no, lines, raw.tell() - done, "utf-8")
            line_no, done = line_no + len(lines), raw.tell()


def _decode_error_message(spec: SourceConfig, path: str, where: str, encoding: str, err: UnicodeDecodeError,
                          near: bool = False, line: bytes | None = None) -> str:
    """Names the file, line and byte; a `line` (not given for a file's first) that reads in the other common
    encoding may be one line of a file that mixes encodings, where `encoding:` cannot help and converting or
    skipping does."""
    where = f"{where} or a line shortly after it" if near else where
    bom = encoding.startswith(("utf-16", "utf-32"))
    detected = f" (detected from the {'byte-order mark' if bom else 'first MB'})" if spec.encoding == "auto" else ""
    other = "gb18030" if encoding.replace("-", "").lower().startswith("utf8") else "utf-8"
    problem = (f"source `{spec.name}`: file `{path}` {where} is not valid {encoding}{detected} "
               f"(byte 0x{err.object[err.start]:02x})")
    if line is not None and _decodes(line, other):
        return (f"{problem}, but reads as {other}. If the whole file is {other}, set `encoding: {other}` for this "
                "source; if it mixes encodings, convert it to one (e.g. with iconv, part by part) or set "
                f"`on_error: skip` to skip the lines that are not {encoding} (counted as `bad_encoding`).")
    setting = "the file's real encoding" if bom else f"`encoding: {other}` (or the file's real encoding)"
    skip = "" if near else "; if only some lines are like this, `on_error: skip` skips and counts them"
    return f"{problem}. Set {setting} for this source, or re-save the file as UTF-8{skip}."


def decode_record(spec: SourceConfig, path: str, where: str, raw: bytes, encoding: str,
                  decode_as: str | None = None) -> str | RecordError:
    """The text of a line's or a record's bytes (`raw`, in `decode_as`, by default the file's `encoding`).
    Bytes not in the encoding, or a UTF-8 line in a file detected as GB18030 (there it would decode,
    garbled, without an error), make a `bad_encoding` RecordError under `on_error: skip`, else a DataError
    naming the place and the fix: it is not the record that is wrong, but the file or the `encoding` setting."""
    skip = spec.on_error == "skip"
    try:
        text = raw.decode(decode_as or encoding)
    except UnicodeDecodeError as e:
        if skip:
            return RecordError(f"is not valid {encoding} (byte 0x{e.object[e.start]:02x}): a line in another "
                               "encoding?", "bad_encoding")
        line = raw if where != "line 1" else None
        raise DataError(_decode_error_message(spec, path, where, encoding, e, line=line)) from None
    if spec.encoding != "auto" or encoding != "gb18030":
        return text
    utf8 = utf8_line(raw if decode_as is None else text.encode(encoding))
    if utf8 is None:
        return text
    problem = f"reads as UTF-8 ({snippet(utf8)}), not as the GB18030 the file was detected as ({snippet(text)})"
    if skip:
        return RecordError(f"{problem}: a line in another encoding?", "bad_encoding")
    raise DataError(f"source `{spec.name}`: file `{path}` {where} {problem}: the file mixes encodings. Convert it to "
                    "one (e.g. with iconv, part by part), or set `on_error: skip` for this source to skip the lines "
                    "that are not GB18030 (counted as `bad_encoding`). If it is GB18030 after all, set `encoding: "
                    "gb18030`.")


def _raise_for_escaped_byte(spec: SourceConfig, path: str, text: str, position: int, encoding: str) -> None:
    """Under `on_error: raise`: names the line of a file decoded whole (errors="surrogateescape") that holds
    the byte at `position`, which did not decode, as decode_record names a line."""
    start, end = text.rfind("\n", 0, position) + 1, text.find("\n", position)
    line = text[start:end if end >= 0 else len(text)].encode(encoding, "surrogateescape")
    number = text.count("\n", 0, start) + 1
    decode_record(spec, path, f"line {number}", line, encoding)


def _strings_of(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _strings_of(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings_of(value)


def checked_record(spec: SourceConfig, path: str, where: str, record: Any, encoding: str) -> Any:
    """A parsed record of a file decoded whole, or the RecordError of decode_record for its strings."""
    raw = "\n".join(_strings_of(record)).encode(encoding, "surrogateescape")
    checked = decode_record(spec, path, where, raw, encoding)
    return checked if isinstance(checked, RecordError) else record


_SPACES = re.compile(r"[ \t\f\v]+")
# Written without spaces between them: CJK punctuation, kana, ideographs and full-width punctuation (not the
# full-width letters and digits, U+FF10-FF19, FF21-FF3A, FF41-FF5A)
_CJK_CHAR = ("\u3000-\u303f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
             "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65")
_CJK_LINE_BREAK = re.compile(rf"(?<=[{_CJK_CHAR}])[ \t]*\n\s*|\s*\n[ \t]*(?=[{_CJK_CHAR}])")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")


def clean_text(text: str, spec: SourceConfig) -> str:
    """Normalise line endings, strip, collapse runs of spaces (optionally line breaks too: into a space, or
    nothing beside CJK text)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not spec.keep_newlines:  # a break next to Chinese text joins without a space (第一行\n第二行: 第一行第二行)
        text = _CJK_LINE_BREAK.sub("", text).replace("\n", " ")
    if spec.collapse_spaces:
        text = _SPACES.sub(" ", text)
        if "\n" in text:
            text = _BLANK_LINES.sub("\n\n", "\n".join(line.strip() for line in text.split("\n")))
    return text.strip()


def _parse_record(spec: SourceConfig, chunk: Chunk, index: int) -> tuple[int, str | dict | None]:
    """(record number, a text line | a record | a RecordError | None for a blank line). A line whose bytes
    are not in the file's encoding is a `bad_encoding` RecordError under `on_error: skip`, else a DataError
    (it is not the record that is wrong, but the file or the `encoding` setting)."""
    record = chunk.records[index]
    if chunk.fmt not in ("text", "jsonl"):
        return record  # (number, record | RecordError for a malformed csv row)
    number = chunk.first_record + index
    line = decode_record(spec, chunk.path, f"line {number}", record, chunk.encoding, chunk.line_encoding)
    if isinstance(line, RecordError):
        return number, line
    if number == 1:
        line = line.removeprefix("\ufeff")
    line = line.rstrip("\r\n")
    if not line.strip():
        return number, None
    if chunk.fmt == "text":
        return number, line
    try:
        return number, json.loads(line)
    except ValueError as e:
        col = getattr(e, "colno", 1)
        snippet = line[max(0, col - 30):col + 30]
        problem = f"is not valid JSON ({getattr(e, 'msg', e)}, column {col}, near {snippet!r})"
        if number == 1 and line.lstrip().startswith("["):
            return number, RecordError(f"{problem}: the file starts with `[`, so it is one JSON array, not JSON "
                                       "Lines. Set `format: json` (or `auto`) for this source.", "invalid_json")
        if not record.endswith((b"\n", b"\r")):
            problem += ", and it is the last line with no line break: the file looks truncated (an interrupted copy?)"
        return number, RecordError(f"{problem}. Fix or remove the line, or set `on_error: skip` for this source.",
                                   "invalid_json")


def record_unit(fmt: str) -> str:
    """How a record is numbered in messages: by line in line-based formats, else by position."""
    return "record" if fmt in ("json", "parquet", "hub") else "line"


def _count(counts: dict, key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def format_chunk(spec: SourceConfig, chunk: Chunk) -> tuple[list[str], list[int], dict[str, int], list[tuple]]:
    """Records -> (clean texts, their line/record numbers, counts, skip notes). Every record that does not
    become a text is counted by reason; bad records raise unless the source says `on_error: skip`, and
    then the first few of each reason come back as (reason, message) notes for a SkipLog."""
    render = make_renderer(spec.template, spec.text_field, f"source `{spec.name}`")
    fields = template_fields(spec.template)
    texts, record_ids, counts, notes = [], [], {}, []
    unit = record_unit(chunk.fmt)
    if chunk.fmt == "empty":
        counts["skipped:empty_file"] = 1
        notes.append(("empty_file", f"`{chunk.path}` is empty"))
    if chunk.last_allowed:
        counts["stopped_at_max_records"] = spec.max_records
    for i in range(len(chunk.records)):
        number, obj = _parse_record(spec, chunk, i)
        if obj is None:
            _count(counts, "blank_lines")
            continue
        _count(counts, "records")
        try:
            if isinstance(obj, RecordError):
                raise obj
            if isinstance(obj, str):
                if spec.template is not None:
                    raise RecordError("is plain text, but a template needs structured records (jsonl, json, csv, "
                                      "parquet). Remove `template` or fix `format`.", "not_an_object")
                text = obj
            elif not isinstance(obj, dict):
                raise not_an_object(obj, chunk)
            else:
                text = render(obj)
                for name in record_missing_fields(fields, obj):
                    _count(counts, f"missing_field:{name}")
            text = clean_text(text, spec)
            if len(text) > spec.max_document_chars:
                raise RecordError(f"is {len(text):,} characters long, above `max_document_chars` "
                                  f"{spec.max_document_chars:,}: a file without line breaks, or not text? Split it "
                                  "into one document per line, raise `max_document_chars`, or set `on_error: skip`.",
                                  "too_long")
        except RecordError as e:
            if spec.on_error != "skip":
                if e.reason == "missing_field" and chunk.fmt in ("csv", "tsv") and spec.columns is None:
                    e = RecordError(f"{e} If the file has no header row, name its columns with `columns: [...]`.",
                                    e.reason)
                skip = " If only some records are like this, `on_error: skip` counts and reports them instead."
                raise RecordError(f"source `{spec.name}`: `{chunk.path}` {unit} {number} {e}{skip}", e.reason) from None
            _count(counts, f"skipped:{e.reason}")
            if counts[f"skipped:{e.reason}"] <= SkipLog.LIMIT:
                told = re.sub(r",? or set `on_error: skip`( for this source)?", "", str(e))  # it is set
                notes.append((e.reason, f"`{chunk.path}` {unit} {number}: {told}"))
            continue
        if not text:
            _count(counts, "dropped:empty")
            continue
        if len(text) < spec.min_chars:
            _count(counts, "dropped:min_chars")
            continue
        if "\ufffd" in text:
            _count(counts, "texts_with_U+FFFD")
        texts.append(text)
        record_ids.append(number)
    return texts, record_ids, counts, notes


class SkipLog:
    """Logs the first few skipped records of each reason once per source, however many chunks (and
    worker processes) they come from; the data report counts them all."""

    LIMIT = 3

    def __init__(self, source: str):
        self.source, self.logged = source, collections.Counter()

    def __call__(self, notes: list[tuple[str, str]]) -> None:
        for reason, message in notes:
            self.logged[reason] += 1
            if self.logged[reason] <= self.LIMIT:
                logger.warning("source `%s`: skipped %s", self.source, message)


def iter_records(spec: SourceConfig, inputs: "SourceInput | None" = None,
                 counts: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """('FILE line N' or 'FILE record N', text) for every text of one source, in order; `counts` gathers
    what did not become text, by reason."""
    log_skips = SkipLog(spec.name)
    for chunk in read_chunks(inputs or SourceInput.open(spec), spec):
        texts, numbers, chunk_counts, notes = format_chunk(spec, chunk)
        for reason, n in chunk_counts.items():
            if counts is not None:
                _count(counts, reason, n)
        log_skips(notes)
        unit = record_unit(chunk.fmt)
        yield from ((f"{chunk.path} {unit} {number}", text) for number, text in zip(numbers, texts))


def iter_texts(spec: SourceConfig, inputs: "SourceInput | None" = None) -> Iterator[str]:
    """All training texts of one source, in order (used to train a tokenizer)."""
    return (text for _, text in iter_records(spec, inputs))


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
    if add_bos not in ("auto", "always", "never"):
        raise DataError(f"add_bos must be auto, always or never, got `{add_bos}`.")
    if add_bos == "always" and tokenizer.bos_token_id is None:
        raise DataError("add_bos: always, but the tokenizer has no BOS token. Use `add_bos: never`.")
    bos = tokenizer.bos_token_id
    adds = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    if add_bos == "always" and not adds:  # the tokenizer saved with the model encodes as it does now
        logger.warning("add_bos always: training documents start with BOS, but the tokenizer (saved with the model) "
                       "does not add it when it encodes: prepend BOS to text for this model, or use `add_bos: auto`")
    if add_bos == "never" and adds:
        logger.warning("add_bos never: training documents have no BOS, but the tokenizer (saved with the model) adds "
                       "it when it encodes: encode text for this model with add_special_tokens=False, or use "
                       "`add_bos: auto`")
    return bos if add_bos == "always" or add_bos == "auto" and adds else None


def record_special_token_flags(directory: Path, tokenizer) -> None:
    """Write `add_bos_token` / `add_eos_token` into a saved tokenizer_config.json as the tokenizer encodes:
    transformers 5 leaves them out, and llama.cpp's conversion then assumes a SentencePiece tokenizer adds BOS
    (every prompt would start with a token the model never trained after). `add_bos: always|never` against the
    tokenizer's own behaviour is warned about by resolve_bos."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    config["add_bos_token"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    config["add_eos_token"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    atomic_write_text(path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def byte_token_mask(tokenizer) -> np.ndarray:
    """True for the ids that stand for raw bytes rather than text: SentencePiece byte-fallback pieces
    (<0xE4>) and byte-level BPE tokens that are not whole UTF-8 characters (a third of 高)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in type(backend.decoder).__name__ + str(backend.decoder)
    mask = np.zeros(len(tokens), dtype=bool)
    for i, token in enumerate(tokens):
        if token is None:
            continue
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            mask[i] = True
        elif byte_level and i not in tokenizer.all_special_ids:
            raw = bytes(_BYTE_LEVEL_DECODE.get(c, 0) for c in token)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                mask[i] = True
    return mask


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which every byte-level BPE writes tokens in."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


_BYTE_LEVEL_DECODE = {c: b for b, c in byte_level_alphabet().items()}
_worker_tokenizer = None


def start_tokenizer_pool(num_proc: int, info: TokenizerInfo):
    """Worker processes that leave Ctrl-C, which reaches the whole process group, to the main process (it stops
    them): they start with SIGINT ignored, which a spawned interpreter keeps, so that one still starting up
    prints no traceback either."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        return multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (info,))
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _init_worker(info: TokenizerInfo) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import Tokenizer

    _worker_tokenizer = (info.fingerprint, Tokenizer.from_str(info.backend_json))


def _encode(info: TokenizerInfo, texts: list[str]) -> list[list[int]]:
    if info.backend_json is None:
        return info.slow(texts, add_special_tokens=False)["input_ids"]
    if _worker_tokenizer is None or _worker_tokenizer[0] != info.fingerprint:  # in-process: another run's tokenizer
        _init_worker(info)
    # encode_batch_fast: the same ids without character offsets, which nothing here reads (~1.5x faster)
    return [e.ids for e in _worker_tokenizer[1].encode_batch_fast(texts, add_special_tokens=False)]


class MappedArray(np.memmap):
    """A memory-mapped array file that pickles as its path: DataLoader workers started by spawn or
    forkserver (macOS; Linux from Python 3.14) map the file again instead of each receiving a copy of
    the corpus. Views (slices) of it pickle as ordinary arrays."""

    def __reduce_ex__(self, protocol):
        reopen = self.__dict__.get("reopen")  # set on the whole mapping only: views do not inherit it
        return (_map, reopen) if reopen else super().__reduce_ex__(protocol)


def _map(path: Path, dtype) -> np.ndarray:
    """A raw array file, memory-mapped read-only (an empty file gives an empty array)."""
    size = path.stat().st_size // np.dtype(dtype).itemsize
    if not size:
        return np.zeros(0, dtype=dtype)
    mapped = MappedArray(path, dtype=dtype, mode="r", shape=(size,))
    mapped.reopen = (path, dtype)
    return mapped


DOC_ARRAYS = {"doc_files": np.int32, "doc_records": np.int64, "doc_hashes": np.uint64, "doc_chars": np.int64}


def text_hash(text: str) -> int:
    """64-bit content hash of a cleaned text, for exact dedup across sources and splits."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def tokenize_chunk(spec: SourceConfig, info: TokenizerInfo, chunk: Chunk) -> dict:
    """Worker: format, clean and tokenize one chunk -> flat tokens, per-document arrays, counts."""
    texts, record_ids, counts, notes = format_chunk(spec, chunk)
    ids = _encode(info, texts) if texts else []
    # [BOS] ids EOS per document, laid out with numpy: no second Python list per document
    specials = 1 + (info.bos_id is not None)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + specials
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint32)
    text_positions = np.ones(len(tokens), dtype=bool)
    for position, token in ((ends - 1, info.eos_id), (ends - lengths, info.bos_id)):
        if token is not None:
            tokens[position], text_positions[position] = token, False
    tokens[text_positions] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32,
                                         count=len(tokens) - specials * len(ids))
    return {
        "tokens": tokens,
        "lengths": lengths,
        "doc_files": np.full(len(ids), chunk.file_index, dtype=np.int32),
        "doc_records": np.asarray(record_ids, dtype=np.int64),
        "doc_hashes": np.fromiter(map(text_hash, texts), dtype=np.uint64, count=len(texts)),
        "doc_chars": np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)),
        "counts": counts, "skip_notes": notes, "nbytes": chunk.nbytes,
        "file": (chunk.file_index, chunk.fmt, chunk.encoding),
    }


class FileDigests:
    """Content hashes of input files, memoised by (size, mtime_ns, ctime_ns) like git's index, so a rerun
    with unchanged inputs reads no file twice. The change time is in the key because a copy that keeps
    the modification time (`cp -p`, `rsync -t`, tar) can give new content the old size and mtime; no
    program can set ctime. Kept in `cache_dir/file_digests.json`."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / "file_digests.json"
        self.memo = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self.memo.get(key)
        if entry and entry[:-1] == stamp:
            return entry[-1]
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
        self.memo[key] = [*stamp, h.hexdigest()]
        return self.memo[key][-1]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.memo))


PROGRESS = "progress.json"  # in a token store's staging directory: how far its build got, to resume from
PROGRESS_SECONDS = 30.0  # how often a store build saves its progress (flushes its files, writes PROGRESS)


def own_staging_name(directory: Path) -> Path:
    """Where this process builds `directory`: a sibling named for the host and process."""
    return directory.with_name(f"{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _dead_staging_dirs(parent: Path) -> Iterator[Path]:
    """Staging directories in `parent` whose building process on this host has died (a killed run)."""
    host = socket.gethostname()
    for stale in parent.glob(f"*.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            yield stale


def staging_dir(directory: Path) -> Path:
    """A fresh temporary sibling to build `directory` in, renamed into place when complete. Siblings that
    builds on this host left behind when their process died are removed first, except the partial token
    stores (resumable_staging_dir resumes or removes those)."""
    for stale in _dead_staging_dirs(directory.parent):
        if not (stale / PROGRESS).is_file():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = own_staging_name(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _partial_stores(stores: Path) -> Iterator[tuple[Path, str, str]]:
    """(directory, source, key) of the partial token stores in `stores` that no live build on this host is
    writing: this process's own (an earlier build in it was interrupted, or a dead process had its pid, as
    the PID 1 of every container start) and dead processes'."""
    own = f".tmp-{socket.gethostname()}-{os.getpid()}"
    for stale in itertools.chain(_dead_staging_dirs(stores), stores.glob(f"*{own}")):
        if (stale / PROGRESS).is_file():
            source, _, key = stale.name.split(".tmp-")[0].rpartition("-")
            yield stale, source, key


def remove_obsolete_partial_stores(directory: Path) -> None:
    """Remove the partial stores that a killed build of the same source (`SOURCE-KEY`) left on this host
    under another key: its files or settings have changed since, so no build will resume them."""
    source, _, key = directory.name.rpartition("-")
    for stale, stale_source, stale_key in _partial_stores(directory.parent):
        if stale_source == source and stale_key != key:
            logger.info("source `%s`: removing %s, a partial token store a killed build left under other files or "
                        "settings", source, stale)
            shutil.rmtree(stale, ignore_errors=True)


def resumable_staging_dir(directory: Path) -> tuple[Path, dict | None]:
    """staging_dir for a token store (`SOURCE-KEY`), and the progress of the build it continues: a partial
    store of the same key (also under another source name) that a dead build on this host left is claimed
    (renamed; if two processes try, one wins) and resumed."""
    key, claimed = directory.name.rpartition("-")[2], None
    for stale, _, stale_key in _partial_stores(directory.parent):
        if stale_key == key and claimed is None:
            with contextlib.suppress(OSError):  # another process claimed it first
                if stale != own_staging_name(directory):
                    os.rename(stale, own_staging_name(directory))
                claimed = own_staging_name(directory)
    if claimed is None:
        return staging_dir(directory), None
    progress = json.loads((claimed / PROGRESS).read_text(encoding="utf-8"))
    if progress.get("chunk_lines") != CHUNK_LINES or any(
            not (claimed / f"{name}.bin").is_file() or (claimed / f"{name}.bin").stat().st_size < size
            for name, size in progress["sizes"].items()):
        shutil.rmtree(claimed, ignore_errors=True)
        return staging_dir(directory), None
    return claimed, progress


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


CURRENT_UMASK = os.umask(0)
os.umask(CURRENT_UMASK)  # reading the umask means setting it: put it back at once


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~CURRENT_UMASK)  # mkstemp's 0600 would hide a shared cache or report from others
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TokenStore:
    """A source's documents as one flat memory-mapped token array plus per-document arrays.

    Layout of a store directory, raw little-endian arrays written chunk by chunk (so building holds
    no per-document list in memory) and memory-mapped when read: tokens.bin (uint16 when the vocab
    fits, else uint32), offsets.bin (int64, n_docs + 1), doc_files / doc_records (where each document
    came from), doc_hashes (for dedup), doc_chars (.bin each); meta.json is written last, and a
    directory without it is never used.
    """

    def __init__(self, directory: Path):
        self.dir = directory
        self.meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        self.offsets = _map(directory / "offsets.bin", np.int64)
        for name, dtype in DOC_ARRAYS.items():
            setattr(self, name, _map(directory / f"{name}.bin", dtype))
        self.tokens = _map(directory / "tokens.bin", np.dtype(self.meta["dtype"]))

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def damage(self) -> str | None:
        """Where the files disagree with meta.json (a copy of the cache cut short, a file missing or of another
        length; contents are not checked), else None:
        a damaged store fails later with an unrelated error (ragged blocks in the collator, ids out of range)."""
        n_docs, n_tokens = self.meta["n_docs"], self.meta["n_tokens"]
        lengths = {"tokens": (len(self.tokens), n_tokens), "offsets": (len(self.offsets), n_docs + 1),
                   **{name: (len(getattr(self, name)), n_docs) for name in DOC_ARRAYS}}
        wrong = [f"{name}.bin holds {have:,} values, not {want:,}" for name, (have, want) in lengths.items()
                 if have != want]
        if not wrong and (self.offsets[0] != 0 or self.offsets[-1] != n_tokens):
            wrong.append("offsets.bin does not span tokens.bin")
        return "; ".join(wrong) or None

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @staticmethod
    def build(directory: Path, spec: SourceConfig, inputs: SourceInput, info: TokenizerInfo,
              num_proc: int, key_material: dict, byte_mask: np.ndarray | None = None) -> None:
        """Tokenize every record of the source's input into a new store at `directory`, atomically. Every
        PROGRESS_SECONDS the files are flushed and the progress saved, so a build that dies (killed,
        preempted, interrupted, out of disk space) leaves a partial store that the next build of the same
        store resumes after its last saved chunk; a build stopped by bad data removes it (the fix changes
        the store's key)."""
        dtype = np.uint16 if info.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        tmp, progress = resumable_staging_dir(directory)
        done = progress or {"chunks": 0, "n_docs": 0, "n_tokens": 0, "nbytes": 0, "counts": {}, "files": {},
                            "seconds": 0.0}
        counts: dict[str, int] = dict(done["counts"])
        file_info: dict[int, tuple] = {int(i): tuple(v) for i, v in done["files"].items()}
        log_skips = SkipLog(spec.name)
        n_docs, n_tokens, n_chunks, nbytes = done["n_docs"], done["n_tokens"], done["chunks"], done["nbytes"]
        total = inputs.size()
        start = time.time() - done["seconds"]
        if progress:
            logger.info("source `%s`: resuming the tokenization an earlier run left at %.0f%% of its input (%s)",
                        spec.name, 100 * nbytes / max(total, 1), counted(n_docs, "document"))
        work = ((spec, info, chunk) for chunk in itertools.islice(read_chunks(inputs, spec), n_chunks, None))
        use_pool = (num_proc > 1 and info.backend_json is not None and not inputs.dataset
                    and total >= POOL_MIN_BYTES)
        pool = start_tokenizer_pool(num_proc, info) if use_pool else None
        from tqdm.auto import tqdm

        files: dict[str, Any] = {}

        def save_progress() -> None:
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
            atomic_write_text(tmp / PROGRESS, json.dumps({
                "chunk_lines": CHUNK_LINES, "chunks": n_chunks, "n_docs": n_docs, "n_tokens": n_tokens,
                "nbytes": nbytes, "counts": counts, "files": file_info, "seconds": time.time() - start,
                "sizes": {name: f.tell() for name, f in files.items()}}))

        try:
            results = bounded_imap(pool, _tokenize_star, work, 4 * num_proc) if pool else map(_tokenize_star, work)
            for name in ("tokens", "offsets", *DOC_ARRAYS):
                if progress:
                    os.truncate(tmp / f"{name}.bin", progress["sizes"][name])  # bytes after the last save
                files[name] = open(tmp / f"{name}.bin", "ab" if progress else "wb")
            with contextlib.ExitStack() as stack, tqdm(total=total, initial=nbytes, unit="rec" if inputs.dataset
                                                       else "B", unit_scale=True, desc=f"tokenize {spec.name}") as bar:
                for f in files.values():
                    stack.enter_context(f)
                if not progress:
                    np.zeros(1, dtype=np.int64).tofile(files["offsets"])
                saved = time.monotonic()
                for part in results:
                    part["tokens"].astype(dtype, copy=False).tofile(files["tokens"])
                    (n_tokens + np.cumsum(part["lengths"])).astype(np.int64).tofile(files["offsets"])
                    for name, dt in DOC_ARRAYS.items():
                        part[name].astype(dt, copy=False).tofile(files[name])
                    n_docs, n_tokens = n_docs + len(part["lengths"]), n_tokens + int(part["lengths"].sum())
                    if byte_mask is not None and len(part["tokens"]):
                        _count(counts, "byte_tokens", int(byte_mask[part["tokens"]].sum()))
                    for k, v in part["counts"].items():
                        _count(counts, k, v)
                    log_skips(part["skip_notes"])
                    file_info[part["file"][0]] = part["file"][1:]
                    n_chunks, nbytes = n_chunks + 1, nbytes + part["nbytes"]
                    bar.update(part["nbytes"])
                    if time.monotonic() - saved >= PROGRESS_SECONDS:
                        save_progress()
                        saved = time.monotonic()
                for f in files.values():
                    f.flush()
                    os.fsync(f.fileno())
                bar.total = bar.n  # all read: 100%, also where max_records ended the reading early
        except DataError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException:
            if (tmp / PROGRESS).is_file():
                saved = json.loads((tmp / PROGRESS).read_text(encoding="utf-8"))
                logger.warning("source `%s`: tokenization stopped; the %s saved so far are kept in %s, and the next "
                               "run with the same data and settings resumes from there", spec.name,
                               counted(saved["n_docs"], "document"), tmp)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if pool:
                pool.terminate()
        meta = {
            "version": STORE_VERSION, "source": spec.name, "dtype": np.dtype(dtype).name,
            "files": [{"path": inputs.label, "format": "hub", "encoding": "-"}] if inputs.dataset is not None
            else [{"path": str(f), "format": file_info.get(i, ("not read", "-"))[0],  # max_records reached first
                   "encoding": file_info.get(i, ("not read", "-"))[1]} for i, f in enumerate(inputs.files)],
            "n_docs": n_docs, "n_tokens": n_tokens,
            "counts": counts, "seconds": round(time.time() - start, 3), "key": key_material,
        }
        try:
            atomic_write_text(tmp / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1))
        except BaseException:
            if not (tmp / PROGRESS).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / PROGRESS).unlink(missing_ok=True)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same store first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not (directory / "meta.json").exists():
                raise


def bounded_imap(pool, fn, items: Iterator, ahead: int) -> Iterator:
    """Pool.imap in order, with at most `ahead` items in flight: Pool.imap itself reads its whole input
    into the task queue, which would hold the corpus in memory."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _tokenize_star(args):
    return tokenize_chunk(*args)


def store_key(spec: SourceConfig, inputs: SourceInput, info: TokenizerInfo, digests: FileDigests) -> tuple[str, dict]:
    material = {
        "version": STORE_VERSION,
        "text": spec.text_settings(),
        "input": inputs.identity(digests),
        "tokenizer": info.fingerprint,
        "bos": info.bos_id,
        "eos": info.eos_id,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    return digest, material


def load_or_build_store(spec: SourceConfig, inputs: SourceInput, info: TokenizerInfo, cache_dir: Path,
                        num_proc: int, digests: FileDigests, byte_mask=None) -> tuple[TokenStore, bool]:
    """The store for this input and these settings; returns (store, cache_hit)."""
    key, material = store_key(spec, inputs, info, digests)
    directory = cache_dir / "token_stores" / f"{spec.name}-{key}"
    hit = (directory / "meta.json").exists()
    if directory.parent.is_dir():
        remove_obsolete_partial_stores(directory)
    store = None
    if hit:
        try:
            store = TokenStore(directory)
            damage = store.damage()
        except (OSError, ValueError, KeyError) as e:  # a file missing, a size not whole values, meta.json cut
            damage = f"{type(e).__name__}: {e}"
        if damage:
            logger.warning("source `%s`: the cached token store %s is damaged (%s): tokenizing the source again",
                           spec.name, directory, damage)
            aside = directory.with_name(f"{directory.name}.damaged-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):  # another process (a second job) moved it first
                os.rename(directory, aside)
            shutil.rmtree(aside, ignore_errors=True)
            hit, store = (directory / "meta.json").exists(), None  # that process may have rebuilt it since
    if not hit:
        logger.info("source `%s`: tokenizing %s into %s", spec.name, inputs.label, directory)
        try:
            TokenStore.build(directory, spec, inputs, info, num_proc, material, byte_mask() if byte_mask else None)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            partial = own_staging_name(directory)
            kept = (f"the part tokenized so far is kept in {partial} and a rerun resumes it (delete it to free its "
                    "space instead)" if partial.is_dir() else "nothing partial was kept")
            raise DataError(f"source `{spec.name}`: no space left on device while writing its token store in "
                            f"{directory.parent} (about 2-4 bytes per token); {kept}. Free space, or set `cache_dir` "
                            "to a disk with room.") from None
    store = store if store is not None else TokenStore(directory)
    if store.n_docs == 0:
        raise no_text_left(spec, inputs.label, store.meta["counts"])
    return store, hit


def spec_label(spec: SourceConfig) -> str:
    paths = spec.path if isinstance(spec.path, list) else [spec.path]
    return f"hub:{spec.hub}" if spec.hub else ", ".join(map(str, paths))


def no_text_left(spec: SourceConfig, label: str, counts: dict[str, int]) -> DataError:
    missing = [k.split(":", 1)[1] for k, n in counts.items() if k.startswith("missing_field:") and
               n == counts.get("records")]
    check = (f"the template's fields ({', '.join(f'`{m}`' for m in missing)} in no record)" if missing else
             "the template's fields") if spec.template is not None else "`text_field`"
    return DataError(f"source `{spec.name}`: no text left in {label} (counts: {counts}). Check {check}, "
                     "`min_chars` and the files' content (`python data_utils.py preview CONFIG` shows the texts).")


# --------------------------------------------------------------------------------------------
# Packing: documents -> fixed-size blocks
# --------------------------------------------------------------------------------------------
class PackedBlocks:
    """`block_size` windows over the concatenation of the chosen documents of a store (a map-style
    torch dataset; torch is imported lazily so tokenizer worker processes start fast).

    Documents keep their EOS (and BOS, per policy) so blocks carry document boundaries; windows
    do not overlap; only the final remainder of fewer than `block_size` tokens is not used.
    """

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, block_size: int, document_positions: bool = False,
                 cum: np.ndarray | None = None):
        """`cum`: the documents' token offsets in their concatenation (len(doc_ids) + 1), when already
        computed (DocumentViews maps them from disk); else computed here."""
        self.store, self.block_size, self.document_positions = store, block_size, document_positions
        self.doc_ids = np.asanyarray(doc_ids, dtype=np.int64)  # a mapped array stays one (pickles as its path)
        if cum is None:
            lengths = store.offsets[self.doc_ids + 1] - store.offsets[self.doc_ids]
            cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.cum = cum
        self.n_tokens = int(self.cum[-1])
        self.n_blocks = self.n_tokens // block_size
        self.unused_tail_tokens = self.n_tokens - self.n_blocks * block_size

    def __len__(self) -> int:
        return self.n_blocks

    def _pieces(self, index: int) -> list[np.ndarray]:
        """The block's tokens, one array per document (or part of one) it holds."""
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
        return pieces

    def __getitem__(self, index: int) -> dict:
        pieces = self._pieces(index)
        positions = np.concatenate([np.arange(len(p)) for p in pieces]) if self.document_positions else None
        return block_item(np.concatenate(pieces), positions)


def block_item(tokens: np.ndarray, positions: np.ndarray | None = None) -> dict:
    """A training example: input_ids = labels (the model shifts them), and with document-aware attention
    position_ids that restart at every document, from which the attention builds a block-diagonal
    causal mask (sdpa and flash-attention, with use_cache=False), so no token sees another document."""
    import torch

    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    item = {"input_ids": ids, "labels": ids.clone()}
    if positions is not None:
        item["position_ids"] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    return item


PASS_DOCS = 1 << 18  # documents per step of the per-document passes: their memory does not grow with the corpus
VIEWS_VERSION = 1


def doc_slice(store: TokenStore, name: str, start: int, stop: int) -> np.ndarray:
    """Entries [start, stop) of a store's per-document array (or of its tokens), read rather than mapped: the
    pages of a mapping stay resident, so a mapped pass over every document would grow with the corpus."""
    dtype = (np.dtype(np.int64) if name == "offsets" else store.tokens.dtype if name == "tokens"
             else np.dtype(DOC_ARRAYS[name]))
    return np.fromfile(store.dir / f"{name}.bin", dtype=dtype, count=stop - start, offset=start * dtype.itemsize)


def hashes_of(store: TokenStore, ids: np.ndarray) -> Iterator[np.ndarray]:
    """The content hashes of documents `ids` (sorted) of a store, read in passes of PASS_DOCS documents."""
    for start in range(0, store.n_docs, PASS_DOCS):
        stop = min(start + PASS_DOCS, store.n_docs)
        lo, hi = np.searchsorted(ids, [start, stop])
        if hi > lo:
            yield doc_slice(store, "doc_hashes", start, stop)[np.asarray(ids[lo:hi]) - start]


def bucketed(chunks: Iterator[np.ndarray], key: str, n_buckets: int, work: Path,
             span: int | None = None) -> Iterator[np.ndarray]:
    """Row arrays partitioned by `key` % n_buckets into bucket files under `work`, then each bucket's rows in
    turn (its file removed once read): grouping equal keys holds one bucket in memory, as an external sort
    would, not the corpus. With `span` (keys in [0, span)), buckets are ranges of keys, yielded in order."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(work / f"bucket{k}.bin", "wb")) for k in range(n_buckets)]
            dtype = None
            for rows in chunks:
                dtype = rows.dtype
                bucket = (rows[key] % np.uint64(n_buckets) if span is None
                          else rows[key] * n_buckets // max(span, 1))
                order = np.argsort(bucket, kind="stable")
                bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
                for k in range(n_buckets):
                    rows[order[bounds[k]:bounds[k + 1]]].tofile(files[k])
        for k in range(n_buckets):
            if dtype is not None:
                yield np.fromfile(work / f"bucket{k}.bin", dtype=dtype)
            (work / f"bucket{k}.bin").unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def n_buckets_for(n_rows: int) -> int:
    return min(256, max(1, -(-n_rows // PASS_DOCS)))  # 256: open files


def dedup_keep_flags(stores: list[TokenStore], work: Path) -> tuple[list[np.ndarray], list[dict]]:
    """Exact dedup over stores in order (an earlier store keeps its copy), in memory that does not grow with
    the corpus beyond one flag per document: (hash, store, doc) rows are partitioned by hash into bucket
    files, and each bucket is deduplicated alone. Returns per store its keep flags and duplicate counts:
    `within_source` (a copy inside the same store was kept or dropped first) and `across_sources` (the
    store's first copy of a text an earlier store has)."""
    row = np.dtype([("hash", "<u8"), ("store", "<u2"), ("doc", "<i8")])

    def rows_of_stores() -> Iterator[np.ndarray]:
        for s, store in enumerate(stores):
            for start in range(0, store.n_docs, PASS_DOCS):
                stop = min(start + PASS_DOCS, store.n_docs)
                rows = np.empty(stop - start, row)
                rows["hash"], rows["store"], rows["doc"] = doc_slice(store, "doc_hashes", start, stop), s, np.arange(start, stop)
                yield rows

    keep = [np.zeros(store.n_docs, dtype=bool) for store in stores]
    within, across = np.zeros(len(stores), np.int64), np.zeros(len(stores), np.int64)
    n_buckets = n_buckets_for(sum(store.n_docs for store in stores))
    for rows in bucketed(rows_of_stores(), "hash", n_buckets, work):
        rows = rows[np.lexsort((rows["doc"], rows["store"], rows["hash"]))]
        new_text = np.ones(len(rows), dtype=bool)
        new_text[1:] = rows["hash"][1:] != rows["hash"][:-1]
        new_in_store = new_text.copy()
        new_in_store[1:] |= rows["store"][1:] != rows["store"][:-1]
        for s in range(len(stores)):
            keep[s][rows["doc"][new_text & (rows["store"] == s)]] = True
        within += np.bincount(rows["store"][~new_in_store], minlength=len(stores))
        across += np.bincount(rows["store"][new_in_store & ~new_text], minlength=len(stores))
    return keep, [{"within_source": int(w), "across_sources": int(a)} for w, a in zip(within, across)]


NEAR_DEDUP_RECALL = 0.98  # chance that MinHash LSH proposes a pair whose similarity is exactly the threshold
NEAR_DEDUP_PERMUTATIONS = 128  # at most: the time of the signature pass grows with them
NEAR_DEDUP_EXAMPLES = 3  # removals per source named in the data report, to judge the threshold by
NEAR_DEDUP_SIGNATURE = 64  # b-bit MinHash bytes per document that screen pairs before the exact check
NEAR_DEDUP_MARGIN = 0.25  # a pair whose signature estimate is this far below the threshold is not checked (5 sigma)
NEAR_DEDUP_GROUP = 4096  # pairs whose documents' n-gram sets are hashed together
NEAR_DEDUP_WINDOW = 4  # a document of an LSH bucket is also compared with the few before it, not only the first
PASS_TOKENS = 1 << 22  # tokens per step of the signature pass (a few arrays of 8 bytes per token)
_MIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def _mix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place: every input bit moves every output bit."""
    for multiplier in _MIX:
        x ^= x >> np.uint64(33)
        x *= multiplier
    x ^= x >> np.uint64(33)
    return x


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) of the MinHash LSH for a Jaccard `threshold`: the most rows (the fewest pairs
    proposed below the threshold, which verifying costs) for which bands x rows <= NEAR_DEDUP_PERMUTATIONS
    still propose a pair exactly at the threshold with probability NEAR_DEDUP_RECALL (more similar pairs
    more surely: 1 - (1 - J^rows)^bands)."""
    best = (NEAR_DEDUP_PERMUTATIONS, 1)
    for rows in range(1, NEAR_DEDUP_PERMUTATIONS + 1):
        p = threshold ** rows
        bands = 1 if p >= 1 else math.ceil(math.log(1 - NEAR_DEDUP_RECALL) / math.log1p(-p)) if p > 0 else math.inf
        if bands * rows <= NEAR_DEDUP_PERMUTATIONS:
            best = (int(bands), rows)
    return best


def shingle_hashes(tokens: np.ndarray, starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every token n-gram of each document (a document shorter than n is one shingle, itself),
    for the documents of flat `tokens` that begin at `starts` (plus the end). Returns the hashes, document
    after document, and the index of each document's first one."""
    t = np.concatenate([np.asarray(tokens, dtype=np.uint64), np.zeros(n, dtype=np.uint64)])
    starts = np.asarray(starts, dtype=np.int64) - int(starts[0])
    lengths = np.diff(starts)
    m = int(starts[-1])
    h = t[:m].copy()
    short = {}
    for k in range(2, n + 1):
        ended = starts[:-1][lengths == k - 1]  # documents of k - 1 tokens: their one shingle is complete
        short[k - 1] = h[ended], ended
        h *= np.uint64(0x100000001B3)
        h += t[k - 1:k - 1 + m]
    valid = np.arange(m) + n <= np.repeat(starts[1:], lengths)
    for values, at in short.values():
        h[at], valid[at] = values, True
    counts = np.where(lengths >= n, lengths - n + 1, 1)
    return _mix64(h[valid]), np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def minhash_band_keys(hashes: np.ndarray, first: np.ndarray, bands: int,
                      rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents, bands) LSH keys: each band's `rows` MinHash values (min over a document's shingles of a
    seeded permutation of their hashes) hashed together with the band's number. Two documents share a
    band's key with probability J^rows, J the Jaccard similarity of their shingle sets. Also the low byte
    of the first NEAR_DEDUP_SIGNATURE MinHash values (b-bit MinHash): the share of equal bytes estimates J
    (plus 1/256 by chance)."""
    rng = np.random.default_rng(0x6E656172)
    xors = rng.integers(0, 2**64, size=bands * rows, dtype=np.uint64, endpoint=False)
    multipliers = rng.integers(0, 2**64, size=bands * rows, dtype=np.uint64, endpoint=False) | np.uint64(1)
    keys = np.empty((len(first), bands), dtype=np.uint64)
    signature = np.zeros((len(first), NEAR_DEDUP_SIGNATURE), dtype=np.uint8)
    permuted = np.empty_like(hashes)
    for b in range(bands):
        key = np.full(len(first), b, dtype=np.uint64)
        for k in range(b * rows, (b + 1) * rows):
            np.bitwise_xor(hashes, xors[k], out=permuted)
            permuted *= multipliers[k]
            minima = np.minimum.reduceat(permuted, first)
            if k < NEAR_DEDUP_SIGNATURE:
                signature[:, k] = minima.astype(np.uint8)  # the low byte (a minimum's top bits are mostly 0)
            key *= np.uint64(0x9E3779B97F4A7C15)
            key ^= minima
        keys[:, b] = _mix64(key)
    return keys, signature


def token_passes(store: TokenStore) -> Iterator[tuple[int, int, np.ndarray]]:
    """A store's documents in steps of at most PASS_DOCS documents and about PASS_TOKENS tokens (at least one
    document): (start, stop, offsets), the tokens read rather than mapped (see doc_slice)."""
    for window in range(0, store.n_docs, PASS_DOCS):
        offsets = doc_slice(store, "offsets", window, min(window + PASS_DOCS, store.n_docs) + 1)
        start = 0
        while start < len(offsets) - 1:
            stop = max(start + 1, int(np.searchsorted(offsets, offsets[start] + PASS_TOKENS, "right")) - 1)
            yield window + start, window + stop, offsets[start:stop + 1]
            start = stop


def near_duplicate_flags(stores: list[TokenStore], keep: list[np.ndarray], threshold: float, ngram: int,
                         work: Path, n_train: int, skip_identical: bool) -> tuple[list[dict], list[list[dict]]]:
    """Near dedup over the documents `keep` flags, in store order, updating the flags: a document is removed
    when the Jaccard similarity of its token `ngram` set with an earlier document that stays is at least
    `threshold`. MinHash LSH proposes the pairs (band keys partitioned into bucket files, as exact dedup
    does), each proposed pair is verified on the exact shingle sets, and documents are decided in order, so
    every removed document has a kept one at least that similar. The stores after the first `n_train` are
    eval sets. `skip_identical`: equal texts are left to exact dedup. Returns per store what it removed
    (near_within_source / near_across_sources for train stores, near_within_eval / near_eval_of_train for
    eval sets) and its first few removals as examples: removed and kept as [store, document], similarity."""
    from tqdm.auto import tqdm

    bands, rows = lsh_bands(threshold)
    bases = np.concatenate([[0], np.cumsum([store.n_docs for store in stores])]).astype(np.int64)
    row = np.dtype([("key", "<u8"), ("doc", "<i8")])
    total_tokens = sum(int(store.offsets[-1]) for store in stores)

    work.mkdir(parents=True, exist_ok=True)
    signature_path = work / "signatures.bin"  # NEAR_DEDUP_SIGNATURE bytes per document, all stores in order

    def band_rows() -> Iterator[np.ndarray]:
        with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="near dedup: MinHash") as bar, \
                open(signature_path, "wb") as signatures:
            for s, store in enumerate(stores):
                for start, stop, offsets in token_passes(store):
                    kept = np.flatnonzero(keep[s][start:stop])
                    signature = np.zeros((stop - start, NEAR_DEDUP_SIGNATURE), dtype=np.uint8)
                    if len(kept):
                        hashes, first = shingle_hashes(doc_slice(store, "tokens", int(offsets[0]), int(offsets[-1])),
                                                       offsets, ngram)
                        keys, signature = minhash_band_keys(hashes, first, bands, rows)
                        chunk = np.empty(len(kept) * bands, row)
                        chunk["key"], chunk["doc"] = keys[kept].ravel(), np.repeat(bases[s] + start + kept, bands)
                        yield chunk
                    signature.tofile(signatures)
                    bar.update(int(offsets[-1] - offsets[0]))

    pair = np.dtype([("later", "<i8"), ("earlier", "<i8")])

    def candidate_pairs() -> Iterator[np.ndarray]:
        n_rows = bands * sum(int(flags.sum()) for flags in keep)
        for chunk in bucketed(band_rows(), "key", n_buckets_for(n_rows), work / "bands"):
            chunk = chunk[np.lexsort((chunk["doc"], chunk["key"]))]
            run_start = np.ones(len(chunk), dtype=bool)
            run_start[1:] = chunk["key"][1:] != chunk["key"][:-1]
            first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(len(chunk)), 0))
            member = np.flatnonzero(~run_start)  # each later document of a run, with its first and a few before it
            for earlier in [first_of_run[member], *(member - k for k in range(1, NEAR_DEDUP_WINDOW + 1))]:
                inside = earlier >= first_of_run[member]
                pairs = np.empty(int(inside.sum()), pair)
                pairs["later"], pairs["earlier"] = chunk["doc"][member[inside]], chunk["doc"][earlier[inside]]
                yield pairs

    def locate(docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Documents' numbers over all stores -> (store, document within it)."""
        s = np.searchsorted(bases, docs, "right") - 1
        return s, docs - bases[s]

    def doc_values(name: str, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        values = np.zeros(len(d), dtype=DOC_ARRAYS[name])
        for k in np.unique(s):
            values[s == k] = getattr(stores[k], name)[d[s == k]]
        return values

    def shingle_sets(docs: np.ndarray) -> Callable[[int], np.ndarray]:
        """doc -> its n-gram set (sorted hashes), for the documents `docs` (sorted): their n-grams hashed in
        one pass over their tokens, gathered store by store without a Python loop per document; each set
        made (np.unique) when first asked for."""
        s, d = locate(docs)
        lengths = np.zeros(len(d), dtype=np.int64)
        tokens = []
        for k in np.unique(s):  # documents are sorted by number, so by store
            offsets = stores[k].offsets.view(np.ndarray)
            begin, end = offsets[d[s == k]], offsets[d[s == k] + 1]
            lengths[s == k] = end - begin
            at = np.repeat(begin - np.concatenate([[0], np.cumsum(end - begin)[:-1]]), end - begin)
            tokens.append(stores[k].tokens.view(np.ndarray)[at + np.arange(len(at))])
        hashes, first = shingle_hashes(np.concatenate(tokens), np.concatenate([[0], np.cumsum(lengths)]), ngram)
        bounds = [*first.tolist(), len(hashes)]
        rank = {doc: k for k, doc in enumerate(docs.tolist())}

        @functools.cache
        def set_of(doc: int) -> np.ndarray:
            return np.unique(hashes[bounds[rank[doc]]:bounds[rank[doc] + 1]])
        return set_of

    screened, proposed = 0, 0

    def in_order() -> Iterator[tuple]:
        """The proposed pairs once each, by their later document (a bucket file per range of documents),
        less those whose signatures put them far below the threshold: (later, earlier, equal texts, the
        later's store and document, the earlier's, doc -> n-gram set)."""
        nonlocal screened, proposed
        n_docs = int(bases[-1])
        signatures = None
        for pairs in bucketed(candidate_pairs(), "later", n_buckets_for(n_docs), work / "pairs", span=n_docs):
            if signatures is None:  # complete once the first bucket of pairs is read: every band row was made
                signatures = np.memmap(signature_path, dtype=np.uint8, mode="r", shape=(n_docs, NEAR_DEDUP_SIGNATURE))
            pairs = np.unique(pairs)  # sorted by (later, earlier)
            estimate = (signatures[pairs["later"]] == signatures[pairs["earlier"]]).mean(1)
            close = estimate >= threshold - NEAR_DEDUP_MARGIN
            screened, proposed = screened + int((~close).sum()), proposed + len(pairs)
            for group in range(0, int(close.sum()), NEAR_DEDUP_GROUP):
                later = pairs["later"][close][group:group + NEAR_DEDUP_GROUP]
                earlier = pairs["earlier"][close][group:group + NEAR_DEDUP_GROUP]
                (sl, dl), (se, de) = locate(later), locate(earlier)
                identical = np.zeros(len(later), dtype=bool)
                if skip_identical:  # equal texts: exact dedup's to count
                    identical = doc_values("doc_hashes", sl, dl) == doc_values("doc_hashes", se, de)
                set_of = shingle_sets(np.unique(np.concatenate([later, earlier])))
                for row in zip(*(a.tolist() for a in (later, earlier, identical, sl, dl, se, de))):
                    yield *row, set_of

    flags = np.concatenate(keep)
    removed_by, examples = {}, [[] for _ in stores]
    try:
        for j, i, identical, sj, dj, si, di, set_of in tqdm(in_order(), desc="near dedup: verifying", unit="pair",
                                                            mininterval=1):
            if identical or not (flags[i] and flags[j]) or si >= n_train and sj >= n_train and si != sj:
                continue  # (two sources' eval sets may share texts, as exact dedup lets them)
            a, b = set_of(i), set_of(j)
            shared = len(np.intersect1d(a, b, assume_unique=True))
            if shared >= threshold * (len(a) + len(b) - shared):
                flags[j] = False
                removed_by[j] = si
                if len(examples[sj]) < NEAR_DEDUP_EXAMPLES:
                    examples[sj].append({"removed": [sj, dj], "kept": [si, di],
                                         "similarity": round(shared / (len(a) + len(b) - shared), 3)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("near dedup (Jaccard >= %s over token %d-grams, %d bands of %d): %s proposed, %s set aside by their "
                "signatures, %s removed", threshold, ngram, bands, rows, counted(proposed, "pair"),
                f"{screened:,}", f"{len(removed_by):,}")
    counts = [collections.Counter() for _ in stores]
    for j, si in removed_by.items():
        sj = int(np.searchsorted(bases, j, "right")) - 1
        if sj < n_train:
            counts[sj]["near_within_source" if si == sj else "near_across_sources"] += 1
        else:
            counts[sj]["near_within_eval" if si >= n_train else "near_eval_of_train"] += 1
    for s in range(len(stores)):
        keep[s][:] = flags[bases[s]:bases[s + 1]]
    names = (("near_within_source", "near_across_sources"), ("near_within_eval", "near_eval_of_train"))
    return [{name: counts[s][name] for name in names[s >= n_train]} for s in range(len(stores))], examples


def eval_positions(n_docs: int, eval_fraction: float, seed: int, name: str) -> np.ndarray:
    """Sorted positions (among a source's kept documents) held out for eval, seeded per source."""
    if eval_fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    n_eval = max(1, round(n_docs * eval_fraction))
    if n_eval >= n_docs:
        raise DataError(f"source `{name}`: eval_fraction {eval_fraction} of {counted(n_docs, 'document')} leaves no "
                        "training documents. Lower `eval_fraction` or give `eval_path`.")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n_docs, size=n_eval, replace=False))


@dataclass
class SourceView:
    train_ids: np.ndarray  # document ids of the store that train, in store order (memory-mapped)
    train_cum: np.ndarray  # token offsets of those documents in their concatenation, len + 1 (memory-mapped)
    eval_ids: np.ndarray  # document ids held out for eval (of the explicit eval store, if the source has one)
    meta: dict  # duplicates removed, characters


class DocumentViews:
    """Which documents of each store train and which evaluate, after exact dedup and the split by document,
    as files in `cache_dir/views/<key>/` (memory-mapped by the packers, reused while the stores and settings
    are unchanged). Built in passes of PASS_DOCS documents, so preparing 4x the corpus does not take 4x the
    memory; the directory is renamed into place complete, its plan.json last."""

    def __init__(self, directory: Path, names: list[str]):
        self.plan = json.loads((directory / "plan.json").read_text(encoding="utf-8"))
        self.sources = [SourceView(_map(directory / f"{i}.train_ids.bin", np.int64),
                                   _map(directory / f"{i}.train_cum.bin", np.int64),
                                   np.fromfile(directory / f"{i}.eval_ids.bin", dtype=np.int64),
                                   self.plan["sources"][i]) for i in range(len(names))]

    @classmethod
    def load_or_build(cls, stored: list[tuple], fractions: list[float], dedup: bool, seed: int,
                      cache_dir: Path, near_dedup: dict | None = None) -> "DocumentViews":
        material = {"version": VIEWS_VERSION, "dedup": dedup, "seed": seed, "sources": [
            {"name": spec.name, "store": store.dir.name, "eval_store": explicit.dir.name if explicit else None,
             "eval_fraction": None if explicit else fraction}
            for (spec, store, _, explicit), fraction in zip(stored, fractions)]}
        if near_dedup:  # ("eval_sets_apart": views from before two sources' eval sets were left apart are rebuilt)
            material["near_dedup"] = {**near_dedup, "eval_sets_apart": True}
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
        directory = cache_dir / "views" / key
        names = [spec.name for spec, *_ in stored]
        if not (directory / "plan.json").exists():
            tmp = staging_dir(directory)
            try:
                cls.build(tmp, stored, fractions, dedup, seed, material)
                os.replace(tmp, directory)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if e.errno == errno.ENOSPC:
                    raise DataError(f"no space left on device while writing the document views in {directory.parent} "
                                    "(16 bytes per document); nothing partial was kept. Free space, or set "
                                    "`cache_dir` to a disk with room.") from None
                if not (directory / "plan.json").exists():  # else another process finished it first
                    raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return cls(directory, names)

    @staticmethod
    def build(directory: Path, stored: list[tuple], fractions: list[float], dedup: bool, seed: int,
              material: dict) -> None:
        stores = [store for _, store, _, _ in stored]
        keep, duplicates = (dedup_keep_flags(stores, directory / "buckets") if dedup else
                            ([np.ones(s.n_docs, dtype=bool) for s in stores],
                             [{"within_source": 0, "across_sources": 0} for _ in stores]))
        # explicit eval sets: their first copy of each text, minus texts any source trains on (probed below)
        explicit, eval_duplicates = {}, {}
        for i, (spec, _, _, eval_store) in enumerate(stored):
            if eval_store is not None:
                hashes = doc_slice(eval_store, "doc_hashes", 0, eval_store.n_docs)
                first = (np.sort(np.unique(hashes, return_index=True)[1]) if dedup
                         else np.arange(eval_store.n_docs))
                eval_duplicates[i] = {"within_eval": eval_store.n_docs - len(first)}
                explicit[i] = (hashes[first], first, np.zeros(len(first), dtype=bool))
        near, examples = material.get("near_dedup"), []
        if near:  # after exact dedup, before the split: no held-out document has a near copy in training
            flags = keep + [np.zeros(stored[i][3].n_docs, dtype=bool) for i in explicit]
            for flag, (_, first, _) in zip(flags[len(stores):], explicit.values()):
                flag[first] = True
            near_counts, examples = near_duplicate_flags(stores + [stored[i][3] for i in explicit], flags,
                                                         near["threshold"], near["ngram"], directory / "near",
                                                         len(stores), dedup)
            for i, counts in enumerate(near_counts[:len(stores)]):
                duplicates[i].update(counts)
            for (i, (hashes, first, in_train)), flag, counts in zip(explicit.items(), flags[len(stores):],
                                                                    near_counts[len(stores):]):
                stays = flag[first]
                explicit[i] = (hashes[stays], first[stays], in_train[stays])
                eval_duplicates[i].update(counts)
        plan = {"material": material, "sources": [], "near_duplicate_examples": examples if near else []}
        for i, ((spec, store, _, eval_store), fraction) in enumerate(zip(stored, fractions)):
            n_kept = int(keep[i].sum())
            if n_kept == 0:
                every = (f"all {store.n_docs} documents duplicate documents" if store.n_docs != 1
                         else "its one document duplicates a document")
                raise DataError(f"source `{spec.name}`: {every} of earlier sources"
                                f"{' (or nearly: near_dedup)' if near else ''}. Remove the source or set "
                                f"{'`near_dedup: null` / a higher threshold' if near else '`dedup: false`'}.")
            held = eval_positions(n_kept, fraction, seed, spec.name) if eval_store is None else np.zeros(0, np.int64)
            eval_ids, chars = [], {"train_chars": 0, "eval_chars": 0, "store_chars": 0}
            rank, total = 0, 0
            with open(directory / f"{i}.train_ids.bin", "wb") as ids_file, \
                    open(directory / f"{i}.train_cum.bin", "wb") as cum_file:
                np.zeros(1, dtype=np.int64).tofile(cum_file)
                for start in range(0, store.n_docs, PASS_DOCS):
                    stop = min(start + PASS_DOCS, store.n_docs)
                    docs = start + np.flatnonzero(keep[i][start:stop])
                    positions = rank + np.arange(len(docs))
                    rank += len(docs)
                    is_eval = np.zeros(len(docs), dtype=bool)
                    if len(held):
                        at = np.searchsorted(held, positions).clip(max=len(held) - 1)
                        is_eval = held[at] == positions
                    train = docs[~is_eval]
                    offsets = doc_slice(store, "offsets", start, stop + 1)
                    lengths = (offsets[1:] - offsets[:-1])[train - start]
                    doc_chars = doc_slice(store, "doc_chars", start, stop)
                    chars["store_chars"] += int(doc_chars.sum())
                    chars["train_chars"] += int(doc_chars[train - start].sum())
                    chars["eval_chars"] += int(doc_chars[docs[is_eval] - start].sum())
                    eval_ids.append(docs[is_eval])
                    train.astype(np.int64).tofile(ids_file)
                    (total + np.cumsum(lengths)).astype(np.int64).tofile(cum_file)
                    total += int(lengths.sum())
                    if dedup and explicit and len(train):
                        hashes = doc_slice(store, "doc_hashes", start, stop)[train - start]
                        for eval_hashes, _, in_train in explicit.values():
                            in_train |= np.isin(eval_hashes, hashes)
            np.concatenate([np.zeros(0, np.int64), *eval_ids]).tofile(directory / f"{i}.eval_ids.bin")
            plan["sources"].append({"duplicates": {**duplicates[i], "eval_of_train": 0}, **chars})
        for i, (_, first, in_train) in explicit.items():
            eval_store = stored[i][3]
            kept = first[~in_train] if dedup else first
            kept.astype(np.int64).tofile(directory / f"{i}.eval_ids.bin")
            plan["sources"][i]["duplicates"]["eval_of_train"] = int(in_train.sum()) if dedup else 0
            plan["sources"][i]["duplicates"].update(eval_duplicates[i])
            plan["sources"][i]["eval_chars"] = int(doc_slice(eval_store, "doc_chars", 0, eval_store.n_docs)[kept].sum())
        atomic_write_text(directory / "plan.json", json.dumps(plan, ensure_ascii=False, indent=1))


class MixedBlocks:
    """The training blocks of all sources in one seeded order, each source holding its weight's
    share of the blocks, which is its share of the tokens (every block has `block_size` tokens).

    A source whose share needs more blocks than it has is repeated (its `epochs` > 1), a larger one
    is subsampled. Sources are interleaved evenly (stratified keys), so every prefix of the order,
    which is what a sequential sampler reads, holds each source's share to within a block or two.
    """

    def __init__(self, parts: dict[str, "PackedBlocks"], weights: dict[str, float] | None, seed: int):
        self.names = list(parts)
        self.parts = [parts[n] for n in self.names]
        available = np.array([len(p) for p in self.parts], dtype=np.int64)
        total = int(available.sum())
        if weights is None:
            counts = available.copy()
        else:
            share = np.array([weights[n] for n in self.names], dtype=np.float64)
            exact = share / share.sum() * total
            counts = np.floor(exact).astype(np.int64)
            counts[np.argsort(counts - exact)[:total - counts.sum()]] += 1  # largest remainders
            counts = np.maximum(counts, 1)
        rng = np.random.default_rng([seed, 0x6D6978])
        sources, blocks, keys = [], [], []
        for i, (have, want) in enumerate(zip(available, counts)):
            repeats, rest = divmod(int(want), int(have))
            ids = np.concatenate([np.tile(np.arange(have), repeats), rng.choice(have, rest, replace=False)])
            sources.append(np.full(want, i, dtype=np.int32))
            blocks.append(rng.permutation(ids))
            keys.append((np.arange(want) + rng.random(want)) / want)
        order = np.argsort(np.concatenate(keys), kind="stable")
        self.source_ids = np.concatenate(sources)[order]
        self.block_ids = np.concatenate(blocks)[order]
        self.counts, self.available = counts, available
        self.epochs = counts / available

    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, index: int) -> dict:
        item = self.parts[self.source_ids[index]][int(self.block_ids[index])]
        item["block_id"] = index  # taken out again by the collator (pretrain.BlockCollator)
        return item

    def shares(self, consumed: int) -> dict[str, float]:
        """Each source's share of the first `consumed` blocks read (passes over the order wrap)."""
        passes, rest = divmod(max(consumed, 0), len(self))
        seen = passes * self.counts + np.bincount(self.source_ids[:rest], minlength=len(self.names))
        return {n: float(c) / max(consumed, 1) for n, c in zip(self.names, seen)}


class StreamedSource:
    """A streaming source's training blocks, tokenized and packed on the fly: the same documents,
    tokens and block boundaries as its token store would give (dedup within the stream only), with
    nothing materialised but a hash per document seen.

    `exclude` holds the sorted hashes of every source's eval documents: with dedup on, a training
    document equal to one of them is dropped as it streams past (a stream cannot be read ahead to drop
    it from the eval set instead, as a token store's split does)."""

    def __init__(self, spec: SourceConfig, info: TokenizerInfo, block_size: int, dedup: bool,
                 cache_dir: Path | None = None, document_positions: bool = False,
                 exclude: np.ndarray = np.zeros(0, np.uint64)):
        self.spec, self.info, self.block_size, self.dedup, self.cache_dir = spec, info, block_size, dedup, cache_dir
        self.document_positions, self.exclude = document_positions, exclude

    def __iter__(self) -> Iterator[dict]:
        return self.blocks_of()

    def blocks_of(self, shard: int = 0, shards: int = 1) -> Iterator[dict]:
        """The blocks packed from shard `shard` of `shards` of the documents: what one of `shards`
        DataLoader workers makes. Each document goes to the shard with the fewest characters so far, so
        the shards hold about equal tokens and are read through at the same pace (by count, one shard
        could hold the long documents and the other the short ones, and the short ones would repeat
        sooner). Every worker reads and dedups all records (cheap) to know where each document goes, and
        tokenizes only its own (the costly part); with one shard, the source's blocks in order."""
        prefix = [self.info.bos_id] if self.info.bos_id is not None else []
        seen: set[int] = set()
        pending = np.zeros(0, dtype=np.uint32)
        positions = np.zeros(0, dtype=np.int64)  # position within its document, for document attention
        log_skips = SkipLog(self.spec.name) if shard == 0 else (lambda notes: None)  # one worker reports
        loads = np.zeros(shards, dtype=np.int64)  # characters given to each shard so far
        for chunk in read_chunks(SourceInput.open(self.spec, cache_dir=self.cache_dir), self.spec):
            texts, _, _, notes = format_chunk(self.spec, chunk)
            log_skips(notes)
            if self.dedup:
                hashes = np.array([text_hash(text) for text in texts], dtype=np.uint64)
                held_out = np.isin(hashes, self.exclude)
                fresh = []
                for text, h, evaluated in zip(texts, hashes.tolist(), held_out):
                    if not evaluated and h not in seen:
                        seen.add(h)
                        fresh.append(text)
                texts = fresh
            mine = texts
            if shards > 1:
                mine = []
                for text in texts:
                    target = int(np.argmin(loads))
                    loads[target] += len(text)
                    if target == shard:
                        mine.append(text)
            if not mine:
                continue
            docs = [prefix + ids + [self.info.eos_id] for ids in _encode(self.info, mine)]
            pending = np.concatenate([pending, np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint32)])
            positions = np.concatenate([positions, *(np.arange(len(d)) for d in docs)])
            n_blocks = len(pending) // self.block_size
            for i in range(n_blocks):
                window = slice(i * self.block_size, (i + 1) * self.block_size)
                pos = None
                if self.document_positions:  # the document the block starts inside restarts at 0 too
                    pos = positions[window].copy()
                    resets = np.flatnonzero(pos[1:] == 0)
                    pos[:resets[0] + 1 if len(resets) else len(pos)] -= pos[0]
                yield block_item(pending[window], pos)
            pending, positions = pending[n_blocks * self.block_size:], positions[n_blocks * self.block_size:]


class ShuffledBlocks:
    """A map-style source inside a streaming mixture: its blocks in a new seeded order each pass, the
    passes one endless sequence."""

    def __init__(self, blocks: "PackedBlocks", seed: int):
        self.blocks, self.seed = blocks, seed

    def __len__(self) -> int:
        return len(self.blocks)

    def blocks_of(self, shard: int = 0, shards: int = 1) -> Iterator[dict]:
        """Blocks shard, shard + shards, shard + 2 shards, ... of the sequence: what one of `shards`
        DataLoader workers reads. Workers that read at the same rate thus read its blocks in order
        together, whatever their number and the source's size."""
        number, order = -1, None
        for index in itertools.count(shard, shards):
            pass_number, position = divmod(index, len(self.blocks))
            if pass_number != number:
                number, order = pass_number, np.random.default_rng([self.seed, pass_number]).permutation(len(self.blocks))
            yield self.blocks[int(order[position])]


class StreamingMixture:
    """Blocks from several sources, at least one streaming, mixed by token weight on the fly.

    The sources take turns in Webster (Sainte-Laguë) order: source s's k-th block has the key
    (k + 0.5) / share_s and blocks go in key order (ties to the earlier source). Every prefix holds the
    weights to within a block, and the order depends on the weights alone, not on the data.

    With W DataLoader workers, each worker makes its blocks in that same order, from its own share of
    every source (StreamedSource and ShuffledBlocks shards), and the DataLoader reads whole batches
    from the workers in turn. So every worker reads each source at the same rate (no shard is starved
    or read twice as often), and the shares of the first n blocks read are known exactly (`shares`)
    from n, the batch size and W. A stream that runs out starts its next pass, and any source read
    more than `max_epochs` times over gets a warning."""

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], max_epochs: float, batch_size: int = 1,
                 workers: int = 0):
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        share = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.share = share / share.sum()
        self.max_epochs, self.batch_size, self.workers = max_epochs, max(int(batch_size), 1), max(int(workers), 1)

    def _key(self, source: int, k: int) -> tuple[float, int]:
        return (k + 0.5) / float(self.share[source]), source

    def source_order(self) -> Iterator[int]:
        """The source of each next block, forever."""
        heap = [self._key(i, 0) for i in range(len(self.names))]
        heapq.heapify(heap)
        counts = [0] * len(self.names)
        while True:
            _, i = heapq.heappop(heap)
            counts[i] += 1
            heapq.heappush(heap, self._key(i, counts[i]))
            yield i

    def source_counts(self, n: int) -> np.ndarray:
        """How many of the first `n` blocks of `source_order` each source gave, without walking them:
        start from n x share and trade blocks until the counts are a prefix of the key order."""
        counts = np.floor(max(n, 0) * self.share).astype(np.int64)  # never more than n in all

        def last():  # the latest key inside the prefix
            return max(self._key(i, int(c) - 1) for i, c in enumerate(counts) if c > 0)

        def following():  # the earliest key outside it
            return min(self._key(i, int(c)) for i, c in enumerate(counts))

        while counts.sum() < n:
            counts[following()[1]] += 1
        while n > 0 and last() > following():
            counts[last()[1]] -= 1
            counts[following()[1]] += 1
        return counts

    def consumed_counts(self, consumed: int) -> np.ndarray:
        """Each source's blocks among the first `consumed` blocks the DataLoader read: batch j came from
        worker j % W, as its (j // W)-th batch."""
        batches, rest = divmod(max(consumed, 0), self.batch_size)
        counts = sum(self.source_counts(self.batch_size * len(range(w, batches, self.workers)))
                     for w in range(self.workers))
        made = self.batch_size * len(range(batches % self.workers, batches, self.workers))  # by the next worker
        return counts + self.source_counts(made + rest) - self.source_counts(made)

    def shares(self, consumed: int) -> dict[str, float]:
        """Each source's share of the first `consumed` blocks read (by all ranks together)."""
        counts = self.consumed_counts(consumed)
        return {n: float(c) / max(consumed, 1) for n, c in zip(self.names, counts)}

    def blocks(self, worker: int = 0, workers: int = 1) -> Iterator[dict]:
        """What DataLoader worker `worker` of `workers` makes: every block of the source order, each from
        this worker's share of its source."""
        if workers != self.workers:
            raise DataError(f"the streaming mixture was planned for {self.workers} DataLoader worker(s) but is read "
                            f"by {workers}: pass dataloader_num_workers to build_datasets.")

        def shard(i: int):
            source = self.sources[i]
            return source.blocks_of(worker, workers) if hasattr(source, "blocks_of") else iter(source)

        iters = [shard(i) for i in range(len(self.sources))]
        passes, taken = [0] * len(self.sources), [0] * len(self.sources)
        for i in self.source_order():
            block = next(iters[i], None)
            if block is None:  # a stream's shard ran out: its next pass
                passes[i] += 1
                iters[i] = shard(i)
                block = next(iters[i], None)
                if block is None:
                    split = (f" (DataLoader worker {worker} of {workers} packs its share of the documents only: "
                             "lower `dataloader_num_workers`)" if workers > 1 else "")
                    raise DataError(f"source `{self.names[i]}` yields no block of the block size{split}. Add data "
                                    "or lower `block_size`.")
                if passes[i] == int(self.max_epochs) and worker == 0:
                    logger.warning("source `%s` started pass %d over its data (more than max_source_epochs %s): "
                                   "lower its weight or add data.", self.names[i], passes[i] + 1, self.max_epochs)
            taken[i] += 1
            if worker == 0 and hasattr(self.sources[i], "__len__") and (taken[i] - 1) * workers <= int(
                    self.max_epochs * len(self.sources[i])) < taken[i] * workers:  # all workers read alike
                logger.warning("source `%s`: its weight reads its %s more than max_source_epochs %s times: "
                               "lower its weight or add data.", self.names[i], counted(len(self.sources[i]), "block"),
                               self.max_epochs)
            yield block

    def __iter__(self) -> Iterator[dict]:
        return self.blocks()

    def as_torch_dataset(self):
        """This mixture as a torch IterableDataset (torch's DataLoader treats only those as streams),
        each DataLoader worker making its batches. torch is imported here, not when data_utils is, so
        tokenizer worker processes start fast."""
        import torch

        mixture = self

        class MixtureStream(torch.utils.data.IterableDataset):
            def __iter__(self):
                worker = torch.utils.data.get_worker_info()
                return mixture.blocks(worker.id, worker.num_workers) if worker else mixture.blocks()

            def __reduce__(self):  # a class made here cannot be pickled by name: rebuild it in the worker
                return mixture.as_torch_dataset, ()

            def shares(self, consumed: int) -> dict[str, float]:
                return mixture.shares(consumed)

        return MixtureStream()


def probe_stream(spec: SourceConfig, cache_dir: Path | None) -> dict:
    """Opens a streaming source and formats its first records, so a wrong split, path or field stops the
    run before training starts rather than at its first batch. Returns what the probe read."""
    texts, counts = 0, collections.Counter()
    for chunk in read_chunks(SourceInput.open(spec, cache_dir=cache_dir), spec):
        found, _, chunk_counts, notes = format_chunk(spec, chunk)
        texts += len(found)
        counts.update(chunk_counts)
        if texts:
            return {"probed_records": counts["records"]}
        if counts["records"] >= PROBE_RECORDS:
            break
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()) if reason != "records") or "none"
    raise DataError(f"source `{spec.name}` streams no text: its first {counts['records']} records gave none "
                    f"(skipped: {skipped}). Check `split`, `text_field` or the template, or set `streaming: false` "
                    "to see every record's problem in the data report.")


def inputs_now(store: TokenStore, inputs: SourceInput) -> list[dict]:
    """A store's files under their current names: the store is keyed by content, so a renamed or moved
    file with the same bytes reuses it, and the report must not name the old path."""
    if inputs.dataset is not None:
        return store.meta["files"]
    return [{**found, "path": str(path)} for found, path in zip(store.meta["files"], inputs.files)]


class SpreadBlocks:
    """`count` blocks spread evenly over a larger set of blocks: an eval set capped by `max_eval_tokens`
    keeps blocks from every part of the source (its first blocks would be its first files only)."""

    def __init__(self, blocks: "PackedBlocks", count: int):
        self.blocks, self.block_size = blocks, blocks.block_size
        self.index = np.linspace(0, len(blocks) - 1, count).round().astype(np.int64)  # distinct: count <= len

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        return self.blocks[int(self.index[index])]


def capped_eval(blocks: "PackedBlocks", max_blocks: int | None, name: str):
    """A source's eval blocks, at most `max_blocks` of them (evaluating every block of a large held-out
    split would take longer than the training between evaluations)."""
    if max_blocks is None or len(blocks) <= max_blocks:
        return blocks
    logger.info("source `%s`: evaluating %d of its %d eval blocks, spread over the split (max_eval_tokens)",
                name, max_blocks, len(blocks))
    return SpreadBlocks(blocks, max_blocks)


@dataclass
class PreparedData:
    train: Any  # a map-style dataset of {"input_ids", "labels"} blocks
    eval: dict[str, PackedBlocks]
    report: dict = field(default_factory=dict)


def _grouped_counts(counts: dict[str, int]) -> dict:
    """Flat store counts ('skipped:invalid_json': 2, ...) -> {'skipped': {'invalid_json': 2}, ...}."""
    grouped: dict[str, Any] = {}
    for key, value in sorted(counts.items()):
        group, _, reason = key.partition(":")
        if reason:
            grouped.setdefault({"missing_field": "missing_fields"}.get(group, group), {})[reason] = value
        else:
            grouped[key] = value
    return grouped


def document_location(store: TokenStore, doc: int) -> str:
    """Where a document of a store came from: its file and line (or record)."""
    file = store.meta["files"][int(store.doc_files[doc])]
    return f"`{file['path']}` {record_unit(file['format'])} {int(store.doc_records[doc])}"


def near_duplicate_examples(stored: list[tuple], plan: dict, name: str) -> list[str]:
    """The first few documents near dedup removed from source `name` (training and eval files), each with the
    document it kept and their similarity: what a threshold removes, to judge it by."""
    stores = [store for _, store, _, _ in stored] + [explicit for *_, explicit in stored if explicit is not None]
    owners = [spec.name for spec, *_ in stored] + [spec.name for spec, *_, explicit in stored if explicit is not None]
    return [f"{document_location(stores[s], d)} ~ {document_location(stores[k], kd)} (similarity {e['similarity']})"
            for removed in plan["near_duplicate_examples"] for e in removed
            for (s, d), (k, kd) in [(e["removed"], e["kept"])] if owners[s] == name]


def near_dedup_settings(data_args) -> dict | None:
    """The near-dedup settings a run asked for (they key the document views), or None."""
    threshold = getattr(data_args, "near_dedup", None)
    if threshold is None:
        return None
    bands, rows = lsh_bands(threshold)
    return {"threshold": threshold, "ngram": data_args.near_dedup_ngram, "bands": bands, "rows": rows}


def build_datasets(data_args, tokenizer, block_size: int, seed: int, batch_size: int = 1,
                   workers: int = 0) -> PreparedData:
    """Sources -> token stores (cached) -> dedup -> split by document -> train blocks of all sources
    + eval blocks per source, and the data report. `batch_size` and `workers` are the DataLoader's (per
    process): the workers of a streaming mixture each make whole batches, read in turn."""
    start = time.time()
    specs = parse_sources(data_args.sources)
    info = TokenizerInfo.from_tokenizer(tokenizer, data_args.add_bos)
    cache_dir = Path(data_args.cache_dir)
    digests = FileDigests(cache_dir)
    num_proc = data_args.preprocessing_num_workers or min(8, os.cpu_count() or 1)
    dedup = getattr(data_args, "dedup", True)
    near_dedup = near_dedup_settings(data_args)
    document = getattr(data_args, "attention", "causal") == "document"
    byte_mask = functools.cache(lambda: byte_token_mask(tokenizer))  # computed only when a store is built
    max_eval_tokens = getattr(data_args, "max_eval_tokens", None)
    max_eval_blocks = max(max_eval_tokens // block_size, 1) if max_eval_tokens else None
    streamed = [s for s in specs if s.streaming]
    if streamed and specs[0].weight is None and len(specs) == 1:
        specs[0].weight = 1.0  # a stream alone is all of the training tokens
    elif streamed and specs[0].weight is None:
        raise DataError("a streaming source has no length to take a natural share from: give every source a "
                        "`weight` (its share of training tokens).")
    stored = []  # (spec, train store, cache hit, explicit eval store or None)
    legacy_stores = {}
    for spec in specs:
        if spec.streaming:
            continue
        inputs = SourceInput.open(spec, cache_dir=cache_dir)
        store, hit = load_or_build_store(spec, inputs, info, cache_dir, num_proc, digests, byte_mask)
        if spec.hub in PACKAGED_BUILDERS and inputs.files and not inputs.remote:
            # its store name when local data_files were keyed by the datasets fingerprint: checkpoints of then resume
            legacy = store_key(spec, dataclasses.replace(inputs, files=[], remote=True), info, digests)[0]
            legacy_stores[spec.name] = f"{spec.name}-{legacy}"
        eval_store = None
        if spec.eval_path or spec.eval_split:
            eval_inputs = SourceInput.open(spec, True, cache_dir)
            eval_store, eval_hit = load_or_build_store(spec, eval_inputs, info, cache_dir, num_proc, digests, byte_mask)
            hit = hit and eval_hit
            eval_store.meta["files"] = inputs_now(eval_store, eval_inputs)
        store.meta["files"] = inputs_now(store, inputs)
        stored.append((spec, store, hit, eval_store))
    fractions = [data_args.eval_fraction if spec.eval_fraction is None else spec.eval_fraction for spec, *_ in stored]
    for i, (spec, store, _, _) in enumerate(stored):
        tokens, needed = store.meta["n_tokens"], 2 * block_size / max(store.meta["n_tokens"], 1)
        if spec.from_per_file and 0 < fractions[i] < needed:  # a file dropped into data/: two eval blocks if it can
            size = f"{counted(store.n_docs, 'document')}, {counted(tokens, 'token')} before dedup"
            if store.n_docs >= 3 and needed <= PER_FILE_MAX_EVAL_FRACTION:
                logger.info("source `%s` (per_file): %s: its eval share is %.1f%%, not %.0f%%, to hold out about two "
                            "blocks of %d tokens", spec.name, size, 100 * needed, 100 * fractions[i], block_size)
                fractions[i] = needed
            else:
                logger.warning("source `%s` (per_file): %s: too small for an eval split (two blocks of %d tokens would "
                               "be more than %.0f%% of it): no eval perplexity for it", spec.name, size, block_size,
                               100 * PER_FILE_MAX_EVAL_FRACTION)
                fractions[i] = 0.0
    views = DocumentViews.load_or_build(stored, fractions, dedup, seed, cache_dir, near_dedup) if stored else None
    if near_dedup and streamed:
        logger.warning("near_dedup covers the stored sources only: %s stream%s (exact dedup within the stream)",
                       ", ".join(f"`{s.name}`" for s in streamed), "s" if len(streamed) == 1 else "")

    train_parts, evals, report_sources = {}, {}, {}
    for (spec, store, hit, explicit_eval), view in zip(stored, views.sources if views else []):
        eval_store = explicit_eval or store
        train = PackedBlocks(store, view.train_ids, block_size, document, cum=view.train_cum)
        if len(train) == 0 and spec.from_per_file:
            logger.warning("source `%s` (per_file): its %s make no block of %d: not trained on (add text to it, or "
                           "lower `block_size`)", spec.name, counted(train.n_tokens, "token"), block_size)
        elif len(train) == 0:
            n_held = len(view.eval_ids)
            held = f" ({n_held} of its documents {'is' if n_held == 1 else 'are'} held out for eval)" if n_held else ""
            raise DataError(f"source `{spec.name}`: {train.n_tokens} training tokens{held} make no block of "
                            f"block_size {block_size}. Add data or lower `block_size`"
                            f"{' or its `eval_fraction`' if held and explicit_eval is None else ''}.")
        if explicit_eval is not None and len(view.eval_ids) == 0:
            every = (f"every one of the {explicit_eval.n_docs} documents" if explicit_eval.n_docs != 1
                     else "the one document")
            nearly, off = ((" (or nearly: near_dedup)", "raise `near_dedup`") if near_dedup
                           else ("", "set `dedup: false`"))
            raise DataError(f"source `{spec.name}`: {every} of its eval set also occurs in the training data{nearly}, "
                            f"and dedup removed it. Give eval files with other texts, or {off}.")
        held_out = PackedBlocks(eval_store, view.eval_ids, block_size, document) if len(view.eval_ids) else None
        unused_eval = 0
        if held_out is not None and len(held_out) == 0 and spec.from_per_file:  # (smaller after dedup than it looked)
            unused_eval = len(view.eval_ids)
            logger.warning("source `%s` (per_file): its eval split has %s, fewer than one block of %d: it has no eval "
                           "perplexity, and its %s held out neither train nor evaluate", spec.name,
                           counted(held_out.n_tokens, "token"), block_size, counted(len(view.eval_ids), "document"))
            held_out = None
        if held_out is not None:
            if len(held_out) == 0:
                more = ("Add texts to its eval files (`eval_path`; dedup drops those that are also training texts)"
                        if explicit_eval is not None else "Raise `eval_fraction`, give `eval_path`")
                raise DataError(f"source `{spec.name}`: its eval split has {counted(held_out.n_tokens, 'token')}, "
                                f"fewer than one block of {block_size}. {more}, or lower `block_size`.")
            evals[spec.name] = capped_eval(held_out, max_eval_blocks, spec.name)
        if len(train):  # (a per_file source under one block has none: in the report, not in the mixture)
            train_parts[spec.name] = train
        duplicates = view.meta["duplicates"]
        documents = len(view.train_ids) + len(view.eval_ids)
        tokens = train.n_tokens + (held_out.n_tokens if held_out is not None else 0)
        report_sources[spec.name] = {
            "files": store.meta["files"], "cache": "hit" if hit else "built", "store": str(store.dir),
            **modelscope_origin(spec), **({"legacy_store": legacy_stores[spec.name]} if spec.name in legacy_stores else {}),
            **_grouped_counts(store.meta["counts"]), "duplicates_removed": duplicates,
            "documents": documents, "characters": view.meta["train_chars"] + view.meta["eval_chars"],
            "tokens": tokens, "mean_tokens_per_document": round(tokens / max(documents, 1), 1),
            "chars_per_token": round(view.meta["store_chars"] / max(int(store.offsets[-1]) - store.n_docs * (
                1 + (info.bos_id is not None)), 1), 3),
            "byte_token_share": round(store.meta["counts"].get("byte_tokens", 0) / max(int(store.offsets[-1]), 1), 4),
            "train_documents": len(view.train_ids), "train_tokens": train.n_tokens, "train_blocks": len(train),
            "unused_tail_tokens": train.unused_tail_tokens,
            "eval_documents": len(view.eval_ids) if held_out else 0,
            "eval_blocks": len(evals[spec.name]) if held_out else 0,
            "eval_blocks_available": len(held_out) if held_out else 0,
            **({"eval_documents_unused": unused_eval} if unused_eval else {}),
        }
        if near_dedup:
            report_sources[spec.name]["near_duplicate_examples"] = near_duplicate_examples(stored, views.plan,
                                                                                           spec.name)
        if explicit_eval is not None:  # what reading the eval files skipped and dropped, as for the training files
            report_sources[spec.name]["eval_input"] = {"files": explicit_eval.meta["files"],
                                                       **_grouped_counts(explicit_eval.meta["counts"])}
        logger.info("source `%s`: %s, %d docs (%d duplicates removed), %d tokens -> %d train blocks, %d eval blocks",
                    spec.name, "cache hit" if hit else "tokenized", documents,
                    sum(duplicates.values()), tokens, len(train), report_sources[spec.name]["eval_blocks"])
    max_epochs = getattr(data_args, "max_source_epochs", 4.0)
    weights = {s.name: s.weight for s in specs} if specs[0].weight is not None else None
    if streamed:
        # Every source's eval documents, dropped from the streams' training documents; a stream's eval
        # documents that a stored source trains on are dropped from its eval set instead.
        eval_hashes = [h for (_, store, _, explicit), view in zip(stored, views.sources if views else [])
                       for h in hashes_of(explicit or store, view.eval_ids)] if dedup else []
        for spec in streamed:
            settings = {k: v for k, v in dataclasses.asdict(spec).items()  # what its training blocks depend on
                        if k not in ("name", "weight", "watch_forgetting", "eval_fraction")}
            report_sources[spec.name] = {"streaming": True, "weight": spec.weight, "settings": settings,
                                         **modelscope_origin(spec), **probe_stream(spec, cache_dir)}
            if spec.eval_split or spec.eval_path:
                eval_spec = dataclasses.replace(spec, streaming=False)
                named = f"eval split `{spec.eval_split}`" if spec.eval_split else "eval files (`eval_path`)"
                eval_store, _ = load_or_build_store(eval_spec, SourceInput.open(eval_spec, True, cache_dir), info,
                                                    cache_dir, num_proc, digests)
                hashes = doc_slice(eval_store, "doc_hashes", 0, eval_store.n_docs)
                first = np.sort(np.unique(hashes, return_index=True)[1]) if dedup else np.arange(eval_store.n_docs)
                in_train = np.zeros(len(first), dtype=bool)
                if dedup:
                    for (_, store, *_), view in zip(stored, views.sources if views else []):
                        for trained in hashes_of(store, view.train_ids):
                            in_train |= np.isin(hashes[first], trained)
                    if in_train.all():
                        every = f"every one of the {len(first)} documents" if len(first) != 1 else "the one document"
                        raise DataError(f"source `{spec.name}`: {every} of its {named} also occurs in another "
                                        "source's training data, and dedup removed it. Give eval data with other "
                                        "texts, or set `dedup: false`.")
                    first = first[~in_train]
                    eval_hashes.append(hashes[first])
                held_out = PackedBlocks(eval_store, first, block_size, document)
                if len(held_out) == 0:
                    raise DataError(f"source `{spec.name}`: its {named} has {counted(held_out.n_tokens, 'token')}, "
                                    f"fewer than one block of {block_size}. Give more eval data or lower "
                                    "`block_size`.")
                evals[spec.name] = capped_eval(held_out, max_eval_blocks, spec.name)
                report_sources[spec.name].update(
                    eval_documents=len(first), eval_blocks=len(evals[spec.name]), eval_blocks_available=len(held_out),
                    eval_input={"files": eval_store.meta["files"], **_grouped_counts(eval_store.meta["counts"])},
                    duplicates_removed={"within_eval": eval_store.n_docs - len(first) - int(in_train.sum()),
                                        "eval_of_train": int(in_train.sum())})
            elif (data_args.eval_fraction if spec.eval_fraction is None else spec.eval_fraction) > 0:
                logger.warning("source `%s` streams: eval_fraction is not applied to a stream, so it has no eval set; "
                               "set `eval_split` or `eval_path` to evaluate it", spec.name)
        digests.save()
        excluded = np.unique(np.concatenate([np.zeros(0, np.uint64), *eval_hashes]).astype(np.uint64))
        sources = {s.name: (StreamedSource(s, info, block_size, dedup, cache_dir, document, excluded) if s.streaming
                            else ShuffledBlocks(train_parts[s.name], seed)) for s in specs}
        mixture = StreamingMixture(sources, weights, max_epochs, batch_size, workers)
        for name, share in zip(mixture.names, mixture.share):
            report_sources[name]["share_of_training_tokens"] = round(float(share), 4)
        train_set = mixture.as_torch_dataset()
        report = {"block_size": block_size, "tokenizer": info.fingerprint, "bos": info.bos_id, "eos": info.eos_id,
                  "dedup": dedup, "near_dedup": near_dedup, "mixture": "token weights, streaming",
                  "seconds": round(time.time() - start, 3),
                  "sources": report_sources, "unread_data_files": unread_data_files(report_sources, specs)}
        return PreparedData(train_set, evals, report)
    digests.save()
    if not train_parts:  # every source a per_file one under one block (a named one stops above)
        raise DataError(f"no source has a training block of block_size {block_size} (shorter: "
                        f"{', '.join(f'`{name}`' for name in report_sources)}). Add data or lower `block_size`.")
    train_set = MixedBlocks(train_parts, weights, seed)
    for i, name in enumerate(train_set.names):
        report_sources[name].update(
            weight=weights[name] if weights else None, mixture_blocks=int(train_set.counts[i]),
            share_of_training_tokens=round(float(train_set.counts[i]) / len(train_set), 4),
            epochs_per_mixture=round(float(train_set.epochs[i]), 3))
        if train_set.epochs[i] > max_epochs:
            logger.warning("source `%s`: its weight repeats its %s %.1f times per pass over the mixture "
                           "(more than max_source_epochs %s): the model may memorise it. Lower its weight or add "
                           "data.", name, counted(int(train_set.available[i]), "block"), train_set.epochs[i],
                           max_epochs)
    for entry in report_sources.values():
        entry.setdefault("share_of_training_tokens", 0.0)  # a per_file source under one block
    report = {
        "block_size": block_size, "tokenizer": info.fingerprint, "bos": info.bos_id, "eos": info.eos_id,
        "dedup": dedup, "near_dedup": near_dedup, "train_blocks": len(train_set),
        "train_tokens": len(train_set) * block_size,
        "mixture": "token weights" if weights else "natural sizes",
        "seconds": round(time.time() - start, 3), "sources": report_sources,
        "unread_data_files": unread_data_files(report_sources, specs),
    }
    return PreparedData(train_set, evals, report)


def unread_data_files(report_sources: dict, specs: list[SourceConfig]) -> list[str]:
    """Data files beside the ones the sources read that no source reads: a file dropped into data/ for a config that
    names its files one by one (configs/pretrain_tiny.yaml) would otherwise be left out without a word. A hub
    source of a file builder (`hub: text`, `json`, ...) reads its local `data_files`."""
    read = [Path(f["path"]) for s in report_sources.values()
            for f in [*s.get("files", []), *s.get("eval_input", {}).get("files", [])]]
    read += [Path(match) for spec in specs if spec.hub in PACKAGED_BUILDERS
             for entry in data_file_entries(spec.data_files) if "://" not in str(entry)
             for match in globlib.glob(os.path.expanduser(str(entry)), recursive=True)]
    seen = {path.resolve() for path in read}
    unread = sorted({str(folder / other.name) for folder in {path.parent for path in read} if folder.is_dir()
                     for other in folder.iterdir()
                     if other.is_file() and is_data_file(other) and other.resolve() not in seen})
    if unread:
        folder = Path(unread[0]).parent
        logger.warning("%s beside the sources' files no source reads: %s%s. Add %s to `sources` (or read the whole "
                       "directory, each file a source of its own: `{path: %s/, per_file: true}`)",
                       counted(len(unread), "data file"), ", ".join(unread[:5]), ", ..." if len(unread) > 5 else "",
                       "it" if len(unread) == 1 else "them", folder)
    return unread


def data_report_markdown(report: dict) -> str:
    """A readable version of data_report.json: one table row per source, then what was dropped."""
    size = (f"{report['train_blocks']} training blocks of {report['block_size']} tokens ({report['train_tokens']:,} "
            "tokens)" if "train_blocks" in report else f"streamed blocks of {report['block_size']} tokens")
    near = report.get("near_dedup")
    lines = ["# Data report", "", f"{size}; mixture by {report['mixture']}; exact dedup "
             f"{'on' if report['dedup'] else 'off'}; near dedup " +
             (f"at Jaccard similarity {near['threshold']} of token {near['ngram']}-grams." if near else "off."), "",
             "| source | records | documents | characters | tokens | tokens/doc | train share | epochs | train blocks | "
             "eval docs | eval blocks | duplicates removed | skipped | cache |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in report["sources"].items():
        removed = f"{sum(s.get('duplicates_removed', {}).values()):,}"
        if s.get("streaming"):
            lines.append(f"| {name} | streamed | | | | | {s['share_of_training_tokens']:.1%} | | | "
                         f"{s.get('eval_documents', 0):,} | {s.get('eval_blocks', 0):,} | {removed} | | – |")
            continue
        lines.append(f"| {name} | {s.get('records', 0):,} | {s['documents']:,} | {s['characters']:,} | "
                     f"{s['tokens']:,} | {s['mean_tokens_per_document']} | {s['share_of_training_tokens']:.1%} | "
                     f"{s['epochs_per_mixture'] if 'epochs_per_mixture' in s else ''} | {s.get('train_blocks', 0):,} | "
                     f"{s['eval_documents']:,} | {s.get('eval_blocks', 0):,} | {removed} | "
                     f"{sum(s.get('skipped', {}).values()):,} | {s['cache']} |")
    lines += ["", "epochs: how often one pass over the mixture reads a source's training blocks (above 1 repeated, "
              "below 1 subsampled). documents, characters and tokens: after cleaning and dedup, eval files "
              "(`eval_path`) included; records and skipped: the training files (eval files' counts below).", ""]
    if report.get("unread_data_files"):
        lines += [f"Not read by any source, beside files that are: {', '.join(f'`{f}`' for f in report['unread_data_files'])}"
                  " (add them to `sources`).", ""]
    lines += ["## Per source", ""]
    for name, s in report["sources"].items():
        if s.get("streaming"):
            lines.append(f"- **{name}**: streamed (tokenized and packed on the fly), weight {s['weight']}; the first "
                         f"{s['probed_records']:,} records checked before training")
        else:
            origin = s.get("modelscope")
            fetched = (f"ModelScope dataset `{origin['dataset']}` (revision {origin['revision'] or 'default'}), "
                       "downloaded: " if origin else "")
            lines.append(f"- **{name}**: {fetched}{_files_markdown(s['files'])}")
            lines += _counts_markdown(s, "  ")
        if "eval_input" in s:
            lines.append(f"  - eval files: {_files_markdown(s['eval_input']['files'])}")
            lines += _counts_markdown(s["eval_input"], "    ")
        if s.get("streaming") and s.get("eval_documents"):
            lines.append("  - training documents equal to an eval document are dropped as they stream past"
                         if report["dedup"] else "  - dedup off: eval documents may also occur in training")
    return "\n".join(lines) + "\n"


def _files_markdown(files: list[dict]) -> str:
    return ", ".join(f"`{f['path']}` ({f['format']}, {f['encoding']})" for f in files)


def _counts_markdown(s: dict, indent: str) -> list[str]:
    """The report's counts of one input as list items: what was skipped, dropped or removed, and why."""
    lines = []
    for group in ("skipped", "dropped", "missing_fields", "duplicates_removed"):
        if any(s.get(group, {}).values()):
            lines.append(f"{indent}- {group.replace('_', ' ')}: " +
                         ", ".join(f"{k} {v:,}" for k, v in s[group].items() if v))
    for key in ("records", "blank_lines", "texts_with_U+FFFD", "unused_tail_tokens"):
        if s.get(key) and (key != "records" or "documents" not in s):  # a source's records are in the table
            lines.append(f"{indent}- {key.replace('_', ' ')}: {s[key]:,}")
    if s.get("near_duplicate_examples"):
        lines.append(f"{indent}- near duplicates removed, the first few (removed ~ kept): " +
                     "; ".join(s["near_duplicate_examples"]))
    if s.get("stopped_at_max_records"):
        lines.append(f"{indent}- read only its first {s['stopped_at_max_records']:,} records (`max_records`); the "
                     "rest was not read")
    return lines


def write_data_report(report: dict, output_dir: str | Path) -> None:
    atomic_write_text(Path(output_dir) / "data_report.json", json.dumps(report, ensure_ascii=False, indent=1))
    atomic_write_text(Path(output_dir) / "data_report.md", data_report_markdown(report))


# --------------------------------------------------------------------------------------------
# Multiple-choice benchmarks: files of questions that every evaluation scores (pretrain.py)
# --------------------------------------------------------------------------------------------
CHOICE_LETTERS = "ABCDEFGHIJ"
QUESTION_FIELDS = ("question", "Question", "问题", "题目")
ANSWER_FIELDS = ("answer_idx", "answer", "Answer", "label", "答案")  # MedQA: answer_idx the letter, answer the text
CHOICES_FIELDS = ("choices", "options", "Options", "选项")  # a list, a {letter: text} mapping or "A. ...\nB. ..."
OPTION_LINE = re.compile(r"^\s*[(（]?([A-J])(?:[)）.．、:：]\s*|\s+)(.*)$")


@dataclass
class BenchmarkConfig:
    """One entry of `benchmarks:`: a file (or files) of single-answer multiple-choice questions."""

    path: str | list[str] | None = None
    name: str = ""  # names the metric eval_bench_<name>_accuracy
    shots: int = 0  # worked examples before each question: the first of `dev_path`, else of `path` (then not scored)
    dev_path: str | list[str] | None = None  # C-Eval's / CMMLU's dev split, for the shots
    max_questions: int | None = 500  # per evaluation: that many, spread evenly over the file(s)
    instruction: str = "以下是单项选择题，请选出正确答案。"  # first line of every prompt ("" for none)
    answer_prefix: str = "答案："  # after the options; the model's next token is scored ("Answer:" in English)
    question_field: str | None = None  # unset: the first of QUESTION_FIELDS a record has
    answer_field: str | None = None  # unset: the first of ANSWER_FIELDS
    choices_field: str | None = None  # unset: columns A, B, ..., else the first of CHOICES_FIELDS
    format: str = "auto"
    encoding: str = "auto"
    columns: list[str] | None = None  # csv/tsv without a header row
    records_field: str | None = None  # json: the field holding the records
    on_error: str = "raise"  # skip: count and report questions that cannot be read
    watch_forgetting: bool = False  # warn when its accuracy falls forgetting_threshold_pct below its baseline

    @classmethod
    def from_dict(cls, raw: Any, index: int) -> "BenchmarkConfig":
        where = f"benchmarks[{index}]"
        if isinstance(raw, str):
            raw = {"path": raw}
        if not isinstance(raw, dict) or not raw.get("path"):
            raise DataError(f"{where} must be a mapping with a `path`, such as {{name: cmb, path: "
                            f"data/benchmarks/cmb.jsonl}}, got {raw!r}.")
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in valid:
                raise DataError(f"{where}: unknown key `{key}`.{closest_key_hint(key, valid)} "
                                f"Valid keys: {', '.join(sorted(valid))}.")
        bench = cls(**raw)
        bench.name = bench.name or re.sub(r"\W+", "_", Path(str(bench.path if isinstance(bench.path, str) else
                                                              bench.path[0]).rstrip("/*")).stem).strip("_")
        where = f"{where} ({bench.name})"
        if not isinstance(bench.shots, int) or bench.shots < 0:
            raise DataError(f"{where}: shots must be 0 or more worked examples, got {bench.shots!r}.")
        if bench.max_questions is not None and (not isinstance(bench.max_questions, int) or bench.max_questions < 1):
            raise DataError(f"{where}: max_questions must be at least 1 (or null: all), got {bench.max_questions!r}.")
        if bench.dev_path and not bench.shots:
            raise DataError(f"{where}: dev_path holds the worked examples of `shots`, which is 0: set shots (5, "
                            "as C-Eval and CMMLU report), or drop dev_path.")
        if bench.on_error not in ("raise", "skip"):
            raise DataError(f"{where}: on_error must be `raise` or `skip`, got `{bench.on_error}`.")
        if not isinstance(bench.watch_forgetting, bool):
            raise DataError(f"{where}: watch_forgetting must be true or false, got {bench.watch_forgetting!r}.")
        bench.source(bench.path)  # the reading options checked now, not at the first evaluation
        return bench

    def source(self, path: Any) -> SourceConfig:
        """The reading side (files, format, encoding) as a source's, so benchmarks read as data does."""
        return SourceConfig.from_dict({"path": path, "name": self.name, "format": self.format,
                                       "encoding": self.encoding, "columns": self.columns,
                                       "records_field": self.records_field, "on_error": self.on_error}, 0)


@dataclass
class ChoiceQuestion:
    question: str
    choices: list[str]
    answer: int  # index into choices
    where: str  # FILE line N / record N

    def text(self, answer_prefix: str) -> str:
        options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(CHOICE_LETTERS, self.choices))
        return f"{self.question}\n{options}{answer_prefix}"


def parse_benchmarks(raw: Any) -> list[BenchmarkConfig]:
    benchmarks = [BenchmarkConfig.from_dict(item, i) for i, item in enumerate(raw if isinstance(raw, list) else [raw])]
    names = [b.name for b in benchmarks]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"Two benchmarks are named `{name}`: give each a unique `name:` (it names "
                            f"eval_bench_{name}_accuracy).")
    return benchmarks


def _first_field(obj: dict, given: str | None, candidates: tuple[str, ...], what: str, option: str) -> Any:
    names = (given,) if given else candidates
    for name in names:
        if obj.get(name) not in (None, ""):
            return obj[name]
    raise RecordError(f"has no {what} (looked for {', '.join(f'`{n}`' for n in names)}; its fields are "
                      f"{_fields_present(obj)}). Set `{option}` for this benchmark.", "missing_field")


def record_choices(obj: dict, given: str | None) -> list[str]:
    """C-Eval / CMMLU columns A, B, C, D, ...; else a choices list, a {letter: text} mapping or option lines."""
    lettered = [str(obj[letter]) for letter in itertools.takewhile(lambda k: obj.get(k) not in (None, ""),
                                                                    CHOICE_LETTERS)]
    if lettered and not given:
        after = [letter for letter in CHOICE_LETTERS[len(lettered) + 1:] if obj.get(letter) not in (None, "")]
        if after:
            raise RecordError(f"has choice {after[0]} but no choice {CHOICE_LETTERS[len(lettered)]} (empty or "
                              "missing): fill it, or drop the question.", "bad_choices")
        return lettered
    value = _first_field(obj, given, CHOICES_FIELDS, "choices (columns A, B, ... or a choices list)", "choices_field")
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: str(k).strip().upper())
        if [str(k).strip().upper() for k in keys] != list(CHOICE_LETTERS[:len(keys)]):
            raise RecordError(f"has choices keyed {', '.join(map(str, keys))}: key them A, B, C, ...", "bad_choices")
        return [str(value[k]) for k in keys]
    if isinstance(value, str):
        lines = [OPTION_LINE.match(line) for line in value.splitlines() if line.strip()]
        if not all(lines) or [m.group(1) for m in lines] != list(CHOICE_LETTERS[:len(lines)]):
            raise RecordError(f"has choices {snippet(value)!r} that are not lines `A. ...`, `B. ...` in order.",
                              "bad_choices")
        return [m.group(2).strip() for m in lines]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise RecordError(f"has choices of type {a_kind(value)}: give a list, a mapping of letters or lines `A. ...`.",
                      "bad_choices")


def choice_question(obj: Any, bench: BenchmarkConfig, where: str) -> ChoiceQuestion:
    if not isinstance(obj, dict):
        raise RecordError(f"is {a_kind(obj)}, not a record with a question, choices and an answer.", "not_an_object")
    question = str(_first_field(obj, bench.question_field, QUESTION_FIELDS, "question", "question_field")).strip()
    choices = record_choices(obj, bench.choices_field)
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise RecordError(f"has {len(choices)} choices: a question needs 2 to {len(CHOICE_LETTERS)}.", "bad_choices")
    answer = _first_field(obj, bench.answer_field, ANSWER_FIELDS, "answer", "answer_field")
    return ChoiceQuestion(question, choices, answer_index(answer, choices), where)


def answer_index(answer: Any, choices: list[str]) -> int:
    """A letter (`B`, `b`, `B.`, `(B)`, `答案：B`), an index from 0 (MMLU's; also `1` or `1.0` as read from a
    csv), or the text of one choice."""
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    text = str(answer).strip()
    letters = re.sub(r"^答案[:：]?|[\s.．、,，()（）]", "", text).upper()
    if isinstance(answer, int) and not isinstance(answer, bool) or text.isdigit():
        index = int(text)
    elif len(letters) == 1 and letters in CHOICE_LETTERS:
        index = CHOICE_LETTERS.find(letters)
    elif choices.count(text) == 1:
        index = choices.index(text)
    elif len(letters) > 1 and set(letters) <= set(CHOICE_LETTERS):
        raise RecordError(f"has several answers ({letters}): only single-answer questions are scored.",
                          "multiple_answers")
    else:
        index = -1
    if not 0 <= index < len(choices):
        raise RecordError(f"has answer {answer!r}, which names none of its {len(choices)} choices "
                          f"(A-{CHOICE_LETTERS[len(choices) - 1]}, an index from 0, or a choice's text).", "bad_answer")
    return index


def read_choice_questions(bench: BenchmarkConfig, path: Any) -> tuple[list[ChoiceQuestion], dict[str, int],
                                                                      list[Path]]:
    """Every question of the files at `path`, in order, the count of those skipped by reason (`on_error:
    skip`; otherwise the first bad one stops with its file, line and field), and the files."""
    spec = bench.source(path)
    questions, skipped, inputs = [], {}, SourceInput.open(spec)
    for chunk in read_chunks(inputs, spec):
        for i in range(len(chunk.records)):
            number, obj = _parse_record(spec, chunk, i)
            if obj is None:
                continue
            where = f"{chunk.path} {record_unit(chunk.fmt)} {number}"
            try:
                if isinstance(obj, RecordError):
                    raise obj
                questions.append(choice_question(obj, bench, where))
            except RecordError as e:
                if bench.on_error != "skip":
                    raise DataError(f"benchmark `{bench.name}`: `{chunk.path}` {record_unit(chunk.fmt)} {number} {e} "
                                    "If only some questions are like "
                                    "this, `on_error: skip` counts and reports them instead.") from None
                _count(skipped, e.reason)
    return questions, skipped, inputs.files


def load_benchmark(bench: BenchmarkConfig) -> tuple[list[ChoiceQuestion], list[ChoiceQuestion], dict]:
    """(questions to score, worked examples for the shots, a report entry). Without dev_path the shots are
    the file's first questions, left out of the score; max_questions keeps that many spread evenly."""
    questions, skipped, files = read_choice_questions(bench, bench.path)
    if bench.dev_path:
        shots, dev_skipped, _ = read_choice_questions(bench, bench.dev_path)
        for reason, n in dev_skipped.items():
            _count(skipped, f"dev:{reason}", n)
        shots = shots[:bench.shots]
    else:
        shots, questions = questions[:bench.shots], questions[bench.shots:]
    if len(shots) < bench.shots:
        raise DataError(f"benchmark `{bench.name}`: shots {bench.shots}, but {bench.dev_path or bench.path} holds "
                        f"only {len(shots)} usable worked examples. Lower `shots`.")
    if not questions:
        raise DataError(f"benchmark `{bench.name}`: no question left to score in {bench.path}"
                        f"{' after its first ' + str(bench.shots) + ' became the shots' if not bench.dev_path else ''}.")
    available = len(questions)
    if bench.max_questions and available > bench.max_questions:
        keep = np.unique(np.linspace(0, available - 1, bench.max_questions).round().astype(int))
        questions = [questions[i] for i in keep]
    report = {"files": [str(f) for f in files], "questions": len(questions), "questions_available": available,
              "shots": len(shots),
              "chance_accuracy": round(sum(1 / len(q.choices) for q in questions) / len(questions), 4),
              "skipped": skipped}
    return questions, shots, report


# --------------------------------------------------------------------------------------------
# Tokenizer training (SentencePiece BPE with byte fallback), cached by content
# --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


TOKENIZER_MAX_LINES = 5_000_000  # SentencePiece's in-memory limit; it would sample beyond it, unseedably


def train_sentencepiece_tokenizer(sources: Any, cache_dir: str, vocab_size: int, model_type: str = "bpe",
                                  character_coverage: float = 0.9995, max_chars: int = 200_000_000,
                                  user_defined_symbols: list[str] | None = None,
                                  option_names: tuple[str, str] = ("tokenizer_vocab_size",
                                                                   "tokenizer_character_coverage")) -> Path:
    """Train a SentencePiece tokenizer on the sources' texts and save it as a Hugging Face tokenizer dir.

    Byte fallback means no text is ever <unk>; coverage 0.9995 keeps rare CJK characters as bytes
    instead of spending the vocabulary on them. The directory is cached under a key of the
    sources' content and the settings, and loads offline with `AutoTokenizer.from_pretrained`.
    """
    import sentencepiece as spm

    specs = parse_sources(sources)
    digests = FileDigests(Path(cache_dir))
    inputs_per_spec = [(spec, SourceInput.open(spec, cache_dir=Path(cache_dir))) for spec in specs]
    symbols = list(user_defined_symbols or [])
    settings = {"vocab_size": vocab_size, "model_type": model_type, "character_coverage": character_coverage,
                "max_chars": max_chars, "max_lines": TOKENIZER_MAX_LINES, "sentencepiece": spm.__version__,
                "version": STORE_VERSION,
                "user_defined_symbols": symbols}
    material = {"settings": settings, "sources": [
        {"text": spec.text_settings(), "input": inputs.identity(digests)} for spec, inputs in inputs_per_spec]}
    digests.save()
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    out_dir = Path(cache_dir) / "tokenizers" / f"sp-{model_type}-{vocab_size}-{key}"
    if (out_dir / "tokenizer_config.json").exists():
        logger.info("tokenizer: cache hit %s", out_dir)
        return out_dir
    tmp = staging_dir(out_dir)
    try:
        corpus, written, lines = tmp / "corpus.txt", 0, 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in itertools.chain.from_iterable(iter_texts(s, fs) for s, fs in inputs_per_spec):
                f.write(text + "\n")  # SentencePiece reads one sentence per line
                written, lines = written + len(text), lines + 1
                if written >= max_chars or lines >= TOKENIZER_MAX_LINES:
                    break  # the same lines every time: every node (with its own cache_dir) trains the same vocabulary
        logger.info("tokenizer: training SentencePiece %s, vocab %d, on %d characters", model_type, vocab_size, written)
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(tmp / "sp"), vocab_size=vocab_size, model_type=model_type,
                byte_fallback=True, character_coverage=character_coverage, split_digits=True,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                unk_piece=SPECIAL_TOKENS["unk"], bos_piece=SPECIAL_TOKENS["bos"], eos_piece=SPECIAL_TOKENS["eos"],
                pad_piece=SPECIAL_TOKENS["pad"], max_sentence_length=1 << 16,
                input_sentence_size=0, shuffle_input_sentence=False,
                num_threads=os.cpu_count() or 1, minloglevel=2, user_defined_symbols=symbols)
        except RuntimeError as e:
            size, coverage = option_names  # the caller's names for them
            fix = (f"Raise `{size}` (it must hold every kept character plus 256 bytes) or lower `{coverage}`"
                   if "smaller than required_chars" in str(e) else f"Lower `{size}` or add data")
            article = "an" if re.match(r"8|1[18](...)*$", str(vocab_size)) else "a"  # an 8000-, an 11000-token
            raise DataError(f"SentencePiece could not train {article} {vocab_size}-token vocabulary on {written} "
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
        record_special_token_flags(final, tokenizer)
        shutil.copy(hf_dir / "tokenizer.model", final / "tokenizer.model")  # kept for vocabulary extension
        if not out_dir.exists():  # else another process finished first: keep theirs
            os.replace(final, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def preview(sources: Any, tokenizer, source_name: str | None, n: int) -> None:
    """Print the first `n` training texts of each (or one) source, exactly as the model reads them."""
    specs = parse_sources(sources)
    if source_name is not None:
        specs = [s for s in specs if s.name == source_name]
        if not specs:
            names = [s.name for s in parse_sources(sources)]
            raise DataError(f"no source named `{source_name}`.{closest_key_hint(source_name, names)} "
                            f"Sources: {', '.join(names)}.")
    for spec in specs:
        print(f"=== source `{spec.name}` ===")
        counts: dict[str, int] = {}
        shown = 0
        for where, text in itertools.islice(iter_records(spec, counts=counts), n):
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            print(f"--- {where} · {len(text)} characters · {n_tokens} tokens (+EOS)")
            print(text)
            shown += 1
        if not shown:
            raise no_text_left(spec, spec_label(spec), counts)
        print()


def source_patterns(spec: SourceConfig) -> list[str]:
    """Every file, folder or glob a source reads: its `path` and `eval_path`, and a local hub folder or a
    packaged builder's local `data_files`."""
    entries = [entry for entry in (spec.path, spec.eval_path) if entry]
    patterns = [p for entry in entries for p in ([entry] if isinstance(entry, str) else entry)]
    if spec.hub:  # a local hub folder holds its data_files; a packaged builder's are paths from here
        folder = Path(os.path.expanduser(spec.hub))
        patterns += [str(folder)] if folder.is_dir() else [str(f) for f in data_file_entries(spec.data_files)
                                                           if "://" not in str(f)]
    return patterns


def convert_target_problem(sources: Any, specs: list[SourceConfig], out: Path,
                           written: str = "the converted file") -> str | None:
    """`convert --out` (and tools/vocab.py's) must not replace a file a source reads (its text was lost), nor be a
    file a source's folder or glob would read next time (trained on), a `per_file` folder's included (its files
    are separate sources by now)."""
    target = out.resolve()
    folders = [SourceConfig(path=raw["path"], name=f"per_file {raw['path']}") for raw in
               (sources if isinstance(sources, list) else [sources]) if isinstance(raw, dict) and raw.get("per_file")]
    for spec in [*specs, *folders]:
        for pattern in source_patterns(spec):
            found = Path(os.path.expanduser(pattern))
            if found.is_dir() and target.is_relative_to(found.resolve()):
                return (f"--out `{out}` is inside `{pattern}`, which source `{spec.name}` reads: the next run would "
                        f"train on {written} too. Write it elsewhere.")
            if fnmatch.fnmatch(str(target), os.path.abspath(os.path.expanduser(pattern))) or any(
                    target == Path(f).resolve() for f in globlib.glob(os.path.expanduser(pattern), recursive=True)):
                return (f"--out `{out}` is a file source `{spec.name}` reads (`{pattern}`): it would be overwritten, "
                        "or read as data by the next run. Write it elsewhere.")
    return None


def convert(sources: Any, out: str, dedup: bool = True) -> dict[str, int]:
    """Write every source's formatted, cleaned (and deduplicated) texts to one jsonl file."""
    seen: set[int] = set()
    written: dict[str, int] = {}
    out_path = Path(out)
    specs = parse_sources(sources)
    if problem := convert_target_problem(sources, specs, out_path):
        raise DataError(problem)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for spec in specs:
                written[spec.name], counts, produced = 0, {}, 0
                for _, text in iter_records(spec, counts=counts):
                    produced += 1
                    h = text_hash(text)
                    if dedup and h in seen:
                        continue
                    seen.add(h)
                    f.write(json.dumps({"text": text, "source": spec.name}, ensure_ascii=False) + "\n")
                    written[spec.name] += 1
                if not produced:
                    raise no_text_left(spec, spec_label(spec), counts)
        os.chmod(tmp, 0o666 & ~CURRENT_UMASK)  # mkstemp's 0600: the corpus is for others' tools too
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def search_hub(query: str, limit: int) -> list[str]:
    """Hub datasets matching `query`, most downloaded first (huggingface_hub; `datasets.list_datasets`
    no longer exists)."""
    if hub_offline() or not hub_reachable():
        raise DataError(f"cannot search the hub: {hub_endpoint()} is unreachable or HF_HUB_OFFLINE is set. Set "
                        "HF_ENDPOINT to a reachable mirror (e.g. https://hf-mirror.com) or search on a machine with "
                        "network.")
    from huggingface_hub import HfApi

    found = HfApi(endpoint=hub_endpoint()).list_datasets(search=query, limit=limit, sort="downloads")
    return [f"{d.id}\tdownloads {d.downloads or 0}\tlikes {d.likes or 0}" for d in found]


COMMANDS = {  # command: (arguments, what it does)
    "preview": ("CONFIG.yaml [--source NAME] [-n N] [--field value ...]",
                "print the first N (default 3) rendered training texts of each source, or of the source NAME, "
                "with their token counts"),
    "convert": ("CONFIG.yaml --out FILE.jsonl [--field value ...]",
                "write all formatted, cleaned, deduplicated texts as jsonl with a `text` field"),
    "prepare": ("CONFIG.yaml [--field value ...]",
                "build the token stores and the data report (output_dir/data_report.json and .md; e.g. on a CPU "
                "node before the GPU job)"),
    "search": ("QUERY [--limit N]", "list hub datasets matching QUERY, most downloaded first"),
}
USAGE = "usage:\n" + "\n".join(f"  python data_utils.py {command} {arguments}\n      {what}"
                                 for command, (arguments, what) in COMMANDS.items())


def command_help(command: str) -> str:
    """A command's usage and the data options it reads, not all of pretrain.py's training options."""
    from transformers import HfArgumentParser

    import pretrain

    arguments, what = COMMANDS[command]
    options = HfArgumentParser(pretrain.DataArguments, usage=argparse.SUPPRESS, add_help=False).format_help()
    reads = "the data options below" + ("" if command == "convert" else " and those that choose the tokenizer "
                                        "(--tokenizer_name_or_path, --model_name_or_path, --tokenizer_vocab_size, ...)")
    note = textwrap.fill(f"The config file's fields and any pretrain.py option may follow (`python pretrain.py "
                         f"--help` lists them all); this command reads {reads}.", 100)
    return f"usage: python data_utils.py {command} {arguments}\n{what}\n\n{note}\n\ndata {options}"


def output_file_problem(out: str) -> str | None:
    """What keeps `convert --out` from being written, found before the conversion runs."""
    path = Path(os.path.expanduser(out)) if out.strip() else None
    if path is None:
        return "--out is empty: give the jsonl file to write, e.g. --out corpus.jsonl"
    if path.is_dir():
        return f"--out `{out}` is a directory: give the jsonl file to write inside it, e.g. {path / 'corpus.jsonl'}"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"--out `{out}`: `{parent}` is a file, not a directory. Give another path."
    if not os.access(parent, os.W_OK):
        return f"--out `{out}`: `{parent}` is not writable. Give another path."
    return None


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        named = f"unknown command `{argv[0]}`" if argv else "no command"
        print(f"error: {named}: give one of {', '.join(COMMANDS)}.\n{USAGE}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command != "search" and {"-h", "--help"} & set(rest):
        print(command_help(command))
        return 0
    if command == "search":
        cli = argparse.ArgumentParser(prog="data_utils.py search")
        cli.add_argument("query")
        cli.add_argument("--limit", type=int, default=20)
        args = cli.parse_args(rest)
        try:
            print("\n".join(search_hub(args.query, args.limit)) or "no dataset found")
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    import pretrain

    cli = argparse.ArgumentParser(prog=f"data_utils.py {command}", add_help=False)
    if command == "preview":
        cli.add_argument("--source")
        cli.add_argument("-n", type=int, default=3)
    if command == "convert":
        cli.add_argument("--out", required=True)
    own, overrides = cli.parse_known_args(rest)
    problem = (f"-n {own.n}: give how many texts to show per source (0 or more)" if getattr(own, "n", 0) < 0 else
               output_file_problem(own.out) if command == "convert" else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    def job(args: list[str]) -> None:
        if command == "prepare":
            pretrain.prepare_only(args)
            return
        model_args, data_args, training_args = pretrain.parse_args(args)
        pretrain.setup_logging(training_args, data_args)
        pretrain.fetch_from_modelscope(model_args, data_args, training_args, with_models=command == "preview")
        if command == "preview":
            tokenizer = pretrain.load_tokenizer(model_args, data_args, training_args)
            preview(data_args.sources, tokenizer, own.source, own.n)
        else:
            if data_args.near_dedup is not None:
                logger.warning("convert removes exact duplicates only: near_dedup works on token n-grams of the "
                               "token stores, when training or with `prepare`")
            counts = convert(data_args.sources, own.out, data_args.dedup)
            print(f"wrote {sum(counts.values())} texts to {own.out}: " +
                  ", ".join(f"{k} {v}" for k, v in counts.items()))

    return pretrain.main(overrides, job=job)


if __name__ == "__main__":
    import data_utils  # run the imported module, so its exception classes are the ones pretrain catches

    sys.exit(data_utils.main(sys.argv[1:]))
