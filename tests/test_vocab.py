"""tools/vocab.py: train a Chinese tokenizer, extend English base tokenizers of both families with it
(ids stable, round trips exact), and continue pretraining a model with the extended tokenizer."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

import data_utils
from conftest import ROOT, ZH_LINES, make_text_corpus

sys.path.insert(0, str(ROOT / "tools"))
import vocab  # noqa: E402

CORPORA = ROOT.parent / "shared" / "corpora"
ENGLISH = [
    "The patient was admitted with fever and a cough that had lasted for three days.",
    "Blood pressure should be measured twice, one minute apart, after five minutes of rest.",
    "Antibiotics do not help against viral infections such as the common cold.",
    "The history of the city goes back more than two thousand years, to a small river port.",
    "Regular exercise, a balanced diet and enough sleep lower the risk of heart disease.",
]
SAMPLES = ["高血压是一种常见的慢性病。", "The patient has a fever of 38.5 degrees.", "1234567890", "😀 emoji 医生 👍",
           "混合 mixed 文本 text，包括数字 42 和标点！"]


def english_file(directory, repeat=40):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "en.txt"
    path.write_text("\n".join(f"{s} Case {i}." for i in range(repeat) for s in ENGLISH) + "\n", encoding="utf-8")
    return path


def byte_level_base(directory, texts, vocab_size=400):
    """A GPT-2 / Qwen2-style byte-level BPE tokenizer trained on `texts`, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocab")
    en = english_file(base / "en")
    sp_base = data_utils.train_sentencepiece_tokenizer([{"path": str(en)}], str(base / "cache"), vocab_size=400)
    bl_base = byte_level_base(base / "bytelevel", en.read_text(encoding="utf-8").splitlines())
    zh = base / "zh.txt"  # Chinese only: its pieces are what a domain tokenizer adds
    zh.write_text("\n".join(f"{line}第{i}例" for i in range(20) for line in ZH_LINES[:5]), encoding="utf-8")
    chinese = data_utils.train_sentencepiece_tokenizer([{"path": str(zh)}], str(base / "cache"), vocab_size=600)
    return base, {"sentencepiece": sp_base, "byte-level BPE": bl_base}, chinese


@pytest.mark.parametrize("family", ["sentencepiece", "byte-level BPE"])
def test_extension_keeps_ids_and_round_trips(bases, family):
    from transformers import AutoTokenizer

    base_dir, families, chinese = bases
    out = base_dir / f"extended-{family.replace(' ', '_')}"
    result = vocab.extend_tokenizer(families[family], chinese, out)
    assert result["family"] == family and result["added_tokens"] > 50
    base, extended = AutoTokenizer.from_pretrained(families[family]), AutoTokenizer.from_pretrained(out)
    assert len(extended) == len(base) + result["added_tokens"]
    base_vocab, ext_vocab = base.get_vocab(), extended.get_vocab()
    assert all(ext_vocab[t] == i for t, i in base_vocab.items())  # every base token keeps its id
    for text in SAMPLES + ENGLISH:
        assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text
    for text in ENGLISH + ["1234567890"]:  # text without the new pieces tokenizes as before
        assert extended(text)["input_ids"] == base(text)["input_ids"]
    zh = "".join(ZH_LINES[:5])
    before, after = len(base(zh)["input_ids"]), len(extended(zh)["input_ids"])
    assert after * 2 <= before  # Chinese no longer falls back to bytes
    assert data_utils.byte_token_mask(extended)[extended(zh, add_special_tokens=False)["input_ids"]].mean() < \
        data_utils.byte_token_mask(base)[base(zh, add_special_tokens=False)["input_ids"]].mean()


def test_unknown_base_is_a_clear_error(tmp_path, bases):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data_utils.DataError, match="neither tokenizer.model"):
        vocab.extend_tokenizer(tmp_path / "empty", bases[2], tmp_path / "out")


def test_continued_pretraining_with_an_extended_tokenizer(bases, micro_model_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pretrain
    from test_end_to_end import run_pretrain

    base_dir, families, chinese = bases
    en = english_file(tmp_path / "en")
    zh = make_text_corpus(tmp_path / "zh", repeat=20)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(families["sentencepiece"]),
        "sources": [{"path": str(en)}], "block_size": 32, "eval_fraction": 0.1, "max_steps": 3,
        "per_device_train_batch_size": 4, "report_to": "none", "output_dir": str(tmp_path / "base_model"),
        "cache_dir": str(tmp_path / "cache")}), encoding="utf-8")
    run_pretrain([config])  # the English base model
    extended_dir = tmp_path / "extended"
    vocab.extend_tokenizer(tmp_path / "base_model", chinese, extended_dir)

    argv = [str(config), "--model_name_or_path", str(tmp_path / "base_model"), "--tokenizer_name_or_path",
            str(extended_dir), "--sources", json.dumps([{"path": str(zh)}], ensure_ascii=False),
            "--output_dir", str(tmp_path / "continued"), "--learning_rate", "1e-2"]
    model_args, data_args, _ = pretrain.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(extended_dir)
    base_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model")
    old_rows = base_model.get_input_embeddings().weight.detach().clone()
    model = pretrain.build_model(model_args, tokenizer, 32)  # step 0 of the continued run
    rows = model.get_input_embeddings().weight.detach()
    assert rows.shape[0] >= len(tokenizer) and rows.shape[0] % 64 == 0
    assert torch.equal(rows[:len(old_rows)], old_rows)  # base rows untouched
    base_tok = AutoTokenizer.from_pretrained(tmp_path / "base_model")
    new_id = len(old_rows)
    pieces = base_tok(tokenizer.decode([new_id]), add_special_tokens=False)["input_ids"]
    assert torch.allclose(rows[new_id], old_rows[pieces].mean(0))  # starts at the mean of the pieces it replaces
    mean_model = pretrain.build_model(pretrain.parse_args(argv + ["--new_token_init", "mean"])[0], tokenizer, 32)
    assert torch.allclose(mean_model.get_input_embeddings().weight[new_id], old_rows.mean(0), atol=1e-6)

    run_pretrain(argv + ["--max_steps", "6"])  # and it trains
    metrics = json.loads((tmp_path / "continued" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["eval"]["final"]["eval_loss"] < metrics["eval"]["before_training"]["eval_loss"]
    assert metrics["model"]["vocab_size"] >= len(tokenizer)


def test_fever_tokens_per_character_halve_at_least(tmp_path):
    fever = CORPORA / "medicalgpt_pretrain" / "fever.txt"
    english = CORPORA / "medicalgpt_pretrain" / "en_article_tail500.txt"
    if not fever.exists():
        pytest.skip("../shared/corpora is not present")
    base = byte_level_base(tmp_path / "base", english.read_text(encoding="utf-8").splitlines(), vocab_size=1000)
    chinese = data_utils.train_sentencepiece_tokenizer([{"path": str(fever)}], str(tmp_path / "cache"),
                                                       vocab_size=6000)
    vocab.extend_tokenizer(base, chinese, tmp_path / "extended")
    table = vocab.report([{"name": "fever", "path": str(fever)}], [str(base), str(tmp_path / "extended")])
    before, after = table["fever"][str(base)], table["fever"][str(tmp_path / "extended")]
    assert before["tokens_per_char"] >= 2 * after["tokens_per_char"]
    assert after["byte_token_share"] < before["byte_token_share"]


def test_cli_train_and_extend_with_report(tmp_path, bases):
    zh = make_text_corpus(tmp_path / "zh", repeat=20)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"name": "zh", "path": str(zh)}],
                                      "cache_dir": str(tmp_path / "cache")}), encoding="utf-8")
    run = [sys.executable, str(ROOT / "tools" / "vocab.py")]
    trained = subprocess.run(run + ["train", str(config), "--vocab_size", "600", "--out", str(tmp_path / "zh_tok"),
                                    "--user_defined_symbols", "高血压,糖尿病"], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "zh_tok").tokenize("高血压") == ["高血压"]
    extended = subprocess.run(run + ["extend", "--base", str(bases[1]["byte-level BPE"]), "--add",
                                     str(tmp_path / "zh_tok"), "--out", str(tmp_path / "ext"), "--config", str(config)],
                              capture_output=True, text=True)
    assert extended.returncode == 0, extended.stderr
    assert "chars/token" in extended.stdout and "fewer tokens than the first" in extended.stdout
    report = json.loads((tmp_path / "ext" / "compression_report.json").read_text())
    assert set(report["zh"]) == {str(bases[1]["byte-level BPE"]), str(tmp_path / "ext")}
