"""finetuning lora: adapters on a frozen base, new tokens' rows trainable, a merged model that loads with
AutoModelForCausalLM (and the adapter alone), resume from adapter checkpoints, honest FLOPs."""
import json
import shutil
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pretrain
from conftest import logged_losses, make_text_corpus
from test_end_to_end import run_pretrain


def lora_args(base, *extra):
    return pretrain.parse_args(["--model_name_or_path", str(base), "--finetuning", "lora", "--lora_rank", "4",
                                *extra])[0]


def test_lora_run_saves_a_merged_model_and_the_adapter(tmp_path, base_model):
    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model, "--finetuning", "lora", "--lora_rank", 4, "--sources",
            json.dumps([{"name": "notes", "path": str(corpus)}]), "--block_size", 32, "--eval_fraction", 0.1,
            "--cache_dir", tmp_path / "cache", "--output_dir", out, "--per_device_train_batch_size", 4,
            "--learning_rate", 1e-2, "--logging_steps", 1, "--eval_steps", 2, "--save_steps", 2, "--report_to",
            "none", "--sample_prompts", "高血压是", "--sample_max_new_tokens", 4, "--gradient_checkpointing", "true"]
    run_pretrain([*args, "--max_steps", 4])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(base_model)  # absolute: found from anywhere
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["finetuning"] == "lora" and metrics["train"]["steps"] == 4 and metrics["samples"]
    assert metrics["model"]["trainable_parameters"] < metrics["model"]["parameters"] / 4
    check = metrics["model"]["saved_model_check"]  # the merged, reloaded model gives the trained model's logits
    assert check["max_abs_logit_diff"] <= check["tolerance"]

    # resumed from its adapter checkpoint at step 2, the run takes the same steps as the one never stopped
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_pretrain([*[resumed if a == out else a for a in args], "--max_steps", 4, "--resume_from_checkpoint", "auto"])
    losses = [logged_losses(d / "checkpoint-4") for d in (out, resumed)]
    assert losses[1][3] == pytest.approx(losses[0][3], rel=1e-4) and losses[1][4] == pytest.approx(losses[0][4], rel=1e-4)

    base = AutoModelForCausalLM.from_pretrained(base_model)
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain model: the adapters are merged in
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for name, weight in base.named_parameters():
        delta = merged.get_parameter(name) - weight
        if name.endswith(("q_proj.weight", "down_proj.weight")):  # adapted: a change of rank at most 4
            assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 4, name
        elif "proj" not in name:  # embeddings, norms, head: frozen, and no new tokens
            assert torch.equal(delta, torch.zeros_like(delta)), name


def with_new_tokens(base_model):
    """The base model's tokenizer with 3 tokens beyond its embedding rows (the model's own tokenizer, so only
    tokens past its rows count as new), and the number of rows."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    rows = AutoModelForCausalLM.from_pretrained(base_model).get_input_embeddings().num_embeddings
    tokenizer.add_tokens([f"新词{i}" for i in range(rows - len(tokenizer) + 3)])
    return tokenizer, rows


def test_new_tokens_train_their_rows_only(tmp_path, base_model):
    tokenizer, rows = with_new_tokens(base_model)
    model = pretrain.build_model(lora_args(base_model), tokenizer, 32)
    new = list(range(rows, len(tokenizer)))
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    ids = torch.tensor([[5, new[0], 7, new[1], 9, new[2], 11, 12]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = model.merge_and_unload()
    for matrix, name in ((merged.get_input_embeddings().weight, "embed_tokens"),
                         (merged.get_output_embeddings().weight, "lm_head")):
        old = next(v for k, v in before.items() if name in k and k.endswith("weight"))
        assert torch.equal(matrix[:rows], old[:rows]), name  # base tokens' rows untouched
        assert not torch.allclose(matrix[new], old[new]), name  # the new tokens learned


def test_extra_modules_train_whole_beside_the_adapters_and_merge(tmp_path, base_model, micro_model_config):
    """lora_extra_modules (MedicalGPT's modules_to_save, LLaMA-Factory's additional_target): Chinese-LLaMA's LoRA
    stage with whole embedding matrices training; merged into the saved model; FLOPs as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    tokenizer, rows = with_new_tokens(base_model)
    model = pretrain.build_model(lora_args(base_model, "--lora_extra_modules", "embed_tokens,lm_head",
                                           "--attn_implementation", "eager"), tokenizer, 32)  # (matmuls torch counts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.model.embed_tokens.modules_to_save.default.weight",
                         "base_model.model.lm_head.modules_to_save.default.weight"}  # whole: no rows of their own
    full = pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model)])[0], tokenizer, 32)
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert pretrain.parameter_counts(model)[0] == sum(p.numel() for p in full.parameters()) + adapters  # copies: none
    ids = torch.randint(3, len(tokenizer), (2, 32))
    with FlopCounterMode(display=False) as counted:
        model(input_ids=ids, labels=ids).loss.backward()
    assert pretrain.flops_per_token(model, 32) == pytest.approx(counted.get_total_flops() / ids.numel(), rel=0.02)

    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    run_pretrain(["--model_name_or_path", base_model, "--finetuning", "lora", "--lora_rank", 4, "--lora_extra_modules",
                  "embed_tokens,lm_head", "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]),
                  "--block_size", 32, "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--output_dir", out,
                  "--max_steps", 3, "--learning_rate", 1e-2, "--report_to", "none", "--sample_prompts", "[]"])
    check = json.loads((out / "metrics.json").read_text())["model"]["saved_model_check"]
    assert check["max_abs_logit_diff"] <= check["tolerance"]
    base, merged = (AutoModelForCausalLM.from_pretrained(d) for d in (base_model, out))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # every row seen in training moved, not new ones only
        changed = (merged.get_parameter(name) != base.get_parameter(name)).any(dim=1)
        assert changed.sum() > 100, name
    import peft

    tied = pretrain.parse_args(["--model_config", str(micro_model_config)])[0]
    tied_dir = tmp_path / "tied"
    tied_model = pretrain.build_model(tied, tokenizer, 32)
    tied_model.save_pretrained(tied_dir)
    tokenizer.save_pretrained(tied_dir)
    with pytest.raises(pretrain.ConfigError, match="ties its output head to its input embeddings .* untie them"):
        pretrain.build_model(lora_args(tied_dir, "--lora_extra_modules", "embed_tokens"), tokenizer, 32)
    peft.get_peft_model(tied_model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
                        ).save_pretrained(tmp_path / "tied_adapter")  # made elsewhere: refused the same way
    with pytest.raises(pretrain.ConfigError, match="trains embed_tokens whole, and this model ties its output head"):
        pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(tied_dir), "--finetuning", "lora",
                                                  "--adapter_name_or_path", str(tmp_path / "tied_adapter")])[0],
                             tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="lora_extra_modules: no module embeddings outside the decoder"):
        pretrain.build_model(lora_args(base_model, "--lora_extra_modules", "embeddings"), tokenizer, 32)


def test_a_saved_adapter_trains_on_from_where_its_run_ended(tmp_path, base_model):
    """adapter_name_or_path (MedicalGPT's --peft_path, LLaMA-Factory's adapter_name_or_path): the next stage starts
    from the adapter, not from new ones; its shape is its own; rows of new tokens must be the adapter's."""
    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    args = ["--model_name_or_path", base_model, "--finetuning", "lora", "--sources",
            json.dumps([{"name": "notes", "path": str(corpus)}]), "--block_size", 32, "--eval_fraction", 0.1,
            "--cache_dir", tmp_path / "cache", "--max_steps", 2, "--learning_rate", 1e-2, "--report_to", "none",
            "--sample_prompts", "[]"]
    run_pretrain([*args, "--lora_rank", 4, "--output_dir", tmp_path / "one"])
    run_pretrain([*args, "--adapter_name_or_path", tmp_path / "one" / "adapter", "--output_dir", tmp_path / "two"])
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["eval"]["final"]["eval_loss"] < one["eval"]["before_training"]["eval_loss"]  # (new adapters: the base's)
    assert two["eval"]["before_training"]["eval_loss"] == pytest.approx(one["eval"]["final"]["eval_loss"], rel=1e-5)
    assert two["eval"]["final"]["eval_loss"] < two["eval"]["before_training"]["eval_loss"]
    assert json.loads((tmp_path / "two" / "adapter" / "adapter_config.json").read_text())["r"] == 4  # its own rank
    check = two["model"]["saved_model_check"]
    assert check["max_abs_logit_diff"] <= check["tolerance"]
    proc = run_pretrain([*args, "--adapter_name_or_path", tmp_path / "one" / "adapter", "--lora_rank", 8,
                         "--output_dir", tmp_path / "three"], check=False)
    assert proc.returncode == 2 and "lora_rank: the adapter" in proc.stderr and "trains on with its own shape" in proc.stderr
    tokenizer, _ = with_new_tokens(base_model)
    with pytest.raises(pretrain.ConfigError, match=r"trained embedding rows for token ids none, and this run's "
                                                   r"tokenizer adds 3 tokens"):
        pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model), "--finetuning", "lora",
                                                  "--adapter_name_or_path", str(tmp_path / "one" / "adapter")])[0],
                             tokenizer, 32)
    # an adapter that trained the embedding matrices whole (lora_extra_modules) on an extended vocabulary holds its
    # new tokens' rows in them: it goes on with that vocabulary (its run's tokenizer), and not with another
    with_rows = ["--model_name_or_path", str(base_model), "--finetuning", "lora"]
    model = pretrain.build_model(pretrain.parse_args([*with_rows, "--lora_rank", "4", "--lora_extra_modules",
                                                      "embed_tokens,lm_head"])[0], tokenizer, 32)
    model.save_pretrained(tmp_path / "whole")
    resumed = pretrain.build_model(pretrain.parse_args([*with_rows, "--adapter_name_or_path", str(tmp_path / "whole")])[0],
                                   tokenizer, 32)
    assert resumed.get_input_embeddings().modules_to_save["default"].weight.requires_grad
    with pytest.raises(pretrain.ConfigError, match=r"trains embedding matrices of \d+ rows, and this run's model has"):
        pretrain.build_model(pretrain.parse_args([*with_rows, "--adapter_name_or_path", str(tmp_path / "whole")])[0],
                             AutoTokenizer.from_pretrained(base_model), 32)
    with pytest.raises(pretrain.ConfigError, match="no module model outside the decoder layers"):  # (no weights of its own)
        pretrain.build_model(lora_args(base_model, "--lora_extra_modules", "model"), tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="holds no readable adapter_config.json"):
        pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model), "--finetuning", "lora",
                                                  "--adapter_name_or_path", str(tmp_path / "one")])[0],
                             AutoTokenizer.from_pretrained(base_model), 32)


def test_flops_count_frozen_weights_without_their_gradients(base_model, tokenizer):
    full = pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model)])[0], tokenizer, 32)
    lora = pretrain.build_model(lora_args(base_model), tokenizer, 32)
    embedding = full.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in full.parameters()) - embedding  # untied: the lookup does no matmul
    attention = 12 * full.config.num_hidden_layers * full.config.hidden_size * 32
    assert pretrain.flops_per_token(full, 32) == 6 * n + attention
    adapters = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert pretrain.flops_per_token(lora, 32) == 4 * (n + adapters) + 2 * adapters + attention

    tokenizer, _ = with_new_tokens(base_model)  # their rows train: gradients, but no matmul of their own
    full = pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model)])[0], tokenizer, 32)
    lora = pretrain.build_model(lora_args(base_model), tokenizer, 32)
    n = sum(p.numel() for p in full.parameters()) - full.get_input_embeddings().weight.numel()
    # the output head's rows: peft computes the head with the whole matrix, so its gradient is a full matmul (the
    # input lookup does no matmul)
    head = full.get_output_embeddings().weight.numel()
    assert pretrain.flops_per_token(lora, 32) == 4 * (n + adapters) + 2 * (adapters + head) + attention
    total, trainable, _ = pretrain.parameter_counts(lora)
    assert total == sum(p.numel() for p in full.parameters()) + adapters  # the rows' copies are no new parameters
    assert trainable == adapters + 2 * 3 * full.config.hidden_size
    from torch.utils.flop_counter import FlopCounterMode

    eager = pretrain.build_model(lora_args(base_model, "--attn_implementation", "eager"), tokenizer, 32)
    ids = torch.randint(3, len(tokenizer), (2, 32))
    with FlopCounterMode(display=False) as counted:
        eager(input_ids=ids, labels=ids).loss.backward()
    # (the formula counts activation gradients into the lowest layer's frozen q/k/v that do not run: +4% here)
    assert pretrain.flops_per_token(eager, 32) == pytest.approx(counted.get_total_flops() / ids.numel(), rel=0.05)


def test_lora_settings_that_cannot_work_are_refused(tmp_path, base_model, micro_model_config, tokenizer):
    with pytest.raises(pretrain.ConfigError, match="adapts a pretrained model"):
        pretrain.build_model(pretrain.parse_args(["--model_config", str(micro_model_config), "--finetuning",
                                                  "lora"])[0], tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="lora_target `nothing_here`"):
        pretrain.build_model(lora_args(base_model, "--lora_target", "nothing_here"), tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match=r"lora_target `q_proj,v_porj`: `v_porj` name\(s\) no module of "
                                                   r"this model. Its linear layers: down_proj, .*v_proj"):
        pretrain.build_model(lora_args(base_model, "--lora_target", "q_proj,v_porj"), tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="finetuning must be one of"):
        pretrain.parse_args(["--finetuning", "qlora"])
    checkpoint = tmp_path / "checkpoint-2"  # a full-weights checkpoint resumed as LoRA, and the reverse
    checkpoint.mkdir()
    lora = pretrain.build_model(lora_args(base_model), tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="holds full weights but this run has finetuning lora"):
        pretrain.check_resume_matches(str(checkpoint), lora, tokenizer)
    saved = lora.peft_config["default"].to_dict()
    for changed, message in (({"r": 8}, "lora_rank 8 -> 4"), ({"lora_alpha": 64}, "lora_alpha 64.0 -> 8.0"),
                             ({"target_modules": ["q_proj"]}, r"lora_target \['q_proj'\] -> ")):
        (checkpoint / "adapter_config.json").write_text(json.dumps({**saved, **changed}, default=list))
        with pytest.raises(pretrain.ConfigError, match=f"other settings \\({message}"):
            pretrain.check_resume_matches(str(checkpoint), lora, tokenizer)
    (checkpoint / "adapter_config.json").write_text(json.dumps(saved, default=list))
    pretrain.check_resume_matches(str(checkpoint), lora, tokenizer)  # the same settings resume
    full = pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model)])[0], tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="holds LoRA adapters but this run has finetuning full"):
        pretrain.check_resume_matches(str(checkpoint), full, tokenizer)
    frozen = pretrain.build_model(pretrain.parse_args(["--model_name_or_path", str(base_model), "--finetuning",
                                                       "freeze"])[0], tokenizer, 32)
    with pytest.raises(pretrain.ConfigError, match="holds LoRA adapters but this run has finetuning freeze"):
        pretrain.check_resume_matches(str(checkpoint), frozen, tokenizer)


def test_lora_on_embedding_matrices_is_refused_where_it_cannot_be_merged_or_wrapped(
        tmp_path_factory, base_model, micro_model_config, tokenizer_dir):
    """A tied head is the input embedding: a merged lm_head adapter would change both (logits off by 1.4 in
    the reproduction). New tokens' rows wrap those modules already (peft's trainable tokens)."""
    from conftest import save_base_model

    tied = save_base_model(tmp_path_factory, micro_model_config, tokenizer_dir, tie_word_embeddings=True)
    for target in ("q_proj,lm_head", "q_proj,model.embed_tokens"):
        with pytest.raises(pretrain.ConfigError, match="ties its output head to its input embeddings"):
            pretrain.build_model(lora_args(tied, "--lora_target", target), AutoTokenizer.from_pretrained(tied), 32)
    with pytest.raises(pretrain.ConfigError, match="embed_tokens: the run adds 3 new tokens"):
        pretrain.build_model(lora_args(base_model, "--lora_target", "q_proj,embed_tokens"),
                             with_new_tokens(base_model)[0], 32)
    untied = pretrain.build_model(lora_args(base_model, "--lora_target", "q_proj,lm_head"),
                                  AutoTokenizer.from_pretrained(base_model), 32)  # an untied head can take one
    assert any("lm_head.lora_A" in name for name, _ in untied.named_parameters())


def test_lora_refuses_fsdp_and_fused_losses_that_miss_its_rows(base_model):
    model = pretrain.build_model(lora_args(base_model), with_new_tokens(base_model)[0], 32)  # untied head: wrapped
    settings = dict(deepspeed=None, fsdp="", use_liger_kernel=False, loraplus_lr_ratio=None, use_muon=False,
                    metric_for_best_model=None)
    with pytest.raises(pretrain.ConfigError, match="lora under FSDP.*ds_zero3.json"):
        pretrain.preflight(types.SimpleNamespace(**{**settings, "fsdp": "full_shard"}), None, model, 0)
    with pytest.raises(pretrain.ConfigError, match="drop use_liger_kernel"):
        pretrain.preflight(types.SimpleNamespace(**{**settings, "use_liger_kernel": True}), None, model, 0)
    chunked = pretrain.parse_args(["--chunked_loss", "true", "--use_cpu", "true"])[2]
    with pytest.raises(pretrain.ConfigError, match="drop chunked_loss"):
        pretrain.use_chunked_loss(model, chunked)
    plain = pretrain.build_model(lora_args(base_model), AutoTokenizer.from_pretrained(base_model), 32)
    pretrain.use_chunked_loss(plain, chunked)  # no new tokens: the head stays plain, the fused loss applies
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.isfinite(plain(input_ids=ids, labels=ids).loss)


def test_bf16_base_with_lora_then_a_full_run_in_the_same_output_dir(tmp_path, base_model):
    """Frozen bf16 weights with fp32 adapters: the merge rounds W + BA to bf16, which the saved-model
    check allows for; a later full run into the same output_dir leaves no stale adapter/ behind."""
    from safetensors import safe_open

    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model, "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]),
            "--block_size", 32, "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--output_dir", out,
            "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--max_steps", 2, "--save_steps", 2,
            "--report_to", "none", "--sample_prompts", ""]
    run_pretrain([*args, "--finetuning", "lora", "--lora_rank", 4, "--torch_dtype", "bfloat16"])
    check = json.loads((out / "metrics.json").read_text())["model"]["saved_model_check"]
    assert 0 < check["max_abs_logit_diff"] <= check["tolerance"]
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # adapters train in fp32
    assert AutoModelForCausalLM.from_pretrained(out).config.dtype == torch.bfloat16
    run_pretrain(args)
    assert not (out / "adapter").exists()


def test_qlora_trains_on_4bit_weights_and_saves_the_merge_into_unquantized_ones(tmp_path, base_model_64):
    """quantization_bit 4: the frozen linear layers are NF4 while the adapters and new tokens' rows train;
    the saved model is the base loaded again in float32 with the adapters merged in (not rounded 4-bit
    weights), checked against that merge and compared with the quantized model on a held-out block; a
    QLoRA checkpoint resumes exactly."""
    pytest.importorskip("bitsandbytes")
    tokenizer, rows = with_new_tokens(base_model_64)
    quantized = pretrain.build_model(lora_args(base_model_64, "--quantization_bit", "4"), tokenizer, 32)
    plain = pretrain.build_model(lora_args(base_model_64), tokenizer, 32)
    assert pretrain.is_quantized(quantized) and not pretrain.is_quantized(plain)
    assert type(quantized.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    assert pretrain.parameter_counts(quantized)[:2] == pretrain.parameter_counts(plain)[:2]  # 4-bit weights counted
    assert pretrain.flops_per_token(quantized, 32) == pretrain.flops_per_token(plain, 32)  # as the weights they are
    assert pretrain.parameter_counts(quantized)[2] < pretrain.parameter_counts(plain)[2]  # stored in fewer bytes

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model_64, "--tokenizer_name_or_path", tokenizer_dir, "--finetuning", "lora",
            "--lora_rank", 4, "--quantization_bit", 4, "--sources", json.dumps([{"name": "notes", "path": str(corpus)}]),
            "--block_size", 32, "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--output_dir", out,
            "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--logging_steps", 1, "--eval_steps", 2,
            "--save_steps", 2, "--report_to", "none", "--sample_prompts", "高血压是", "--sample_max_new_tokens", 4]
    run_pretrain([*args, "--max_steps", 4])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] and metrics["train"]["steps"] == 4
    check = metrics["model"]["saved_model_check"]
    assert check["max_abs_logit_diff"] <= check["tolerance"]  # the saved model is the merge it claims to be
    gap = check["quantization"]  # and it scores the held-out block about as the 4-bit model did
    assert gap["probe_loss_saved"] == pytest.approx(gap["probe_loss_quantized"], rel=0.05)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(base_model_64)
    assert merged.config.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.get_input_embeddings().num_embeddings > rows  # the new tokens' rows are in it
    delta = merged.get_parameter("model.layers.0.mlp.down_proj.weight") - base.get_parameter(
        "model.layers.0.mlp.down_proj.weight")
    assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 4  # full-precision base + a rank-4 update
    assert torch.equal(merged.get_parameter("model.norm.weight"), base.get_parameter("model.norm.weight"))

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_pretrain([*[resumed if a == out else a for a in args], "--max_steps", 4, "--resume_from_checkpoint", "auto"])
    losses = [logged_losses(d / "checkpoint-4") for d in (out, resumed)]
    assert losses[1][4] == pytest.approx(losses[0][4], rel=1e-4)


def test_quantization_settings_that_cannot_work_are_refused(base_model):
    with pytest.raises(pretrain.ConfigError, match="cannot be trained directly. Set `finetuning: lora`"):
        pretrain.parse_args(["--model_name_or_path", str(base_model), "--quantization_bit", "4"])
    with pytest.raises(pretrain.ConfigError, match="quantization_bit must be 4 or 8"):
        lora_args(base_model, "--quantization_bit", "3")
    with pytest.raises(pretrain.ConfigError, match="quantization_type must be one of nf4, fp4"):
        lora_args(base_model, "--quantization_bit", "4", "--quantization_type", "int4")
    with pytest.raises(pretrain.ConfigError, match="quantization_type, double_quantization only apply with "
                                                   "`quantization_bit`"):
        lora_args(base_model, "--quantization_type", "fp4", "--double_quantization", "false")
    qlora = lora_args(base_model, "--quantization_bit", "4", "--quantization_type", "fp4", "--double_quantization",
                      "false", "--attn_implementation", "eager")
    merge = pretrain.unquantized_args(qlora)  # the base loaded again for the merge at the end
    assert (merge.quantization_bit, merge.attn_implementation, merge.finetuning) == (None, "sdpa", "lora")


def test_rslora_scales_by_the_root_of_the_rank_and_dora_merges_exactly(base_model, tokenizer, tmp_path):
    rs = pretrain.build_model(lora_args(base_model, "--use_rslora", "true"), tokenizer, 32)
    layer = rs.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 4 ** 0.5)  # default alpha 16 over sqrt(rank 4)
    plain = pretrain.build_model(lora_args(base_model), tokenizer, 32)
    assert plain.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)
    checkpoint = tmp_path / "checkpoint-2"  # an rsLoRA checkpoint does not resume as plain LoRA
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text(json.dumps(rs.peft_config["default"].to_dict(), default=list))
    with pytest.raises(pretrain.ConfigError, match="use_rslora True -> False"):
        pretrain.check_resume_matches(str(checkpoint), plain, tokenizer)

    dora = pretrain.build_model(lora_args(base_model, "--use_dora", "true"), tokenizer, 32)
    assert any("lora_magnitude_vector" in name for name, p in dora.named_parameters() if p.requires_grad)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    optimizer = torch.optim.AdamW([p for p in dora.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        dora(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dora.eval()
    with torch.no_grad():
        trained = dora(input_ids=ids).logits
        merged = dora.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(trained, merged, atol=1e-4)


def test_qlora_gradients_match_the_dequantized_model_also_after_an_evaluation(base_model_64, tokenizer):
    """The 4-bit layers' backward gives the gradients of the weights they hold (dequantized), also after an
    evaluation's forward without grad, after which bitsandbytes would repack the weights for CPU inference
    (and get the backward wrong) unless told not to."""
    bnb = pytest.importorskip("bitsandbytes")
    quantized = pretrain.build_model(lora_args(base_model_64, "--quantization_bit", "4", "--lora_dropout", "0"),
                                     tokenizer, 32)
    plain = pretrain.build_model(lora_args(base_model_64, "--lora_dropout", "0"), tokenizer, 32)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name).weight.data.copy_(weight)
    torch.manual_seed(0)
    for model in (quantized, plain):  # the same non-zero adapters in both
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 4])
    grads = []
    for model in (quantized, plain):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)  # an evaluation first
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[1].items():
        assert torch.allclose(grads[0][name], grad, rtol=1e-3, atol=1e-6), name


def test_loraplus_gives_the_b_matrices_their_own_faster_groups_through_a_run(tmp_path, base_model, tokenizer):
    model = pretrain.build_model(lora_args(base_model), tokenizer, 32)
    _, _, training_args = pretrain.parse_args(["--output_dir", str(tmp_path), "--learning_rate", "1e-3",
                                               "--loraplus_lr_ratio", "16", "--use_cpu", "true"])
    optimizer_cls, kwargs = pretrain.optimizer_of(training_args, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls([{"params": trainable, "weight_decay": 0.0}], **kwargs)
    assert str(optimizer_cls) == str(torch.optim.AdamW)  # what the Trainer's checks read (8-bit Adam's embeddings)
    b = {id(p) for name, p in model.named_parameters() if "lora_B" in name}
    assert b and len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["lr"] == (16e-3 if all(id(p) in b for p in group["params"]) else 1e-3)
        assert all((id(p) in b) == (group["lr"] == 16e-3) for p in group["params"])

    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    out = tmp_path / "out"
    args = ["--model_name_or_path", base_model, "--finetuning", "lora", "--lora_rank", 4, "--sources",
            json.dumps([{"name": "notes", "path": str(corpus)}]), "--block_size", 32, "--cache_dir",
            tmp_path / "cache", "--output_dir", out, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3,
            "--max_steps", 2, "--save_steps", 2, "--warmup_steps", 0, "--lr_scheduler_type", "constant",
            "--report_to", "none", "--sample_prompts", ""]
    run_pretrain([*args, "--loraplus_lr_ratio", 16])
    groups = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([1e-3, 16e-3])
    for other in ([], ["--loraplus_lr_ratio", 4]):  # the optimizer state holds the groups and rates of the first
        proc = run_pretrain([*args, "--max_steps", 3, "--resume_from_checkpoint", "auto", *other], check=False)
        assert proc.returncode == 2 and "trained with loraplus_lr_ratio 16.0, this run has" in proc.stderr

    with pytest.raises(pretrain.ConfigError, match="loraplus_lr_ratio speeds up LoRA's B matrices"):
        run_args = pretrain.parse_args(["--output_dir", str(tmp_path), "--loraplus_lr_ratio", "16"])[2]
        pretrain.preflight(run_args, None, AutoModelForCausalLM.from_pretrained(base_model), 0)


def test_lora_under_zero3_refuses_quantized_bases_and_new_tokens_on_the_cpu(base_model, monkeypatch):
    """ZeRO-3 partitions the base model: 4-bit weights cannot be partitioned, and peft gathers new tokens'
    partitioned rows on CUDA devices only (the rest of LoRA under ZeRO-3 is tested on 2 processes)."""
    import transformers.integrations.deepspeed as hf_deepspeed

    try:
        with pytest.raises(pretrain.ConfigError, match=r"quantization_bit \(QLoRA\) under DeepSpeed ZeRO-3.*ds_zero2"):
            pretrain.parse_args(["--model_name_or_path", str(base_model), "--finetuning", "lora", "--quantization_bit",
                                 "4", "--deepspeed", "deepspeed/ds_zero3.json", "--use_cpu", "true"])
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    assert not pretrain.is_deepspeed_zero3_enabled()
    monkeypatch.setattr(pretrain, "is_deepspeed_zero3_enabled", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    with pytest.raises(pretrain.ConfigError, match="lora with 2 new tokens under DeepSpeed ZeRO-3 on cpu"):
        pretrain.add_lora(model, lora_args(base_model), [600, 601], gradient_checkpointing=False)
    # matrices that train whole hold the new tokens' rows: no rows of their own to gather
    whole = pretrain.add_lora(model, lora_args(base_model, "--lora_extra_modules", "embed_tokens,lm_head"), [598, 599],
                              gradient_checkpointing=False)
    assert not whole.peft_config["default"].trainable_token_indices
