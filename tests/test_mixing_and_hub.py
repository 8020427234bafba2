"""Token-weighted mixing, hub sources through a local fixture in hub layout, offline failures,
wikitext article grouping."""
import itertools
import json
import logging
import os
import time
import types

import numpy as np
import pytest

import data_utils
from data_utils import DataError
from conftest import ROOT, ZH_LINES, make_jsonl_corpus, make_text_corpus


def data_args(tmp_path, sources, **overrides):
    fields = dict(sources=sources, block_size=4, eval_fraction=0.0, add_bos="never", dedup=True,
                  cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1, max_source_epochs=4.0)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def build(tmp_path, tokenizer, sources, **overrides):
    args = data_args(tmp_path, sources, **overrides)
    return data_utils.build_datasets(args, tokenizer, args.block_size, seed=3)


def make_hub_fixture(root, rows=None, eval_rows=None):
    """A dataset directory in hub layout: parquet files per config/split and a README with `configs:`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows or [f"{line}（第{i}段）" for i in range(12) for line in ZH_LINES]
    eval_rows = eval_rows or [f"验证集第{i}条：{ZH_LINES[i % len(ZH_LINES)]}" for i in range(10)]
    (root / "pretrain").mkdir(parents=True)
    pq.write_table(pa.table({"text": rows}), root / "pretrain" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": eval_rows}), root / "pretrain" / "validation-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: pretrain\n  data_files:\n  - split: train\n    path: pretrain/train-*.parquet\n"
        "  - split: validation\n    path: pretrain/validation-*.parquet\n---\n# fixture\n", encoding="utf-8")
    return root


# ------------------------------------------------------------------------------ mixing
def test_achieved_token_shares_follow_the_weights(tmp_path, tokenizer):
    big = make_text_corpus(tmp_path / "big", repeat=60)
    small = make_jsonl_corpus(tmp_path / "small", repeat=12)
    data = build(tmp_path, tokenizer, [{"name": "general", "path": str(big), "weight": 0.3},
                                       {"name": "medical", "path": str(small), "weight": 0.7}])
    mixed = data.train
    assert len(mixed) >= 2000
    for consumed in (200, 2000, len(mixed)):
        shares = mixed.shares(consumed)
        assert shares["medical"] == pytest.approx(0.7, abs=0.02), consumed
        assert shares["general"] == pytest.approx(0.3, abs=0.02), consumed
    # what the model reads: every item is a full block of its source, no padding
    counted = np.bincount(mixed.source_ids[:2000], minlength=2) / 2000
    assert counted[1] == pytest.approx(0.7, abs=0.02)
    assert all(mixed[i]["input_ids"].shape == (4,) for i in range(50))
    report = data.report["sources"]
    assert report["medical"]["epochs_per_mixture"] > 1 > report["general"]["epochs_per_mixture"]  # repeat / subsample
    again = build(tmp_path, tokenizer, [{"name": "general", "path": str(big), "weight": 0.3},
                                        {"name": "medical", "path": str(small), "weight": 0.7}])
    assert again.train.block_ids.tolist() == mixed.block_ids.tolist()  # seeded


def test_heavy_repetition_warns(tmp_path, tokenizer, caplog):
    big = make_text_corpus(tmp_path / "big", repeat=60)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("极少量的医学文本，重复很多次。\n", encoding="utf-8")
    for order in (1, -1):  # wherever it is listed, once
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data_utils"):
            build(tmp_path, tokenizer, [{"name": "general", "path": str(big), "weight": 0.5},
                                        {"name": "tiny", "path": str(tiny), "weight": 0.5}][::order])
        warned = [r.getMessage() for r in caplog.records if "max_source_epochs" in r.getMessage()]
        assert len(warned) == 1 and "source `tiny`" in warned[0], (order, warned)


@pytest.mark.parametrize("weights,message", [
    ((0, 1), "weight must be a number above 0"),
    ((-1, 1), "weight must be a number above 0"),
    ((0.5, None), "have a `weight` but b do not"),
])
def test_bad_weights_are_clear_errors(tmp_path, weights, message):
    sources = [{"name": n, "path": "x", **({"weight": w} if w is not None else {})} for n, w in zip("ab", weights)]
    with pytest.raises(DataError, match=message):
        data_utils.parse_sources(sources)


# ------------------------------------------------------------------------------ hub sources
def test_hub_layout_directory_goes_through_load_dataset(tmp_path, tokenizer):
    hub = make_hub_fixture(tmp_path / "medical")
    data = build(tmp_path, tokenizer, [{"name": "med", "hub": str(hub), "hub_config": "pretrain",
                                        "eval_split": "validation"}], block_size=16)
    report = data.report["sources"]["med"]
    assert report["records"] == 12 * len(ZH_LINES) == report["train_documents"]
    assert report["eval_documents"] == 10 and report["documents"] == 12 * len(ZH_LINES) + 10
    assert report["files"][0]["format"] == "hub"
    assert data.eval["med"].store.n_docs == 10
    again = build(tmp_path, tokenizer, [{"name": "med", "hub": str(hub), "hub_config": "pretrain",
                                         "eval_split": "validation"}], block_size=16)
    assert again.report["sources"]["med"]["cache"] == "hit"


@pytest.mark.parametrize("override,message", [
    ({"hub_config": "pretrainx"}, r"BuilderConfig 'pretrainx' not found.*Available: \['pretrain'\]"),
    ({"split": "test"}, r"Unknown split \"test\""),
])
def test_unknown_config_or_split(tmp_path, tokenizer, override, message):
    hub = make_hub_fixture(tmp_path / "medical")
    source = {"name": "med", "hub": str(hub), "hub_config": "pretrain", **override}
    with pytest.raises(DataError, match=message):
        build(tmp_path, tokenizer, [source])


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable-endpoint"])
def test_unreachable_hub_fails_fast_with_the_three_fixes(tmp_path, tokenizer, monkeypatch, env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.time()
    with pytest.raises(DataError) as err:
        build(tmp_path, tokenizer, [{"name": "med", "hub": "nobody/no-such-dataset", "hub_config": "pretrain"}])
    assert time.time() - start < 5
    message = str(err.value)
    assert "nobody/no-such-dataset" in message
    assert "HF_ENDPOINT" in message and "hf download --repo-type dataset nobody/no-such-dataset" in message
    assert "`path:`" in message


# ------------------------------------------------------------------------------ wikitext
def test_wikitext_lines_become_whole_articles(tmp_path, tokenizer):
    text = (" \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . \n"
            " = Beta = \n \n Beta follows alpha . \n")
    path = tmp_path / "wiki.txt"
    path.write_text(text, encoding="utf-8")
    spec = data_utils.SourceConfig.from_dict({"path": str(path), "group": "wikitext_articles", "format": "text"}, 0)
    assert list(data_utils.iter_texts(spec)) == [
        "= Alpha =\nAlpha is a letter .\n= = History = =\nIt is old .", "= Beta =\nBeta follows alpha ."]


def test_wikitext_grouping_on_the_real_file(tmp_path):
    valid = ROOT.parent / "shared" / "corpora" / "wikitext2_tokens" / "valid.txt"
    if not valid.exists():
        pytest.skip("../shared/corpora is not present")
    spec = data_utils.SourceConfig.from_dict({"path": str(valid), "group": "wikitext_articles",
                                              "format": "text"}, 0)
    articles = list(data_utils.iter_texts(spec))
    assert len(articles) == 60  # the file's 60 top-level headings
    assert all(a.startswith("= ") and "\n" in a for a in articles)


def test_two_local_hub_directories_with_one_name_do_not_share_a_cache(tmp_path, tokenizer):
    """`datasets` keys local directories by name and config only; the toolkit keys them by content."""
    first = make_hub_fixture(tmp_path / "a" / "medical", rows=[f"第一份数据，第{i}条。" for i in range(30)])
    second = make_hub_fixture(tmp_path / "b" / "medical", rows=[f"第二份数据的记录{i}号。" for i in range(40)])
    one = build(tmp_path, tokenizer, [{"name": "m", "hub": str(first), "hub_config": "pretrain"}])
    two = build(tmp_path, tokenizer, [{"name": "m", "hub": str(second), "hub_config": "pretrain"}])
    assert one.report["sources"]["m"]["records"] == 30
    assert two.report["sources"]["m"]["records"] == 40


@pytest.mark.parametrize("builder", [False, True], ids=["hub-directory", "hub-json-data-files"])
def test_a_local_hub_file_copied_with_its_old_size_and_mtime_is_read_again(tmp_path, tokenizer, builder):
    """`cp -p` / `rsync -t` can give new content the old size and mtime: the Arrow cache must not serve the old
    text (the token store, keyed by content, would then hold it under the new content's key). `datasets`
    fingerprints a packaged builder's local data_files by modification time alone."""
    path = tmp_path / "medical" / "data" / "train.jsonl"
    path.parent.mkdir(parents=True)
    write = lambda word: path.write_text("".join(json.dumps({"text": f"{line}（{word}{i}）"}, ensure_ascii=False) + "\n"  # noqa: E731
                                                 for i in range(20) for line in ZH_LINES), encoding="utf-8")
    write("第一版")
    stat = path.stat()
    source = [{"name": "m", "hub": "json", "data_files": str(path.parent / "*.jsonl"), "eval_fraction": 0}
              if builder else {"name": "m", "hub": str(path.parent.parent), "eval_fraction": 0}]
    first = build(tmp_path, tokenizer, source)
    time.sleep(0.05)  # past the file system's clock tick
    write("第二版")  # the same byte length
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = build(tmp_path, tokenizer, source)
    texts = [tokenizer.decode(data.train.parts[0].store.doc(0)) for data in (first, second)]
    assert "第一版0" in texts[0].replace(" ", "") and "第二版0" in texts[1].replace(" ", ""), texts


# ------------------------------------------------------------------------------ streaming
def test_streaming_and_map_style_give_identical_tokens(tmp_path, tokenizer):
    hub = make_hub_fixture(tmp_path / "medical")
    source = {"name": "med", "hub": str(hub), "hub_config": "pretrain", "eval_fraction": 0}
    stored = build(tmp_path, tokenizer, [source], block_size=16).train.parts[0]
    spec = data_utils.SourceConfig.from_dict({**source, "streaming": True}, 0)
    info = data_utils.TokenizerInfo.from_tokenizer(tokenizer, "never")
    streamed = list(data_utils.StreamedSource(spec, info, 16, dedup=True, cache_dir=tmp_path / "cache"))
    assert len(streamed) == len(stored) > 10
    assert all(streamed[i]["input_ids"].tolist() == stored[i]["input_ids"].tolist() for i in range(len(stored)))
    # document-aware positions agree too
    stored_doc = build(tmp_path / "d", tokenizer, [source], block_size=16, attention="document").train.parts[0]
    streamed_doc = list(data_utils.StreamedSource(spec, info, 16, dedup=True, cache_dir=tmp_path / "cache",
                                                  document_positions=True))
    assert all(streamed_doc[i]["position_ids"].tolist() == stored_doc[i]["position_ids"].tolist()
               for i in range(len(stored_doc)))


def test_streaming_mixture_follows_the_weights(tmp_path, tokenizer):
    hub = make_hub_fixture(tmp_path / "medical")
    local = make_text_corpus(tmp_path / "general", repeat=60)
    data = build(tmp_path, tokenizer, [
        {"name": "med", "hub": str(hub), "hub_config": "pretrain", "streaming": True, "weight": 0.25,
         "eval_split": "validation"},
        {"name": "general", "path": str(local), "weight": 0.75}])
    assert not hasattr(data.train, "__len__")  # a stream: the corpus is never materialised
    stream = iter(data.train)
    blocks = [next(stream) for _ in range(2000)]
    assert all(b["input_ids"].shape == (4,) for b in blocks)
    shares = data.train.shares(2000)
    assert shares["med"] == pytest.approx(0.25, abs=0.001) and shares["general"] == pytest.approx(0.75, abs=0.001)
    assert "med" in data.eval and data.report["sources"]["med"]["streaming"] is True
    assert data.report["sources"]["med"]["eval_documents"] == 10
    markdown = data_utils.data_report_markdown(data.report)
    assert "| med | streamed |" in markdown and "records checked before training" in markdown


class Tagged:
    """A stand-in source whose blocks say where they came from: block i of one endless sequence, worker
    w of W reading blocks w, w + W, ... (as ShuffledBlocks does)."""

    def __init__(self, name):
        self.name = name

    def blocks_of(self, shard=0, shards=1):
        return ({"source": self.name, "i": i} for i in itertools.count(shard, shards))


@pytest.mark.parametrize("weights", [{"a": 0.25, "b": 0.75}, {"a": 1, "b": 1, "c": 3}, {"a": 0.07, "b": 0.93}])
def test_mixture_shares_are_exact_at_every_prefix(weights):
    mixture = data_utils.StreamingMixture({n: Tagged(n) for n in weights}, weights, 4)
    read = [b["source"] for b in itertools.islice(mixture, 3000)]
    total = sum(weights.values())
    for n in (0, 1, 7, 100, 1234, 3000):
        counts, shares = mixture.source_counts(n), mixture.shares(n)
        for i, name in enumerate(weights):
            assert counts[i] == read[:n].count(name) and shares[name] == pytest.approx(counts[i] / max(n, 1))
            assert abs(read[:n].count(name) - n * weights[name] / total) <= 1  # within a block everywhere


@pytest.mark.parametrize("weights, batch_size, workers", [
    ({"a": 1, "b": 1}, 1, 2), ({"a": 1, "b": 3}, 1, 4), ({"a": 0.1, "b": 0.9}, 5, 2), ({"a": 0.3, "b": 0.7}, 4, 3)])
def test_mixture_workers_read_every_source_evenly(weights, batch_size, workers):
    """Through a real DataLoader with workers: the shares reported from the count of blocks read are the
    ones read, and each source's blocks are read in order, none skipped or doubled, whatever the period of
    the mixture and the batch size (a worker that got all of one source's turns would starve the others'
    shards)."""
    import torch

    mixture = data_utils.StreamingMixture({n: Tagged(n) for n in weights}, weights, 4, batch_size, workers)
    loader = torch.utils.data.DataLoader(mixture.as_torch_dataset(), batch_size=batch_size, num_workers=workers,
                                         collate_fn=lambda items: items)
    batches = 60 * workers
    read = [b for batch in itertools.islice(loader, batches) for b in batch]
    for n in range(0, len(read) + 1, 7):
        counts = mixture.consumed_counts(n)
        assert [counts[i] for i in range(len(weights))] == [sum(b["source"] == s for b in read[:n]) for s in weights]
    for name in weights:  # a whole number of rounds over the workers: each source's first blocks, once each
        indices = sorted(b["i"] for b in read if b["source"] == name)
        assert indices == list(range(len(indices))), name
    assert mixture.shares(len(read))["a"] == pytest.approx(weights["a"] / sum(weights.values()), abs=2 / len(read))


def test_streamed_source_shards_split_the_documents(tmp_path, tokenizer):
    """Two workers' shards of a stream hold every document once, nothing lost or doubled, and about equal
    text: long and short documents alternate here, and a split by count would give one shard all the long."""
    rows = [f"{ZH_LINES[i % 5] * (4 if i % 2 else 1)}（第{i}段）" for i in range(80)]
    hub = make_hub_fixture(tmp_path / "medical", rows=rows)
    spec = data_utils.SourceConfig.from_dict({"name": "med", "hub": str(hub), "hub_config": "pretrain",
                                              "streaming": True}, 0)
    info = data_utils.TokenizerInfo.from_tokenizer(tokenizer, "never")
    source = data_utils.StreamedSource(spec, info, 1, dedup=True, cache_dir=tmp_path / "cache")

    def documents(blocks):
        tokens = [int(b["input_ids"][0]) for b in blocks]
        return tokenizer.decode(tokens).split(tokenizer.eos_token)[:-1]

    whole = documents(source)
    shards = [documents(source.blocks_of(k, 2)) for k in range(2)]
    assert len(whole) == 80 and sorted(shards[0] + shards[1]) == sorted(whole)
    sizes = [sum(map(len, shard)) for shard in shards]
    assert abs(sizes[0] - sizes[1]) <= max(map(len, whole))


def test_streamed_source_leaves_out_its_eval_documents(tmp_path, tokenizer):
    rows = [f"{line}（第{i}段）" for i in range(6) for line in ZH_LINES]
    hub = make_hub_fixture(tmp_path / "medical", rows=rows, eval_rows=rows[:5] + ["只在验证集里的一条文本。"] * 3)
    source = {"name": "med", "hub": str(hub), "hub_config": "pretrain", "streaming": True, "weight": 1,
              "eval_split": "validation"}
    data = build(tmp_path, tokenizer, [source], block_size=1)
    med = data.report["sources"]["med"]
    assert med["eval_documents"] == 6 and med["duplicates_removed"] == {"within_eval": 2, "eval_of_train": 0}
    tokens = [int(b["input_ids"][0]) for b in itertools.islice(data.train, 5000)]
    trained = set(tokenizer.decode(tokens).replace(" ", "").split(tokenizer.eos_token))
    assert not trained & {r.replace(" ", "") for r in rows[:5]}
    assert {r.replace(" ", "") for r in rows[5:]} <= trained


def test_streams_and_stored_sources_never_train_on_each_others_eval_documents(tmp_path, tokenizer):
    rows = [f"{line}（第{i}段）" for i in range(6) for line in ZH_LINES]
    local = [f"本地文本{i}：{ZH_LINES[i % len(ZH_LINES)]}" for i in range(30)]
    stream_eval = local[:3] + ["只在流验证集里的文本甲。", "只在流验证集里的文本乙。"]
    hub = make_hub_fixture(tmp_path / "medical", rows=rows, eval_rows=stream_eval)
    (tmp_path / "local.txt").write_text("\n".join(local) + "\n", encoding="utf-8")
    (tmp_path / "local_eval.txt").write_text("\n".join(rows[:4] + ["只在本地验证集里的文本。"]) + "\n", encoding="utf-8")
    data = build(tmp_path, tokenizer, [
        {"name": "med", "hub": str(hub), "hub_config": "pretrain", "streaming": True, "weight": 1,
         "eval_split": "validation"},
        {"name": "local", "path": str(tmp_path / "local.txt"), "eval_path": str(tmp_path / "local_eval.txt"),
         "weight": 1}], block_size=1)
    med = data.report["sources"]["med"]
    assert med["eval_documents"] == 2 and med["duplicates_removed"] == {"within_eval": 0, "eval_of_train": 3}
    assert data.report["sources"]["local"]["eval_documents"] == 5
    # equal weights alternate block by block, the stream first: the even blocks are the stream's, in order
    tokens = [int(b["input_ids"][0]) for b in itertools.islice(data.train, 0, 10000, 2)]
    trained = set(tokenizer.decode(tokens).replace(" ", "").split(tokenizer.eos_token))
    assert not trained & {r.replace(" ", "") for r in rows[:4]}  # the stored source evaluates on them
    assert {r.replace(" ", "") for r in rows[4:]} <= trained


def test_streamed_source_problems_stop_the_run_before_training(tmp_path, tokenizer):
    hub = make_hub_fixture(tmp_path / "medical", eval_rows=["短。"])
    base = {"name": "med", "hub": str(hub), "hub_config": "pretrain", "streaming": True, "weight": 1}
    with pytest.raises(DataError, match="has no field `body`"):
        build(tmp_path, tokenizer, [{**base, "text_field": "body"}])
    with pytest.raises(DataError, match="streams no text: its first 72 records gave none .*missing_field"):
        build(tmp_path, tokenizer, [{**base, "text_field": "body", "on_error": "skip"}])
    with pytest.raises(DataError, match="Fix `hub_config` / `split`"):
        build(tmp_path, tokenizer, [{**base, "split": "nonexistent"}])
    with pytest.raises(DataError, match="fewer than one block of 64"):
        build(tmp_path, tokenizer, [{**base, "eval_split": "validation"}], block_size=64)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "好的一行"}\n{"text": 不是JSON}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^source `j`: `hub:json//train` \(after record 0\) cannot be read: "):
        build(tmp_path, tokenizer, [{"name": "j", "hub": "json", "data_files": str(broken), "streaming": True,
                                     "weight": 1}])


def test_script_datasets_and_offline_hf_data_files_get_one_clear_message(tmp_path, tokenizer):
    scripted = tmp_path / "medical"
    scripted.mkdir()
    (scripted / "medical.py").write_text("import datasets\n")
    with pytest.raises(DataError, match="built by a loading script.*point `path:` at the data files"):
        build(tmp_path, tokenizer, [{"name": "med", "hub": str(scripted)}])
    remote = "hf://datasets/shibing624/medical/pretrain/train_encyclopedia.json"  # offline in every test
    with pytest.raises(DataError, match="`shibing624/medical` cannot be loaded: the hub .* is unreachable"):
        build(tmp_path, tokenizer, [{"name": "med", "hub": "json", "data_files": remote}])
    with pytest.raises(DataError, match="^source `med`: hub dataset `shibing624/medical` cannot be loaded"):
        build(tmp_path, tokenizer, [{"name": "med", "hub": "json", "data_files": remote, "streaming": True,
                                     "weight": 1}])


def test_hub_builders_read_local_files_in_their_encoding(tmp_path, monkeypatch):
    """`hub: text` on GBK files failed mid-read, blamed on schema drift, and `encoding: gbk` was ignored."""
    from test_data import texts_of

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    lines = ["高血压患者需长期服药。", "糖尿病患者应控制饮食。"]
    (tmp_path / "gbk.txt").write_bytes("\n".join(lines).encode("gbk"))
    (tmp_path / "utf8.txt").write_text("\n".join(lines), encoding="utf-8")
    source = {"name": "h", "hub": "text", "data_files": str(tmp_path / "gbk.txt")}
    assert texts_of(source) == lines  # detected, as for `path:` sources
    assert texts_of({**source, "encoding": "gbk"}) == lines
    with pytest.raises(DataError, match=r"cannot be read: a file of it is not utf-8 text .*Set `encoding:` to the "
                                        r"files' encoding"):
        texts_of({**source, "encoding": "utf-8"})
    with pytest.raises(DataError, match=r"its data files are in different encodings \(`.*gbk.txt` gb18030, "
                                        r"`.*utf8.txt` utf-8\)"):
        texts_of({**source, "data_files": [str(tmp_path / "gbk.txt"), str(tmp_path / "utf8.txt")]})
    (tmp_path / "ascii.txt").write_text("Hypertension\n", encoding="ascii")  # ASCII: one with any of them
    assert texts_of({**source, "data_files": [str(tmp_path / "ascii.txt"), str(tmp_path / "gbk.txt")]}) == [
        "Hypertension", *lines]
    with pytest.raises(DataError, match="hub dataset `shibing624/medical` is read by its own builder. Drop `encoding`"):
        texts_of({"name": "m", "hub": "shibing624/medical", "encoding": "gbk"})
    hub_dir = tmp_path / "hubdir"  # a local directory in hub layout (hub_local_dir copies are)
    hub_dir.mkdir()
    (hub_dir / "train.txt").write_bytes("\n".join(lines).encode("gbk"))
    assert texts_of({"name": "d", "hub": str(hub_dir)}) == lines
    assert texts_of({"name": "d", "hub": str(hub_dir), "encoding": "gbk"}) == lines
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_dir = tmp_path / "parquet_hub"  # parquet data beside a GBK note: the parquet builder takes no encoding
    (parquet_dir / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": lines}), parquet_dir / "data" / "train.parquet")
    (parquet_dir / "说明.txt").write_bytes("数据说明".encode("gbk"))
    assert texts_of({"name": "p", "hub": str(parquet_dir)}) == lines
    with pytest.raises(DataError, match="local hub directories of text files; .* Drop `encoding`"):
        texts_of({"name": "p", "hub": str(parquet_dir), "encoding": "gbk"})


def test_hub_text_groups_each_files_lines_not_the_rows_of_several(tmp_path, monkeypatch):
    from test_data import texts_of

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    (tmp_path / "a.txt").write_text("高血压\n病因\n\n治疗\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("糖尿病\n病因\n", encoding="utf-8")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    for streaming in (False, True):
        source = {"name": "h", "hub": "text", "data_files": files, "streaming": streaming}
        assert texts_of({**source, "group": "document"}) == ["高血压\n病因\n\n治疗", "糖尿病\n病因"]
        assert texts_of({**source, "group": "paragraph"}) == ["高血压\n病因", "治疗", "糖尿病\n病因"]
    with pytest.raises(DataError, match="group `document` on a hub source needs `hub: text` or a local hub directory"):
        texts_of({"name": "j", "hub": "json", "data_files": files, "group": "document"})
    hub_dir = tmp_path / "hubdir"  # a local hub directory of .txt files: the text builder's too
    (hub_dir / "data").mkdir(parents=True)
    (hub_dir / "data" / "train.txt").write_text("高血压\n病因\n\n治疗\n", encoding="utf-8")
    assert texts_of({"name": "d", "hub": str(hub_dir), "group": "paragraph"}) == ["高血压\n病因", "治疗"]


def test_missing_local_data_files_are_named(tmp_path, tokenizer):
    for pattern in (str(tmp_path / "nowhere.jsonl"), str(tmp_path / "nowhere" / "*.jsonl")):
        with pytest.raises(DataError, match="matches no file"):
            build(tmp_path, tokenizer, [{"name": "j", "hub": "json", "data_files": pattern}])


def test_revision_of_a_local_hub_copy_is_flagged(tmp_path, caplog):
    make_hub_fixture(tmp_path / "hub" / "owner" / "medical")
    with caplog.at_level(logging.WARNING, logger="data_utils"):
        sources, done = data_utils.use_local_hub_copies(
            [{"hub": "owner/medical", "revision": "v2"}], str(tmp_path / "hub"))
    assert sources[0]["hub"] == str(tmp_path / "hub" / "owner" / "medical") and done
    assert "`revision: v2` does not apply to the local copy" in caplog.text


def test_hf_data_files_of_two_repositories_map_to_their_own_local_copies(tmp_path, caplog):
    """A repository that is not downloaded, or a file a partial download lacks, keeps its hf:// URL; a pinned
    commit in the URL is flagged."""
    root = tmp_path / "hub"
    for repo in ("ownerA/general", "ownerB/medical"):
        (root / repo / "data").mkdir(parents=True)
    (root / "ownerA" / "general" / "data" / "train.jsonl").write_text("{}\n")
    urls = ["hf://datasets/ownerA/general/data/train.jsonl", "hf://datasets/ownerB/medical/data/train.jsonl"]
    sources, done = data_utils.use_local_hub_copies([{"hub": "json", "data_files": urls}], str(root))
    assert sources[0]["data_files"] == [str(root / "ownerA" / "general" / "data" / "train.jsonl"), urls[1]]
    assert done == [f"ownerA/general -> {root / 'ownerA' / 'general'}"]
    (root / "ownerB" / "medical" / "data" / "train.jsonl").write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="data_utils"):
        sources, done = data_utils.use_local_hub_copies(
            {"hub": "json", "data_files": {"train": urls[0], "validation": urls[1].replace("medical/", "medical@abc12/")}},
            str(root))  # a single mapping, as `--sources '{hub: ...}'` gives it
    assert sources["data_files"] == {"train": str(root / "ownerA" / "general" / "data" / "train.jsonl"),
                                     "validation": str(root / "ownerB" / "medical" / "data" / "train.jsonl")}
    assert len(done) == 2 and "the revision `abc12`" in caplog.text


def test_a_hub_source_evaluates_on_its_eval_path_files(tmp_path, tokenizer):
    hub = make_hub_fixture(tmp_path / "medical")
    eval_file = tmp_path / "my_eval.txt"
    eval_file.write_text("".join(f"自己的验证文本第{i}条，内容与训练集不同。\n" for i in range(12)), encoding="utf-8")
    base = {"name": "med", "hub": str(hub), "hub_config": "pretrain", "eval_path": str(eval_file)}
    for source in (base, {**base, "streaming": True, "weight": 1}):
        data = build(tmp_path, tokenizer, [source], block_size=16)
        assert data.eval["med"].store.n_docs == 12 and data.report["sources"]["med"]["eval_documents"] == 12, source
        assert data.report["sources"]["med"]["eval_input"]["files"][0]["path"] == str(eval_file)
    with pytest.raises(DataError, match="set `eval_path` .* or `eval_split` .*not both"):
        build(tmp_path, tokenizer, [{**base, "eval_split": "validation"}])


@pytest.mark.parametrize("streaming", [False, True], ids=["stored", "streamed"])
def test_shards_that_disagree_on_their_columns_are_named_with_a_fix(tmp_path, tokenizer, streaming):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "drift" / "data"
    hub.mkdir(parents=True)
    rows = [f"{line}（第{i}段）" for i in range(450) for line in ZH_LINES]  # past the stream's first records
    pq.write_table(pa.table({"text": rows}), hub / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": rows[:30], "source": ["x"] * 30}), hub / "train-00001-of-00002.parquet")
    source = {"name": "drift", "hub": str(hub.parent), "eval_fraction": 0,
              **({"streaming": True, "weight": 1} if streaming else {})}
    with pytest.raises(DataError, match=r"^source `drift`: .* cannot be read: CastError: .*column names don't match.*"
                                        r"schema drift.*`data_files`.*`path:`"):
        data = build(tmp_path, tokenizer, [source], block_size=16)
        for _ in data.train:  # a stream's later files are read during training
            pass


def test_a_hub_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, tokenizer):
    for hub in ("data/hub/Salesforce/wikitxt", "./wikitxt"):
        with pytest.raises(DataError, match=f"source `m`: hub directory `{hub}` does not exist"):
            build(tmp_path, tokenizer, [{"name": "m", "hub": hub}])


def test_streaming_among_other_sources_needs_weights(tmp_path, tokenizer):
    hub = make_hub_fixture(tmp_path / "medical")
    stream = {"name": "med", "hub": str(hub), "hub_config": "pretrain", "streaming": True}
    with pytest.raises(DataError, match="give every source a `weight`"):
        build(tmp_path, tokenizer, [stream, {"name": "notes", "path": str(make_text_corpus(tmp_path))}])
    alone = build(tmp_path, tokenizer, [stream], block_size=16)  # all of the training tokens: no weight to give
    assert alone.report["sources"]["med"]["weight"] == 1.0 and next(iter(alone.train))["input_ids"].numel() == 16


def test_preview_path_also_keys_local_hub_directories_by_content(tmp_path):
    """Callers without a cache_dir (preview, convert, tools/vocab.py report) get the content key too."""
    first = make_hub_fixture(tmp_path / "a" / "medical", rows=["甲的第一条", "甲的第二条"])
    second = make_hub_fixture(tmp_path / "b" / "medical", rows=["乙的一条", "乙的二条", "乙的三条"])
    for hub, expected in ((first, 2), (second, 3)):
        spec = data_utils.SourceConfig.from_dict({"hub": str(hub), "hub_config": "pretrain"}, 0)
        assert len(list(data_utils.iter_texts(spec))) == expected


def test_workers_started_by_spawn_map_the_stores_instead_of_copying_them(tmp_path, tokenizer):
    """macOS (and Linux from Python 3.14) start DataLoader workers by spawn/forkserver, which pickles the
    dataset: a stored corpus travels as file paths, and a streaming mixture can be pickled at all."""
    import pickle

    import torch

    hub = make_hub_fixture(tmp_path / "medical")
    local = make_text_corpus(tmp_path / "general", repeat=200)
    stored = build(tmp_path, tokenizer, [{"name": "general", "path": str(local)}], block_size=16)
    part = stored.train.parts[0]  # its store's arrays and its document ids travel as paths
    assert len(pickle.dumps(part)) < part.store.tokens.nbytes / 10
    streamed = build(tmp_path, tokenizer, [
        {"name": "med", "hub": str(hub), "hub_config": "pretrain", "streaming": True, "weight": 1},
        {"name": "general", "path": str(local), "weight": 1}], block_size=16)
    for dataset in (stored.train, streamed.train):
        alone = list(itertools.islice(torch.utils.data.DataLoader(dataset, batch_size=4), 3))
        spawned = list(itertools.islice(torch.utils.data.DataLoader(
            dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn"), 3))
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(alone, spawned))


def test_a_local_hub_copy_keeps_the_source_name_of_its_hub_id(tmp_path):
    """Downloading a copy into hub_local_dir must not rename an unnamed source (its stores, data plan and
    eval_<name>_ppl): it was `data_hub_owner_medical`, so a resumed run no longer matched its data plan."""
    make_hub_fixture(tmp_path / "hub" / "owner" / "medical")
    before = data_utils.parse_sources([{"hub": "owner/medical"}])[0].name
    sources, _ = data_utils.use_local_hub_copies([{"hub": "owner/medical"}], str(tmp_path / "hub"))
    assert data_utils.parse_sources(sources)[0].name == before == "owner_medical"
    named, _ = data_utils.use_local_hub_copies([{"hub": "owner/medical", "name": "med"}], str(tmp_path / "hub"))
    assert data_utils.parse_sources(named)[0].name == "med"


def test_an_unnamed_packaged_loader_source_is_named_by_its_files_not_the_loader(tmp_path):
    """`hub: text` / `hub: json` sources without `name` were all called `text` / `json` (two of them collided, and
    README's streamed local file was `text`): named by their first data file, a glob's folder, or the repository
    of their hf:// files, also once those are read from a local copy."""
    specs = data_utils.parse_sources([
        {"hub": "text", "data_files": ["data/medical_zh.txt"]},
        {"hub": "json", "data_files": {"train": "corpora/notes.jsonl.gz"}},
        {"hub": "json", "data_files": "cases/**/*.jsonl"},
        {"hub": "text", "data_files": "*.txt"}])
    assert [s.name for s in specs] == ["medical_zh", "notes", "cases", "text"]
    remote = {"hub": "json", "data_files": ["hf://datasets/owner/medical/pretrain/a.json"]}
    assert data_utils.parse_sources([remote])[0].name == "owner_medical"
    (tmp_path / "hub" / "owner" / "medical" / "pretrain").mkdir(parents=True)
    (tmp_path / "hub" / "owner" / "medical" / "pretrain" / "a.json").write_text('[{"text": "x"}]')
    copied, done = data_utils.use_local_hub_copies([remote], str(tmp_path / "hub"))
    assert done and data_utils.parse_sources(copied)[0].name == "owner_medical"
