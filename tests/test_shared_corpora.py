"""The loaders and token store on real public corpora (../shared/corpora); skipped when absent."""
import json
import types

import pytest

import data_utils
from conftest import ROOT

CORPORA = ROOT.parent / "shared" / "corpora"
pytestmark = pytest.mark.skipif(not CORPORA.is_dir(), reason="../shared/corpora is not present")


def build(tmp_path, tokenizer, sources):
    args = types.SimpleNamespace(sources=sources, block_size=64, eval_fraction=0.02, add_bos="never",
                                 cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1)
    return data_utils.build_datasets(args, tokenizer, 64, seed=0)


def test_real_corpora_load_with_exact_document_counts(tmp_path, tokenizer):
    fever = CORPORA / "medicalgpt_pretrain" / "fever.txt"  # 996 lines, 11 blank
    qa = CORPORA / "medicalgpt_qa" / "medical_corpus.txt"  # jsonl saved as .txt, keys 问/答
    kg = CORPORA / "medical_kg" / "medical1.json"  # mongoexport jsonl with CRLF line endings
    data = build(tmp_path, tokenizer, [
        {"name": "fever", "path": str(fever)},
        {"name": "qa", "path": str(qa), "text_field": "答"},
        {"name": "kg", "path": str(kg), "text_field": "desc"},
    ])
    report = data.report["sources"]
    assert report["fever"]["documents"] == 985 and report["fever"]["counts"]["blank_lines"] == 11
    assert report["qa"]["documents"] == 87
    assert report["kg"]["documents"] == 308
    kg_store = data.train.datasets[2].store
    first_desc = json.loads(kg.read_bytes().split(b"\n", 1)[0])["desc"].strip()
    assert tokenizer.decode(kg_store.doc(0)[:-1].tolist()) == first_desc  # CRLF gone, text intact
    for name in ("fever", "qa", "kg"):
        assert report[name]["train_documents"] + report[name]["eval_documents"] == report[name]["documents"]
