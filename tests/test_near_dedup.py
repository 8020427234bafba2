"""Near-duplicate removal: MinHash LSH proposes pairs, each is verified on the exact shingle sets."""
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data_utils
from data_utils import DataError


def jaccard(a, b, n):
    sets = [set(data_utils.shingle_hashes(np.array(d), np.array([0, len(d)]), n)[0].tolist()) for d in (a, b)]
    return len(sets[0] & sets[1]) / len(sets[0] | sets[1])


def fake_stores(root: Path, sources: list[list[list[int]]]) -> list:
    """Token stores on disk from lists of token-id documents (only what near dedup reads)."""
    stores = []
    for i, docs in enumerate(sources):
        directory = root / f"s{i}"
        directory.mkdir()
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
        tokens = np.concatenate([np.zeros(0, np.uint32), *[np.array(d, np.uint32) for d in docs]])
        offsets.tofile(directory / "offsets.bin")
        tokens.tofile(directory / "tokens.bin")
        hashes = np.array([hash(tuple(d)) % 2**63 for d in docs], dtype=np.uint64)
        stores.append(types.SimpleNamespace(dir=directory, n_docs=len(docs), offsets=offsets, tokens=tokens,
                                            doc_hashes=hashes, doc=lambda k, t=tokens, o=offsets: t[o[k]:o[k + 1]]))
    return stores


def greedy(sources, threshold, n):
    """Brute force: every earlier document that stays is compared with each document, in order (equal texts
    are left to exact dedup)."""
    docs = [d for docs in sources for d in docs]
    kept = []
    for j, d in enumerate(docs):
        if all(jaccard(docs[i], d, n) < threshold or docs[i] == d for i in kept):
            kept.append(j)
    return kept


def test_shingles_and_their_minhash_estimate_the_jaccard_similarity():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 30000, 400)
    docs = [base]
    for changed in (20, 60, 120, 200):
        d = base.copy()
        d[rng.choice(400, changed, replace=False)] = rng.integers(30000, 60000, changed)
        docs.append(d)
    docs += [np.array([7, 8]), np.array([7, 8]), np.array([8, 7])]  # shorter than n: one shingle each, itself
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    hashes, first = data_utils.shingle_hashes(np.concatenate(docs), starts, 5)
    assert first.tolist() == [0, 396, 792, 1188, 1584, 1980, 1981, 1982] and len(hashes) == 1983
    assert hashes[1980] == hashes[1981] != hashes[1982]
    minhashes, signatures = data_utils.minhash_band_keys(hashes, first, 128, 1)  # bands of one row: the MinHashes
    for k in range(1, 5):
        exact = jaccard(base, docs[k], 5)
        assert abs((minhashes[0] == minhashes[k]).mean() - exact) < 0.12
        # the b-bit signature (first 64 MinHashes' low bytes) estimates it too, the margin that screens pairs is 4 sigma
        assert abs((signatures[0] == signatures[k]).mean() - exact) < data_utils.NEAR_DEDUP_MARGIN
    assert data_utils.lsh_bands(0.8) == (17, 7) and data_utils.lsh_bands(1.0) == (1, 128)
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = data_utils.lsh_bands(threshold)
        assert bands * rows <= 128 and 1 - (1 - threshold ** rows) ** bands >= data_utils.NEAR_DEDUP_RECALL


def test_near_copies_are_removed_in_order_and_counted_like_brute_force(tmp_path):
    rng = np.random.default_rng(7)
    bases = [rng.integers(0, 5000, int(rng.integers(30, 200))).tolist() for _ in range(30)]

    def near_copy(doc, changes):
        doc = list(doc)
        for _ in range(changes):
            doc[int(rng.integers(len(doc)))] = int(rng.integers(5000, 9000))
        return doc

    first = [bases[i] for i in range(20)] + [near_copy(bases[i], 1) for i in range(5)] + [bases[3]]
    second = [near_copy(bases[i], 2) for i in range(5, 10)] + [bases[i] for i in range(20, 30)]
    evals = [near_copy(bases[25], 1), bases[11], rng.integers(0, 5000, 50).tolist()]
    sources = [first, second, evals]
    stores = fake_stores(tmp_path, sources)
    keep = [np.ones(len(s), dtype=bool) for s in sources]
    keep[0][25] = False  # what exact dedup removed: left out
    counts, examples = data_utils.near_duplicate_flags(stores, keep, 0.7, 3, tmp_path / "work", n_train=2,
                                                       skip_identical=True)
    expected = greedy([first[:25], second, evals], 0.7, 3)
    got = [k for k, flag in enumerate(np.concatenate(keep)) if flag]
    assert [k - (k > 25) for k in got] == expected
    assert counts == [{"near_within_source": 5, "near_across_sources": 0},
                      {"near_within_source": 0, "near_across_sources": 5},
                      # bases[11] is identical to a training text: left to exact dedup (skip_identical)
                      {"near_within_eval": 0, "near_eval_of_train": 1}]
    assert keep[2].tolist() == [False, True, True]
    assert [e["removed"] for e in examples[0]] == [[0, 20], [0, 21], [0, 22]]  # the first three, in order
    assert examples[0][0]["kept"] == [0, 0] and examples[0][0]["similarity"] == round(jaccard(first[0], first[20], 3), 3)
    assert [(e["removed"], e["kept"]) for e in examples[2]] == [([2, 0], [1, 10])]
    assert not (tmp_path / "work").exists()


def test_two_sources_eval_sets_may_share_near_copies_as_exact_ones(tmp_path):
    """Exact dedup compares an eval set with itself and with training, not with another source's eval set:
    near dedup removed near copies there (more harshly than exact copies), counted as near_within_eval."""
    rng = np.random.default_rng(3)
    train = [rng.integers(0, 5000, 100).tolist() for _ in range(5)]
    shared = rng.integers(0, 5000, 100).tolist()
    near = list(shared)
    near[50] = 9999
    own_copy = list(near)
    own_copy[10] = 9998
    stores = fake_stores(tmp_path, [train, [shared], [near, own_copy]])
    keep = [np.ones(n, dtype=bool) for n in (5, 1, 2)]
    counts, _ = data_utils.near_duplicate_flags(stores, keep, 0.8, 3, tmp_path / "work", n_train=1,
                                                skip_identical=True)
    assert keep[2].tolist() == [True, False]  # the near copy of the other source's eval text stays; its own goes
    assert counts[2] == {"near_within_eval": 1, "near_eval_of_train": 0}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=8),
                min_size=1, max_size=3), st.sampled_from([0.5, 0.8, 1.0]), st.integers(1, 3), st.integers(1, 4))
def test_every_removed_document_has_a_kept_earlier_one_at_least_that_similar(sources, threshold, n, pass_docs):
    with tempfile.TemporaryDirectory() as tmp:
        stores = fake_stores(Path(tmp), sources)
        keep = [np.ones(len(s), dtype=bool) for s in sources]
        original = data_utils.PASS_DOCS
        data_utils.PASS_DOCS = pass_docs  # many passes and buckets even for tiny inputs
        try:
            counts, _ = data_utils.near_duplicate_flags(stores, keep, threshold, n, Path(tmp) / "work",
                                                        n_train=len(sources), skip_identical=False)
        finally:
            data_utils.PASS_DOCS = original
    docs = [d for s in sources for d in s]
    flags = np.concatenate(keep)
    for j in np.flatnonzero(~flags):
        assert any(jaccard(docs[i], docs[j], n) >= threshold for i in np.flatnonzero(flags[:j]))
    assert sum(sum(c.values()) for c in counts) == int((~flags).sum())
    if threshold == 1.0:  # one band of all 128 MinHashes: equal shingle sets always meet, none is kept twice
        kept_sets = [frozenset(data_utils.shingle_hashes(np.array(d), np.array([0, len(d)]), n)[0].tolist())
                     for d, flag in zip(docs, flags) if flag]
        assert len(kept_sets) == len(set(kept_sets))


def run_build(tmp_path, tokenizer, sources, **overrides):
    args = types.SimpleNamespace(sources=sources, block_size=8, eval_fraction=0.0, add_bos="never",
                                 cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1, near_dedup=0.8,
                                 near_dedup_ngram=5)
    vars(args).update(overrides)
    return data_utils.build_datasets(args, tokenizer, 8, seed=0)


def test_near_dedup_in_a_run_reports_caches_and_keeps_eval_clean(tmp_path, tokenizer):
    articles = [f"患者男性，{60 + i}岁，因反复胸闷气短三年入院。查体：血压150/90mmHg，心率88次/分，双肺呼吸音清。"
                f"心电图提示ST段压低，诊断为冠心病、稳定型心绞痛，给予阿司匹林、他汀类药物治疗。" for i in range(6)]
    others = ["长江是中国第一长河，全长约六千三百公里，流经青藏高原、四川盆地和长江中下游平原，最后注入东海。",
              "北京是中国的首都，也是全国的政治、文化和国际交往中心，有三千多年的建城史和八百多年的建都史。",
              "发热是机体在致热原作用下体温调节中枢调定点上移而引起的调节性体温升高，常见于感染性疾病。"]
    (tmp_path / "cases.txt").write_text("\n".join(articles + others[:1]) + "\n", encoding="utf-8")
    (tmp_path / "wiki.txt").write_text("\n".join(others + articles[2:3]) + "\n", encoding="utf-8")
    (tmp_path / "dev.txt").write_text(articles[0].replace("三年", "五年") + "\n" + others[2] + "\n"
                                      "糖尿病患者应规律监测血糖，合理饮食，适量运动，并在医生指导下使用降糖药物。\n",
                                      encoding="utf-8")
    sources = [{"path": str(tmp_path / "cases.txt"), "name": "cases"},
               {"path": str(tmp_path / "wiki.txt"), "name": "wiki", "eval_path": str(tmp_path / "dev.txt")}]
    data = run_build(tmp_path, tokenizer, sources)
    report = data.report
    assert report["near_dedup"] == {"threshold": 0.8, "ngram": 5, "bands": 17, "rows": 7}
    cases, wiki = report["sources"]["cases"], report["sources"]["wiki"]
    # the six case reports differ in one number: one stays
    assert cases["duplicates_removed"] == {"within_source": 0, "across_sources": 0, "near_within_source": 5,
                                           "near_across_sources": 0, "eval_of_train": 0}
    assert cases["documents"] == 2
    # wiki's copy of others[0] is exact (across_sources); its copy of a case report is near
    assert wiki["duplicates_removed"]["across_sources"] == 2  # others[0] and articles[2] (removed near in cases)
    # dev: a near copy of a training case report leaves eval, the exact copy of a training text too
    assert wiki["duplicates_removed"]["near_eval_of_train"] == 1 and wiki["duplicates_removed"]["eval_of_train"] == 1
    markdown = data_utils.data_report_markdown(report)
    assert "near dedup at Jaccard similarity 0.8 of token 5-grams" in markdown
    assert "near_within_source 5" in markdown
    cases_txt, dev_txt = tmp_path / "cases.txt", tmp_path / "dev.txt"
    assert cases["near_duplicate_examples"] == [f"`{cases_txt}` line {k} ~ `{cases_txt}` line 1 (similarity {s})"
                                                for k, s in ((2, 0.945), (3, 0.945), (4, 0.945))]
    assert wiki["near_duplicate_examples"] == [f"`{dev_txt}` line 1 ~ `{cases_txt}` line 1 (similarity 0.935)"]
    assert f"near duplicates removed, the first few (removed ~ kept): `{cases_txt}` line 2 ~" in markdown
    # the same settings again: the views come from the cache; another threshold makes others
    views = sorted(p.name for p in (tmp_path / "cache" / "views").iterdir())
    run_build(tmp_path, tokenizer, sources)
    assert sorted(p.name for p in (tmp_path / "cache" / "views").iterdir()) == views
    loose = run_build(tmp_path, tokenizer, sources, near_dedup=None)
    assert loose.report["sources"]["cases"]["documents"] == 7 and loose.report["near_dedup"] is None
    assert len(list((tmp_path / "cache" / "views").iterdir())) == 2


def test_a_source_near_dedup_empties_and_an_eval_set_it_empties_are_named(tmp_path, tokenizer):
    text = ("高血压是以体循环动脉血压增高为主要特征的临床综合征，长期高血压可损伤心、脑、肾等器官，需要长期规律服药。"
            "糖尿病患者应规律监测血糖，合理饮食，适量运动，并在医生指导下使用降糖药物。")
    (tmp_path / "a.txt").write_text(text + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(text.replace("服药", "用药") + "\n", encoding="utf-8")  # Jaccard 0.68
    with pytest.raises(DataError, match=r"source `b`: its one document duplicates a document of earlier sources "
                                        r"\(or nearly: near_dedup\)\. Remove the source or set `near_dedup: null`"):
        run_build(tmp_path, tokenizer, [{"path": str(tmp_path / "a.txt"), "name": "a"},
                                        {"path": str(tmp_path / "b.txt"), "name": "b"}], near_dedup=0.6)
    with pytest.raises(DataError, match=r"source `a`: the one document of its eval set also occurs in the training "
                                        r"data \(or nearly: near_dedup\), and dedup removed it.*raise `near_dedup`"):
        run_build(tmp_path, tokenizer, [{"path": str(tmp_path / "a.txt"), "name": "a",
                                         "eval_path": str(tmp_path / "b.txt")}], near_dedup=0.6)


def test_near_dedup_options_are_checked():
    import pretrain

    def data_arguments(**kw):
        return pretrain.DataArguments(sources=[{"path": "data/"}], **kw)

    assert data_arguments(near_dedup=True).near_dedup == 0.8 and data_arguments(near_dedup=0.9).near_dedup == 0.9
    assert data_arguments(near_dedup=False).near_dedup is None
    for text, threshold in (("true", 0.8), ("0.85", 0.85), ("null", None)):  # YAML and the command line give text
        assert pretrain.parse_args(["configs/pretrain_tiny.yaml", "--near_dedup", text])[1].near_dedup == threshold
    with pytest.raises(DataError, match=r"near_dedup is a Jaccard similarity in \(0, 1\].*got `80`"):
        data_arguments(near_dedup=80)
    with pytest.raises(DataError, match="near_dedup_ngram must be at least 1"):
        data_arguments(near_dedup=0.8, near_dedup_ngram=0)
