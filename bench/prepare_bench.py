"""Data preparation: this toolkit vs transformers' run_clm.py pipeline vs the raw tokenizer limit.

    python bench/prepare_bench.py [--mb 100] [--mb2 400] [--workers 2] [--block_size 1024]

Every figure is measured in this one run, on the same corpus, tokenizer and worker count, and printed
for both sides with their ratio:
  * prepare tokens/s: this toolkit's cold preparation (read, clean, tokenize, write the token store,
    pack) vs a faithful run_clm-style pipeline (datasets `text` loader, batched `tokenize_function`
    with `Dataset.map(num_proc)`, then `group_texts` with the same block size, batches of 1,000)
    vs the raw limit (the fast tokenizer's batch encode alone on the same texts, same workers);
  * a second run with unchanged inputs: seconds until the first training batch;
  * peak RSS of preparation at two corpus sizes (each in a fresh process).
The corpus is ../shared/corpora (Chinese medical + general + English text, one document per line)
repeated to the chosen size, or data/ when ../shared is absent. The tokenizer is trained once on the
corpus (SentencePiece BPE, 8,000 pieces) and is the same for all three.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "corpora"


def source_lines() -> list[str]:
    files = ([SHARED / "medicalgpt_pretrain" / "fever.txt", SHARED / "thucnews_titles" / "dev.txt",
              SHARED / "wikitext2_tokens" / "valid.txt", SHARED / "medicalgpt_pretrain" / "en_article_tail500.txt"]
             if SHARED.is_dir() else sorted((ROOT / "data").glob("*.txt")))
    lines = []
    for f in files:
        lines += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def make_corpus(path: Path, megabytes: float) -> Path:
    """Distinct documents (a running number per copy, so dedup keeps them) up to `megabytes`."""
    lines, target, written, copy = source_lines(), int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for line in lines:
                row = f"{line} [{copy}]\n"
                f.write(row)
                written += len(row.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return path


def run_child(script: str, args: list[str], **env: str) -> dict:
    """Run one measurement of `script` (its `--child ARGS`) in a fresh process, so peak RSS and start-up are that
    measurement's alone; returns the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                         env=dict(os.environ, **env))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(functions: dict, child_args: list[str]) -> None:
    """The `--child KIND ARGS...` side of run_child: call functions[KIND] with the arguments (digits as ints)."""
    kind, *rest = child_args
    print(json.dumps(functions[kind](*[int(x) if x.isdigit() else x for x in rest])))


def peak_rss_mb() -> float:
    """The largest process's peak RSS so far: this one's, or its largest finished child's (a tokenizer pool)."""
    return max(resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def run_clm_group_texts(block_size: int):
    """run_clm.py's `group_texts`, as written there: concatenate a batch of documents, cut blocks, drop the rest."""
    from itertools import chain

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return group_texts


def run_toolkit(corpus: str, tokenizer_dir: str, cache: str, workers: int, block_size: int) -> dict:
    import types

    from transformers import AutoTokenizer

    import data_utils

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = types.SimpleNamespace(sources=[{"name": "corpus", "path": corpus, "format": "text"}], block_size=block_size,
                                 eval_fraction=0.0, add_bos="never", cache_dir=cache,
                                 preprocessing_num_workers=workers, dedup=True, max_source_epochs=4.0)
    start = time.perf_counter()
    data = data_utils.build_datasets(args, tokenizer, block_size, seed=0)
    first = data.train[0]  # the first training batch's first block
    seconds = time.perf_counter() - start
    del first
    return {"seconds": seconds, "tokens": data.report["sources"]["corpus"]["tokens"],
            "cache": data.report["sources"]["corpus"]["cache"], "peak_rss_mb": peak_rss_mb()}


def run_clm_baseline(corpus: str, tokenizer_dir: str, cache: str, workers: int, block_size: int) -> dict:
    """transformers/examples/pytorch/language-modeling/run_clm.py's data path, step for step."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=cache)

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"],
                        desc="Running tokenizer on dataset")

    grouped = tokenized.map(run_clm_group_texts(block_size), batched=True, num_proc=workers, desc=f"Grouping texts in chunks of {block_size}")
    first = grouped["train"][0]
    seconds = time.perf_counter() - start
    del first
    n_tokens = sum(len(ids) for ids in tokenized["train"]["input_ids"])
    kept = len(grouped["train"]) * block_size
    return {"seconds": seconds, "tokens": n_tokens, "tokens_kept": kept, "peak_rss_mb": peak_rss_mb()}


def raw_limit(corpus: str, tokenizer_dir: str, workers: int, method: str = "encode_batch") -> dict:
    """The fast tokenizer's batch encode alone (its own threads, as many as the workers). `encode_batch` is
    what `tokenizer(texts)` runs (ids and character offsets); `encode_batch_fast` skips the offsets."""
    from tokenizers import Tokenizer

    os.environ["RAYON_NUM_THREADS"] = str(workers)
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    texts = Path(corpus).read_text(encoding="utf-8").splitlines()
    start = time.perf_counter()
    n_tokens = 0
    for i in range(0, len(texts), 10_000):
        batch = getattr(tokenizer, method)(texts[i:i + 10_000], add_special_tokens=False)
        n_tokens += sum(len(e.ids) for e in batch)
    return {"seconds": time.perf_counter() - start, "tokens": n_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--mb2", type=float, default=400, help="second size for the peak-RSS comparison (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main({"toolkit": run_toolkit, "baseline": run_clm_baseline, "raw": raw_limit}, args.child)
        return

    import data_utils

    work = Path(args.keep or tempfile.mkdtemp(prefix="prepare_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work / f"corpus_{args.mb:g}mb.txt", args.mb)
    tokenizer_dir = data_utils.train_sentencepiece_tokenizer([{"path": str(corpus), "format": "text"}],
                                                             str(work / "tok_cache"), 8000, max_chars=20_000_000)
    w, b = args.workers, args.block_size
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.0f} MB), {w} workers, block {b}, "
          f"{os.cpu_count()} CPUs", flush=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    child = functools.partial(run_child, __file__, TOKENIZERS_PARALLELISM="true")
    ours = child(["toolkit", str(corpus), str(tokenizer_dir), str(work / "cache"), str(w), str(b)])
    again = child(["toolkit", str(corpus), str(tokenizer_dir), str(work / "cache"), str(w), str(b)])
    base = child(["baseline", str(corpus), str(tokenizer_dir), str(work / "hf_cache"), str(w), str(b)])
    raw = child(["raw", str(corpus), str(tokenizer_dir), str(w)])
    raw_fast = child(["raw", str(corpus), str(tokenizer_dir), str(w), "encode_batch_fast"])
    rate = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    print(f"prepare tokens/s   toolkit {rate(ours):,.0f}   run_clm {rate(base):,.0f}   raw tokenizer {rate(raw):,.0f} "
          f"(encode_batch; encode_batch_fast, which the toolkit uses: {rate(raw_fast):,.0f})")
    print(f"  toolkit / run_clm = {rate(ours) / rate(base):.2f}x (target >= 2)   "
          f"toolkit / raw limit = {rate(ours) / rate(raw):.2f}x (target >= 0.6)   "
          f"toolkit / raw encode_batch_fast = {rate(ours) / rate(raw_fast):.2f}x")
    print(f"  tokens trained on: toolkit {ours['tokens']:,} (all, one tail < block), run_clm keeps "
          f"{base['tokens_kept']:,} of {base['tokens']:,} ({1 - base['tokens_kept'] / base['tokens']:.2%} dropped)")
    print(f"second run, unchanged inputs: first batch after {again['seconds']:.2f} s ({again['cache']}; target < 2 s)")
    peaks = {args.mb: ours["peak_rss_mb"]}
    if args.mb2:
        big = make_corpus(work / f"corpus_{args.mb2:g}mb.txt", args.mb2)
        r = child(["toolkit", str(big), str(tokenizer_dir), str(work / "cache_big"), str(w), str(b)])
        peaks[args.mb2] = r["peak_rss_mb"]
        shutil.rmtree(work / "cache_big", ignore_errors=True)
        big.unlink()
    print("peak RSS of preparation (largest process): " + ", ".join(f"{k:g} MB text: {v:,.0f} MB" for k, v in peaks.items())
          + (f"; ratio {peaks[args.mb2] / peaks[args.mb]:.2f} (target <= 1.2, and < 1500 MB)" if args.mb2 else "")
          + f"; run_clm at {args.mb:g} MB: {base['peak_rss_mb']:,.0f} MB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
