"""Templates, value rules, cleaning, format/encoding detection and the preview/convert CLI."""
import json
import re
import subprocess
import sys

import pytest

import data_utils
from data_utils import DataError, RecordError, SourceConfig, make_renderer, render_value
from conftest import ROOT


def render(template, record, text_field="text"):
    return make_renderer(template, text_field, "test")(record)


# ------------------------------------------------------------------------------ value rules
@pytest.mark.parametrize("value,expected", [
    ("  高血压 \x00\t", "高血压"),
    (["内科", ["呼吸内科", ["胸外科"]], "", None], "内科,呼吸内科,胸外科"),
    ({"成人": "每日一次", "儿童": "遵医嘱"}, "成人：每日一次，儿童：遵医嘱"),
    (3, "3"), (0.5, "0.5"), (2.0, "2"),
    (True, "是"), (False, "否"),
    (None, ""), ("", ""), ([], ""), ({}, ""),
])
def test_value_rules(value, expected):
    assert render_value(value) == expected


def test_numbers_take_a_unit():
    assert render_value(7, unit="天") == "7天"


# ------------------------------------------------------------------------------ templates
def test_record_worked_example():
    record = {"_id": {"$oid": "5bb578b6831b973a137e3ee6"}, "name": "肺泡蛋白质沉积症",
              "desc": "肺泡蛋白质沉积症是一种罕见疾病。", "category": ["疾病百科", "内科", "呼吸内科"]}
    text = render({"type": "record", "fields": ["name", "desc", "category"]}, record)
    assert text == "名称：肺泡蛋白质沉积症。描述：肺泡蛋白质沉积症是一种罕见疾病。类别：疾病百科,内科,呼吸内科"


def test_record_rules_skip_empty_values_and_never_write_none():
    record = {"name": "感冒", "desc": None, "symptom": [], "cure_way": ["药物治疗", "支持性治疗"],
              "cured_prob": 0.95, "yibao_status": True, "cure_lasttime": 7, "check": {}, "cause": "  "}
    template = {"type": "record", "fields": ["name", "desc", "symptom", "cause", "cure_way", "cured_prob",
                                             "yibao_status", "cure_lasttime", "check", "get_way"],
                "units": {"cure_lasttime": "天"}, "prefixes": {"cure_way": "常用的治疗方式有"},
                "labels": {"cured_prob": "治愈概率"}}
    text = render(template, record)
    assert text == "名称：感冒。常用的治疗方式有药物治疗,支持性治疗。治愈概率：0.95。医保：是。治疗周期：7天"
    for bad in ("None", "[]", "{}", "。。"):
        assert bad not in text
    assert data_utils.record_missing_fields(data_utils.template_fields(template), record) == [
        "desc", "symptom", "cause", "check", "get_way"]


def test_record_without_field_list_uses_record_order_and_skips_id():
    text = render("record", {"_id": 1, "b": "二", "a": "一。"})
    assert text == "b：二。a：一。"
    assert render({"type": "record", "skip_fields": ["b"]}, {"_id": 1, "b": "二", "a": "一"}) == "a：一"  # _id too


def test_record_field_separator_is_left_out_only_where_it_would_double_the_punctuation():
    record = {"a": "一。", "b": "二", "c": "三"}
    assert render({"type": "record", "field_separator": "\n"}, record) == "a：一。\nb：二\nc：三"
    assert render({"type": "record", "field_separator": "；"}, record) == "a：一。b：二；c：三"


def test_qa_concat_with_chinese_keys():
    template = {"type": "qa_concat", "question_field": "问", "answer_field": "答"}
    assert render(template, {"问": "什么是高血压？", "答": "高血压是……"}) == "[QUESTION] 什么是高血压？ [ANSWER] 高血压是……"


def test_empty_answers_and_questions_are_counted(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "问一", "a": "答一"}\n{"q": "问二", "a": null}\n{"q": "", "a": "答三"}\n', encoding="utf-8")
    spec = SourceConfig.from_dict({"path": str(path), "template": {"type": "qa_concat", "question_field": "q",
                                                                   "answer_field": "a"}}, 0)
    texts, _, counts, _ = data_utils.format_chunk(spec, next(data_utils.read_chunks([path], spec)))
    assert len(texts) == 3 and counts["missing_field:a"] == 1 and counts["missing_field:q"] == 1
    assert texts == ["[QUESTION] 问一 [ANSWER] 答一", "[QUESTION] 问二", "[ANSWER] 答三"]  # no label of a gap
    assert data_utils.template_fields("qa_instruction") == ["instruction", "output"]
    assert data_utils.template_fields({"type": "format", "format": "{title}\n{body}"}) == ["title", "body"]


def test_empty_fields_leave_out_their_labels():
    assert render("qa_concat", {"question": "", "answer": "答一"}) == "[ANSWER] 答一"
    assert render("qa_concat", {"question": "问一", "answer": None}) == "[QUESTION] 问一"
    assert render({"type": "qa_concat", "question_label": "问：", "answer_label": "答："},
                  {"question": "问一", "answer": "答一"}) == "问：问一 答：答一"
    template = {"type": "qa_instruction", "instruction_prefix": "请回答以下问题："}
    assert render(template, {"instruction": "", "output": "发热"}) == "Output: 发热"
    assert render(template, {"instruction": "什么是发热？", "output": " "}) == "Instruction: 请回答以下问题：什么是发热？"


def test_qa_instruction_with_and_without_input():
    template = {"type": "qa_instruction", "instruction_field": "question", "output_field": "answer",
                "instruction_prefix": "请回答以下问题："}
    assert render(template, {"question": "什么是高血压？", "answer": "高血压是……"}) == \
        "Instruction: 请回答以下问题：什么是高血压？\nOutput: 高血压是……"
    assert render("qa_instruction", {"instruction": "翻译", "input": "fever", "output": "发热"}) == \
        "Instruction: 翻译\nInput: fever\nOutput: 发热"


def test_dialog_sharegpt_and_messages():
    sharegpt = {"conversations": [{"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息。"}]}
    assert render("dialog", sharegpt) == "[User] 头痛怎么办？\n[Assistant] 多休息。"
    messages = {"messages": [{"role": "system", "content": "你是医生"}, {"role": "user", "content": "咳嗽"},
                             {"role": "assistant", "content": "多喝水"}]}
    custom = {"type": "dialog", "role_labels": {"user": "患者：", "assistant": "医生：", "system": "系统："}}
    assert render(custom, messages) == "系统：你是医生\n患者：咳嗽\n医生：多喝水"  # no space after a full-width colon
    partial = {"type": "dialog", "role_labels": {"user": "患者：", "assistant": "医生："}}  # merged over the defaults
    assert render(partial, messages) == "[System] 你是医生\n患者：咳嗽\n医生：多喝水"
    by_alias = {"type": "dialog", "role_labels": {"human": "Patient:", "gpt": "Doctor:"}}
    assert render(by_alias, messages) == "[System] 你是医生\nPatient: 咳嗽\nDoctor: 多喝水"
    assert render(by_alias, sharegpt) == "Patient: 头痛怎么办？\nDoctor: 多休息。"
    with pytest.raises(RecordError, match="role `nurse`"):
        render("dialog", {"messages": [{"role": "nurse", "content": "x"}]})
    merged = {"conversations": None, "messages": [  # parquet / datasets merge both schemas, null where unused
        {"from": None, "value": None, "role": "user", "content": "咳嗽"},
        {"from": "gpt", "value": "多喝水", "role": None, "content": None}]}
    assert render("dialog", merged) == "[User] 咳嗽\n[Assistant] 多喝水"


def test_format_template_and_its_guards():
    assert render({"type": "format", "format": "{title}\n{content}"}, {"title": "标题", "content": "正文"}) == "标题\n正文"
    with pytest.raises(RecordError, match="no field `content`; its fields are `title`"):
        render({"type": "format", "format": "{title}\n{content}"}, {"title": "标题"})
    for field in ("title.__class__", "0", "title!r", "title:.1f"):  # would fail mid-run, or add Python quotes
        with pytest.raises(DataError, match=re.escape(f"format field `{{{field}}}` must be a plain field name")):
            render({"type": "format", "format": f"{{{field}}}"}, {"title": "x"})


def test_template_config_mistakes_are_named():
    with pytest.raises(DataError, match=r"no option `question_feild`.*`question_field`"):
        SourceConfig.from_dict({"path": "x", "template": {"type": "qa_concat", "question_feild": "q"}}, 0)
    with pytest.raises(DataError, match=r"template type `recrod`.*`record`"):
        SourceConfig.from_dict({"path": "x", "template": "recrod"}, 0)


# ------------------------------------------------------------------------------ cleaning
def test_cleaning_rules():
    spec = SourceConfig.from_dict({"path": "x"}, 0)
    assert data_utils.clean_text("  a  b\t\tc \r\n\r\n\r\n  d  ", spec) == "a b c\n\nd"
    flat = SourceConfig.from_dict({"path": "x", "keep_newlines": False}, 0)
    # Chinese is written without spaces: a line break beside it joins without one, elsewhere it is a space
    assert data_utils.clean_text("第一行\n第二行 \n 第三行。\nfever\n38 ℃", flat) == "第一行第二行第三行。fever 38 ℃"
    assert data_utils.clean_text("Hypertension\n高血压\n\n\n降压 \n药", flat) == "Hypertension高血压降压药"
    assert data_utils.clean_text("です\nはい\nＨｅｌｌｏ\nworld", flat) == "ですはいＨｅｌｌｏ world"  # kana; full-width Latin
    assert flat.text_settings()["line_breaks"] and "line_breaks" not in spec.text_settings()  # new stores only here
    raw = SourceConfig.from_dict({"path": "x", "collapse_spaces": False}, 0)
    assert data_utils.clean_text("a  b", raw) == "a  b"


def test_min_chars_and_replacement_characters_are_counted(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("短\n这一行足够长了\n坏字符\ufffd也足够长\n", encoding="utf-8")
    spec = SourceConfig.from_dict({"path": str(path), "min_chars": 5}, 0)
    texts, _, counts, _ = data_utils.format_chunk(spec, next(data_utils.read_chunks([path], spec)))
    assert texts == ["这一行足够长了", "坏字符\ufffd也足够长"]
    assert counts["dropped:min_chars"] == 1 and counts["texts_with_U+FFFD"] == 1


# ------------------------------------------------------------------------------ formats
def test_yaml_quoting_traps_in_a_format_are_named(caplog):
    """`format: {标题}` unquoted is a YAML mapping; in single quotes `\\n` stays a backslash and an n."""
    import logging

    import yaml

    unquoted = yaml.safe_load("{path: x, template: {type: format, format: {标题}}}")
    with pytest.raises(DataError, match="got {'标题': None}. In YAML a value starting with `{` is a mapping: quote it"):
        SourceConfig.from_dict(unquoted, 0)
    single = yaml.safe_load("{path: x, name: s, template: {type: format, format: '{标题}\\n{正文}'}}")
    with caplog.at_level(logging.WARNING):
        SourceConfig.from_dict(single, 0)
        SourceConfig.from_dict(single, 0)
    assert caplog.text.count("template option `format` holds a backslash and an n") == 1
    double = yaml.safe_load('{path: x, name: d, template: {type: format, format: "{标题}\\n{正文}"}}')
    assert SourceConfig.from_dict(double, 0).template["format"] == "{标题}\n{正文}"


def test_formats_are_detected_by_content(tmp_path):
    cases = {
        "a.dat": ("line one\nline two\n", "text"),
        "b.txt": ('{"text": "x"}\n{"text": "y"}\n', "jsonl"),
        "c.txt": ('[{"text": "x"}]', "json"),
        "d.txt": ("标题一\t8\n标题二\t5\n标题三\t2\n", "tsv"),
        "e.txt": ("text,label\n甲,1\n乙,2\n", "csv"),
    }
    for name, (content, fmt) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        assert data_utils.detect_format(tmp_path / name, "auto", "utf-8") == fmt, name


def test_csv_with_header_and_tsv_with_columns(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"含有,逗号的文本",1\n第二条,2\n', encoding="utf-8")
    assert data_utils.iter_texts(SourceConfig.from_dict({"path": str(tmp_path / "a.csv")}, 0)).__next__() == \
        "含有,逗号的文本"
    (tmp_path / "b.tsv").write_text("新闻标题一\t8\n新闻标题二\t5\n", encoding="utf-8")
    spec = SourceConfig.from_dict({"path": str(tmp_path / "b.tsv"), "columns": ["title", "label"],
                                   "text_field": "title"}, 0)
    assert list(data_utils.iter_texts(spec)) == ["新闻标题一", "新闻标题二"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["一段文本", "另一段"], "n": [1, 2]}), tmp_path / "x.parquet")
    spec = SourceConfig.from_dict({"path": str(tmp_path / "x.parquet"), "text_field": "content"}, 0)
    assert list(data_utils.iter_texts(spec)) == ["一段文本", "另一段"]


def test_bad_json_names_line_column_and_snippet(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "好"}\n{"text": "坏", oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 is not valid JSON \(.*, column 15, near '.*oops"):
        list(data_utils.iter_texts(SourceConfig.from_dict({"path": str(path)}, 0)))


# ------------------------------------------------------------------------------ CLI
def test_preview_and_convert_cli(tmp_path, tokenizer_dir, capsys):
    import yaml

    import data_utils

    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"问": f"问题{i}？", "答": f"回答{i}。"}, ensure_ascii=False)
                              for i in [1, 2, 2, 3]) + "\n", encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "tokenizer_name_or_path": str(tokenizer_dir), "output_dir": str(tmp_path / "out"),
        "sources": [{"name": "medqa", "path": str(data),
                     "template": {"type": "qa_concat", "question_field": "问", "answer_field": "答"}}]},
        allow_unicode=True), encoding="utf-8")
    run = [sys.executable, str(ROOT / "data_utils.py")]
    shown = subprocess.run(run + ["preview", str(config), "-n", "2"], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert "[QUESTION] 问题1？ [ANSWER] 回答1。" in shown.stdout
    assert f"{data} line 2 · 29 characters" in shown.stdout and "tokens" in shown.stdout
    out = tmp_path / "all.jsonl"  # the other commands in this process (the entry point is checked above)
    assert data_utils.main(["convert", str(config), "--out", str(out), "--near_dedup", "0.8"]) == 0
    assert "convert removes exact duplicates only: near_dedup works on token n-grams" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == [f"[QUESTION] 问题{i}？ [ANSWER] 回答{i}。" for i in (1, 2, 3)]  # deduped
    assert data_utils.main(["preview", str(config), "--source", "medqq"]) == 2
    assert "no source named `medqq`. Did you mean `medqa`?" in capsys.readouterr().err


def test_a_template_that_fits_no_record_is_named_and_preview_and_convert_say_no_text(tmp_path, tokenizer_dir,
                                                                                      capsys):
    """An alpaca file under a `record` template for other fields: every text was empty, and preview printed
    nothing, convert wrote an empty file with exit code 0, training blamed `text_field`."""
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "问", "input": "", "output": "答"}] * 3), encoding="utf-8")
    record = {"path": str(data), "template": {"type": "record", "fields": ["name", "desc"]}}
    stray = [{"name": "高血压", "desc": "血压高"}, {"meta": 1}]  # one stray record: counted, not an error
    (tmp_path / "kg.json").write_text(json.dumps(stray, ensure_ascii=False), encoding="utf-8")
    assert len(list(data_utils.iter_texts(SourceConfig.from_dict({**record, "path": str(tmp_path / "kg.json")}, 0)))) == 1
    config = tmp_path / "r.yaml"
    config.write_text(json.dumps({"tokenizer_name_or_path": str(tokenizer_dir), "output_dir": str(tmp_path / "o"),
                                  "sources": [record]}), encoding="utf-8")
    assert data_utils.main(["preview", str(config)]) == 2
    assert "Check the template's fields (`name`, `desc` in no record)" in capsys.readouterr().err
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "短"}\n' * 3, encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"tokenizer_name_or_path": str(tokenizer_dir), "output_dir": str(tmp_path / "o"),
                                  "sources": [{"path": str(short), "min_chars": 5}]}), encoding="utf-8")
    for command in (["preview", str(config)], ["convert", str(config), "--out", str(tmp_path / "x.jsonl")]):
        assert data_utils.main(command) == 2
        error = capsys.readouterr().err
        assert f"no text left in {short}" in error and "'dropped:min_chars': 3" in error and "`min_chars`" in error
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("command", ["prepare", "preview", "convert"])
def test_command_help_lists_the_data_options_not_all_training_options(command, capsys):
    assert data_utils.main([command, "--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: python data_utils.py {command} CONFIG.yaml")
    assert "--sources SOURCES" in shown and "--block_size" in shown and "--learning_rate" not in shown
    assert ("--tokenizer_name_or_path" in shown) == (command != "convert")
    assert data_utils.main(["--help"]) == 0 and "python data_utils.py prepare CONFIG.yaml" in capsys.readouterr().out


def test_data_commands_refuse_bad_arguments_before_any_work(tmp_path, capsys):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for argv, message in ((["bogus"], "unknown command `bogus`: give one of preview, "),
                          (["preview", "configs/pretrain_tiny.yaml", "-n", "-1"], "-n -1: give how many texts"),
                          (["convert", "configs/pretrain_tiny.yaml", "--out", ""], "--out is empty"),
                          (["convert", "configs/pretrain_tiny.yaml", "--out", str(tmp_path / "a_dir")],
                           "is a directory: give the jsonl file to write inside it"),
                          (["convert", "configs/pretrain_tiny.yaml", "--out", str(tmp_path / "a_file" / "x.jsonl")],
                           "is a file, not a directory"),
                          (["convert", "configs/pretrain_tiny.yaml", "--source", "medical", "--out",
                            str(tmp_path / "x.jsonl")], "unknown option `--source`")):  # preview's only
        assert data_utils.main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (argv, errors)
    assert not (tmp_path / "x.jsonl").exists()


def test_dialog_with_openai_content_parts_renders_their_text():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "这张片子"},
                                                        {"type": "image_url", "image_url": {"url": "x"}},
                                                        {"type": "text", "text": "怎么看？"}]},
                           {"role": "assistant", "content": "需要结合症状。"}]}
    assert render("dialog", record) == "[User] 这张片子\n怎么看？\n[Assistant] 需要结合症状。"


def test_convert_refuses_to_overwrite_its_input_or_write_where_a_source_reads(tmp_path):
    """`convert --out` on a source file replaced the text with its jsonl (exit 0); inside a source folder it
    would be read as data by the next run."""
    import data_utils

    notes = tmp_path / "data" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("高血压患者应定期测量血压。\n", encoding="utf-8")
    (tmp_path / "data" / "notes.jsonl").write_text('{"text": "糖尿病"}\n', encoding="utf-8")
    for sources, out, problem in (([{"path": str(notes)}], notes, "is a file source `notes` reads"),
                                  ([{"path": str(tmp_path / "data" / "*.txt")}], notes, "is a file source"),
                                  ([{"path": str(tmp_path / "data" / "*.jsonl")}], notes.parent / "all.jsonl",
                                   "read as data by the next run"),  # a new file the glob would read
                                  ([{"hub": "json", "data_files": str(notes.parent / "notes.jsonl")}],
                                   notes.parent / "notes.jsonl", "is a file source `notes` reads"),
                                  ([{"path": str(notes.parent)}], notes.parent / "all.jsonl", "is inside"),
                                  ([{"path": str(notes.parent), "per_file": True}], notes.parent / "all.jsonl",
                                   "is inside")):  # the default config's data/: each file a source by now
        with pytest.raises(data_utils.DataError, match=problem):
            data_utils.convert(sources, str(out))
    assert notes.read_text(encoding="utf-8") == "高血压患者应定期测量血压。\n"
    assert data_utils.convert([{"path": str(notes)}], str(tmp_path / "all.jsonl")) == {"notes": 1}
