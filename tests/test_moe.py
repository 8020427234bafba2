"""Mixture-of-experts models: the router's load-balancing loss trains with its weight counted once per step
(not once per micro-batch and rank), evaluation perplexity leaves it out, the saved model is for inference, and
FLOPs count the experts a token is routed to, not all of them."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pretrain
from conftest import make_text_corpus
from test_end_to_end import run_pretrain

MOE_SHAPES = {  # tiny: 8 experts, 2 per token
    "qwen2_moe": {"moe_intermediate_size": 48, "shared_expert_intermediate_size": 64, "num_experts": 8,
                  "num_experts_per_tok": 2},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {"moe_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2},
}


def moe_spec(model_type: str) -> dict:
    return {"model_type": model_type, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "tie_word_embeddings": False, **MOE_SHAPES[model_type]}


@pytest.mark.parametrize("model_type", sorted(MOE_SHAPES))
def test_flops_per_token_of_experts_is_what_torch_counts(model_type):
    """Only the routed experts' top-k share computes per token (a 30B-A3B model is not a 30B one in MFU).
    Eager experts: FlopCounterMode does not count the grouped matmuls of the default implementation."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**moe_spec(model_type)), attn_implementation="eager",
                                             experts_implementation="eager")
    ids = torch.randint(0, 512, (2, 64))
    with FlopCounterMode(display=False) as counted:
        model(input_ids=ids, labels=ids).loss.backward()
    assert pretrain.flops_per_token(model, 64) == pytest.approx(counted.get_total_flops() / ids.numel(), rel=0.01)


def moe_trainer(tmp_path, tokenizer, accumulation: int, coef: float = 0.5):
    model_args, data_args, training_args = pretrain.parse_args(
        ["--model_config", str(tmp_path / "moe.json"), "--moe_aux_loss_coef", str(coef), "--output_dir",
         str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none", "--eval_strategy", "no",
         "--gradient_accumulation_steps", str(accumulation)])
    model = pretrain.build_model(model_args, tokenizer, 32)
    trainer = pretrain.PretrainTrainer(model=model, args=training_args, processing_class=tokenizer,
                                       tokens_per_step=64, block_size=32, meter=None, data_plan={})
    trainer.current_gradient_accumulation_steps = accumulation
    return model, trainer


@pytest.mark.parametrize("ranks,accumulation", [(1, 1), (1, 4), (2, 1), (2, 4)])
def test_the_router_loss_counts_once_per_step_at_any_accumulation_and_ranks(tmp_path, tokenizer, monkeypatch,
                                                                           ranks, accumulation):
    """The model adds weight x router loss to a cross-entropy divided by the whole step's tokens, which the
    Trainer multiplies by the ranks and leaves undivided by the accumulation steps: each micro-batch's loss must
    be its share of the step's cross-entropy plus weight x router loss / accumulation steps (x4 x2 before)."""
    (tmp_path / "moe.json").write_text(json.dumps(moe_spec("qwen2_moe")))
    model, trainer = moe_trainer(tmp_path, tokenizer, accumulation)
    monkeypatch.setattr(trainer.accelerator.state, "num_processes", ranks)  # as on each of `ranks` alike ranks
    ids = torch.randint(3, 500, (2, 32))
    step_tokens = ids[:, 1:].numel() * accumulation * ranks  # what the Trainer counts over the step and ranks
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids}, num_items_in_batch=step_tokens)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # mean cross-entropy + 0.5 x router loss
        router = out.aux_loss
        cross_entropy = out.loss - 0.5 * router
    assert trainer.router_losses and float(trainer.router_losses[0]) == pytest.approx(float(router))
    assert float(loss) == pytest.approx(float(cross_entropy / accumulation + 0.5 * router / accumulation), rel=1e-5)


def test_moe_run_trains_the_router_loss_and_evaluates_without_it(tmp_path, tokenizer_dir, monkeypatch):
    """Two runs alike but for the router loss's weight: their step-0 evaluations agree (perplexity leaves the
    router loss out), their first logged losses differ by weight x the logged router loss, the saved model does
    not compute it, and MFU's FLOPs count 2 of the 8 experts."""
    (tmp_path / "moe.json").write_text(json.dumps(moe_spec("qwen2_moe")))
    corpus = make_text_corpus(tmp_path / "data", repeat=20)
    runs = {}
    for coef in (0, 0.5):
        out = tmp_path / f"out{coef}"
        run_pretrain(["--model_config", tmp_path / "moe.json", "--tokenizer_name_or_path", tokenizer_dir,
                      "--moe_aux_loss_coef", coef, "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]),
                      "--block_size", 32, "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--output_dir",
                      out, "--max_steps", 2, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2,
                      "--logging_steps", 1, "--save_steps", 2, "--report_to", "none", "--sample_prompts", "[]"])
        history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        runs[coef] = ({h["step"]: h for h in history if "loss" in h}, next(h for h in history if "eval_loss" in h),
                      json.loads((out / "metrics.json").read_text()), json.loads((out / "config.json").read_text()))
    (plain, plain_eval, plain_metrics, _), (routed, routed_eval, metrics, config) = runs[0], runs[0.5]
    assert routed_eval["step"] == 0 and routed_eval["eval_loss"] == pytest.approx(plain_eval["eval_loss"], rel=1e-6)
    assert "router_aux_loss" not in plain[1] and routed[1]["router_aux_loss"] > 0.5  # ~1 when balanced
    assert routed[1]["loss"] - plain[1]["loss"] == pytest.approx(0.5 * routed[1]["router_aux_loss"], rel=0.02)
    assert config["output_router_logits"] is False and config["router_aux_loss_coef"] == 0.5
    experts = 2 * 8 * (2 * 48 * 64 + 64 * 48)  # layers x experts x (gate_up + down) weights
    assert plain_metrics["train"]["flops_per_token"] == metrics["train"]["flops_per_token"]
    monkeypatch.setattr(pretrain, "expert_shares", lambda model: {})  # every expert counted whole
    every_expert = pretrain.flops_per_token(AutoModelForCausalLM.from_pretrained(tmp_path / "out0"), 32)
    assert metrics["train"]["flops_per_token"] == pytest.approx(every_expert - 6 * experts * (1 - 2 / 8))


def test_the_router_loss_weight_is_for_models_that_have_one(tmp_path, tokenizer, micro_model_config):
    with pytest.raises(pretrain.ConfigError, match="moe_aux_loss_coef must be 0"):
        pretrain.parse_args(["--moe_aux_loss_coef", "-1"])
    args = pretrain.parse_args(["--model_config", str(micro_model_config), "--moe_aux_loss_coef", "0.01"])[0]
    with pytest.raises(pretrain.ConfigError, match=r"the model \(llama\) has no router load-balancing loss"):
        pretrain.build_model(args, tokenizer, 32)


def test_lora_on_all_linear_adapts_fused_experts_and_merges_them(tmp_path, tokenizer_dir):
    """peft adapts Qwen3-MoE's fused expert weights as parameters (target_parameters), which take no dropout:
    lora_dropout unset is 0 there, and a set one is refused with the fix instead of peft's error."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**moe_spec("qwen3_moe"))).save_pretrained(base)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(base)
    corpus = make_text_corpus(tmp_path / "data", repeat=20)
    lora = ["--model_name_or_path", base, "--finetuning", "lora", "--lora_rank", 4, "--sources",
            json.dumps([{"name": "notes", "path": str(corpus)}]), "--block_size", 32, "--eval_fraction", 0.1,
            "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "lora", "--max_steps", 2, "--report_to",
            "none", "--sample_prompts", "[]"]
    proc = run_pretrain([*lora, "--lora_dropout", 0.1], check=False)
    assert proc.returncode == 2 and "lora_dropout 0.1: peft adapts this mixture-of-experts model's experts" in proc.stderr
    proc = run_pretrain(lora)
    assert "the routed experts' weights: adapted too (down_proj, gate.weight, gate_up_proj)" in proc.stderr
    adapter = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0 and {"gate_up_proj", "down_proj"} <= set(adapter["target_parameters"])
    check = json.loads((tmp_path / "lora" / "metrics.json").read_text())["model"]["saved_model_check"]
    assert check["max_abs_logit_diff"] <= check["tolerance"]  # the merged model computes what the adapted one did
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    delta = merged.model.layers[0].mlp.experts.gate_up_proj - AutoModelForCausalLM.from_pretrained(
        base).model.layers[0].mlp.experts.gate_up_proj
    assert delta.abs().max() > 0  # the experts learned
