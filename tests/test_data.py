"""Loaders, the token store and packing."""
import gzip
import json
import logging
import os
import time
import types
from pathlib import Path

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
    texts, record_ids, counts, _ = data_utils.format_chunk(spec, chunk)
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


def test_per_file_makes_each_file_and_folder_of_a_directory_a_source(tmp_path, caplog):
    """The default config's `data/`: a file dropped in is trained on, with its own eval perplexity."""
    d = tmp_path / "data"
    (d / "wiki").mkdir(parents=True)
    (d / "hub" / "owner" / "name").mkdir(parents=True)
    (d / "notes").mkdir()
    (d / "medical_zh.txt").write_text("高血压\n", encoding="utf-8")
    (d / "cases.jsonl").write_text('{"content": "发热"}\n', encoding="utf-8")
    (d / "cases.txt").write_text("咳嗽\n", encoding="utf-8")
    (d / "dump.jsonl.gz").write_bytes(gzip.compress('{"content": "头痛"}\n'.encode()))
    (d / "wiki" / "a.txt").write_text("北京\n", encoding="utf-8")
    (d / "hub" / "owner" / "name" / "x.jsonl").write_text('{"text": "hub"}\n')  # hub_local_dir's downloads
    (d / "notes" / "todo.md").write_text("not data")
    (d / "README.md").write_text("not data")
    with caplog.at_level(logging.WARNING):
        specs = data_utils.parse_sources([{"path": str(d), "per_file": True, "text_field": "content",
                                           "on_error": "skip"}])
    assert [(s.name, Path(s.path).name) for s in specs] == [
        ("cases", "cases.jsonl"), ("cases_txt", "cases.txt"), ("dump", "dump.jsonl.gz"),
        ("medical_zh", "medical_zh.txt"), ("wiki", "wiki")]
    assert all(s.text_field == "content" and s.on_error == "skip" for s in specs)
    assert "these 2 hold no data file, not read: README.md, notes" in caplog.text
    collide = tmp_path / "collide"
    collide.mkdir()
    for name in ("病历 2023.txt", "病历-2023.txt", "病历_2023.txt"):
        (collide / name).write_text("高血压\n", encoding="utf-8")
    assert sorted(s.name for s in data_utils.parse_sources([{"path": str(collide), "per_file": True}])) == [
        "病历_2023", "病历_2023_txt", "病历_2023_txt2"]
    assert data_utils.parse_sources([{"path": str(d / "wiki"), "per_file": False}])[0].name == "wiki"
    for extra, message in (({"name": "x"}, "`name` cannot apply to all of them"),
                           ({"weight": 1}, "`weight` cannot apply"), ({"per_file": "yes"}, "must be true or false"),
                           ({"path": str(d / "cases.txt")}, "needs `path` to be one directory")):
        with pytest.raises(DataError, match=message):
            data_utils.parse_sources([{"path": str(d), "per_file": True, **extra}])
    for name in ("../../escape", "/abs", "a/../../b"):
        with pytest.raises(DataError, match="would put the source's cache folders outside `cache_dir`"):
            data_utils.parse_sources([{"path": str(d), "name": name}])
    assert data_utils.parse_sources([{"path": str(d), "name": "zh/medical"}])[0].name == "zh/medical"  # as before
    with pytest.raises(DataError, match=r"sources\[1\] \(m\): weight must be a number above 0"):  # the config's entry
        data_utils.parse_sources([{"path": str(d), "per_file": True}, {"path": str(d / "wiki"), "name": "m",
                                                                         "weight": -1}])


def test_per_file_leaves_out_what_other_sources_name(tmp_path):
    """A file given its own settings beside `per_file` (a jsonl whose text is in `content`), or another source's
    eval file, was read twice: trained on as well."""
    d = tmp_path / "data"
    (d / "books").mkdir(parents=True)
    for name in ("a.txt", "cases.jsonl", "dev.txt", "books/ch1.txt"):
        (d / name).write_text('{"content": "x"}\n' if name.endswith("jsonl") else "x\n", encoding="utf-8")
    specs = data_utils.parse_sources([{"path": str(d), "per_file": True},
                                      {"path": str(d / "cases.jsonl"), "text_field": "content"},
                                      {"path": str(tmp_path / "other.txt"), "eval_path": str(d / "dev.txt")}])
    assert [(s.name, Path(s.path).name) for s in specs] == [("a", "a.txt"), ("books", "books"), ("cases", "cases.jsonl"),
                                                            ("other", "other.txt")]
    with pytest.raises(DataError, match="ch1.txt`, which another source names, lies in folder `.*books`, which "
                                        "`per_file` reads as one source"):
        data_utils.parse_sources([{"path": str(d), "per_file": True}, {"path": str(d / "books" / "ch1.txt")}])


def test_a_per_file_source_too_small_to_split_or_pack_trains_whole_or_is_reported(tmp_path, tokenizer, caplog):
    """A few lines dropped into data/ stopped the default config's run (an eval split under one block, or no
    block at all), with fixes (`eval_path`) that per_file refuses."""
    d = tmp_path / "data"
    make_text_corpus(d, "big.txt", repeat=30)
    (d / "notes.txt").write_text("\n".join(f"短句{i}号" for i in range(8)), encoding="utf-8")
    (d / "one.txt").write_text("只有一行", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        data = build(tmp_path, tokenizer, [{"path": str(d), "per_file": True}], eval_fraction=0.1)
    sources = data.report["sources"]
    assert sources["big"]["eval_blocks"] > 0 and "notes" not in data.eval and "one" not in data.eval
    assert sources["notes"]["eval_documents"] == 0 and sources["notes"]["train_documents"] == 8
    assert sources["one"]["train_blocks"] == 0 and sources["one"]["share_of_training_tokens"] == 0.0
    assert "source `notes` (per_file): 8 documents, 88 tokens before dedup: too small for an eval split (two " \
        "blocks of 16 tokens would be more than 20% of it): no eval perplexity for it" in caplog.text
    assert "source `one` (per_file): its 9 tokens make no block of 16: not trained on" in caplog.text
    with pytest.raises(DataError, match="source `one`: 9 training tokens make no block"):  # named sources: stop
        build(tmp_path, tokenizer, [{"path": str(d / "big.txt")}, {"path": str(d / "one.txt")}])
    (d / "mid.txt").write_text("\n".join(f"中等大小的文件，第{i}行。" for i in range(14)), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        data = build(tmp_path, tokenizer, [{"path": str(d), "per_file": True}], eval_fraction=0.1)
    assert "mid" in data.eval and "its eval share is" in caplog.text  # raised to hold out two blocks
    (d / "mid.txt").unlink()
    (d / "dup.txt").write_text("重复的一行文字。\n" * 50 + "另一行。\n第三行。\n", encoding="utf-8")  # small after dedup
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = build(tmp_path, tokenizer, [{"path": str(d), "per_file": True}], eval_fraction=0.1)
    assert "dup" not in data.eval and data.report["sources"]["dup"]["eval_documents"] == 0
    assert "source `dup` (per_file): its eval split has" in caplog.text and (
        data.report["sources"]["dup"]["eval_documents_unused"] > 0)
    (d / "dup.txt").unlink()
    (d / "big.txt").unlink()
    (d / "notes.txt").unlink()
    with pytest.raises(DataError, match=r"no source has a training block of block_size 16 \(shorter: `one`\)"):
        build(tmp_path, tokenizer, [{"path": str(d), "per_file": True}], eval_fraction=0.1)


@pytest.mark.parametrize("setup,message", [
    (lambda d: str(d / "missing.txt"), "does not exist"),
    (lambda d: (d / "empty_dir").mkdir() or str(d / "empty_dir"), "holds no data files"),
    (lambda d: (d / "empty.txt").write_text("") and None or str(d / "empty.txt"), "is empty"),
    (lambda d: str(d / "*.nothing"), "matches no file"),
])
def test_missing_or_empty_paths_are_clear_errors(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        texts_of({"path": setup(tmp_path), "name": "med"})


def test_empty_files_are_skipped_and_counted_under_the_skip_policy(tmp_path, tokenizer):
    """Real dumps hold 0-byte shards: `on_error: skip` stopped on them all the same."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "高血压是常见病"}\n', encoding="utf-8")
    (tmp_path / "d" / "b.jsonl").write_text("")
    with pytest.raises(DataError, match="b.jsonl` is empty. Remove it or fill it, or set `on_error: skip`"):
        texts_of({"path": str(tmp_path / "d")})
    assert texts_of({"path": str(tmp_path / "d"), "on_error": "skip"}) == ["高血压是常见病"]
    for group in (None, "paragraph"):
        spec = SourceConfig.from_dict({"path": str(tmp_path / "d"), "on_error": "skip", "group": group}, 0)
        counts = [data_utils.format_chunk(spec, chunk)[2] for chunk in data_utils.read_chunks(
            data_utils.SourceInput.open(spec), spec)]
        assert sum(c.get("skipped:empty_file", 0) for c in counts) == 1, group
    data = build(tmp_path, tokenizer, [{"path": str(tmp_path / "d"), "on_error": "skip", "name": "d"}], block_size=4)
    assert data.report["sources"]["d"]["skipped"] == {"empty_file": 1}


def test_a_json_object_holding_the_records_is_read_with_records_field(tmp_path):
    wrapped = {"version": "1.0", "data": [{"text": "高血压是常见病"}, {"text": "糖尿病"}]}
    (tmp_path / "one_line.json").write_text(json.dumps(wrapped, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "pretty.json").write_text(json.dumps(wrapped, ensure_ascii=False, indent=2), encoding="utf-8")
    for name in ("one_line.json", "pretty.json"):
        assert texts_of({"path": str(tmp_path / name), "records_field": "data"}) == ["高血压是常见病", "糖尿病"]
    with pytest.raises(DataError, match="line 1 has no field `text`; its fields are `version`, `data`.* If the "
                                        "file is one JSON object whose `data` holds the records, set `records_field: data`"):
        texts_of({"path": str(tmp_path / "one_line.json")})
    with pytest.raises(DataError, match="a pretty-printed JSON object. If it holds the records as a list under one of "
                                        "its fields .*set `records_field` to that field"):
        texts_of({"path": str(tmp_path / "pretty.json")})
    with pytest.raises(DataError, match=r"`records_field: rows` names no list of records: its object's fields are "
                                        "`version`, `data`"):
        texts_of({"path": str(tmp_path / "pretty.json"), "records_field": "rows"})
    with pytest.raises(DataError, match="`records_field` applies to JSON files"):
        texts_of({"hub": "text", "data_files": str(tmp_path / "pretty.json"), "records_field": "data"})
    assert texts_of({"hub": "json", "data_files": str(tmp_path / "pretty.json"), "records_field": "data"}) == [
        "高血压是常见病", "糖尿病"]
    spec = SourceConfig.from_dict({"path": "x"}, 0)
    assert "records_field" not in spec.text_settings()  # the token stores of sources without it keep their keys


def test_an_excel_workbook_is_named_with_how_to_save_it(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "cases.xlsx", "w") as book:
        book.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(DataError, match=r"cases.xlsx` is a zip archive \(an Excel .xlsx.*save an Excel sheet as "
                                        r"\"CSV UTF-8\""):
        texts_of({"path": str(tmp_path / "cases.xlsx")})


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "好"}\n{"text": "坏"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl` line 2 is not valid JSON"):
        texts_of({"path": str(path)})


def test_missing_text_field_names_the_fields_the_record_has(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"text": "ok"}\n{"question": "问", "answer": "答"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 has no field `text`; its fields are `question`, `answer`.*"
                                        r"question-answer pair: `template: qa_concat`"):
        texts_of({"path": str(path)})
    for record, template in (({"instruction": "问", "input": "", "output": "答"}, "qa_instruction"),
                             ({"conversations": [{"from": "human", "value": "问"}]}, "dialog")):
        path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=f"`template: {template}` renders"):
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
    texts, _, counts, _ = data_utils.format_chunk(spec, next(data_utils.read_chunks([path], spec)))
    assert texts == ["一", "二"]
    assert counts["skipped:invalid_json"] == 1 and counts["skipped:missing_field"] == 1
    assert counts["records"] == 4


def test_invalid_utf8_suggests_the_encoding_option(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("正常一行\n".encode() + "高血压".encode("gbk") + b"\n")
    with pytest.raises(DataError, match=r"line 2 is not valid utf-8.*encoding: gb18030"):
        texts_of({"path": str(path), "encoding": "utf-8"})


def test_lines_in_another_encoding_are_skipped_and_counted_or_named(tmp_path):
    """A GBK line in a UTF-8 file (after the first MB, or with `encoding:` forced): `on_error: skip` skips and
    counts it as `bad_encoding`, also where lines are decoded in blocks (a lone-CR file); `raise` names it."""
    path = tmp_path / "mixed.txt"
    path.write_bytes("正常一行\n".encode() + "高血压".encode("gbk") + b"\n" + "第三行\n".encode())
    spec = SourceConfig.from_dict({"path": str(path), "encoding": "utf-8", "on_error": "skip"}, 0)
    texts, numbers, counts, notes = data_utils.format_chunk(spec, next(data_utils.read_chunks([path], spec)))
    assert (texts, numbers) == (["正常一行", "第三行"], [1, 3]) and counts["skipped:bad_encoding"] == 1
    assert notes == [("bad_encoding", f"`{path}` line 2: is not valid utf-8 (byte 0xb8): a line in another encoding?")]
    with pytest.raises(DataError, match=r"mixed\.txt` line 2 is not valid utf-8.*reads as gb18030.*mixes encodings.*"
                                        r"iconv.*on_error: skip"):
        texts_of({"path": str(path), "encoding": "utf-8"})
    lone_cr = tmp_path / "cr.txt"
    lone_cr.write_bytes("第一行\r第二行\r".encode("gbk") + b"\xff\xff\r" + "第四行\r".encode("gbk"))
    spec = SourceConfig.from_dict({"path": str(lone_cr), "encoding": "gb18030", "on_error": "skip"}, 0)
    chunk = next(data_utils.read_chunks([lone_cr], spec))
    texts, numbers, counts, _ = data_utils.format_chunk(spec, chunk)
    assert (texts, numbers, counts["skipped:bad_encoding"]) == (["第一行", "第二行", "第四行"], [1, 2, 4], 1)
    assert chunk.encoding == "gb18030"  # what the report names, though the lines are handed on as UTF-8
    with pytest.raises(DataError, match=r"cr\.txt` line 3 is not valid gb18030 \(byte 0xff\)"):
        texts_of({"path": str(lone_cr), "encoding": "gb18030"})


def test_a_file_that_mixes_encodings_is_named_or_read_as_utf8(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n".join(line.encode("gbk" if i % 2 else "utf-8") for i, line in enumerate(ZH_LINES[:5])))
    with pytest.raises(DataError, match=r"mixed\.txt` mixes encodings: line 1 is UTF-8 but line 2 is not.*"
                                        r"2 of the first 5 lines are like it"):
        data_utils.detect_encoding(path, "auto")
    assert data_utils.detect_encoding(path, "auto", skip_bad_lines=True) == "utf-8"
    assert texts_of({"path": str(path), "on_error": "skip"}) == [ZH_LINES[0], ZH_LINES[2], ZH_LINES[4]]


# UTF-8 text whose bytes are also valid GB18030: read as GB18030 it decodes, garbled, without an error
UTF8_READS_AS_GB18030 = ["心脏病患者要注意休息", "Dose: 5 mg ×2"]  # the second as 脳2: no ideograph in UTF-8


def gb18030_file_with_utf8_lines(path, fmt):
    """A GB18030 file of a little over 1 MB (its first MB is GB18030 only) whose records 30001 and 30002 are
    UTF-8; its texts and the line numbers of those two records."""
    texts = [f"第{i}例：高血压患者应当定期监测血压" for i in range(1, 30004)]
    texts[30000:30002] = UTF8_READS_AS_GB18030
    rows = {"text": texts, "csv": [f"{i},{t}" for i, t in enumerate(texts, 1)],
            "jsonl": [json.dumps({"text": t}, ensure_ascii=False) for t in texts],
            "json": [json.dumps({"text": t}, ensure_ascii=False) + ("," if i < len(texts) else "")
                     for i, t in enumerate(texts, 1)]}[fmt]
    header = {"csv": b"id,text\n", "json": b"[\n"}.get(fmt, b"")
    path.write_bytes(header + b"".join(row.encode("utf-8" if i in (30001, 30002) else "gb18030") + b"\n"
                                       for i, row in enumerate(rows, 1)) + (b"]\n" if fmt == "json" else b""))
    assert path.stat().st_size > 1 << 20
    return texts, [n + (1 if header else 0) for n in (30001, 30002)]


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "json"])
def test_utf8_lines_after_the_first_mb_of_a_gb18030_file_are_named_or_skipped(tmp_path, fmt):
    """They would decode as GB18030, garbled and silently; now `raise` names the first (both readings), `skip`
    counts both as `bad_encoding`, and `encoding: gb18030` (the user says so) reads every line as GB18030."""
    path = tmp_path / f"gb.{'txt' if fmt == 'text' else fmt}"
    texts, lines = gb18030_file_with_utf8_lines(path, fmt)
    source = {"path": str(path), "format": fmt}
    assert data_utils.detect_encoding(path, "auto") == "gb18030"
    places = [f"record {n}" for n in (30001, 30002)] if fmt == "json" else [f"line {n}" for n in lines]
    with pytest.raises(DataError, match=rf"gb\.\w+` {places[0]} reads as UTF-8 \(“.*心脏病患者要注意休息.*”\), not "
                                        r"as the GB18030 the file was detected as \(“.*蹇冭剰鐥.*”\): the file mixes "
                                        r"encodings.*iconv.*on_error: skip.*encoding: gb18030"):
        texts_of(source)
    spec = SourceConfig.from_dict({**source, "on_error": "skip"}, 0)
    skipped, notes, kept = 0, [], []
    for chunk in data_utils.read_chunks([path], spec):
        chunk_texts, _, counts, chunk_notes = data_utils.format_chunk(spec, chunk)
        kept, notes, skipped = kept + chunk_texts, notes + chunk_notes, skipped + counts.get("skipped:bad_encoding", 0)
    assert kept == [t for t in texts if t not in UTF8_READS_AS_GB18030] and skipped == 2
    assert [message.split(": ")[0] for _, message in notes] == [f"`{path}` {place}" for place in places]
    garbled = texts_of({**source, "encoding": "gb18030"})
    assert "心脏病患者要注意休息".encode().decode("gb18030") in garbled


def test_rows_of_csv_and_json_in_another_encoding_are_named_by_line_or_skipped(tmp_path):
    """A file decoded whole: the error names the row's own line or the JSON record (it named the line where an
    8 KB block of decoding started, or only a byte offset), and `on_error: skip` skips the record instead of
    stopping."""
    rows = [f"{i},第{i}行的内容" for i in range(1, 3001)]
    table = tmp_path / "t.csv"
    table.write_bytes(b"id,text\n" + b"".join(r.encode("gbk" if i == 1500 else "utf-8") + b"\n"
                                             for i, r in enumerate(rows, 1)))
    array = tmp_path / "t.json"
    items = [json.dumps({"text": f"第{i}条"}, ensure_ascii=False) for i in range(1, 201)]
    array.write_bytes(b"[\n" + b",\n".join(r.encode("gbk" if i == 150 else "utf-8") for i, r in enumerate(items, 1))
                      + b"\n]")
    for path, place in ((table, "line 1501"), (array, "record 150")):
        with pytest.raises(DataError, match=rf"` {place} is not valid utf-8 \(byte 0x\w\w\), but reads as gb18030"):
            texts_of({"path": str(path), "encoding": "utf-8"})
        spec = SourceConfig.from_dict({"path": str(path), "encoding": "utf-8", "on_error": "skip"}, 0)
        chunks = [data_utils.format_chunk(spec, chunk) for chunk in data_utils.read_chunks([path], spec)]
        assert sum(len(texts) for texts, _, _, _ in chunks) == (2999 if path == table else 199)
        assert [note for _, _, _, notes in chunks for note in notes] == [
            ("bad_encoding", f"`{path}` {place}: is not valid utf-8 (byte 0xb5): a line in another encoding?")]
    utf16 = tmp_path / "u16.json"  # a lone surrogate: bytes that surrogateescape cannot keep either
    utf16.write_bytes('[{"text": "中文"}]'.encode("utf-16") + b"\x00\xd8\x41\x00")
    with pytest.raises(DataError, match=r"u16\.json` byte 34 is not valid utf-16 \(detected from the byte-order mark"):
        texts_of({"path": str(utf16)})


def test_a_head_that_is_gb18030_with_utf8_lines_mixes_encodings(tmp_path):
    """UTF-8 lines that are also valid GB18030 inside the first MB: named, with the way out if the detection
    is wrong; under `on_error: skip` the file is read in the encoding of most of its lines."""
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"".join(line.encode("gb18030") + b"\n" for line in ZH_LINES[:5]) +
                     b"".join(line.encode("utf-8") + b"\n" for line in UTF8_READS_AS_GB18030))
    with pytest.raises(DataError, match=r"mixes encodings: line 6 is UTF-8 but line 1 is not.*"
                                        r"If line 6 is GB18030 after all \(it then reads “蹇冭剰.*”\), set "
                                        r"`encoding: gb18030`"):
        data_utils.detect_encoding(path, "auto")
    assert data_utils.detect_encoding(path, "auto", skip_bad_lines=True) == "gb18030"
    assert texts_of({"path": str(path), "on_error": "skip"}) == ZH_LINES[:5]


def test_a_json_array_on_each_line_is_named_with_a_conversion_that_works(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text('[{"text": "甲"}, {"text": "乙"}]\n[{"text": "丙"}]\n', encoding="utf-8")
    fix = r"one object per line instead, e\.g\. `jq -c '\.\[\]' \S*lists\.jsonl > lists_lines\.jsonl`"
    with pytest.raises(DataError, match=r"lists\.jsonl` line 1 is a JSON array \(a list\) and so is every line "
                                        r"after it.*" + fix):
        texts_of({"path": str(path)})
    with pytest.raises(DataError, match=r"lists\.jsonl` line 1 is a JSON list, not an object.*" + fix):
        texts_of({"path": str(path), "format": "jsonl"})
    path.write_text('[{"text": "甲"}, {"text": "乙"}]', encoding="utf-8")  # one array on one line: a JSON file
    assert texts_of({"path": str(path)}) == ["甲", "乙"]


def test_gbk_file_is_detected_and_decoded(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("高血压是常见病\r\n糖尿病需要控制血糖\r\n".encode("gbk"))
    assert data_utils.detect_encoding(path, "auto") == "gb18030"
    assert texts_of({"path": str(path)}) == ["高血压是常见病", "糖尿病需要控制血糖"]


def test_big5_is_told_from_gbk_which_it_also_decodes_as(tmp_path):
    """Traditional Chinese in Big5 decodes as GB18030 without an error, into other (rare) characters: it was
    trained on garbled. GBK text that also decodes as Big5 stays GB18030 (real corpora: test_shared_corpora)."""
    lines = ["高血壓是一種常見的慢性病，患者需要長期服藥並監測血壓。", "糖尿病患者應控制飲食，規律運動，定期檢測血糖。"]
    (tmp_path / "big5.txt").write_bytes("\r\n".join(lines * 3).encode("big5"))
    assert data_utils.detect_encoding(tmp_path / "big5.txt", "auto") == "cp950"
    assert texts_of({"path": str(tmp_path / "big5.txt")}) == lines * 3
    simplified = "高血压是一种常见的慢性病，患者需要长期服药并监测血压。"
    assert simplified.encode("gbk").decode("cp950")  # Big5 reads it too (garbled)
    (tmp_path / "gbk.txt").write_bytes(simplified.encode("gbk"))
    assert data_utils.detect_encoding(tmp_path / "gbk.txt", "auto") == "gb18030"


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


def test_bos_policy(tmp_path, tokenizer, caplog):
    path = make_text_corpus(tmp_path / "d", repeat=1)
    with caplog.at_level("WARNING", logger="data_utils"):
        data = build(tmp_path, tokenizer, [{"path": str(path)}], add_bos="always")
    store = data.train.parts[0].store
    assert all(store.doc(i)[0] == tokenizer.bos_token_id for i in range(store.n_docs))
    # the tokenizer saved with the model encodes without it: said, so inference can match training
    assert "add_bos always: training documents start with BOS, but the tokenizer" in caplog.text
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


def test_a_large_eval_split_is_capped_by_blocks_spread_over_it(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=40)
    whole = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}], eval_fraction=0.3).eval["c"]
    capped = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}], eval_fraction=0.3, max_eval_tokens=16 * 10)
    assert len(whole) > 30 and len(capped.eval["c"]) == 10
    report = capped.report["sources"]["c"]
    assert report["eval_blocks"] == 10 and report["eval_blocks_available"] == len(whole)
    blocks = [capped.eval["c"][i]["input_ids"].tolist() for i in range(10)]
    assert blocks[0] == whole[0]["input_ids"].tolist() and blocks[-1] == whole[len(whole) - 1]["input_ids"].tolist()
    assert len({tuple(b) for b in blocks}) == 10  # distinct blocks from across the split


def test_explicit_eval_files(tmp_path, tokenizer):
    train = make_text_corpus(tmp_path / "t", repeat=4)
    held = make_jsonl_corpus(tmp_path / "e", repeat=4)
    data = build(tmp_path, tokenizer, [{"path": str(train), "eval_path": str(held), "name": "c"}])
    assert data.train.parts[0].store.n_docs == 4 * len(ZH_LINES) == len(data.train.parts[0].doc_ids)
    assert data.eval["c"].store.dir != data.train.parts[0].store.dir


def test_eval_split_smaller_than_a_block_is_an_error(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=3)
    with pytest.raises(DataError, match="fewer than one block of 120. Raise `eval_fraction`, give `eval_path`"):
        build(tmp_path, tokenizer, [{"path": str(path)}], eval_fraction=0.01, block_size=120)
    held = tmp_path / "held.txt"
    held.write_text("短的评估文本。\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fewer than one block of 120. Add texts to its eval files \(`eval_path`"):
        build(tmp_path, tokenizer, [{"path": str(path), "eval_path": str(held)}], block_size=120)


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


def test_a_damaged_cached_store_is_tokenized_again(tmp_path, tokenizer, caplog):
    """A cache copied short (tokens.bin truncated) was used as a hit: 'stack expects each tensor to be equal size'
    from the collator, many steps later."""
    import logging

    path = make_text_corpus(tmp_path / "d", repeat=3)
    first = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
    store = first.train.parts[0].store.dir
    expected = [first.train[i]["input_ids"].tolist() for i in range(len(first.train))]
    for damage in (lambda: os.truncate(store / "tokens.bin", 100), lambda: os.truncate(store / "offsets.bin", 17),
                   lambda: (store / "doc_hashes.bin").unlink()):
        damage()
        with caplog.at_level(logging.WARNING, logger="data_utils"):
            again = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
        assert again.report["sources"]["c"]["cache"] == "built" and "is damaged" in caplog.text
        assert [again.train[i]["input_ids"].tolist() for i in range(len(again.train))] == expected
        caplog.clear()


def test_a_damaged_store_another_process_moved_first_is_rebuilt_not_a_crash(tmp_path, tokenizer, monkeypatch):
    """Two jobs on one cache both saw the damage: the second rmtree raised FileNotFoundError."""
    path = make_text_corpus(tmp_path / "d", repeat=3)
    store = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}]).train.parts[0].store.dir
    os.truncate(store / "tokens.bin", 100)
    real_rename = os.rename

    def other_process_first(src, dst):
        real_rename(src, tmp_path / "moved_by_the_other_job")
        raise FileNotFoundError(src)

    monkeypatch.setattr(data_utils.os, "rename", other_process_first)
    again = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
    assert again.report["sources"]["c"]["cache"] == "built"


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


def test_a_killed_build_resumes_after_its_last_saved_chunk(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    """A build killed mid-way (preempted, OOM-killed: no cleanup, unflushed writes lost) left a staging directory
    that the next build removed, and hours of tokenization with it. It now saves its progress, and the next build
    of the same store resumes after the last saved chunk: it tokenizes only the rest, into a store equal to one
    built in one go, counts and all. A partial store of the same source with other settings is removed by the
    next build of that source."""
    import subprocess
    import sys

    from conftest import ROOT

    corpus = make_text_corpus(tmp_path / "d", repeat=40)
    source = {"path": str(corpus), "name": "c"}
    child = f"""
import os, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import data_utils
from pathlib import Path
from transformers import AutoTokenizer
from test_data import build
data_utils.CHUNK_LINES, data_utils.PROGRESS_SECONDS = 16, 0.0
real, calls = data_utils.tokenize_chunk, []
def dies_at_chunk_10(*args):
    calls.append(1)
    if len(calls) == 10:
        os._exit(9)
    return real(*args)
data_utils.tokenize_chunk = dies_at_chunk_10
build(Path({str(tmp_path / "resumed")!r}), AutoTokenizer.from_pretrained({str(tokenizer_dir)!r}), [{source!r}])
"""
    stores, partials = tmp_path / "resumed" / "cache" / "token_stores", []
    for settings in ({"min_chars": 2}, {}):  # first a partial store of the source under other settings
        script = child.replace(f"[{source!r}]", f"[{({**source, **settings})!r}]")
        killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
        assert killed.returncode == 9, killed.stderr
        partials.append([p for p in stores.iterdir()])
    assert len(partials[0]) == 1 and partials[1] == [partials[1][0]] != partials[0]  # the obsolete one went
    assert json.loads((partials[1][0] / "progress.json").read_text())["chunks"] == 9

    monkeypatch.setattr(data_utils, "CHUNK_LINES", 16)
    real, tokenized = data_utils.tokenize_chunk, []
    monkeypatch.setattr(data_utils, "tokenize_chunk", lambda *args: tokenized.append(1) or real(*args))
    resumed = build(tmp_path / "resumed", tokenizer, [source])
    monkeypatch.setattr(data_utils, "tokenize_chunk", real)
    whole = build(tmp_path / "whole", tokenizer, [source])
    n_chunks = -(-sum(1 for _ in corpus.open(encoding="utf-8")) // 16)
    assert len(tokenized) == n_chunks - 9 > 0
    a, b = resumed.train.parts[0].store, whole.train.parts[0].store
    for name in ("tokens", "offsets", *data_utils.DOC_ARRAYS):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    assert {k: v for k, v in a.meta.items() if k != "seconds"} == {k: v for k, v in b.meta.items() if k != "seconds"}
    assert [p.name for p in stores.iterdir()] == [a.dir.name] and not (a.dir / "progress.json").exists()


def test_an_interrupted_build_resumes_in_the_same_process_and_under_another_source_name(tmp_path, tokenizer,
                                                                                       monkeypatch, caplog):
    """Ctrl-C in a notebook, or a container whose process is PID 1 at every start: the partial store carries this
    process's own id, which the resume used to skip and then delete. The key, not the source name, says which
    partial a build continues; a partial under other settings goes at the next build or cache hit of its source."""
    import socket
    import subprocess
    import sys

    caplog.set_level("INFO", logger="data_utils")
    corpus = make_text_corpus(tmp_path / "d", repeat=40)
    monkeypatch.setattr(data_utils, "CHUNK_LINES", 16)
    monkeypatch.setattr(data_utils, "PROGRESS_SECONDS", 0.0)
    real, calls = data_utils.tokenize_chunk, []

    def interrupted_at_chunk_5(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(data_utils, "tokenize_chunk", interrupted_at_chunk_5)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, tokenizer, [{"path": str(corpus), "name": "c"}])
    stores = tmp_path / "cache" / "token_stores"
    [partial] = stores.iterdir()
    assert partial.name.endswith(f".tmp-{socket.gethostname()}-{os.getpid()}")
    assert "the 64 documents saved so far are kept in" in caplog.text
    calls.clear()
    monkeypatch.setattr(data_utils, "tokenize_chunk", lambda *args: calls.append(1) or real(*args))
    resumed = build(tmp_path, tokenizer, [{"path": str(corpus), "name": "renamed"}])
    n_chunks = -(-sum(1 for _ in corpus.open(encoding="utf-8")) // 16)
    assert len(calls) == n_chunks - 4 and "resuming the tokenization" in caplog.text
    whole = build(tmp_path / "whole", tokenizer, [{"path": str(corpus), "name": "renamed"}])
    assert resumed.train.parts[0].store.tokens.tolist() == whole.train.parts[0].store.tokens.tolist()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    obsolete = stores / f"renamed-0123456789abcdef0123.tmp-{socket.gethostname()}-{dead}"
    obsolete.mkdir()
    (obsolete / "progress.json").write_text("{}")
    assert build(tmp_path, tokenizer, [{"path": str(corpus), "name": "renamed"}]).report["sources"]["renamed"][
        "cache"] == "hit"
    assert not obsolete.exists()


def test_a_utf8_file_with_a_few_bad_bytes_is_read_as_utf8_and_names_them(tmp_path):
    """A line cut inside a character (a truncated copy) crashed detection with a traceback; a JSON array on one
    line with one record in GBK was called neither UTF-8 nor GB18030 ("if it is binary, remove it")."""
    cut = tmp_path / "cut.txt"
    cut.write_bytes("糖尿病患者应规律监测血糖\n".encode() + "高血压是常见病".encode()[:-1] + b"\n" +
                    "北京是中国的首都\n".encode())
    with pytest.raises(DataError, match=r"cut\.txt` mixes encodings: line 1 is UTF-8 but line 2 is not"):
        texts_of({"path": str(cut)})
    assert texts_of({"path": str(cut), "on_error": "skip"}) == ["糖尿病患者应规律监测血糖", "北京是中国的首都"]
    minified = tmp_path / "one_line.json"
    records = [json.dumps({"text": f"第{i}条记录"}, ensure_ascii=False) for i in range(1, 201)]
    minified.write_bytes(("[" + ",".join(records) + "]").encode().replace("第150条记录".encode(),
                                                                            "第150条记录".encode("gbk")))
    assert data_utils.detect_encoding(minified, "auto") == "utf-8"
    with pytest.raises(DataError, match=r"one_line\.json` record 150 is not valid utf-8 .*but reads as gb18030"):
        texts_of({"path": str(minified)})
    assert len(texts_of({"path": str(minified), "on_error": "skip"})) == 199


def test_max_records_reads_only_the_first_records_and_the_report_says_so(tmp_path, tokenizer, monkeypatch):
    """LLaMA-Factory's max_samples, before tokenizing: a quick run on a large source reads its first N records
    (here across chunk boundaries, in text and JSON Lines) instead of tokenizing it all."""
    monkeypatch.setattr(data_utils, "CHUNK_LINES", 16)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"第{i}行文本\n" for i in range(1, 101)), encoding="utf-8")
    lines = tmp_path / "j.jsonl"
    lines.write_text("".join(json.dumps({"text": f"第{i}条"}, ensure_ascii=False) + "\n" for i in range(1, 101)),
                     encoding="utf-8")
    for path, first in ((text, "第{}行文本"), (lines, "第{}条")):
        for n in (10, 16, 37):
            assert texts_of({"path": str(path), "max_records": n}) == [first.format(i) for i in range(1, n + 1)]
    data = build(tmp_path, tokenizer, [{"path": str(text), "name": "t", "max_records": 37, "eval_fraction": 0}])
    report = data.report["sources"]["t"]
    assert (report["documents"], report["stopped_at_max_records"]) == (37, 37)
    assert "- read only its first 37 records (`max_records`); the rest was not read" in \
        data_utils.data_report_markdown(data.report)
    whole = build(tmp_path, tokenizer, [{"path": str(text), "name": "t", "max_records": 100, "eval_fraction": 0}])
    assert whole.report["sources"]["t"]["documents"] == 100 and "stopped_at_max_records" not in \
        whole.report["sources"]["t"]  # exactly all of them: nothing was left unread
    with pytest.raises(DataError, match=r"max_records must be at least 1.*got 0"):
        SourceConfig.from_dict({"path": str(text), "max_records": 0}, 0)


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


# ------------------------------------------------------------------ awkward but valid input files
def test_a_long_first_record_keeps_its_format(tmp_path):
    """Detection samples whole lines: a first record longer than any fixed-size sample is still jsonl/csv."""
    long = "长" * 100_000
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": long}, ensure_ascii=False) + '\n{"text": "短"}\n',
                                      encoding="utf-8")
    assert texts_of({"path": str(tmp_path / "a.jsonl")}) == [long, "短"]
    (tmp_path / "b.csv").write_text(f"title,text\n一,{long * 2}\n二,短\n", encoding="utf-8")  # > csv's 131,072 limit
    assert texts_of({"path": str(tmp_path / "b.csv")}) == [long * 2, "短"]


def test_a_ragged_row_does_not_turn_a_csv_into_plain_text(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("title,text\n" + "".join(f"标题{i},正文{i}\n" for i in range(20)) + "坏,行,多一列\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv` line 22 has 3 columns but the header has 2"):
        texts_of({"path": str(path)})
    assert texts_of({"path": str(path), "on_error": "skip"}) == [f"正文{i}" for i in range(20)]


def test_csv_rows_are_named_by_their_first_line_and_blank_lines_before_the_header_are_blank(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('\ntitle,text\n标题,"第一段\n第二段"\n' + "".join(f"标题{i},正文{i}\n" for i in range(20))
                    + '坏,"跨行\n的",多一列\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv` line 25 has 3 columns but the header has 2 \(title, text\)"):
        texts_of({"path": str(path)})
    spec = SourceConfig.from_dict({"path": str(path), "on_error": "skip"}, 0)
    texts, places, counts, notes = data_utils.format_chunk(spec, next(data_utils.read_chunks([path], spec)))
    assert texts == ["第一段\n第二段"] + [f"正文{i}" for i in range(20)]
    assert places[:2] == [3, 5] and counts["blank_lines"] == 1 and counts["skipped:bad_row"] == 1
    assert notes[0][1].startswith(f"`{path}` line 25: has 3 columns")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_files_are_read(tmp_path, encoding):
    (tmp_path / "a.txt").write_text("第一行\r\n第二行\n", encoding=encoding)
    (tmp_path / "b.jsonl").write_text('{"text": "甲"}\n{"text": "乙"}\n', encoding=encoding)
    declared = "auto" if encoding != "utf-16-le" else encoding  # a byte-order mark names the other two
    assert texts_of({"path": str(tmp_path / "a.txt"), "encoding": declared}) == ["第一行", "第二行"]
    assert texts_of({"path": str(tmp_path / "b.jsonl"), "encoding": declared}) == ["甲", "乙"]


def test_lone_cr_line_breaks(tmp_path):
    (tmp_path / "a.txt").write_bytes("一\r二\r\r三".encode())
    (tmp_path / "b.jsonl").write_bytes('{"text": "甲"}\r{"text": "乙"}\r'.encode())
    assert texts_of({"path": str(tmp_path / "a.txt")}) == ["一", "二", "三"]
    assert texts_of({"path": str(tmp_path / "b.jsonl")}) == ["甲", "乙"]


def test_tsv_quotes_are_text_unless_the_file_quotes_whole_fields(tmp_path):
    template = {"type": "format", "format": "{title}|{text}"}
    (tmp_path / "a.tsv").write_text('title\ttext\n"十大"评选\t正文一\n"未闭合\t正文二\n末条\t正文三\n', encoding="utf-8")
    assert texts_of({"path": str(tmp_path / "a.tsv"), "template": template}) == [
        '"十大"评选|正文一', '"未闭合|正文二', "末条|正文三"]
    (tmp_path / "b.tsv").write_text('title\ttext\n"""十大""评选"\t"正文\n一"\n末条\t正文二\n', encoding="utf-8")  # pandas
    assert texts_of({"path": str(tmp_path / "b.tsv"), "template": template}) == ['"十大"评选|正文\n一', "末条|正文二"]
    (tmp_path / "c.tsv").write_text('title\ttext\n"十大"\t正文一\n"未闭合\t正文二\n末条\t正文三\n', encoding="utf-8")
    assert texts_of({"path": str(tmp_path / "c.tsv"), "template": template}) == [  # a whole title in quotes: text
        '"十大"|正文一', '"未闭合|正文二', "末条|正文三"]
    (tmp_path / "d.tsv").write_text('"title"\t"text"\n"十大"\t"正文一"\n', encoding="utf-8")  # a quote-all writer
    assert texts_of({"path": str(tmp_path / "d.tsv"), "template": template}) == ["十大|正文一"]


def test_tsv_whose_quoted_fields_hold_tabs_and_line_breaks(tmp_path):
    import csv

    with open(tmp_path / "a.tsv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", "text"])
        writer.writerows([i, f"第一段{i}\n第二段\t{i}"] for i in range(30))
    assert data_utils.detect_format(tmp_path / "a.tsv", "auto", "utf-8") == "tsv"
    assert texts_of({"path": str(tmp_path / "a.tsv")})[:2] == ["第一段0\n第二段 0", "第一段1\n第二段 1"]


def test_a_one_column_table_is_read_as_a_table_not_as_lines(tmp_path):
    """An Excel export of one text column: its header, quotes and cells with line breaks are the table's, not
    text lines (the header was trained on, the quotes kept, a cell split in two)."""
    (tmp_path / "a.csv").write_bytes('\ufeffcontent\r\n"头痛三天。\r\n查体：血压偏高。"\r\n"发热两天。"\r\n'
                                     '"高血压的治疗, 需要长期坚持"\r\n'.encode())
    assert texts_of({"path": str(tmp_path / "a.csv"), "text_field": "content"}) == [
        "头痛三天。\n查体：血压偏高。", "发热两天。", "高血压的治疗, 需要长期坚持"]
    (tmp_path / "b.csv").write_text('"头痛三天。\n查体"\n发热两天。\n', encoding="utf-8")  # no header: `columns`
    assert texts_of({"path": str(tmp_path / "b.csv"), "columns": ["text"]}) == ["头痛三天。\n查体", "发热两天。"]
    (tmp_path / "c.txt").write_text("text\n高血压\n", encoding="utf-8")  # the default text_field as a header
    assert data_utils.detect_format(tmp_path / "c.txt", "auto", "utf-8") == "csv"
    (tmp_path / "d.txt").write_text("content\n高血压\n", encoding="utf-8")  # another field: lines of text
    assert texts_of({"path": str(tmp_path / "d.txt")}) == ["content", "高血压"]
    (tmp_path / "excel.csv").write_bytes('\ufeff病历内容\r\n"主诉：头痛3天。\r\n现病史：胀痛。"\r\n"发热1天。"\r\n'.encode())
    assert texts_of({"path": str(tmp_path / "excel.csv")}) == ["主诉：头痛3天。\n现病史：胀痛。", "发热1天。"]  # its column
    (tmp_path / "e.txt").write_text("text\nHello, world.\n", encoding="utf-8")  # an unquoted comma: not one column
    assert texts_of({"path": str(tmp_path / "e.txt")}) == ["text", "Hello, world."]


def test_format_detection_reads_a_bounded_sample(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(("长" * 3_000_000 + "\n") * 4, encoding="utf-8")
    lines, cut_off = data_utils.sample_lines(path, "utf-8")
    assert cut_off and sum(map(len, lines)) == data_utils.SAMPLE_CHARS
    assert data_utils.detect_format(path, "auto", "utf-8") == "text"


@pytest.mark.parametrize("encoding", ["UTF-8", "utf_8", "auto"])
def test_a_byte_order_mark_stays_out_of_a_csv_header_however_utf8_is_spelt(tmp_path, encoding):
    (tmp_path / "a.csv").write_bytes("\ufefftext,id\n你好,1\n".encode())
    assert texts_of({"path": str(tmp_path / "a.csv"), "encoding": encoding}) == ["你好"]


def test_byte_order_mark_stays_out_of_a_headerless_csv(tmp_path):
    (tmp_path / "a.csv").write_bytes("\ufeff高血压,1\n糖尿病,2\n".encode())
    assert texts_of({"path": str(tmp_path / "a.csv"), "columns": ["text", "label"]}) == ["高血压", "糖尿病"]


def test_text_lines_starting_with_a_bracket_are_text(tmp_path):
    (tmp_path / "a.txt").write_text("[1] 高血压是常见病\n[2] 糖尿病\n", encoding="utf-8")
    assert data_utils.detect_format(tmp_path / "a.txt", "auto", "utf-8") == "text"
    (tmp_path / "b.txt").write_text('[\n  "一", "二"\n]', encoding="utf-8")
    assert data_utils.detect_format(tmp_path / "b.txt", "auto", "utf-8") == "json"


def test_paragraph_and_document_groups_keep_an_articles_lines_together(tmp_path):
    """A textbook .txt: one document per line split its sections from their headings, and exact dedup then
    removed the repeated headings (【病因】) of every article but the first."""
    (tmp_path / "d").mkdir()
    for name, title in (("a.txt", "高血压"), ("b.txt", "糖尿病")):
        (tmp_path / "d" / name).write_bytes(f"{title}\r\n【病因】\r\n遗传与环境。\r\n\r\n\r\n\r\n【治疗】\r\n"
                                            "长期服药。\r\n".encode())
    assert texts_of({"path": str(tmp_path / "d"), "group": "paragraph"}) == [
        "高血压\n【病因】\n遗传与环境。", "【治疗】\n长期服药。", "糖尿病\n【病因】\n遗传与环境。", "【治疗】\n长期服药。"]
    assert texts_of({"path": str(tmp_path / "d"), "group": "document"}) == [
        "高血压\n【病因】\n遗传与环境。\n\n【治疗】\n长期服药。", "糖尿病\n【病因】\n遗传与环境。\n\n【治疗】\n长期服药。"]
    records = tmp_path / "r.jsonl"
    records.write_text('{"t": "第一段"}\n{"t": ""}\n{"t": "第二段"}\n', encoding="utf-8")  # a text_field's values
    assert texts_of({"path": str(records), "text_field": "t", "group": "paragraph"}) == ["第一段", "第二段"]
    with pytest.raises(DataError, match="group `lines` is not known: use paragraph, document, wikitext_articles"):
        texts_of({"path": str(records), "group": "lines"})
    with pytest.raises(DataError, match="`group` joins lines .* `template` renders whole records: use one"):
        texts_of({"path": str(records), "group": "document", "template": "qa_concat"})


def test_wikitext_articles_are_grouped_per_file_and_bad_lines_follow_the_skip_policy(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.txt").write_text(" = 甲 = \n 甲的段落 \n", encoding="utf-8")
    (tmp_path / "w" / "b.txt").write_text(" 无标题的开头 \n = 乙 = \n 乙的段落 \n", encoding="utf-8")
    spec = SourceConfig.from_dict({"path": str(tmp_path / "w"), "group": "wikitext_articles"}, 0)
    assert [(where.split("/")[-1], text) for where, text in data_utils.iter_records(spec)] == [
        ("a.txt line 1", "= 甲 =\n甲的段落"), ("b.txt line 1", "无标题的开头"), ("b.txt line 2", "= 乙 =\n乙的段落")]
    path = tmp_path / "w.jsonl"
    path.write_text('{"text": " = 甲 = "}\n{"text": "一"}\nnot json\n[1]\n{"x": 1}\n{"text": "二"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"w\.jsonl` line 3 is not valid JSON"):
        texts_of({"path": str(path), "group": "wikitext_articles"})
    spec = SourceConfig.from_dict({"path": str(path), "group": "wikitext_articles", "on_error": "skip"}, 0)
    texts, _, counts, _ = data_utils.format_chunk(spec, next(data_utils.read_chunks(data_utils.SourceInput.open(spec), spec)))
    assert texts == ["= 甲 =\n一\n二"]
    assert counts == {"records": 4, "skipped:invalid_json": 1, "skipped:not_an_object": 1, "skipped:missing_field": 1}


@pytest.mark.parametrize("key,value,message", [
    ("min_chars", "3", r"`min_chars` must be a whole number, got '3'. Write it without quotes"),
    ("eval_fraction", "0.1", r"`eval_fraction` must be a number"),
    ("keep_newlines", "false", r"`keep_newlines` must be true or false"),
    ("weight", True, r"`weight` must be a number"),
    ("name", True, r"`name` must be a string, got True. Quote it"),
    ("min_chars", 2.5, r"`min_chars` must be a whole number, got 2.5"),
    ("columns", "a,b", r"`columns` must be a list of strings"),
    ("template", {"type": "record", "fields": {"title": 1}}, r"option `fields` must be a list"),
])
def test_source_keys_of_the_wrong_type_are_named(tmp_path, key, value, message):
    with pytest.raises(DataError, match=message):
        SourceConfig.from_dict({"path": "x.txt", key: value}, 0)


def test_numbers_yaml_1_1_leaves_as_strings_are_taken():
    """PyYAML (YAML 1.1) reads unquoted `5e-2` as a string; quotes are what keep `3` one, so it stays an error."""
    import yaml

    raw = yaml.safe_load("{path: x.txt, eval_fraction: 5e-2, weight: 1e-1, max_document_chars: 2e7}")
    assert raw["eval_fraction"] == "5e-2"
    spec = SourceConfig.from_dict(raw, 0)
    assert (spec.eval_fraction, spec.weight, spec.max_document_chars) == (0.05, 0.1, 20_000_000)
    assert isinstance(spec.max_document_chars, int)
    with pytest.raises(DataError, match=r"`min_chars` must be a whole number, got 2\.5\.$"):
        SourceConfig.from_dict({"path": "x.txt", "min_chars": "25e-1"}, 0)
    with pytest.raises(DataError, match=r"`weight` must be a number, got '1e-1x'\. Write it without quotes"):
        SourceConfig.from_dict({"path": "x.txt", "weight": "1e-1x"}, 0)


def test_yaml_numbers_that_mean_the_right_thing_are_taken():
    spec = SourceConfig.from_dict({"path": "x.txt", "name": 2023, "max_document_chars": 2.0e+7, "min_chars": 10.0,
                                   "template": {"type": "record", "fields": "title", "skip_fields": "_id",
                                                "labels": None}}, 0)
    assert (spec.name, spec.max_document_chars, spec.min_chars) == ("2023", 20_000_000, 10)
    assert data_utils.make_renderer(spec.template, "text", "s")({"title": "高血压", "_id": 1}) == "title：高血压"
    assert data_utils.template_fields(spec.template) == ["title"]


def test_the_report_counts_what_reading_the_eval_files_skipped(tmp_path, tokenizer):
    train = make_text_corpus(tmp_path / "t", repeat=4)
    held = tmp_path / "dev.jsonl"
    held.write_text('{"text": "评估一"}\nnot json\n{"text": 5}\n\n{"text": "评估二"}\n{"text": "评估一"}\n', encoding="utf-8")
    data = build(tmp_path, tokenizer, [{"path": str(train), "eval_path": str(held), "name": "c", "on_error": "skip"}],
                 block_size=4)
    report = data.report["sources"]["c"]
    assert report["eval_input"]["files"] == [{"path": str(held), "format": "jsonl", "encoding": "utf-8"}]
    assert report["eval_input"]["skipped"] == {"invalid_json": 1, "not_a_string": 1}
    assert report["eval_input"]["blank_lines"] == 1 and report["eval_input"]["records"] == 5
    assert report["duplicates_removed"]["within_eval"] == 1 and report["eval_documents"] == 2
    markdown = data_utils.data_report_markdown({**data.report, "train_blocks": 1, "train_tokens": 4})
    assert f"eval files: `{held}` (jsonl, utf-8)" in markdown and "skipped: invalid_json 1, not_a_string 1" in markdown
    assert f"| {report['train_blocks']:,} | 2 | {report['eval_blocks']:,} | 1 |" in markdown  # blocks in the table


def test_new_content_with_the_old_size_and_mtime_is_hashed_again(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("高血压", encoding="utf-8")
    digests = data_utils.FileDigests(tmp_path / "cache")
    before, stat = digests(path), path.stat()
    time.sleep(0.05)  # past the file system's clock tick, as between a run and a later copy
    path.write_text("冠心病", encoding="utf-8")  # same byte length
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `rsync -t` leave it
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert digests(path) != before


def test_a_renamed_file_reuses_its_store_under_its_new_name(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path / "d", repeat=3)
    first = build(tmp_path, tokenizer, [{"path": str(path.parent), "name": "c"}])
    renamed = path.rename(path.with_name("renamed.txt"))
    second = build(tmp_path, tokenizer, [{"path": str(path.parent), "name": "c"}])
    assert second.report["sources"]["c"]["cache"] == "hit"
    assert [f["path"] for f in second.report["sources"]["c"]["files"]] == [str(renamed)]
    assert first.report["sources"]["c"]["files"][0]["format"] == second.report["sources"]["c"]["files"][0]["format"]


def test_a_headerless_tsv_error_points_to_columns(tmp_path):
    (tmp_path / "a.tsv").write_text("新闻标题一\t8\n新闻标题二\t5\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no field `text`.*name its columns with `columns: \[...\]`"):
        texts_of({"path": str(tmp_path / "a.tsv")})


def test_skipped_records_are_logged_a_few_per_reason_per_source_not_per_chunk(tmp_path, tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(data_utils, "CHUNK_LINES", 4)  # 5 chunks, each with bad lines
    path = tmp_path / "a.jsonl"
    path.write_text("".join('{"text": "好%d"}\nnot json\n' % i for i in range(10)), encoding="utf-8")
    with caplog.at_level("WARNING", logger="data_utils"):
        data = build(tmp_path, tokenizer, [{"path": str(path), "name": "c", "on_error": "skip"}], block_size=4)
    assert data.report["sources"]["c"]["skipped"] == {"invalid_json": 10}
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == data_utils.SkipLog.LIMIT


def test_one_process_building_stores_with_two_tokenizers_uses_each(tmp_path, tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    path = make_text_corpus(tmp_path / "d", repeat=2)
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["高血压"])
    for tok in (tokenizer, other):
        store = build(tmp_path, tok, [{"path": str(path), "name": "c"}]).train.parts[0].store
        first = store.tokens[store.offsets[0]:store.offsets[1]].tolist()
        assert first == tok(ZH_LINES[0] + "（第0例）", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_a_directory_names_the_files_it_does_not_read(tmp_path, caplog):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("正文\n", encoding="utf-8")
    (tmp_path / "d" / "README.md").write_text("# 数据说明\n", encoding="utf-8")
    (tmp_path / "d" / "b.zip").write_bytes(b"PK")
    with caplog.at_level("WARNING", logger="data_utils"):
        assert data_utils.resolve_files(str(tmp_path / "d"), "s") == [tmp_path / "d" / "a.txt"]
    assert "2 files without a data extension are not read (README.md, b.zip)" in caplog.text


def test_gzip_bz2_and_xz_files_are_read(tmp_path):
    import bz2
    import gzip
    import lzma

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl.gz").write_bytes(gzip.compress('{"text": "甲"}\n{"text": "乙"}\n'.encode()))
    (d / "b.txt.bz2").write_bytes(bz2.compress("一\n二\n".encode("gbk")))  # GBK inside: detected after decompression
    (d / "c.csv.xz").write_bytes(lzma.compress("title,text\nt,丙\n".encode()))
    (d / "d.json.gz").write_bytes(gzip.compress(json.dumps([{"text": "丁"}], ensure_ascii=False).encode()))
    (d / "e.txt.gz").write_bytes(gzip.compress("戊\r己\r".encode("utf-16")))
    assert texts_of({"path": str(d)}) == ["甲", "乙", "一", "二", "丙", "丁", "戊", "己"]
    spec = SourceConfig.from_dict({"path": str(d / "b.txt.bz2")}, 0)
    chunk = next(data_utils.read_chunks(data_utils.SourceInput.open(spec), spec))
    assert (chunk.fmt, chunk.encoding) == ("text", "gb18030") and chunk.nbytes == (d / "b.txt.bz2").stat().st_size


def test_data_files_beside_the_sources_that_no_source_reads_are_named(tmp_path, tokenizer, caplog):
    """A file dropped into data/ for a config that names its files one by one is reported, not left out silently."""
    path = make_text_corpus(tmp_path / "d", repeat=3)
    dropped = path.parent / "mine.jsonl"
    dropped.write_text("".join(f'{{"text": "我的语料，第{i}条。"}}\n' for i in range(8)), encoding="utf-8")
    (path.parent / "notes.md").write_text("not data\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        data = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"}])
    assert data.report["unread_data_files"] == [str(dropped)]
    assert f"1 data file beside the sources' files no source reads: {dropped}. Add it to `sources`" in caplog.text
    assert f"`{dropped}`" in data_utils.data_report_markdown(data.report)
    everything = build(tmp_path, tokenizer, [{"path": str(path.parent), "name": "all"}])
    assert everything.report["unread_data_files"] == []
    by_builder = build(tmp_path, tokenizer, [{"path": str(path), "name": "c"},  # a hub file builder reads it
                                             {"hub": "json", "data_files": str(dropped), "name": "mine"}])
    assert by_builder.report["unread_data_files"] == []
