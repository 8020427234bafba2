"""The GPU speed settings, checked for correctness on the CPU: bf16 weights with fp32 master weights in the
optimizer (`mixed_precision: bf16_weights`), torch.compile of the repeated decoder layers
(`torch_compile_scope: blocks`), a training loop that leaves the device alone between logs (no host read of
a device value per step from this toolkit or the Trainer loop), and the loss without full logits
(`chunked_loss`)."""
import json
import traceback

import pytest
import torch

from conftest import ROOT
from test_reliability import config as reliability_config


def config(tmp_path, micro_model_config, tokenizer_dir, **extra):
    """test_reliability's run config: 6 steps, no checkpoints unless asked."""
    return reliability_config(tmp_path, micro_model_config, tokenizer_dir, **{
        "max_steps": 6, "save_strategy": "no", "learning_rate": 3.0e-3, "logging_steps": 2, **extra})


def test_fp32_master_weights_keep_updates_that_bf16_weights_round_away():
    """An update of 1e-4 per step is below a bf16 weight's resolution at 1.0 (2^-8): plain AdamW on bf16
    weights never moves them; the master-weight AdamW moves its fp32 masters and rounds them into the weights."""
    import pretrain

    master_adamw = pretrain.with_fp32_master_weights(torch.optim.AdamW)
    weights = {kind: torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16)) for kind in ("plain", "master")}
    optimizers = {"plain": torch.optim.AdamW([weights["plain"]], lr=1e-4, weight_decay=0.0),
                  "master": master_adamw([{"params": [weights["master"]], "weight_decay": 0.0}], lr=1e-4)}
    for _ in range(100):
        for kind, optimizer in optimizers.items():
            weights[kind].grad = torch.ones_like(weights[kind])
            optimizer.step()
            weights[kind].grad = None
    assert torch.equal(weights["plain"], torch.ones(64, dtype=torch.bfloat16))
    master = optimizers["master"].master_params[0]
    assert master.dtype == torch.float32 and master[0].item() == pytest.approx(0.99, abs=1e-4)
    assert weights["master"].dtype == torch.bfloat16 and torch.equal(weights["master"], master.to(torch.bfloat16))
    # the masters travel with the optimizer state: a fresh optimizer picks them up exactly
    restored = master_adamw([{"params": [torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))],
                              "weight_decay": 0.0}], lr=1e-4)
    restored.load_state_dict(optimizers["master"].state_dict())
    assert torch.equal(restored.master_params[0], master)
    assert torch.equal(restored.model_params[0], weights["master"])


def test_fp32_masters_keep_bitsandbytes_32_bit_embedding_state():
    """The Trainer asks bitsandbytes' 8-bit optimizers for 32-bit state on embeddings, naming the model's
    weight; the master-weight optimizer must pass that on to the weight's master."""
    bnb = pytest.importorskip("bitsandbytes")
    import pretrain

    embedding, linear = torch.nn.Embedding(300, 16, dtype=torch.bfloat16), torch.nn.Linear(16, 300, dtype=torch.bfloat16)
    optimizer = pretrain.with_fp32_master_weights(bnb.optim.AdamW8bit)(
        [embedding.weight, linear.weight], lr=1e-3, min_8bit_size=0)
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(embedding, "weight", {"optim_bits": 32})
    for weight in (embedding.weight, linear.weight):
        weight.grad = torch.ones_like(weight)
    optimizer.step()
    states = [optimizer.state[m]["state1"].dtype for m in optimizer.master_params]
    assert states == [torch.float32, torch.uint8]  # the embedding's in 32 bits, the linear layer's in 8


def test_fp32_masters_start_from_the_weights_at_the_first_step():
    """DDP overwrites each rank's weights with rank 0's after the optimizer is built, and accelerate hands the
    optimizer its own state back: the first step must still start from the weights as they are then."""
    import pretrain

    weight = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    optimizer = pretrain.with_fp32_master_weights(torch.optim.SGD)([weight], lr=1.0)
    with torch.no_grad():
        weight.fill_(2.0)  # the broadcast
    optimizer.load_state_dict(optimizer.state_dict())  # accelerate's move to the device
    weight.grad = torch.ones_like(weight)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hooked = []
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])  # torch now wraps SGD.step with the step hooks too
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: hooked.append(optimizer))
    try:
        optimizer.step()
    finally:
        handle.remove()
    assert torch.equal(weight, torch.full((8,), 1.0, dtype=torch.bfloat16))  # 2 - 1, not 0 - 1
    assert len(hooked) == 1  # step hooks run once per step, not again around the inner update


def test_bf16_weights_run_trains_bf16_weights_and_checkpoints_fp32_masters(tmp_path, micro_model_config,
                                                                         tokenizer_dir, capsys):
    import pretrain
    from safetensors.torch import load_file

    run = config(tmp_path, micro_model_config, tokenizer_dir, mixed_precision="bf16_weights", max_steps=8,
                 save_strategy="steps", save_steps=4, logging_steps=1)
    assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "out"
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # the model as it trained
    state = torch.load(out / "checkpoint-8" / "optimizer.pt", weights_only=True)
    masters = state["fp32_master_weights"]
    assert {m.dtype for m in masters} == {torch.float32} and len(masters) == len(saved)
    # the saved bf16 weights are the masters rounded (tied embeddings: one tensor, saved once)
    assert sorted(m.to(torch.bfloat16).sum().item() for m in masters) == sorted(t.sum().item() for t in saved.values())
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]]
    assert losses[-1] < losses[0]
    assert metrics["model"]["saved_model_check"]["max_abs_logit_diff"] == 0.0  # reloaded in bf16, as trained


def test_bf16_weights_is_refused_where_another_component_owns_the_masters(tmp_path, micro_model_config,
                                                                          tokenizer_dir, capsys):
    import pretrain

    run = config(tmp_path, micro_model_config, tokenizer_dir, mixed_precision="bf16_weights")
    assert pretrain.main([str(run), "--fsdp", "full_shard"]) == 2
    assert "mixed_precision bf16_weights is for one process and DDP" in capsys.readouterr().err
    assert pretrain.main([str(run), "--torch_dtype", "float16"]) == 2
    assert "torch_dtype `float16` contradicts it" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compile_scope_compiles_each_decoder_layer_or_the_model(tmp_path, micro_model_config, tokenizer_dir,
                                                                monkeypatch, capsys, scope):
    """The `eager` backend runs dynamo's tracing without code generation: with scope blocks the repeated layers
    become compiled modules, with scope model the model does; both trace without graph breaks and train."""
    import torch._dynamo.utils

    import pretrain

    seen = []
    original = pretrain.PretrainTrainer.training_step

    def training_step(self, model, inputs, *args):
        compiled_whole = type(model).__name__ == "OptimizedModule"
        layers = (model._orig_mod if compiled_whole else model).model.layers
        seen.append((type(model).__name__, {type(layer).__name__ for layer in self.model.model.layers},
                     {type(layer).__name__ for layer in layers}))
        return original(self, model, inputs, *args)

    monkeypatch.setattr(pretrain.PretrainTrainer, "training_step", training_step)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run = config(tmp_path, micro_model_config, tokenizer_dir, torch_compile=True, torch_compile_backend="eager",
                 torch_compile_scope=scope)
    assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
    wrapper, original_layers, trained_layers = seen[0]
    assert original_layers == {"LlamaDecoderLayer"}  # compilation wraps; the model itself is unchanged
    if scope == "blocks":
        assert wrapper == "LlamaForCausalLM" and trained_layers == {"OptimizedModule"}
    else:
        assert wrapper == "OptimizedModule" and trained_layers == {"LlamaDecoderLayer"}
    assert not torch._dynamo.utils.counters["graph_break"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["steps"] == 6


def test_no_host_read_of_a_device_value_per_step_between_logs(tmp_path, micro_model_config, tokenizer_dir,
                                                               monkeypatch, capsys):
    """A host read of a device value (`item`, `bool`, ...) waits for the GPU to finish, which starves a
    launch-bound step. Between logs, neither this toolkit nor the Trainer loop may read one per step (with the
    default non-finite policy, stop); transformers' own model code still does once per forward (its check
    for packed position_ids), which is outside this toolkit."""
    from transformers import TrainerCallback

    import pretrain

    reads, counting = [], [False]
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if counting[0]:
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                reads.append(f"{caller.filename}:{caller.lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class CountBetweenLogs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counting[0] = 2 <= state.global_step < 9  # steps 3 to 9; the log is at step 10

    original_init = pretrain.PretrainTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(CountBetweenLogs())

    monkeypatch.setattr(pretrain.PretrainTrainer, "__init__", init)
    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=10, logging_steps=10)
    assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
    ours = [r for r in reads if r.startswith(str(ROOT)) or "/transformers/trainer.py:" in r or "/accelerate/" in r]
    assert not ours, ours
    assert all("/transformers/" in r for r in reads), reads  # only the model's own check remains


def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(monkeypatch):
    """Several chunks, ignored tokens, and a denominator given from outside (gradient accumulation)."""
    import pretrain

    monkeypatch.setattr(pretrain, "CHUNK_LOGITS_BYTES", 4 * 100 * 7)  # 7 tokens per chunk at vocab 100
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 8, requires_grad=True), torch.randn(100, 8, requires_grad=True)
    labels = torch.randint(0, 100, (50,))
    labels[:5] = -100
    for denominator in (torch.tensor(45), torch.tensor(120)):
        chunked = pretrain.ChunkedCrossEntropy.apply(hidden, weight, labels, denominator, True)
        grads = torch.autograd.grad(chunked * 3.0, (hidden, weight))  # a scaled upstream gradient
        plain = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum") / denominator
        expected = torch.autograd.grad(plain * 3.0, (hidden, weight))
        torch.testing.assert_close(chunked, plain)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)


def test_chunked_cross_entropy_keeps_small_fp16_gradients():
    """fp16's loss scaler multiplies the gradient in backward; the 1/token-count scale must come after it, or
    softmax / 100,000 (below fp16's smallest value) would underflow to zero in the forward pass."""
    import pretrain

    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 16), torch.randn(4096, 16) * 0.1
    labels, denominator = torch.randint(0, 4096, (64,)), torch.tensor(100_000)
    grads = {}
    for dtype in (torch.float32, torch.float16):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        loss = pretrain.ChunkedCrossEntropy.apply(h, w, labels, denominator, True)
        (loss * 65536.0).backward()  # as fp16's loss scaler does
        grads[dtype] = w.grad.float() / 65536.0
    assert (grads[torch.float16] != 0).float().mean() > 0.99
    torch.testing.assert_close(grads[torch.float16], grads[torch.float32], rtol=2e-2, atol=1e-9)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_model_matches_the_plain_loss(micro_model_config, autocast):
    """Uneven ignored labels and an outside token count (gradient accumulation), fp32 or bf16 autocast; the
    Trainer's `shift_labels`; evaluation under no_grad."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import pretrain

    spec = json.loads(micro_model_config.read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config)
    chunked = AutoModelForCausalLM.from_config(config)
    chunked.load_state_dict(plain.state_dict())
    pretrain.use_chunked_loss(chunked, type("Args", (), {"use_liger_kernel": False})())
    ids = torch.randint(0, config.vocab_size, (3, 40))
    labels = ids.clone()
    labels[0, :17], labels[2, 30:] = -100, -100
    inputs = {"input_ids": ids, "labels": labels, "num_items_in_batch": torch.tensor(250)}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = [model(**inputs).loss for model in (plain, chunked)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2 if autocast else 1e-5, atol=0)
    for a, b in zip(plain.parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=5e-2 if autocast else 1e-4, atol=1e-3 if autocast else 1e-6)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    with torch.no_grad():
        again = chunked(input_ids=ids, shift_labels=shifted, num_items_in_batch=torch.tensor(250)).loss
        # evaluation's next-token accuracy, without logits: the plain model's counts
        hits = [pretrain.next_token_hits(model(**inputs), labels) for model in (plain, chunked)]
    torch.testing.assert_close(again, chunked(**inputs).loss.detach())
    assert hits[1].tolist() == hits[0].tolist() and hits[0][:, 1].tolist() == [23, 39, 29]


def test_chunked_loss_run_logs_the_losses_of_the_plain_run(tmp_path, micro_model_config, tokenizer_dir, monkeypatch,
                                                           capsys):
    import pretrain

    monkeypatch.setattr(pretrain, "CHUNK_LOGITS_BYTES", 4 * 512 * 16)  # 16 tokens per chunk: 8 chunks per batch
    losses = {}
    for chunked in (False, True):
        run = config(tmp_path / str(chunked), micro_model_config, tokenizer_dir, chunked_loss=chunked, logging_steps=1,
                     gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3)
        assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
        metrics = json.loads((tmp_path / str(chunked) / "out" / "metrics.json").read_text())
        final = metrics["eval"]["final"]
        losses[chunked] = [metrics["train"]["loss"], final["eval_loss"], final["eval_accuracy"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_chunked_loss_is_refused_for_models_it_does_not_cover(tmp_path, tokenizer_dir, capsys):
    import pretrain

    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}))
    run = config(tmp_path, gpt2, tokenizer_dir, chunked_loss=True)
    assert pretrain.main([str(run)]) == 2
    assert "chunked_loss supports llama, qwen2, qwen3, mistral models" in capsys.readouterr().err
