"""CPU training throughput: pretrain.py vs a plain transformers Trainer on the run_clm baseline's dataset.

    python bench/train_bench.py [--steps 40] [--block_size 256] [--batch 8] [--mb 5]

Same tiny model (configs/model/tiny.json), tokenizer, batch size, sequence length and steps on both
sides, measured in this one run; each side in a fresh process. Printed for both, with the ratio:
tokens/s (Trainer's train_runtime, which includes data loading), and the share of padding tokens in
the batches. pretrain.py runs twice: plain causal attention over packed blocks, and
`--attention document` (position_ids restart at each document).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prepare_bench import child_main, make_corpus, run_child, run_clm_group_texts  # noqa: E402


def plain_trainer(corpus: str, tokenizer_dir: str, work: str, steps: int, block: int, batch: int) -> dict:
    """run_clm.py's dataset (tokenize, group_texts) and a Trainer with its defaults for everything else."""
    import datasets
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,
                              default_data_collator)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=f"{work}/hf")["train"]
    tokenized = raw.map(lambda e: tokenizer(e["text"]), batched=True, remove_columns=["text"])
    grouped = tokenized.map(run_clm_group_texts(block), batched=True)
    spec = json.loads((ROOT / "configs/model/tiny.json").read_text())
    spec["vocab_size"] = (len(tokenizer) + 63) // 64 * 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    args = TrainingArguments(output_dir=f"{work}/plain", max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=steps,
                             use_cpu=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=grouped, data_collator=default_data_collator)
    result = trainer.train()
    mask = grouped[: steps * batch]["attention_mask"]
    padding = 1 - sum(map(sum, mask)) / (len(mask) * block)
    return {"runtime": result.metrics["train_runtime"], "padding_share": padding}


def toolkit(corpus: str, tokenizer_dir: str, work: str, steps: int, block: int, batch: int, attention: str) -> dict:
    out = Path(work) / f"toolkit-{attention}"
    cmd = [sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "configs/pretrain_tiny.yaml"),
           "--tokenizer_name_or_path", tokenizer_dir, "--sources", json.dumps([{"path": corpus, "format": "text"}]),
           "--block_size", str(block), "--per_device_train_batch_size", str(batch), "--max_steps", str(steps),
           "--eval_fraction", "0", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
           "--report_to", "none", "--sample_prompts", "", "--output_dir", str(out), "--cache_dir", f"{work}/cache",
           "--attention", attention, "--verify_saved_model", "false", "--use_cpu", "true"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"runtime": metrics["train"]["runtime_seconds"], "padding_share": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mb", type=float, default=5)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main({"plain": plain_trainer, "toolkit": toolkit}, args.child)
        return
    import data_utils

    work = tempfile.mkdtemp(prefix="train_bench-")
    corpus = make_corpus(Path(work) / "corpus.txt", args.mb)
    tokenizer_dir = str(data_utils.train_sentencepiece_tokenizer([{"path": str(corpus), "format": "text"}],
                                                                 f"{work}/tok", 8000, max_chars=5_000_000))
    common = [str(corpus), tokenizer_dir, work, str(args.steps), str(args.block_size), str(args.batch)]

    def child(kind, *extra):
        return run_child(__file__, [kind, *common, *extra], CUDA_VISIBLE_DEVICES="")

    tokens = args.steps * args.batch * args.block_size
    started = time.time()
    plain = child("plain")
    ours = child("toolkit", "causal")
    doc = child("toolkit", "document")
    rate = lambda r: tokens / r["runtime"]  # noqa: E731
    print(f"{args.steps} steps x {args.batch} x {args.block_size} tokens, tiny model, {os.cpu_count()} CPUs")
    print(f"training tokens/s   plain Trainer {rate(plain):,.0f}   pretrain.py {rate(ours):,.0f}   "
          f"pretrain.py --attention document {rate(doc):,.0f}")
    print(f"  pretrain.py / plain = {rate(ours) / rate(plain):.2f}x (target >= 1.0)   "
          f"document / plain = {rate(doc) / rate(plain):.2f}x (target >= 0.9)")
    print(f"padding share       plain Trainer {plain['padding_share']:.1%}   pretrain.py {ours['padding_share']:.1%}")
    print(f"(bench took {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
