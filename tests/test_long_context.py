"""Continued pretraining beyond the base model's context: rope_scaling (linear, yarn, llama3) and rope_theta change
the rotary embeddings before the weights load, and the saved model keeps them."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pretrain
from conftest import make_text_corpus
from test_end_to_end import run_pretrain


def build(base, tokenizer, block_size, *flags):
    args = pretrain.parse_args(["--model_name_or_path", str(base), *flags])[0]
    return pretrain.build_model(args, tokenizer, block_size)


def test_rope_settings_change_the_rotary_frequencies(base_model, tokenizer):
    original = build(base_model, tokenizer, 128)
    frequencies = original.model.rotary_emb.inv_freq
    with pytest.raises(pretrain.ConfigError, match="exceeds the model's max_position_embeddings 128. Lower "
                                                   "`block_size`, or set `rope_scaling: yarn`"):
        build(base_model, tokenizer, 256)

    linear = build(base_model, tokenizer, 256, "--rope_scaling", "linear")  # position interpolation: 256 -> 128
    assert linear.config.max_position_embeddings == 256
    assert linear.config.rope_parameters["rope_type"] == "linear" and linear.config.rope_parameters["factor"] == 2.0
    assert torch.allclose(linear.model.rotary_emb.inv_freq, frequencies / 2)

    yarn = build(base_model, tokenizer, 300, "--rope_scaling", "yarn")  # factor rounded up: 3
    rope = yarn.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 3.0, 128)
    assert yarn.config.max_position_embeddings == 384
    assert yarn.model.rotary_emb.attention_scaling > 1  # YaRN's temperature on the attention logits
    assert torch.equal(yarn.model.rotary_emb.inv_freq[0], frequencies[0])  # fast dimensions kept
    assert yarn.model.rotary_emb.inv_freq[-1] < frequencies[-1]  # slow ones interpolated

    llama3 = build(base_model, tokenizer, 512, "--rope_scaling", "llama3")  # Llama 3.1's, from 128 to 512
    rope = llama3.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"], rope["low_freq_factor"],
            rope["high_freq_factor"], llama3.config.max_position_embeddings) == ("llama3", 4.0, 128, 1.0, 4.0, 512)
    wavelengths = 2 * torch.pi / frequencies
    kept, scaled = wavelengths < 128 / 4, wavelengths > 128  # fast dimensions kept, slow ones / factor
    assert kept.any() and scaled.any()
    assert torch.equal(llama3.model.rotary_emb.inv_freq[kept], frequencies[kept])
    assert torch.allclose(llama3.model.rotary_emb.inv_freq[scaled], frequencies[scaled] / 4)

    theta = build(base_model, tokenizer, 128, "--rope_theta", "500000")
    assert theta.config.rope_parameters["rope_theta"] == 500000.0
    assert theta.model.rotary_emb.inv_freq[-1] < frequencies[-1]
    longer = build(base_model, tokenizer, 256, "--rope_theta", "500000")  # adjusted base frequency alone
    assert longer.config.max_position_embeddings == 256 and longer.config.rope_parameters["rope_type"] == "default"
    assert torch.equal(longer.model.rotary_emb.inv_freq, theta.model.rotary_emb.inv_freq)

    unchanged = build(base_model, tokenizer, 64, "--rope_scaling", "yarn")  # fits: nothing to scale
    assert unchanged.config.rope_parameters["rope_type"] == "default"
    with pytest.raises(pretrain.ConfigError, match="already scales its positions"):
        linear.save_pretrained(base_model.parent / "scaled")
        build(base_model.parent / "scaled", tokenizer, 1024, "--rope_scaling", "yarn")
    with pytest.raises(pretrain.ConfigError, match="rope_scaling must be linear, yarn or llama3"):
        pretrain.parse_args(["--rope_scaling", "ntk"])
    with pytest.raises(pretrain.ConfigError, match="frequencies that change from batch to batch.*yarn, linear or llama3"):
        pretrain.parse_args(["--rope_scaling", "dynamic"])


def test_rope_settings_are_refused_from_scratch(micro_model_config, tokenizer):
    args = pretrain.parse_args(["--model_config", str(micro_model_config), "--rope_scaling", "yarn"])[0]
    with pytest.raises(pretrain.ConfigError, match="from scratch, set max_position_embeddings"):
        pretrain.build_model(args, tokenizer, 256)


def test_a_yarn_run_at_twice_the_context_saves_a_model_that_keeps_it(tmp_path, base_model):
    corpus = make_text_corpus(tmp_path / "data", repeat=60)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model, "--rope_scaling", "yarn", "--rope_theta", 20000,
            "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]), "--block_size", 256,
            "--eval_fraction", 0.2, "--cache_dir", tmp_path / "cache", "--output_dir", out,
            "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, "--save_steps", 2, "--report_to", "none",
            "--sample_prompts", ""]
    run_pretrain([*args, "--max_steps", 2])
    saved = AutoModelForCausalLM.from_pretrained(out)
    rope = saved.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("yarn", 2.0, 20000.0)
    assert saved.config.max_position_embeddings == 256
    legacy = json.loads((out / "config.json").read_text())  # what readers on transformers 4 take
    assert (legacy["rope_theta"], legacy["rope_scaling"]["type"], legacy["rope_scaling"]["factor"]) == (20000.0, "yarn", 2.0)
    check = json.loads((out / "metrics.json").read_text())["model"]["saved_model_check"]
    assert len(check["probe_input_ids"]) == 256 and check["max_abs_logit_diff"] <= check["tolerance"]
    # a resume must apply the same positions: the checkpoint's config says which
    proc = run_pretrain([*[a for a in args if a not in ("--rope_theta", 20000)], "--max_steps", 4,
                         "--resume_from_checkpoint", str(out / "checkpoint-2")], check=False)
    assert proc.returncode != 0 and "rope_parameters" in proc.stderr and "another model shape" in proc.stderr
