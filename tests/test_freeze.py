"""finetuning freeze: only the chosen decoder layers and extra modules train, the saved model is whole, the
FLOPs count only the backward that runs, and a checkpoint resumes only with the parameters it trained."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import pretrain
from conftest import logged_losses, make_text_corpus
from test_end_to_end import run_pretrain


def freeze_model(base, tokenizer, *flags):
    args = pretrain.parse_args(["--model_name_or_path", str(base), "--finetuning", "freeze", *flags])[0]
    return pretrain.build_model(args, tokenizer, 32)


def sizes(model, where):
    return sum(p.numel() for name, p in model.named_parameters() if where(name))


def test_only_the_chosen_layers_and_modules_train_and_flops_count_what_runs(base_model, tokenizer):
    model = freeze_model(base_model, tokenizer, "--freeze_trainable_layers", "1", "--freeze_extra_modules", "lm_head")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("model.layers.1.", "lm_head.")) for name in trained)
    assert "lm_head.weight" in trained and "model.layers.1.mlp.down_proj.weight" in trained

    n = sizes(model, lambda name: "embed_tokens" not in name)  # untied: the lookup does no matmul
    above = sizes(model, lambda name: name.startswith(("model.layers.1.", "model.norm.", "lm_head.")))
    trainable = sizes(model, lambda name: name in trained)
    width, layers = model.config.hidden_size, model.config.num_hidden_layers
    # backward stops at layer 1: activation gradients for it and the head only, attention backward in 1 layer
    assert pretrain.flops_per_token(model, 32) == 2 * n + 2 * above + 2 * trainable + (4 * layers + 8) * width * 32

    first = freeze_model(base_model, tokenizer, "--freeze_trainable_layers", "-1")
    assert {name.split(".")[2] for name, p in first.named_parameters() if p.requires_grad} == {"0"}

    embeddings = freeze_model(base_model, tokenizer, "--freeze_trainable_layers", "0", "--freeze_extra_modules",
                              "embed_tokens,lm_head")  # Chinese-LLaMA's first stage: the layers frozen
    assert {name for name, p in embeddings.named_parameters() if p.requires_grad} == {
        "model.embed_tokens.weight", "lm_head.weight"}
    n_all = sizes(embeddings, lambda name: "embed_tokens" not in name)
    head = sizes(embeddings, lambda name: name.startswith("lm_head."))
    # the embeddings train: activation gradients run through every layer
    assert pretrain.flops_per_token(embeddings, 32) == 4 * n_all + 2 * head + 12 * layers * width * 32


@pytest.mark.parametrize("trains", ["all", "top layer", "lm_head", "lm_head and norm"])
def test_flops_per_token_is_what_torch_counts_in_a_training_step(micro_model_config, trains):
    """The formula against torch's FlopCounterMode over a real forward and backward (eager attention, whose
    matmuls it counts; an untied head). Only the head training used to count an activation gradient through it
    that never runs (+15% in the tiny model)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    spec = json.loads(micro_model_config.read_text())
    spec.update(tie_word_embeddings=False, num_hidden_layers=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), attn_implementation="eager")
    wanted = {"all": lambda name: True, "top layer": lambda name: name.startswith("model.layers.2."),
              "lm_head": lambda name: name.startswith("lm_head."),
              "lm_head and norm": lambda name: name.startswith(("lm_head.", "model.norm."))}[trains]
    for name, p in model.named_parameters():
        p.requires_grad_(wanted(name))
    ids = torch.randint(0, spec["vocab_size"], (2, 64))
    with FlopCounterMode(display=False) as counted:
        model(input_ids=ids, labels=ids).loss.backward()
    assert pretrain.flops_per_token(model, 64) == pytest.approx(counted.get_total_flops() / ids.numel(), rel=0.02)


def test_freeze_settings_that_cannot_work_are_refused(base_model, tokenizer):
    with pytest.raises(pretrain.ConfigError, match="has 2 decoder layers. Use -2..2"):
        freeze_model(base_model, tokenizer, "--freeze_trainable_layers", "3")
    with pytest.raises(pretrain.ConfigError, match="no module embeddings outside the decoder layers.*embed_tokens"):
        freeze_model(base_model, tokenizer, "--freeze_extra_modules", "embeddings")
    with pytest.raises(pretrain.ConfigError, match="trains nothing"):
        freeze_model(base_model, tokenizer, "--freeze_trainable_layers", "0")
    with pytest.raises(pretrain.ConfigError, match="freeze_trainable_layers does not apply with expand_layers"):
        freeze_model(base_model, tokenizer, "--expand_layers", "1", "--freeze_trainable_layers", "1")
    with pytest.raises(pretrain.ConfigError, match="finetuning freeze keeps most weights of a pretrained model"):
        pretrain.parse_args(["--model_config", "configs/model/tiny.json", "--finetuning", "freeze"])


@pytest.mark.parametrize("kwargs,reentrant", [({}, False), ({"use_reentrant": False}, False),
                                               ({"use_reentrant": True}, True), ({"preserve_rng_state": False}, True)])
def test_gradient_checkpointing_backward_stops_at_the_lowest_trainable_layer(base_model, tokenizer, kwargs, reentrant):
    """transformers hooks the embedding output to require grad whenever it checkpoints; only reentrant
    checkpointing needs that (also torch's default when other kwargs leave use_reentrant out), and with it the
    backward would run through every frozen layer."""
    model = freeze_model(base_model, tokenizer, "--freeze_trainable_layers", "1")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)  # as the Trainer does
    model.train()
    args = pretrain.parse_args(["--use_cpu", "true", "--gradient_checkpointing", "true",
                                "--gradient_checkpointing_kwargs", json.dumps(kwargs)])[2]
    assert pretrain.reentrant_checkpointing(args) == reentrant
    pretrain.FrozenBelowCallback().on_train_begin(args, None, None, model=model)
    backward_through = []
    model.model.layers[0].register_full_backward_hook(lambda *_: backward_through.append(0))
    ids = torch.arange(1, 33).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert backward_through == ([0] if reentrant else [])  # reentrant needs the hooked inputs (and MFU counts it)
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_a_freeze_run_changes_only_what_trains_and_resumes_only_as_it_trained(tmp_path, base_model):
    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model, "--finetuning", "freeze", "--freeze_trainable_layers", 1,
            "--freeze_extra_modules", "norm", "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]),
            "--block_size", 32, "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--output_dir", out,
            "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--logging_steps", 1, "--save_steps", 2,
            "--report_to", "none", "--sample_prompts", "", "--gradient_checkpointing", "true"]
    run_pretrain([*args, "--max_steps", 4])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["finetuning"] == "freeze"
    assert metrics["model"]["trainable_parameters"] < metrics["model"]["parameters"] / 2
    base, trained = AutoModelForCausalLM.from_pretrained(base_model), AutoModelForCausalLM.from_pretrained(out)
    for name, weight in base.named_parameters():
        changed = not torch.equal(trained.get_parameter(name), weight)
        assert changed == name.startswith(("model.layers.1.", "model.norm.")), name

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    again = [resumed if a == out else a for a in args]
    run_pretrain([*again, "--max_steps", 4, "--resume_from_checkpoint", "auto"])
    losses = [logged_losses(d / "checkpoint-4") for d in (out, resumed)]
    assert losses[1][4] == pytest.approx(losses[0][4], rel=1e-4)
    other = [2 if a == 1 else a for a in again]  # two layers now: the optimizer state would not fit
    proc = run_pretrain([*other, "--max_steps", 6, "--resume_from_checkpoint", str(out / "checkpoint-2")], check=False)
    assert proc.returncode != 0 and "trained other parameters than this run would" in proc.stderr


def test_block_expansion_starts_from_the_base_models_outputs_and_trains_only_the_new_layers(base_model, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(base_model).eval()
    model = freeze_model(base_model, tokenizer, "--expand_layers", "2", "--freeze_extra_modules", "norm").eval()
    assert model.config.num_hidden_layers == 4  # 2 + 2: a copy after each layer
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    ids = torch.randint(0, len(tokenizer), (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # the copies add exactly zero
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name.split(".")[2] for name in trained if name.startswith("model.layers.")} == {"1", "3"}
    assert "model.norm.weight" in trained
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert not model.model.layers[3].self_attn.o_proj.weight.any()


def test_block_expansion_settings_that_cannot_work_are_refused(base_model, tokenizer):
    with pytest.raises(pretrain.ConfigError, match="has 2 decoder layers, which do not split into 3 equal groups. "
                                                   "Use one of 1, 2"):
        freeze_model(base_model, tokenizer, "--expand_layers", "3")
    for flags in (["--model_name_or_path", str(base_model)], ["--model_config", "configs/model/tiny.json",
                                                              "--finetuning", "freeze"]):
        with pytest.raises(pretrain.ConfigError, match="expand_layers 2: block expansion adds"):
            pretrain.parse_args([*flags, "--expand_layers", "2"])


def test_a_block_expansion_run_saves_the_grown_model_with_the_base_layers_unchanged(tmp_path, base_model):
    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model, "--finetuning", "freeze", "--expand_layers", 1,
            "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]), "--block_size", 32,
            "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--output_dir", out,
            "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--max_steps", 3, "--report_to", "none",
            "--sample_prompts", "", "--save_steps", 2, "--logging_steps", 1]
    run_pretrain(args)
    base, trained = AutoModelForCausalLM.from_pretrained(base_model), AutoModelForCausalLM.from_pretrained(out)
    assert trained.config.num_hidden_layers == 3  # the copy goes after the last of 2 layers
    for name, weight in base.named_parameters():
        assert torch.equal(trained.get_parameter(name), weight), name  # layers 0 and 1 stay the base's
    new = trained.model.layers[2]
    assert new.self_attn.o_proj.weight.any() and new.mlp.down_proj.weight.any()  # the copy learned
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["saved_model_check"]["max_abs_logit_diff"] == 0

    resumed = tmp_path / "resumed"  # the expansion is rebuilt, then the checkpoint's weights load into it
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_pretrain([resumed if a == out else a for a in args] + ["--resume_from_checkpoint", "auto"])
    losses = [logged_losses(d / "checkpoint-3") for d in (out, resumed)]
    assert losses[1][3] == pytest.approx(losses[0][3], rel=1e-4)
