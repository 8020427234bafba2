"""Where one training step of a model goes, without the Trainer: forward, backward and optimizer times
(CUDA events), the step's tokens/s and MFU (same convention as pretrain.py), how many operators and kernel
launches the host issues per step, and the kernels that take the most GPU time (torch.profiler). Compare
its tokens/s with bench/gpu_bench.sh's to see what the Trainer and the data pipeline add, and its tables to
see what bounds the model itself. The speed settings are pretrain.py's own:

    python bench/gpu_profile.py [--model_config configs/model/qwen2-0.5b.json] [--seq 4096] [--batch 4]
        [--precision bf16|bf16_weights|fp32] [--compile none|blocks] [--liger] [--chunked_loss]

On a CPU it runs too (small --seq): the operator count per step does not depend on the device, so it shows
what a setting saves the host before a GPU is at hand.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class CountOperators(TorchDispatchMode):
    """Counts the ATen operators dispatched (forward, backward and optimizer): in eager mode each one is a
    kernel launch on a GPU, and the host pays the dispatcher for each."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def build(args, device: str):
    """The model and optimizer as pretrain.py sets them up for these settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import pretrain

    raw = json.loads(Path(args.model_config).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.use_cache = False
    dtype = torch.bfloat16 if args.precision == "bf16_weights" else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation, dtype=dtype)
    model = model.to(device)
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    if args.chunked_loss:
        pretrain.use_chunked_loss(model, argparse.Namespace(use_liger_kernel=args.liger))
    optimizer_cls = (pretrain.with_fp32_master_weights(torch.optim.AdamW) if args.precision == "bf16_weights"
                     else torch.optim.AdamW)
    optimizer = optimizer_cls(list(model.parameters()), lr=1e-4, fused=device == "cuda")
    if args.compile == "blocks":  # as pretrain.py's torch_compile_scope blocks (accelerate's regional compilation)
        from accelerate.utils import compile_regions

        return model, compile_regions(model), optimizer
    return model, model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_config", default=str(ROOT / "configs/model/qwen2-0.5b.json"))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--precision", choices=["bf16", "bf16_weights", "fp32"], default="bf16",
                        help="bf16: autocast over fp32 weights | bf16_weights: bf16 weights, fp32 masters | fp32")
    parser.add_argument("--compile", choices=["none", "blocks"], default="none")
    parser.add_argument("--liger", action="store_true", help="Liger kernels (fused RMSNorm, RoPE, SwiGLU, loss)")
    parser.add_argument("--chunked_loss", action="store_true", help="pretrain.py's chunked_loss (no full logits)")
    args = parser.parse_args()

    import pretrain

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, forward, optimizer = build(args, device)
    config = model.config
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    autocast = args.precision == "bf16"
    per_token = pretrain.flops_per_token(model, args.seq)
    peak = pretrain.peak_flops_of(torch.cuda.get_device_name()) if device == "cuda" else None

    def step(timings: list | None = None, counter: CountOperators | None = None):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if device == "cuda" else None
        if marks:
            marks[0].record()
        with counter or contextlib.nullcontext():  # forward and backward (the fused optimizer is a few launches)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(input_ids=tokens, labels=tokens).loss
            if marks:
                marks[1].record()
            loss.backward()
        if marks:
            marks[2].record()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if marks:
            marks[3].record()
            if timings is not None:
                torch.cuda.synchronize()
                timings.append([marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(3)])

    warmup = time.perf_counter()
    for _ in range(2 if args.compile == "none" else 3):  # allocator, cuBLAS heuristics; compilation
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warmup = time.perf_counter() - warmup
    timings: list = []
    start = time.perf_counter()
    for _ in range(args.steps):
        step(timings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tps = args.batch * args.seq / seconds
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, seq {args.seq} x batch {args.batch}, {args.attn_implementation}, precision {args.precision}, "
          f"compile {args.compile}{', liger' if args.liger else ''}{', chunked loss' if args.chunked_loss else ''}; "
          f"first steps {warmup:.1f} s")
    print(f"model step alone: {seconds:.3f} s/step, {tps:,.0f} tokens/s" +
          (f", MFU {tps * per_token / peak:.1%}" if peak else ""))
    if timings:
        fwd, bwd, opt = (sum(t[i] for t in timings) / len(timings) for i in range(3))
        print(f"  forward {fwd:.3f} s, backward {bwd:.3f} s, clip + optimizer {opt:.3f} s (GPU time, CUDA events)")
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        print(f"  peak memory (process RSS) {pretrain.peak_memory_gib():.1f} GiB")
    if args.compile == "none":  # compiled regions run generated kernels that bypass the dispatcher
        counter = CountOperators()
        step(counter=counter)
        casts = sum(n for name, n in counter.counts.items() if name in ("_to_copy", "copy_"))
        print(f"  host: {sum(counter.counts.values()):,} ATen operators in forward + backward, {casts:,} of them "
              f"casts or copies; most frequent: {', '.join(f'{k} {v}' for k, v in counter.counts.most_common(6))}")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device == "cuda":
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        print(f"  host: {launches:,} kernel launches per step")
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
