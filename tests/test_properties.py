"""Property tests (hypothesis): formatters never invent artefacts, the packer keeps every token once, in order."""
import types

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import data_utils

CLEAN_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: not any(bad in s for bad in ("None", "[]", "{}", "。")))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), CLEAN_TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(CLEAN_TEXT, inner, max_size=3)), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_values_never_render_as_none_or_empty_brackets(value):
    text = data_utils.render_value(value)
    for bad in ("None", "[]", "{}"):
        assert bad not in text


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "desc", "category", "symptom", "cause", "cure_way"]), VALUES,
                       max_size=6),
       st.lists(st.sampled_from(["name", "desc", "category", "symptom", "cause", "cure_way"]), unique=True,
                max_size=6))
def test_records_render_without_artefacts_or_doubled_stops(record, fields):
    render = data_utils.make_renderer({"type": "record", "fields": fields or None}, "text", "test")
    text = render(record)
    for bad in ("None", "[]", "{}", "。。"):
        assert bad not in text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(2, 64), st.data())
def test_packing_keeps_every_token_once_in_order(lengths, block_size, data):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    store = types.SimpleNamespace(offsets=offsets, tokens=np.arange(offsets[-1], dtype=np.uint32))
    chosen = sorted(data.draw(st.sets(st.integers(0, len(lengths) - 1), min_size=1)))
    blocks = data_utils.PackedBlocks(store, np.array(chosen), block_size, document_positions=True)
    stream = np.concatenate([store.tokens[offsets[d]:offsets[d + 1]] for d in chosen])
    packed = [blocks[i] for i in range(len(blocks))]
    got = np.concatenate([b["input_ids"].numpy() for b in packed]) if packed else np.zeros(0)
    assert got.tolist() == stream[:len(blocks) * block_size].tolist()  # once each, in order
    assert len(stream) - len(got) == blocks.unused_tail_tokens < block_size  # only a final partial block unused
    for b in packed:  # positions restart exactly where a document starts
        ids, pos = b["input_ids"].numpy(), b["position_ids"].numpy()
        starts = set(offsets[chosen].tolist())
        assert all((pos[i] == 0) == (i == 0 or int(ids[i]) in starts) for i in range(len(ids)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), max_size=40), min_size=1, max_size=4), st.integers(1, 16))
def test_bucketed_dedup_equals_a_set_over_the_sources_in_order(sources, pass_docs):
    """The flat-memory dedup (hash buckets on disk, PASS_DOCS documents at a time) keeps exactly the first
    copy of each text in source order and counts duplicates as within / across sources."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        stores = []
        for i, hashes in enumerate(sources):
            directory = Path(tmp) / f"s{i}"
            directory.mkdir()
            np.array(hashes, dtype=np.uint64).tofile(directory / "doc_hashes.bin")
            stores.append(types.SimpleNamespace(dir=directory, n_docs=len(hashes)))
        original = data_utils.PASS_DOCS
        data_utils.PASS_DOCS = pass_docs  # many buckets and passes even for tiny inputs
        try:
            keep, counts = data_utils.dedup_keep_flags(stores, Path(tmp) / "work")
        finally:
            data_utils.PASS_DOCS = original
        seen_before: set[int] = set()
        for hashes, flags, count in zip(sources, keep, counts):
            seen_here: set[int] = set()
            expected, within, across = [], 0, 0
            for h in hashes:
                if h in seen_here:
                    within += 1
                elif h in seen_before:
                    across += 1
                expected.append(h not in seen_here and h not in seen_before)
                seen_here.add(h)
            seen_before |= seen_here
            assert flags.tolist() == expected
            assert count == {"within_source": within, "across_sources": across}
        assert not (Path(tmp) / "work").exists()
