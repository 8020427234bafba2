"""tools/vocab.py: train a Chinese tokenizer, extend English base tokenizers of both families with it
(ids stable, round trips exact), and continue pretraining a model with the extended tokenizer."""
import json
import shutil
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


def qwen2_style_base(directory, texts, vocab_size=400):
    """A Qwen2 / Llama-3-style byte-level BPE tokenizer: its special tokens are added tokens numbered after the
    BPE vocabulary, and it loads as transformers' Qwen2Tokenizer (which re-adds them on every load)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                             "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.save_pretrained(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    return directory


def llama2_style_base(directory, texts, vocab_size=400, pad=False):
    """A Llama-2-style tokenizer as transformers 5 saves one: tokenizer.model, and a tokenizer.json whose
    TemplateProcessing post-processor is what adds BOS (tokenizer_config.json no longer says add_bos_token);
    `pad`: with a <pad> added after the SentencePiece vocabulary, as many Llama-2 fine-tunes have."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    hub = directory / "hub"
    hub.mkdir(parents=True)
    (directory / "corpus.txt").write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(directory / "corpus.txt"), model_prefix=str(hub / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (hub / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(hub)
    if pad:
        tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(directory / "llama2")
    shutil.copy(hub / "tokenizer.model", directory / "llama2" / "tokenizer.model")
    return directory / "llama2"


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


def test_new_byte_level_tokens_that_are_part_of_a_character_start_at_their_bytes_rows(bases, micro_model_config,
                                                                                     tmp_path):
    """Byte-level BPE spells a new character through tokens of part of its bytes (`ä¸`), which decode to U+FFFD:
    their rows all started at the mean of U+FFFD's three bytes."""
    from transformers import AutoTokenizer

    import pretrain

    base_dir, families, chinese = bases
    out = tmp_path / "extended"
    vocab.extend_tokenizer(families["byte-level BPE"], chinese, out)
    base, extended = AutoTokenizer.from_pretrained(families["byte-level BPE"]), AutoTokenizer.from_pretrained(out)
    spec = json.loads(micro_model_config.read_text())
    (tmp_path / "model.json").write_text(json.dumps({**spec, "vocab_size": len(base), "tie_word_embeddings": False}))
    model = pretrain.build_model(pretrain.parse_args(["--model_config", str(tmp_path / "model.json")])[0], base, 32)
    model.save_pretrained(tmp_path / "base_model")
    base.save_pretrained(tmp_path / "base_model")
    old_rows = model.get_input_embeddings().weight.detach().clone()
    args = pretrain.parse_args(["--model_name_or_path", str(tmp_path / "base_model"), "--tokenizer_name_or_path",
                                str(out)])[0]
    rows = pretrain.build_model(args, extended, 32).get_input_embeddings().weight.detach()
    partial = [i for i in range(len(base), len(extended)) if "\ufffd" in extended.decode([i])]
    assert len(partial) > 10
    base_vocab = base.get_vocab()
    for new_id in partial:
        own = [base_vocab[symbol] for symbol in extended.convert_ids_to_tokens(new_id)]
        assert torch.allclose(rows[new_id], old_rows[own].mean(0)), extended.convert_ids_to_tokens(new_id)


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
    base_tok = AutoTokenizer.from_pretrained(tmp_path / "base_model")
    first_new = len(base_tok)
    assert first_new < len(old_rows)  # the base model has spare rows (its vocabulary rounded up to 64)
    assert torch.equal(rows[:first_new], old_rows[:first_new])  # base rows untouched
    for new_id in (first_new, len(old_rows)):  # a new token in a spare row, and one in a row added by the resize
        pieces = base_tok(tokenizer.decode([new_id]), add_special_tokens=False)["input_ids"]
        assert torch.allclose(rows[new_id], old_rows[pieces].mean(0))  # starts at the mean of the pieces it replaces
    mean_model = pretrain.build_model(pretrain.parse_args(argv + ["--new_token_init", "mean"])[0], tokenizer, 32)
    assert torch.allclose(mean_model.get_input_embeddings().weight[first_new], old_rows[:first_new].mean(0), atol=1e-6)

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


def test_byte_level_extension_never_merges_onto_a_base_token_its_own_merges_do_not_reach(tmp_path):
    """Base merges (b,c), (a,b), (ab,c): "abc" encodes as [a, bc], and the token "abc" is reached only from "ab".
    Adding "abcz" by appending (a,bc) would have re-encoded every base "abc" as the one token: it stays out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ids = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(data_utils.byte_level_alphabet().values()))}}
    merges = [("b", "c"), ("a", "b"), ("ab", "c")]
    ids.update({a + b: len(ids) + i for i, (a, b) in enumerate(merges)})
    model = Tokenizer(models.BPE(vocab=ids, merges=merges))
    model.pre_tokenizer, model.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>").save_pretrained(tmp_path / "base")
    (tmp_path / "terms.txt").write_text("abcz\nxy\n", encoding="utf-8")
    vocab.extend_tokenizer(tmp_path / "base", tmp_path / "terms.txt", tmp_path / "ext")
    base, extended = AutoTokenizer.from_pretrained(tmp_path / "base"), AutoTokenizer.from_pretrained(tmp_path / "ext")
    for text in ("abc", "xabc", "abcz", "bcab"):
        assert extended(text)["input_ids"] == base(text)["input_ids"], text
    assert extended.tokenize("xy") == ["xy"]  # a piece whose merges touch no base token is still added


def test_the_sentencepiece_model_of_a_hub_tokenizer_is_kept_from_the_hub_cache(tmp_path, tokenizer_dir):
    """Checkpoints and the final model keep tokenizer.model (for a later `extend`); for a base named by hub id it
    was looked for in a directory called `org/name` and never found."""
    import shutil

    import pretrain

    repo = tmp_path / "hub" / "models--org--micro"
    shutil.copytree(tokenizer_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = (tokenizer_dir / "tokenizer.model").read_bytes()
    assert pretrain.sentencepiece_model_of("org/micro", cache_dir=tmp_path / "hub") == model
    assert pretrain.sentencepiece_model_of(str(tokenizer_dir)) == model
    assert pretrain.sentencepiece_model_of("org/other", cache_dir=tmp_path / "hub") is None


def test_cli_train_and_extend_with_report(tmp_path, bases):
    zh = make_text_corpus(tmp_path / "zh", repeat=20)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"name": "zh", "path": str(zh)}],
                                      "cache_dir": str(tmp_path / "cache")}), encoding="utf-8")
    run = [sys.executable, str(ROOT / "tools" / "vocab.py")]
    symbols = tmp_path / "terms.txt"  # a BOM (Notepad's UTF-8) and a term with a space, one term per line
    symbols.write_text("\ufeff高血压\n糖尿病\nblood pressure\n", encoding="utf-8")
    trained = subprocess.run(run + ["train", str(config), "--vocab_size", "600", "--out", str(tmp_path / "zh_tok"),
                                    "--user_defined_symbols", str(symbols)], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "zh_tok")
    assert tokenizer.tokenize("高血压") == ["高血压"] and tokenizer.tokenize("患者高血压")[-1] == "高血压"
    assert "blood▁pressure" in tokenizer.get_vocab() and "\ufeff高血压" not in tokenizer.get_vocab()
    extended = subprocess.run(run + ["extend", "--base", str(bases[1]["byte-level BPE"]), "--add",
                                     str(tmp_path / "zh_tok"), "--out", str(tmp_path / "ext"), "--config", str(config)],
                              capture_output=True, text=True)
    assert extended.returncode == 0, extended.stderr
    assert "chars/token" in extended.stdout and "fewer tokens than the first" in extended.stdout
    report = json.loads((tmp_path / "ext" / "compression_report.json").read_text())
    assert set(report["zh"]) == {str(bases[1]["byte-level BPE"]), str(tmp_path / "ext")}


def test_user_defined_symbols_stay_whole_after_extension(bases, tmp_path):
    """`train --user_defined_symbols` terms stay one token in both families. Appended to a Llama-2-style
    tokenizer.model as normal pieces they had no merge path (冠心病: neither it nor its characters are in the
    corpus, so ['▁', bytes, '心', bytes]); a term the byte-level pre-tokenizer splits (2型糖尿病, COVID-19) was
    skipped."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base_dir, _, _ = bases
    terms = ["高血压", "糖尿病", "冠心病", "2型糖尿病", "COVID-19"]
    zh = make_text_corpus(tmp_path / "zh", repeat=20)
    add = data_utils.train_sentencepiece_tokenizer([{"path": str(zh)}], str(tmp_path / "cache"), vocab_size=600,
                                                   user_defined_symbols=terms)
    english = (base_dir / "en" / "en.txt").read_text(encoding="utf-8").splitlines()
    text = "患者有2型糖尿病、冠心病和高血压，COVID-19 阴性。"
    for name, base in (("llama2", llama2_style_base(tmp_path / "llama", english)),
                       ("qwen2", qwen2_style_base(tmp_path / "qwen2", english))):
        out = tmp_path / f"{name}_extended"
        vocab.extend_tokenizer(base, add, out)
        before, extended = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
        for term in terms:
            ids = extended(term, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and extended.decode(ids) == term, (name, extended.convert_ids_to_tokens(ids))
        ids = extended(text)["input_ids"]
        assert [extended.decode([i]) for i in ids if extended.decode([i]) in terms] == \
            ["2型糖尿病", "冠心病", "高血压", "COVID-19"], (name, extended.convert_ids_to_tokens(ids))
        assert extended.decode(ids, skip_special_tokens=True) == text
        assert extended("1234567890")["input_ids"] == before("1234567890")["input_ids"]
    # tokenizer.model too, which a later extension starts from
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama2_extended" / "tokenizer.model"))
    assert all(sp.encode(term, out_type=str)[-1] == term for term in terms)


def test_a_glossary_file_adds_terms_that_tokenize_whole_or_says_which_it_could_not(bases, tmp_path, capsys):
    """A text file of terms, one per line (here with a BOM, as Notepad saves it, and a trailing space). Into a
    Llama-2-style tokenizer.model they were appended alone, and a term whose halves are not pieces was never
    produced (冠心病 stayed bytes): each now comes with its merge path (its characters, then 冠心, 冠心病), in the
    slow SentencePiece model and tokenizer.json alike, and a Latin term also in its word-initial form (▁COVID-19,
    as after a space). What still does not come out whole is counted, named and warned about (a byte-level
    pre-tokenizer splits COVID-19 and 'heart failure'; SentencePiece merges across its ▁)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base_dir, _, _ = bases
    terms = ["高血压", "冠心病", "心肌梗死", "COVID-19", "heart failure"]
    glossary = tmp_path / "terms.txt"
    glossary.write_text("\ufeff" + "\n".join(terms[:3]) + " \n" + "\n".join(terms[3:]) + "\n", encoding="utf-8")
    english = (base_dir / "en" / "en.txt").read_text(encoding="utf-8").splitlines()
    text = "患者有冠心病和高血压，曾心肌梗死。"
    for name, base in (("llama2", llama2_style_base(tmp_path / "llama", english)),
                       ("qwen2", qwen2_style_base(tmp_path / "qwen2", english))):
        out = tmp_path / f"{name}_extended"
        assert vocab.main(["extend", "--base", str(base), "--add", str(glossary), "--out", str(out)]) == 0
        shown = capsys.readouterr()
        result = json.loads(shown.out)
        extended, before = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base)
        tokens = [extended.decode([i]) for i in extended(text, add_special_tokens=False)["input_ids"]]
        assert [t for t in tokens if t in terms] == ["冠心病", "高血压", "心肌梗死"], (name, tokens)
        assert extended.decode(extended(text)["input_ids"], skip_special_tokens=True) == text
        assert extended("The patient is well.")["input_ids"] == before("The patient is well.")["input_ids"]
        if name == "llama2":
            sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
            assert [t for t in sp.encode(text, out_type=str) if t in terms] == ["冠心病", "高血压", "心肌梗死"]
            for sentence in ("The patient has COVID-19 now.", "COVID-19 阳性"):
                assert "▁COVID-19" in sp.encode(sentence, out_type=str)
                assert "▁COVID-19" in extended.convert_ids_to_tokens(extended(sentence)["input_ids"])
        if name == "qwen2":  # its pre-tokenizer splits digits, punctuation and words
            assert (result["terms"], result["terms_not_whole_examples"]) == (5, ["COVID-19", "heart▁failure"])
            assert "warning: 2 of the 5 terms still do not come out as one token" in shown.err
        else:
            assert (result["terms"], result["terms_not_whole"]) == (5, 0) and "warning" not in shown.err
    gbk = tmp_path / "gbk_terms.txt"  # a glossary saved in GBK reads too
    gbk.write_bytes("\n".join(terms[:3]).encode("gbk"))
    assert vocab.pieces_to_add(gbk)[2] == terms[:3]


def test_a_hub_tokenizer_that_cannot_be_loaded_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Offline, a hub id not in the cache used to end in an OSError traceback (after ~50 s of retries where the
    network is down but HF_HUB_OFFLINE is not set): now exit code 2 and the fixes, at once."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(make_text_corpus(tmp_path / "zh"))}],
                                      "cache_dir": str(tmp_path / "cache")}), encoding="utf-8")
    hub_id = "example-org/tokenizer-not-in-any-cache"
    start = time.monotonic()
    assert vocab.main(["report", str(config), "--tokenizer", hub_id]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"--tokenizer `{hub_id}` cannot be loaded" in err and "pass that directory as `--tokenizer`" in err
    assert f"hf download {hub_id}" in err and "HF_ENDPOINT" in err
    assert vocab.main(["extend", "--base", hub_id, "--add", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--base `{hub_id}` is not a directory" in err and f"hf download {hub_id}" in err
    assert vocab.main(["report", str(config), "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "--tokenizer directory `" in (err := capsys.readouterr().err) and "` does not exist" in err


def test_train_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    """`train` used to copy the tokenizer into any --out, over and next to what was there; now it writes --out whole,
    like `extend`: a directory it did not write is never touched, an earlier `train` is replaced with --overwrite."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(make_text_corpus(tmp_path / "zh", repeat=20))}],
                                      "cache_dir": str(tmp_path / "cache")}), encoding="utf-8")
    train = ["train", str(config), "--vocab_size", "600", "--out"]
    with pytest.raises(SystemExit):
        vocab.main(["train", str(config), "--vocab_size", "-5", "--out", str(tmp_path / "small")])
    assert "--vocab_size -5: a SentencePiece tokenizer with byte fallback needs at least 300" in capsys.readouterr().err
    assert vocab.main(["train", str(config), "--vocab_size", "90000", "--out", str(tmp_path / "big")]) == 2
    assert "Lower `--vocab_size` or add data" in capsys.readouterr().err  # this tool's flag, not the config's

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "tokenizer.json").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        assert vocab.main(train + [str(notes), *overwrite]) == 2
        assert "did not write" in capsys.readouterr().err
    assert sorted(f.name for f in notes.iterdir()) == ["tokenizer.json"] and \
        (notes / "tokenizer.json").read_text() == "mine"
    assert vocab.main(train + [str(tmp_path), "--overwrite"]) == 2  # holds the cache (and the config)
    assert "is or holds the input" in capsys.readouterr().err

    out = tmp_path / "tok"
    out.mkdir()  # an empty directory is fine
    assert vocab.main(train + [str(out)]) == 0
    written = sorted(f.name for f in out.iterdir())
    assert "vocab_train.json" in written and "tokenizer.model" in written
    assert vocab.main(train + [str(out)]) == 2
    assert "add --overwrite to replace it" in capsys.readouterr().err
    assert vocab.main(train + [str(out), "--overwrite", "--user_defined_symbols", "高血压"]) == 0
    assert sorted(f.name for f in out.iterdir()) == written
    assert json.loads((out / "vocab_train.json").read_text(encoding="utf-8"))["user_defined_symbols"] == ["高血压"]
    (out / "model.safetensors").write_bytes(b"weights")
    assert vocab.main(train + [str(out), "--overwrite"]) == 2
    assert "did not write (model.safetensors)" in capsys.readouterr().err and (out / "model.safetensors").is_file()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.yaml", "cache", "notes", "tok", "zh"]  # no temporaries


def test_qwen2_style_special_tokens_after_the_vocabulary_keep_their_ids(bases, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    base_dir, _, chinese = bases
    base = qwen2_style_base(tmp_path / "qwen2", (base_dir / "en" / "en.txt").read_text(encoding="utf-8").splitlines())
    before = AutoTokenizer.from_pretrained(base)
    specials = {t: before.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    bpe_size = len(json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    assert sorted(specials.values()) == [bpe_size, bpe_size + 1, bpe_size + 2]  # after the BPE vocabulary
    result = vocab.extend_tokenizer(base, chinese, tmp_path / "out")
    extended = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(extended).__name__ == "Qwen2Tokenizer" and result["added_tokens"] > 50
    base_vocab, ext_vocab = before.get_vocab(), extended.get_vocab()
    assert all(ext_vocab[t] == i for t, i in base_vocab.items())  # special tokens included
    new_ids = sorted(set(ext_vocab.values()) - set(base_vocab.values()))
    assert new_ids == list(range(bpe_size + 3, len(extended))) and len(new_ids) == result["added_tokens"]
    raw = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))  # the tokenizers library alone agrees
    assert {t: raw.token_to_id(t) for t in specials} == specials
    chat = ("<|im_start|>user\n高血压怎么办？<|im_end|>\n<|im_start|>assistant\nAspirin 100 mg daily.<|im_end|>"
            "<|endoftext|>")
    ids = extended(chat)["input_ids"]
    assert [i for i in ids if i in specials.values()] == [specials[t] for t in
                                                          ("<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>",
                                                           "<|endoftext|>")]
    assert set(ids) & set(new_ids) and extended.decode(ids) == chat
    assert extended.convert_tokens_to_ids(extended.convert_ids_to_tokens(ids)) == ids
    for text in ENGLISH + ["1234567890"]:
        assert extended(text)["input_ids"] == before(text)["input_ids"]


@pytest.mark.parametrize("pad", [False, True])
def test_llama2_style_base_keeps_its_bos_and_pad(bases, tmp_path, pad):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base_dir, _, chinese = bases
    base = llama2_style_base(tmp_path / "llama", (base_dir / "en" / "en.txt").read_text(encoding="utf-8").splitlines(),
                             pad=pad)
    assert json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))["post_processor"]["type"] == \
        "TemplateProcessing" and "add_bos_token" not in (base / "tokenizer_config.json").read_text(encoding="utf-8")
    before = AutoTokenizer.from_pretrained(base)
    assert before("Hello world")["input_ids"][0] == before.bos_token_id == 1
    assert before.pad_token_id == (400 if pad else None) and len(before) == 400 + pad
    result = vocab.extend_tokenizer(base, chinese, tmp_path / "out")
    extended = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert result["added_tokens"] > 50 and len(extended) == len(before) + result["added_tokens"]
    assert all(extended.get_vocab()[t] == i for t, i in before.get_vocab().items())
    for text in ENGLISH + ["", "Hello world", "1234567890", "a<pad>b"]:  # BOS (and the pad) as before
        assert extended(text)["input_ids"] == before(text)["input_ids"]
    zh = "".join(ZH_LINES[:3])
    ids = extended(zh)["input_ids"]
    assert ids[0] == 1 and len(ids) * 2 <= len(before(zh)["input_ids"])  # the new pieces at work, after BOS
    assert extended.decode(ids, skip_special_tokens=True) == zh
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))  # for a later extension
    assert sp.get_piece_size() == len(extended) and (sp.id_to_piece(400) == "<pad>") == pad

    # what extending used to write, a tokenizer rebuilt from tokenizer.model alone, adds no BOS: the check refuses it
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tmp_path / "out" / name, rebuilt / name)
    without_bos = AutoTokenizer.from_pretrained(rebuilt)
    assert without_bos("Hello world")["input_ids"][0] != 1
    with pytest.raises(data_utils.DataError, match=r"changed how '' tokenizes \(ids \[1\]"):
        vocab.check_extension(before, without_bos)


def test_out_never_replaces_inputs_or_files_the_tool_did_not_write(bases, tmp_path, monkeypatch, capsys):
    base_dir, families, chinese = bases
    model = tmp_path / "model"  # a base model directory: its weights must survive any --out
    shutil.copytree(families["byte-level BPE"], model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    run = [sys.executable, str(ROOT / "tools" / "vocab.py"), "extend", "--base", str(model), "--add", str(chinese)]
    refused = subprocess.run(run + ["--out", str(model), "--overwrite"], capture_output=True, text=True)
    assert refused.returncode == 2 and "is or holds the input" in refused.stderr
    for out in (tmp_path, chinese, chinese.parent):  # a directory holding an input, the --add tokenizer
        with pytest.raises(data_utils.DataError, match="is or holds the input"):
            vocab.extend_tokenizer(model, chinese, out, overwrite=True)
    assert (model / "model.safetensors").read_bytes() == b"weights" and (chinese / "tokenizer.model").is_file()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(data_utils.DataError, match="did not write"):
        vocab.extend_tokenizer(model, chinese, notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "mine"

    out = tmp_path / "ext"
    out.mkdir()  # an empty directory is fine
    vocab.extend_tokenizer(model, chinese, out)
    written = sorted(f.name for f in out.iterdir())
    assert "vocab_extension.json" in written and "model.safetensors" not in written
    with pytest.raises(data_utils.DataError, match="--overwrite"):
        vocab.extend_tokenizer(model, chinese, out)
    (out / "compression_report.json").write_text("{}")  # also the tool's
    vocab.extend_tokenizer(model, chinese, out, overwrite=True)
    assert sorted(f.name for f in out.iterdir()) == written
    (out / "model.safetensors").write_bytes(b"trained")
    with pytest.raises(data_utils.DataError, match=r"did not write \(model.safetensors\)"):
        vocab.extend_tokenizer(model, chinese, out, overwrite=True)
    (out / "model.safetensors").unlink()

    tokenizer_json = (out / "tokenizer.json").read_bytes()  # a failed extension leaves the old one whole
    monkeypatch.setattr(vocab, "check_extension", lambda *a: (_ for _ in ()).throw(data_utils.DataError("bad")))
    with pytest.raises(data_utils.DataError, match="bad"):
        vocab.extend_tokenizer(model, chinese, out, overwrite=True)
    assert (out / "tokenizer.json").read_bytes() == tokenizer_json
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ext", "model", "notes"]  # no temporary directories left

    # a tokenizer written where the config's sources read (the default config's per_file data/) would be trained
    # on by the next run: its tokenizer.json and other .json files are data files there
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("高血压患者应定期测量血压。\n" * 50, encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": f"{data}/", "per_file": True}],
                                      "cache_dir": str(tmp_path / "cache")}))
    for argv in (["extend", "--base", str(model), "--add", str(chinese), "--config", str(config)],
                 ["train", str(config), "--vocab_size", "400"]):
        assert vocab.main([*argv, "--out", str(data / "tok")]) == 2 and not (data / "tok").exists()
        assert f"--out `{data / 'tok'}` is inside `{data}/`, which source `per_file {data}/` reads: the next run " \
               "would train on the tokenizer's .json files too" in capsys.readouterr().err


def test_a_models_own_tokenizer_larger_than_its_embeddings_gets_rows(tmp_path, micro_model_config, tokenizer_dir):
    """A base model whose tokenizer has more tokens than embedding rows (a tokenizer saved after added tokens)."""
    from transformers import AutoTokenizer

    import pretrain

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_args = pretrain.parse_args(["--model_config", str(micro_model_config)])[0]
    model = pretrain.build_model(model_args, tokenizer, 32)
    rows = model.get_input_embeddings().num_embeddings
    tokenizer.add_tokens([f"新词{i}" for i in range(rows - len(tokenizer) + 5)])
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    continued = pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(tmp_path / "base")])[0],
                                     tokenizer, 32)
    weight = continued.get_input_embeddings().weight
    assert weight.shape[0] >= len(tokenizer) and weight.shape[0] % 64 == 0
    assert torch.equal(weight[:rows], model.get_input_embeddings().weight)
    assert torch.allclose(weight[len(tokenizer) - 1], model.get_input_embeddings().weight.mean(0), atol=1e-6)


def test_a_tokenizer_trained_on_a_sample_of_the_corpus_is_the_same_on_every_node(tmp_path, monkeypatch):
    """SentencePiece would train on a random sample of the lines above its limit (not seedable in 0.2): the corpus it
    gets stops at TOKENIZER_MAX_LINES, so two nodes with their own cache_dir (or two reruns) get the same vocabulary."""
    corpus = make_text_corpus(tmp_path / "data", repeat=60)
    monkeypatch.setattr(data_utils, "TOKENIZER_MAX_LINES", 150)
    import sentencepiece as spm

    vocabularies = []
    for node in ("node0", "node1"):
        model = data_utils.train_sentencepiece_tokenizer([{"path": str(corpus)}], str(tmp_path / node), vocab_size=600)
        sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
        vocabularies.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])
    assert vocabularies[0] == vocabularies[1]
