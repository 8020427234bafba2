"""Where one training step of a model goes, without the Trainer: forward, backward and optimizer times
(CUDA events), the step's tokens/s and MFU (same convention as pretrain.py), and the kernels that take the
most GPU time (torch.profiler). Compare its tokens/s with bench/gpu_bench.sh's to see what the Trainer and
the data pipeline add, and its kernel table to see what bounds the model itself.

    python bench/gpu_profile.py [--model_config configs/model/qwen2-0.5b.json] [--seq 4096] [--batch 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_config", default=str(ROOT / "configs/model/qwen2-0.5b.json"))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--attn_implementation", default="sdpa")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    import pretrain

    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = json.loads(Path(args.model_config).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    per_token = pretrain.flops_per_token(model, args.seq)
    peak = pretrain.peak_flops_of(torch.cuda.get_device_name()) if device == "cuda" else None

    def step(timings: list | None = None):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if device == "cuda" else None
        if marks:
            marks[0].record()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=tokens, labels=tokens).loss
        if marks:
            marks[1].record()
        loss.backward()
        if marks:
            marks[2].record()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if marks:
            marks[3].record()
            if timings is not None:
                torch.cuda.synchronize()
                timings.append([marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(3)])

    for _ in range(2):  # warm-up: allocator, cuDNN/cuBLAS heuristics
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    timings: list = []
    start = time.perf_counter()
    for _ in range(args.steps):
        step(timings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tps = args.batch * args.seq / seconds
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, seq {args.seq} x batch {args.batch}, {args.attn_implementation}, "
          f"{'bf16 autocast, fused AdamW' if device == 'cuda' else 'fp32'}")
    print(f"model step alone: {seconds:.3f} s/step, {tps:,.0f} tokens/s" +
          (f", MFU {tps * per_token / peak:.1%}" if peak else ""))
    if timings:
        fwd, bwd, opt = (sum(t[i] for t in timings) / len(timings) for i in range(3))
        print(f"  forward {fwd:.3f} s, backward {bwd:.3f} s, clip + optimizer {opt:.3f} s (GPU time, CUDA events)")
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
