"""Near dedup: this toolkit's MinHash LSH vs datasketch's MinHashLSH (what text-dedup-style pipelines run).

    pip install datasketch && python bench/near_dedup_bench.py [--docs 100000] [--threshold 0.8]

Both sides get the same documents as the same token ids (read from this toolkit's token store, so
tokenization is not timed) and the same shingles (token 5-grams), 128 permutations and threshold.
The baseline is datasketch's documented loop: a MinHash per document (update_batch of its shingles),
query the LSH index, insert it when nothing matched, else count it removed. Printed side by side:
  * seconds and documents/s of the dedup step, and their ratio;
  * recall: of the planted near copies whose exact Jaccard similarity with their original is at least
    the threshold, the share removed;
  * precision: of the removed documents, the share with a kept document at least that similar
    (the baseline's match as the LSH reports it, measured exactly here);
  * the toolkit's peak memory allocated during the dedup step (tracemalloc, in a second run: numpy
    reports its arrays to it), against its keep flags (one byte per document).
The corpus: lines of ../shared/corpora (or data/) joined three at a time into distinct documents
(so many pairs share a line: partial overlaps below the threshold), plus near copies of a fifth of
them with 0.2-6% of their characters changed.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prepare_bench import source_lines  # noqa: E402

CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"


def make_corpus(path: Path, n_docs: int, seed: int) -> list[tuple[int, int]]:
    """Writes n_docs documents (one per line); returns (copy, original) line numbers (0-based) of the
    planted near copies."""
    rng = random.Random(seed)
    lines = source_lines()
    originals = int(n_docs / 1.2)
    docs = ["".join(rng.sample(lines, 3)) for _ in range(originals)]
    planted = []
    while len(docs) < n_docs:
        k = rng.randrange(originals)
        text = list(docs[k])
        for _ in range(max(1, int(len(text) * rng.uniform(0.002, 0.06)))):
            text[rng.randrange(len(text))] = rng.choice(CHARS)
        planted.append((len(docs), k))
        docs.append("".join(text))
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return planted


def shingle_set(tokens: np.ndarray, n: int) -> set[int]:
    import data_utils

    return set(data_utils.shingle_hashes(tokens, np.array([0, len(tokens)]), n)[0].tolist())


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def baseline(docs: list[np.ndarray], threshold: float, n: int) -> tuple[float, dict[int, int]]:
    """datasketch: MinHash per document, query, insert if new. Returns seconds and {removed: its match}."""
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    removed = {}
    for i, tokens in enumerate(docs):
        t = tokens.tolist()
        grams = [" ".join(map(str, t[k:k + n])).encode() for k in range(max(len(t) - n + 1, 1))]
        m = MinHash(num_perm=128)
        m.update_batch(grams)
        found = lsh.query(m)
        if found:
            removed[i] = min(found)
        else:
            lsh.insert(i, m)
    return time.perf_counter() - start, removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--ngram", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    import data_utils

    work = Path(tempfile.mkdtemp(prefix="near_dedup_bench-"))
    try:
        corpus = work / "corpus.txt"
        planted = make_corpus(corpus, args.docs, 0)
        tokenizer_dir = data_utils.train_sentencepiece_tokenizer([{"path": str(corpus), "format": "text"}],
                                                                 str(work / "cache"), 8000)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        data_args = types.SimpleNamespace(sources=[{"name": "corpus", "path": str(corpus), "format": "text"}],
                                          block_size=256, eval_fraction=0.0, add_bos="never",
                                          cache_dir=str(work / "cache"), preprocessing_num_workers=2)
        data = data_utils.build_datasets(data_args, tokenizer, 256, seed=0)
        store = data_utils.TokenStore(Path(data.report["sources"]["corpus"]["store"]))
        assert store.n_docs == args.docs, "documents were dropped or merged before dedup"
        keep = [np.ones(store.n_docs, dtype=bool)]
        start = time.perf_counter()
        data_utils.near_duplicate_flags([store], keep, args.threshold, args.ngram, work / "near", 1, False)
        ours_seconds = time.perf_counter() - start
        ours_removed = set(np.flatnonzero(~keep[0]).tolist())
        tracemalloc.start()
        data_utils.near_duplicate_flags([store], [np.ones(store.n_docs, dtype=bool)], args.threshold, args.ngram,
                                        work / "near", 1, False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        docs = [np.asarray(store.doc(i)) for i in range(store.n_docs)]
        base_seconds, base_removed = baseline(docs, args.threshold, args.ngram)

        sets = {}

        def shingles(i: int) -> set[int]:
            if i not in sets:
                sets[i] = shingle_set(docs[i], args.ngram)
            return sets[i]

        similar = [(c, o) for c, o in planted if jaccard(shingles(c), shingles(o)) >= args.threshold]
        print(f"{args.docs:,} documents ({store.offsets[-1]:,} tokens), {len(planted):,} planted near copies, "
              f"{len(similar):,} of them at Jaccard >= {args.threshold} over token {args.ngram}-grams")
        rate = lambda seconds: args.docs / seconds  # noqa: E731
        print(f"dedup seconds      toolkit {ours_seconds:.1f}   datasketch {base_seconds:.1f}   "
              f"toolkit / datasketch = {base_seconds / ours_seconds:.1f}x documents/s "
              f"({rate(ours_seconds):,.0f} vs {rate(base_seconds):,.0f})")
        for name, removed in (("toolkit", ours_removed), ("datasketch", set(base_removed))):
            recall = sum(c in removed for c, _ in similar) / max(len(similar), 1)
            print(f"{name:10s} removed {len(removed):,}   recall of planted copies >= threshold {recall:.4f}")
        # precision: ours is 1 by construction (each removal verified on the exact n-gram sets, tests/test_near_dedup.py);
        # the baseline's matches are measured on a sample
        sample = random.Random(1).sample(sorted(base_removed), min(2000, len(base_removed)))
        true = sum(jaccard(shingles(j), shingles(base_removed[j])) >= args.threshold for j in sample)
        print(f"toolkit peak memory of the dedup step {peak / 2**20:.1f} MiB (keep flags {store.n_docs / 2**20:.1f} MiB)")
        print(f"datasketch precision (removed with its match at >= {args.threshold}, {len(sample):,} sampled): "
              f"{true / max(len(sample), 1):.4f}; toolkit: 1 by construction (every removal verified exactly)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
