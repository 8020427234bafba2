"""Document-aware attention: position_ids restart at every document in a packed block, so a
document's logits do not depend on the document packed before it."""
import json
import types

import numpy as np
import pytest
import torch

import data_utils
from conftest import make_text_corpus


def test_positions_restart_at_each_document(tmp_path, tokenizer):
    path = make_text_corpus(tmp_path, repeat=3)
    args = types.SimpleNamespace(sources=[{"path": str(path)}], block_size=64, eval_fraction=0.0, add_bos="never",
                                 cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1,
                                 attention="document")
    blocks = data_utils.build_datasets(args, tokenizer, 64, seed=0).train.parts[0]
    for i in range(len(blocks)):
        item = blocks[i]
        ids, pos = item["input_ids"].numpy(), item["position_ids"].numpy()
        assert pos[0] == 0
        after_eos = np.flatnonzero(ids[:-1] == tokenizer.eos_token_id) + 1
        assert (pos[after_eos] == 0).all()  # a new document starts at position 0
        assert ((np.diff(pos) == 1) | (pos[1:] == 0)).all()  # and counts up inside a document


def test_logits_of_a_document_ignore_the_document_before_it(micro_model_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads(micro_model_config.read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    eos, second = 2, [17, 45, 99, 3, 250, 61, 7]
    first_a, first_b = [5, 6, 7, 8, 9, eos], [300, 301, 302, 303, 304, eos]
    positions = torch.tensor([list(range(6)) + list(range(len(second)))])

    def logits(first, position_ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([first + second]), position_ids=position_ids,
                         use_cache=False).logits[0, 6:]

    assert torch.allclose(logits(first_a, positions), logits(first_b, positions), atol=1e-5)
    causal = torch.arange(6 + len(second))[None]  # plain causal attention: the second document sees the first
    assert not torch.allclose(logits(first_a, causal), logits(first_b, causal), atol=1e-3)


def test_throughput_figures_and_mfu_convention(micro_model_config, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    import pretrain

    spec = json.loads(micro_model_config.read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    n = sum(p.numel() for p in model.parameters())  # tied embeddings: counted once, as the output projection
    assert pretrain.flops_per_token(model, 128) == 6 * n + 12 * 2 * 32 * 128
    # Attention width is heads x head_dim, which Qwen3-like configs set wider than the hidden size.
    wide = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True))
    n = sum(p.numel() for p in wide.parameters())
    assert pretrain.flops_per_token(wide, 128) == 6 * n + 12 * 2 * (4 * 16) * 128
    args = types.SimpleNamespace(peak_tflops=None, use_cpu=False, low_precision=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A800-SXM4-80GB", 312.0),
                         ("NVIDIA GeForce RTX 4090", 165.2), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        peak = pretrain.peak_flops_per_device(args)
        assert peak == (tflops * 1e12 if tflops else None), name
    meter = pretrain.ThroughputMeter(tokens_per_step=1000, world_size=2, flops_per_token=1e9, peak_flops=1e12)
    state = types.SimpleNamespace(global_step=0, max_steps=100)
    meter.on_train_begin(None, state, None)
    for _ in range(3):
        meter.on_step_begin(None, state, None)
        meter.on_step_end(None, state, None)
    window = meter.read(3)
    assert window["tokens_per_second_per_device"] == pytest.approx(window["tokens_per_second"] / 2, rel=1e-3)
    assert window["mfu"] == pytest.approx(window["tokens_per_second_per_device"] * 1e9 / 1e12, rel=1e-3, abs=1e-4)
    assert 0 <= window["data_wait_share"] <= 1 and window["step_time_s"] >= 0
    for _ in range(2):  # the steady state starts after the first window, which holds the one-off costs
        meter.on_step_begin(None, state, None)
        meter.on_step_end(None, state, None)
    overall = meter.overall(5)
    assert overall["steady_state"]["from_step"] == 3 and "mfu" in overall["steady_state"]
    assert overall["step_time_s"] >= 0 and "steady_state" not in meter.read(5)


def test_meter_excludes_logs_evaluations_and_what_follows_the_last_step(monkeypatch):
    """A fake clock: steps take 1 s, fetching a batch 0.5 s, a log 2 s (after its reading), an evaluation
    3 s, and 10 s pass after the last step (final evaluation, saving). None of that but the fetch and the
    steps may enter the figures, also when a log and an evaluation fall on the same step."""
    import pretrain

    clock = [0.0]
    monkeypatch.setattr(pretrain.time, "perf_counter", lambda: clock[0])
    meter = pretrain.ThroughputMeter(tokens_per_step=100, world_size=1, flops_per_token=1.0, peak_flops=None)
    state = types.SimpleNamespace(global_step=0, max_steps=4)
    control = types.SimpleNamespace(should_log=False)
    meter.on_train_begin(None, state, control)
    windows = []
    for step in range(1, 5):
        clock[0] += 0.5  # fetching the batch
        meter.on_step_begin(None, state, control)
        clock[0] += 1.0
        state.global_step = step
        meter.on_step_end(None, state, control)
        if step % 2 == 0:
            windows.append(meter.read(step))
            clock[0] += 2.0
            meter.logged(None, state, control)
            clock[0] += 3.0
            meter.on_evaluate(None, state, control)
    clock[0] += 10.0
    for figures in (*windows, meter.overall(4), meter.overall(4)["steady_state"]):
        assert figures["step_time_s"] == pytest.approx(1.5, abs=1e-3) and figures["data_wait_share"] == pytest.approx(1 / 3, abs=1e-3)
        assert figures["tokens_per_second"] == pytest.approx(100 / 1.5, abs=0.1)
    assert control.should_log  # the last step is always logged
    for name, tflops in [("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA H100 NVL", 835.5),
                         ("NVIDIA H200 NVL", 835.5), ("NVIDIA H200", 989.5), ("NVIDIA H20", 148.0),
                         ("Tesla V100-SXM2-32GB", 125.0), ("Tesla V100-PCIE-16GB", 112.0),
                         ("Tesla V100S-PCIE-32GB", 130.0), ("Tesla T4", 65.0)]:
        assert pretrain.peak_flops_of(name) == tflops * 1e12, name
