"""The loaders, templates and data report on real public corpora (../shared/corpora), with their
real quirks (jsonl saved as .txt, CRLF, ragged records, U+FFFD, tab-separated titles).
Skipped when ../shared/corpora is absent."""
import json
import re

import pytest
import yaml

import data_utils
from conftest import ROOT
from test_end_to_end import run_pretrain

CORPORA = ROOT.parent / "shared" / "corpora"
pytestmark = pytest.mark.skipif(not CORPORA.is_dir(), reason="../shared/corpora is not present")
KG_FIELDS = ["name", "desc", "category", "symptom", "cause", "prevent", "acompany", "get_way", "easy_get",
             "cure_department", "cure_way", "cure_lasttime", "cured_prob", "common_drug", "check"]
SOURCES = [
    {"name": "fever", "path": str(CORPORA / "medicalgpt_pretrain" / "fever.txt")},
    {"name": "qa", "path": str(CORPORA / "medicalgpt_qa" / "medical_corpus.txt"),
     "template": {"type": "qa_concat", "question_field": "问", "answer_field": "答"}},
    {"name": "dialog", "path": str(CORPORA / "medicalgpt_qa" / "medical_sft_1K_format.jsonl"), "template": "dialog"},
    {"name": "kg", "path": str(CORPORA / "medical_kg" / "medical1.json"),
     "template": {"type": "record", "fields": KG_FIELDS}},
    {"name": "news", "path": str(CORPORA / "thucnews_titles" / "dev.txt"), "columns": ["title", "label"],
     "text_field": "title"},
]


def jsonl(path):
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def expected_counts():
    """What the report must say, computed straight from the files."""
    norm = lambda s: re.sub(r"[ \t]+", " ", s).strip()  # noqa: E731
    fever_lines = (CORPORA / "medicalgpt_pretrain" / "fever.txt").read_text(encoding="utf-8").splitlines()
    fever = [norm(line) for line in fever_lines if line.strip()]
    qa = jsonl(CORPORA / "medicalgpt_qa" / "medical_corpus.txt")
    dialog = jsonl(CORPORA / "medicalgpt_qa" / "medical_sft_1K_format.jsonl")
    kg = jsonl(CORPORA / "medical_kg" / "medical1.json")
    news = [line.split("\t")[0].strip() for line in
            (CORPORA / "thucnews_titles" / "dev.txt").read_text(encoding="utf-8").splitlines()]
    return {
        "fever": (len(fever), len(set(fever)), 11),
        "qa": (len(qa), len({(r["问"].strip(), r["答"].strip()) for r in qa}), 0),
        "dialog": (len(dialog), len({json.dumps(r["conversations"], ensure_ascii=False) for r in dialog}), 0),
        "kg": (len(kg), len({json.dumps({k: r.get(k) for k in KG_FIELDS}, ensure_ascii=False) for r in kg}), 0),
        "news": (len(news), len(set(news)), 0),
    }


def test_real_corpora_train_and_the_report_matches_the_files(tmp_path, tokenizer_dir, micro_model_config):
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump({
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(tokenizer_dir),
        "sources": SOURCES, "block_size": 64, "eval_fraction": 0.01, "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
        "eval_strategy": "no", "eval_on_start": False, "report_to": "none", "logging_steps": 1,
    }, allow_unicode=True), encoding="utf-8")
    run_pretrain([config])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert (tmp_path / "out" / "data_report.md").read_text(encoding="utf-8").startswith("# Data report")
    for name, (records, unique, blank) in expected_counts().items():
        source = report["sources"][name]
        assert source["records"] == records, name
        assert source["documents"] == unique, name
        assert source["duplicates_removed"]["within_source"] == records - unique, name
        assert source.get("blank_lines", 0) == blank, name
        assert source["train_documents"] + source["eval_documents"] == unique, name
        assert source["tokens"] > 0 and 0 < source["share_of_training_tokens"] < 1
    assert report["sources"]["news"]["texts_with_U+FFFD"] == 33
    assert report["sources"]["news"]["files"][0]["format"] == "tsv"
    assert report["sources"]["qa"]["files"][0]["format"] == "jsonl"  # a .txt file, detected by content
    assert report["sources"]["kg"]["missing_fields"]["common_drug"] == 82
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 3


@pytest.mark.parametrize("source", SOURCES[1:4], ids=lambda s: s["name"])
def test_rendered_texts_add_no_none_brackets_or_doubled_stops(source):
    spec = data_utils.SourceConfig.from_dict(source, 0)
    records = jsonl(data_utils.resolve_files(spec.path, spec.name)[0])
    texts = list(data_utils.iter_texts(spec))
    assert len(texts) == len(records)
    for record, text in zip(records, texts):
        raw = json.dumps(record, ensure_ascii=False)
        for junk in ("None", "[]", "{}", "。。"):
            assert text.count(junk) <= raw.count(junk), (junk, text[:200])
    if spec.name == "kg":
        assert texts[0].startswith("名称：肺泡蛋白质沉积症。描述：")
    if spec.name == "dialog":
        assert texts[0].startswith("[User] 治疗阳痿吃什么药呢？") and "\n[Assistant] " in texts[0]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s["name"])
def test_real_corpora_saved_as_gb18030_read_as_their_utf8_originals(tmp_path, source):
    """Detected as GB18030, every line is checked for being UTF-8 Chinese (a mixed file); on real text
    that check must find nothing: the same texts come out as from the UTF-8 original."""
    original = data_utils.resolve_files(source["path"], source["name"])[0]
    copy = tmp_path / original.name
    copy.write_bytes(original.read_text(encoding="utf-8").encode("gb18030"))
    texts = list(data_utils.iter_texts(data_utils.SourceConfig.from_dict(source, 0)))
    assert data_utils.detect_encoding(copy, "auto") == "gb18030"
    assert list(data_utils.iter_texts(data_utils.SourceConfig.from_dict({**source, "path": str(copy)}, 0))) == texts
