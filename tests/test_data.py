"""Loaders, the token store and packing."""
import json
import os
import types

import numpy as np
import pytest

import data_utils
from data_utils import DataError, SourceConfig
from conftest import ZH_LINES, make_jsonl_corpus, make_text_corpus


def texts_of(raw_source, index=0):
    spec = SourceConfig.from_dict(raw_source, index)
    return list(data_utils.iter_texts(spec))


def data_args(tmp_path, sources, **overrides):
    fields = dict(sources=sources, block_size=16, eval_fraction=0.0, add_bos="never",
                  cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


# ---------------------------------------------------------------------------------- loaders
def test_plain_text_one_sample_per_line_blank_lines_skipped_and_counted(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("第一行\r\n\r\n  第二行  \n\n第三行".encode())  # CRLF, blanks, no final newline
    spec = SourceConfig.from_dict({"path": str(path)}, 0)
    chunk = next(data_utils.read_chunks([path], spec))
    texts, record_ids, counts = data_utils.format_chunk(spec, chunk)
    assert texts == ["第一行", "第二行", "第三行"]
    assert record_ids == [1, 3, 5]
    assert counts["blank_lines"] == 2


def test_bom_is_removed(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "你好\n世界\n".encode())
    assert texts_of({"path": str(path)}) == ["你好", "世界"]


def test_jsonl_with_configurable_text_field_and_detection_by_content(tmp_path):
    path = make_jsonl_corpus(tmp_path, name="looks_like_text.txt", repeat=1, field="content")
    texts = texts_of({"path": str(path), "text_field": "content"})
    assert texts == [f"{line} 记录0" for line in ZH_LINES]


def test_json_array_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"text": "甲"}, {"text": "乙\r\n丙"}], ensure_ascii=False), encoding="utf-8")
    assert texts_of({"path": str(path)}) == ["甲", "乙\n丙"]


def test_directory_and_glob_sources_are_sorted_and_complete(tmp_path):
    make_text_corpus(tmp_path / "d", name="b.txt", repeat=1)
    make_jsonl_corpus(tmp_path / "d" / "sub", name="a.jsonl", repeat=1)
    (tmp_path / "d" / "notes.md").write_text("not data")
    files = data_utils.resolve_files(str(tmp_path / "d"), "s")
    assert [f.name for f in files] == ["b.txt", "a.jsonl"]
    assert data_utils.resolve_files(str(tmp_path / "d" / "*.txt"), "s") == [tmp_path / "d" / "b.txt"]
    assert len(texts_of({"path": str(tmp_path / "d")})) == 2 * len(ZH_LINES)


@pytest.mark.parametrize("setup,message", [
    (lambda d: str(d / "missing.txt"), "does not exist"),
    (lambda d: (d / "empty_dir").mkdir() or str(d / "empty_dir"), "holds no data files"),
    (lambda d: (d / "empty.txt").write_text("") and None or str(d / "empty.txt"), "is empty"),
    (lambda d: str(d / "*.nothing"), "matches no file"),
])
def test_missing_or_empty_paths_are_clear_errors(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        texts_of({"path": setup(tmp_path), "name": "med"})


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "好"}\n{"text": "坏"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl` line 2 is not valid JSON"):
        texts_of({"path": str(path)})


def test_missing_text_field_names_the_fields_the_record_has(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"text": "ok"}\n{"question": "问", "answer": "答"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 has no field `text`; its fields are `question`, `answer`"):
        texts_of({"path": str(path)})


@pytest.mark.parametrize("value", [3, None, ["a"]])
def test_text_that_is_not_a_string_is_an_error(tmp_path, value):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": value}) + "\n")
    with pytest.raises(DataError, match="not a string"):
        texts_of({"path": str(path)})


def test_skip_policy_counts_what_it_skipped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "一"}\nnot json\n{"other": 1}\n{"text": "二"}\n', encoding="utf-8")
    spec = SourceConfig.from_dict({"path": str(path), "on_error": "skip"}, 0)
    texts, _, counts = data_utils.format_chunk(spec, next(data_utils.read_chunks([path], spec)))
    assert texts == ["一", "二"]
    assert counts["skipped:invalid_json"] == 1 and counts["skipped:missing_field"] == 1
    assert counts["records"] == 4


def test_invalid_utf8_suggests_the_encoding_option(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("正常一行\n".encode() + "高血压".encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"line 2 is not valid utf-8.*encoding: gb18030"):
        texts_of({"path": str(path), "encoding": "utf-8"})


def test_gbk_file_is_detected_and_decoded(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("高血压是常见病\r\n糖尿病需要控制血糖\r\n".encode("gbk"))
    assert data_utils.detect_encoding(path, "auto") == "gb18030"
    assert texts_of({"path": str(path)}) == ["高血压是常见病", "糖尿病需要控制血糖"]


def test_unknown_source_key_suggests_the_closest(tmp_path):
    with pytest.raises(DataError, match=r"unknown key `text_feild`.*`text_field`"):
        SourceConfig.from_dict({"path": "x", "text_feild": "t"}, 0)


# ------------------------------------------------------------------------------ token store
def build(tmp_path, tokenizer, sources, **overrides):
    return data_utils.build_datasets(data_args(tmp_path, sources, **overrides), tokenizer,
                                     overrides.get("block_size", 16), seed=0)


def test_store_keeps_every_token_in_order_with_eos_after_each_document(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=3)
    data = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
    docs = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    store = data.train.parts[0].store
    assert store.tokens.dtype == np.uint16  # the vocabulary fits
    assert store.tokens.tolist() == expected
    assert store.n_docs == len(docs)
    assert all(store.doc(i)[-1] == tokenizer.eos_token_id for i in range(store.n_docs))
    # packing: blocks are consecutive windows over the stream, no padding, only the tail is unused
    blocks = np.concatenate([data.train.parts[0][i]["input_ids"].numpy() for i in range(len(data.train.parts[0]))])
    assert blocks.tolist() == expected[:len(data.train.parts[0]) * 16]
    assert data.train.parts[0].unused_tail_tokens == len(expected) % 16 < 16
    assert all(data.train.parts[0][i]["input_ids"].shape == (16,) for i in range(len(data.train.parts[0])))


def test_bos_policy(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=1)
    data = build(tmp_path, tokenizer, [{"path": str(path)}], add_bos="always")
    store = data.train.parts[0].store
    assert all(store.doc(i)[0] == tokenizer.bos_token_id for i in range(store.n_docs))
    # auto follows the tokenizer: the trained SentencePiece tokenizer does not add BOS itself
    assert data_utils.resolve_bos(tokenizer, "auto") is None


def test_eval_split_is_by_document_and_disjoint(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=10)
    data = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}], eval_fraction=0.2)
    train_ids, eval_ids = set(data.train.parts[0].doc_ids.tolist()), set(data.eval["c"].doc_ids.tolist())
    assert not train_ids & eval_ids
    assert len(train_ids | eval_ids) == data.train.parts[0].store.n_docs
    assert len(eval_ids) == round(0.2 * data.train.parts[0].store.n_docs)
    again = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}], eval_fraction=0.2)
    assert again.eval["c"].doc_ids.tolist() == data.eval["c"].doc_ids.tolist()  # seeded


def test_explicit_eval_files(tmp_path, tokenizer):
    train = make_text_corpus(tmp_path / "t", repeat=4)
    held = make_jsonl_corpus(tmp_path / "e", repeat=4)
    data = build(tmp_path, tokenizer, [{"path": str(train), "eval_path": str(held), "name": "c"}])
    assert data.train.parts[0].store.n_docs == 4 * len(ZH_LINES) == len(data.train.parts[0].doc_ids)
    assert data.eval["c"].store.dir != data.train.parts[0].store.dir


def test_eval_split_smaller_than_a_block_is_an_error(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=3)
    with pytest.raises(DataError, match="fewer than one block"):
        build(tmp_path, tokenizer, [{"path": str(path)}], eval_fraction=0.01, block_size=120)


def test_second_run_is_a_cache_hit_without_tokenization(tmp_path, tokenizer, monkeypatch):
    path = make_text_corpus(tmp_path / "d", repeat=3)
    first = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
    assert first.report["sources"]["c"]["cache"] == "built"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_utils.TokenStore, "build", no_tokenizing)
    second = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
    assert second.report["sources"]["c"]["cache"] == "hit"
    assert second.train.parts[0].store.dir == first.train.parts[0].store.dir


def test_any_changed_input_rebuilds(tmp_path, tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    path = make_jsonl_corpus(tmp_path / "d", repeat=3)
    base = [{"path": str(path), "name": "c"}]
    first = build(tmp_path, tokenizer, base)
    store_dir = first.train.parts[0].store.dir
    # a file's content
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "新增的一条记录"}, ensure_ascii=False) + "\n")
    changed_file = build(tmp_path, tokenizer, base)
    assert changed_file.report["sources"]["c"]["cache"] == "built"
    assert changed_file.train.parts[0].store.dir != store_dir
    assert changed_file.train.parts[0].store.n_docs == first.train.parts[0].store.n_docs + 1
    # the formatting (a template)
    changed_field = build(tmp_path, tokenizer, [{"path": str(path), "name": "c",
                                                 "template": {"type": "format", "format": "病例：{text}"}}])
    assert changed_field.train.parts[0].store.dir not in (store_dir, changed_file.train.parts[0].store.dir)
    # the tokenizer
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["高血压"])
    changed_tokenizer = build(tmp_path, other, base)
    assert changed_tokenizer.report["sources"]["c"]["cache"] == "built"
    # the block size re-packs the same store: new blocks, no new tokenization
    repacked = build(tmp_path, tokenizer, base, block_size=8)
    assert repacked.report["sources"]["c"]["cache"] == "hit"
    assert len(repacked.train.parts[0]) == changed_file.train.parts[0].n_tokens // 8 != len(changed_file.train.parts[0])


def test_interrupted_build_is_never_taken_as_complete(tmp_path, tokenizer, monkeypatch):
    path = make_text_corpus(tmp_path / "d", repeat=3)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_utils, "tokenize_chunk", crash)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, tokenizer, [{"path": str(path)}])
    stores = list((tmp_path / "cache" / "token_stores").iterdir())
    assert stores == []  # the temporary directory was removed, nothing looks finished
    monkeypatch.undo()
    assert build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}]).report["sources"]["c"]["cache"] == "built"


def test_temporary_directories_of_killed_builds_are_removed(tmp_path, tokenizer):
    """A SIGKILLed build cannot clean up after itself: the next build on the host removes what a dead
    process left (and never what a live one is writing)."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stores = tmp_path / "cache" / "token_stores"
    left = stores / f"notes-0123.tmp-{host}-{dead}"
    alive = stores / f"notes-4567.tmp-{host}-{os.getppid()}"
    for directory in (left, alive):
        directory.mkdir(parents=True)
        (directory / "tokens.bin").write_bytes(b"partial")
    build(tmp_path, tokenizer, [{"path": str(make_text_corpus(tmp_path / "d", repeat=3)), "name": "notes"}])
    assert not left.exists() and alive.exists()
    assert [p.name for p in (tmp_path / "cache" / "views").iterdir() if ".tmp-" in p.name] == []


def test_parallel_workers_give_the_same_store(tmp_path, tokenizer, monkeypatch):
    path = make_text_corpus(tmp_path / "d", repeat=40)
    monkeypatch.setattr(data_utils, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(data_utils, "CHUNK_LINES", 16)
    serial = build(tmp_path / "a", tokenizer, [{"path": str(path)}], preprocessing_num_workers=1)
    parallel = build(tmp_path / "b", tokenizer, [{"path": str(path)}], preprocessing_num_workers=2)
    assert parallel.train.parts[0].store.tokens.tolist() == serial.train.parts[0].store.tokens.tolist()
    assert parallel.train.parts[0].store.offsets.tolist() == serial.train.parts[0].store.offsets.tolist()


def test_several_sources_are_all_trained_on(tmp_path, tokenizer):
    a = make_text_corpus(tmp_path / "a", repeat=3)
    b = make_jsonl_corpus(tmp_path / "b", repeat=3)
    data = build(tmp_path, tokenizer, [{"path": str(a), "name": "a"}, {"path": str(b), "name": "b"}])
    report = data.report["sources"]
    assert len(data.train) == report["a"]["train_blocks"] + report["b"]["train_blocks"]  # natural sizes
    assert set(data.train.source_ids.tolist()) == {0, 1}
    with pytest.raises(DataError, match="Two sources are named `a`"):
        build(tmp_path, tokenizer, [{"path": str(a), "name": "a"}, {"path": str(b), "name": "a"}])
