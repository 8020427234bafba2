"""use_muon: torch.optim.Muon on the weight matrices inside the model, the configured AdamW on the rest, driven
by one learning-rate schedule, checkpointed and resumed exactly; refused where it cannot be right."""
import json
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file

import pretrain
from test_reliability import config as reliability_config


def micro_model(micro_model_config, **shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**json.loads(micro_model_config.read_text()), **shape}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))


def test_muon_updates_the_matrices_and_adamw_the_rest_under_one_schedule(micro_model_config, tokenizer, tmp_path):
    model = micro_model(micro_model_config, tie_word_embeddings=False)
    args = pretrain.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--use_muon", "true",
                                "--learning_rate", "0.01", "--weight_decay", "0.1", "--warmup_steps", "2",
                                "--eval_strategy", "no"])[2]
    trainer = pretrain.PretrainTrainer(model=model, args=args, processing_class=tokenizer, tokens_per_step=0,
                                       block_size=16, meter=None, data_plan={})
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = trainer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    other = {names[id(p)] for g in optimizer.other.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.ndim == 2} - {"model.embed_tokens.weight",
                                                                              "lm_head.weight"}
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.norm.weight" in other
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= other and not muon & other
    assert len(muon) + len(other) == len(list(model.parameters()))

    # each part moves its weights exactly as the torch optimizer alone would, at the schedule's learning rate
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    alone = [torch.optim.Muon([{"params": [reference[n] for n in sorted(muon)], "weight_decay": 0.1}], lr=0.01,
                              adjust_lr_fn="match_rms_adamw"),
             type(optimizer.other)([{"params": [reference[n] for n in sorted(other) if "norm" not in n],
                                     "weight_decay": 0.1},
                                    {"params": [reference[n] for n in sorted(other) if "norm" in n],
                                     "weight_decay": 0.0}], **trainer.optimizer_cls_and_kwargs[1])]
    for step in range(3):
        torch.manual_seed(step)
        for name, p in model.named_parameters():
            p.grad = torch.randn_like(p)
            reference[name].grad = p.grad.clone()
        lr = trainer.lr_scheduler.get_last_lr()[0]
        assert all(g["lr"] == lr for g in optimizer.param_groups)
        for o in alone:
            for g in o.param_groups:
                g["lr"] = lr
        optimizer.step()
        for o in alone:
            o.step()
        trainer.lr_scheduler.step()
    assert lr == pytest.approx(0.01)  # past the warmup: the schedule reached both parts
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=0, atol=0, msg=name)
    # the state holds both parts and loads into a fresh optimizer
    decay = trainer.get_decay_parameter_names(model)
    fresh = type(optimizer)([{"params": [p for n, p in model.named_parameters() if (n in decay) == decays],
                              "weight_decay": 0.1 * decays} for decays in (True, False)], lr=0.01)
    fresh.load_state_dict(optimizer.state_dict())
    assert torch.equal(fresh.muon.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.muon.state_dict()["state"][0]["momentum_buffer"])
    for group in fresh.param_groups:  # the loaded parts' groups: what a schedule sets reaches them
        group["lr"] = 0.5
    assert all(g["lr"] == 0.5 for part in fresh.parts for g in part.param_groups)


def test_a_muon_run_trains_and_resumes_exactly(tmp_path, micro_model_config, tokenizer_dir, capsys, monkeypatch):
    run = reliability_config(tmp_path, micro_model_config, tokenizer_dir, max_steps=6, save_steps=3,
                             learning_rate=3.0e-3, warmup_steps=2, use_muon=True)
    used = []  # the learning rate each part steps with (accelerate reloads the state as it wraps the optimizer)
    for part in (torch.optim.Muon, torch.optim.AdamW):
        monkeypatch.setattr(part, "step", lambda self, *a, step=part.step, **k: (
            used.append((type(self).__name__, self.param_groups[0]["lr"])), step(self, *a, **k))[1])
    assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    logged = [h["learning_rate"] for h in history if "learning_rate" in h]  # warmup, then the cosine decay
    assert [lr for name, lr in used if name == "Muon"] == [lr for name, lr in used if name == "AdamW"] == \
        pytest.approx(logged) and logged[0] < logged[2] > logged[-1]
    assert "muon" in torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    assert pretrain.main([str(run), "--output_dir", str(resumed), "--resume_from_checkpoint", "auto"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and metrics["train"]["steps"] == 6
    # the optimizer state belongs to Muon: a resume without it is refused before it loads
    shutil.copytree(out / "checkpoint-3", tmp_path / "plain" / "checkpoint-3")
    capsys.readouterr()
    assert pretrain.main([str(run), "--output_dir", str(tmp_path / "plain"), "--resume_from_checkpoint", "auto",
                          "--use_muon", "false"]) == 2
    assert "trained with use_muon True, this run with False" in capsys.readouterr().err


def test_muon_is_refused_where_its_updates_would_be_wrong(micro_model_config):
    model = micro_model(micro_model_config)
    settings = dict(deepspeed=None, fsdp="", use_liger_kernel=False, loraplus_lr_ratio=None, use_muon=True,
                    bf16_weights=False, metric_for_best_model=None)
    for extra, message in (({"deepspeed": "ds.json"}, "use_muon under DeepSpeed"),
                           ({"fsdp": "full_shard"}, "use_muon under FSDP"),
                           ({"bf16_weights": True}, "use_muon with mixed_precision bf16_weights")):
        with pytest.raises(pretrain.ConfigError, match=message):
            pretrain.preflight(types.SimpleNamespace(**{**settings, **extra}), None, model, 0)
    for p in model.parameters():
        p.requires_grad = False
    model.get_input_embeddings().weight.requires_grad = True
    with pytest.raises(pretrain.ConfigError, match="no trainable weight matrices for Muon"):
        pretrain.with_muon(torch.optim.AdamW, model)
