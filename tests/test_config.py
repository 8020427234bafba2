"""YAML + command-line arguments: every field settable, CLI wins, mistakes named precisely."""
import json
import shutil

import pytest
import yaml

import pretrain
from pretrain import ConfigError


def write_config(tmp_path, **fields):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_yaml_sets_fields_of_all_three_dataclasses(tmp_path):
    config = write_config(tmp_path, model_config="configs/model/tiny.json", block_size=64, learning_rate=1.0e-3,
                          output_dir=str(tmp_path / "out"), sources=[{"path": "data/", "name": "all"}],
                          sample_prompts=["a", "b"], use_cpu=True)
    model_args, data_args, training_args = pretrain.parse_args([config])
    assert model_args.model_config == "configs/model/tiny.json"
    assert data_args.block_size == 64
    assert data_args.sources == [{"path": "data/", "name": "all"}]
    assert training_args.learning_rate == 1e-3
    assert training_args.sample_prompts == ["a", "b"]
    assert training_args.lr_scheduler_type.value == "cosine"  # pretraining default


def test_command_line_overrides_yaml(tmp_path):
    config = write_config(tmp_path, block_size=64, learning_rate=1.0e-3, output_dir=str(tmp_path / "out"))
    _, data_args, training_args = pretrain.parse_args(
        [config, "--block_size", "32", "--learning_rate=5e-4", "--sources", "[{path: data/x.txt}]"])
    assert data_args.block_size == 32
    assert training_args.learning_rate == 5e-4
    assert data_args.sources == [{"path": "data/x.txt"}]


def test_a_yaml_no_is_the_choice_no_where_there_is_one(tmp_path):
    """YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` failed as `invalid choice: 'false'`."""
    path = tmp_path / "run.yaml"
    path.write_text("save_strategy: no\neval_strategy: no\nlogging_strategy: no\nmixed_precision: no\n"
                    f"output_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    training_args = pretrain.parse_args([str(path)])[2]
    assert [str(getattr(training_args, k)).split(".")[-1].lower() for k in pretrain.NO_CHOICE] == ["no"] * 4


def test_null_in_the_config_file_means_none_not_the_default(tmp_path):
    """`save_total_limit: null` (keep every checkpoint) was dropped, and the default of 3 deleted checkpoints."""
    config = write_config(tmp_path, save_total_limit=None, eval_steps=None, max_eval_tokens=None, block_size=64,
                          output_dir=str(tmp_path / "out"))
    _, data_args, training_args = pretrain.parse_args([config])
    assert training_args.save_total_limit is None and data_args.max_eval_tokens is None
    assert training_args.eval_steps == training_args.logging_steps  # None: the Trainer's rule, not 100
    _, _, training_args = pretrain.parse_args([config, "--save_total_limit", "2"])  # the command line wins
    assert training_args.save_total_limit == 2
    with pytest.raises(ConfigError, match=r"run\.yaml`: `block_size: null`, but block_size cannot be empty.*remove "
                                          r"the line for its default"):
        pretrain.parse_args([write_config(tmp_path, block_size=None)])


@pytest.mark.parametrize("local_rank", [["--local_rank=1"], ["--local_rank", "1"]])
def test_the_config_path_is_found_behind_the_deepspeed_launchers_local_rank(tmp_path, local_rank):
    config = write_config(tmp_path, block_size=64, output_dir=str(tmp_path / "out"))
    _, data_args, training_args = pretrain.parse_args([*local_rank, config, "--max_steps", "3"])
    assert (data_args.block_size, training_args.max_steps, training_args.local_rank) == (64, 3, 1)


def test_misspelt_yaml_key_names_the_closest_valid_key(tmp_path):
    config = write_config(tmp_path, blok_size=64)
    with pytest.raises(ConfigError, match=r"unknown key `blok_size`.*Did you mean `block_size`"):
        pretrain.parse_args([config])


def test_misspelt_cli_option_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"--learnig_rate.*Did you mean `learning_rate`"):
        pretrain.parse_args([write_config(tmp_path), "--learnig_rate", "1e-3"])


@pytest.mark.parametrize("field,value", [("block_size", "many"), ("learning_rate", "fast"), ("use_cpu", "maybe")])
def test_wrong_value_type_is_a_clear_error(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        pretrain.parse_args([write_config(tmp_path, **{field: value})])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        pretrain.parse_args([str(tmp_path / "nope.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("block_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        pretrain.parse_args([str(broken)])


def test_every_shipped_config_parses_and_its_data_renders(tmp_path, tokenizer, monkeypatch):
    from pathlib import Path

    import data_utils

    root = Path(pretrain.__file__).parent
    monkeypatch.chdir(root)
    configs = sorted((root / "configs").rglob("*.yaml"))
    assert len(configs) >= 6
    for config in configs:
        model_args, data_args, _ = pretrain.parse_args([str(config), "--cache_dir", str(tmp_path / "cache")])
        assert model_args.model_config is None or (root / model_args.model_config).is_file()
        specs = data_utils.parse_sources(data_args.sources)
        if any(s.hub for s in specs):
            continue  # hub sources: tests/test_open_mixed.py runs them on local copies
        data = data_utils.build_datasets(data_args, tokenizer, data_args.block_size, seed=0)
        assert len(data.train) > 0 and data.eval, config


@pytest.mark.parametrize("field,value", [("torch_dtype", "fp16"), ("tokenizer_model_type", "wordpiece"),
                                         ("new_token_init", "foo")])
def test_a_value_outside_its_choices_is_named_with_them(tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be one of .*, got `{value}`"):
        pretrain.parse_args([write_config(tmp_path, **{field: value})])


def test_an_attention_kernel_that_is_not_installed_is_a_clear_error(tmp_path, micro_model_config, tokenizer):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    model_args = pretrain.parse_args([write_config(tmp_path, model_config=str(micro_model_config),
                                                   attn_implementation="flash_attention_2")])[0]
    with pytest.raises(ConfigError, match=r"attn_implementation `flash_attention_2`.*set `attn_implementation: sdpa`"):
        pretrain.build_model(model_args, tokenizer, 32)


def test_written_reports_are_readable_by_others_as_the_umask_allows(tmp_path):
    import data_utils

    data_utils.atomic_write_text(tmp_path / "report.json", "{}")
    (tmp_path / "a.txt").write_text("一行文本\n", encoding="utf-8")
    data_utils.convert([{"path": str(tmp_path / "a.txt")}], str(tmp_path / "all.jsonl"))  # a corpus for other tools
    for written in ("report.json", "all.jsonl"):
        assert (tmp_path / written).stat().st_mode & 0o777 == 0o666 & ~data_utils.CURRENT_UMASK, written


def test_streaming_needs_a_length_and_one_ordered_reader():
    def settings(*flags):
        return pretrain.parse_args(["--use_cpu", "true", *flags])[2]

    with pytest.raises(ConfigError, match="set `max_steps`"):
        pretrain.check_streaming_settings(settings())
    pretrain.check_streaming_settings(settings("--max_steps", "5"))
    with pytest.raises(ConfigError, match="record_block_ids records the places of the mixture's blocks"):
        pretrain.check_streaming_settings(settings("--max_steps", "5", "--record_block_ids", "true"))
    for flag, message in (("--auto_find_batch_size", "changes the batch size after the run planned its steps"),
                          ("--dataloader_drop_last", "every training step is full already")):  # streamed or not
        with pytest.raises(ConfigError, match=message):
            pretrain.check_batch_settings(settings(flag, "true"))
    for flags in (["--dataloader_in_order", "false"], ["--accelerator_config", '{"dispatch_batches": false}'],
                  ["--accelerator_config", '{"split_batches": true}']):
        with pytest.raises(ConfigError, match="read in order by the main process"):
            pretrain.check_streaming_settings(settings("--max_steps", "5", *flags))


def test_a_resume_keeps_the_checkpoints_batch_or_says_what_would(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    plan = {"block_size": 32, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "world_size": 2,
            "dataloader_num_workers": 0, "tokens_per_step": 4 * 2 * 32}
    (checkpoint / "batch_plan.json").write_text(json.dumps(plan))

    def settings(*flags):
        return pretrain.parse_args(["--use_cpu", "true", *flags])[2]

    args = settings("--per_device_train_batch_size", "4")  # one process now, two then
    pretrain.keep_checkpoint_batch(str(checkpoint), args, 32, streaming=False)
    assert args.gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="blocks of 32 tokens, this run 64"):
        pretrain.keep_checkpoint_batch(str(checkpoint), settings(), 64, streaming=False)
    with pytest.raises(ConfigError, match="product times the processes is 8 blocks"):
        pretrain.keep_checkpoint_batch(str(checkpoint), settings("--per_device_train_batch_size", "3"), 32, False)
    with pytest.raises(ConfigError, match="replays its order only with the same settings"):
        pretrain.keep_checkpoint_batch(str(checkpoint), settings("--per_device_train_batch_size", "8"), 32, True)
    deepspeed = settings("--per_device_train_batch_size", "4")
    deepspeed.deepspeed = "ds.json"
    with pytest.raises(ConfigError, match="saved with neither DeepSpeed nor FSDP, this run has DeepSpeed: the "
                                          "optimizer state is in"):
        pretrain.keep_checkpoint_batch(str(checkpoint), deepspeed, 32, streaming=False)
    fsdp = settings("--per_device_train_batch_size", "4")
    fsdp.fsdp = ["full_shard"]  # as parsed on a GPU (the CPU refuses FSDP before this check)
    with pytest.raises(ConfigError, match="saved with neither DeepSpeed nor FSDP, this run has FSDP"):
        pretrain.keep_checkpoint_batch(str(checkpoint), fsdp, 32, streaming=False)
    fsdp_checkpoint = tmp_path / "fsdp" / "checkpoint-4"
    for sharded in (False, True):  # accelerate's full state dict files, then its sharded (DCP) folders
        shutil.rmtree(fsdp_checkpoint.parent, ignore_errors=True)
        shutil.copytree(checkpoint, fsdp_checkpoint)
        for name in ("pytorch_model_fsdp_0", "optimizer_0") if sharded else ("pytorch_model_fsdp.bin", "optimizer.bin"):
            (fsdp_checkpoint / name).mkdir() if sharded else (fsdp_checkpoint / name).write_bytes(b"")
        with pytest.raises(ConfigError, match="saved with FSDP, this run has neither DeepSpeed nor FSDP: .*Resume "
                                              "with torchrun/run_torchrun.sh with FSDP=1"):
            pretrain.keep_checkpoint_batch(str(fsdp_checkpoint), settings("--per_device_train_batch_size", "4"), 32,
                                           False)
        pretrain.keep_checkpoint_batch(str(fsdp_checkpoint), fsdp, 32, streaming=False)
    (checkpoint / "global_step4").mkdir()  # ZeRO's optimizer state
    with pytest.raises(ConfigError, match="saved with DeepSpeed, this run has neither DeepSpeed nor FSDP: .*silently "
                                          "start a fresh optimizer"):
        pretrain.keep_checkpoint_batch(str(checkpoint), settings("--per_device_train_batch_size", "4"), 32, False)
    with pytest.raises(ConfigError, match="saved by DeepSpeed on 2 process.*, this run has 1: ZeRO partitions"):
        pretrain.keep_checkpoint_batch(str(checkpoint), deepspeed, 32, streaming=False)
    (checkpoint / "batch_plan.json").write_text(json.dumps({**plan, "world_size": 1, "gradient_accumulation_steps": 2}))
    with pytest.raises(ConfigError, match="Resume with gradient_accumulation_steps 2"):  # batch sizes fixed at parse
        pretrain.keep_checkpoint_batch(str(checkpoint), deepspeed, 32, streaming=False)


def test_options_of_other_toolkits_name_their_counterparts(tmp_path, monkeypatch):
    for option, counterpart in (("use_peft", "`finetuning: lora`"), ("cutoff_len", "`block_size`"),
                                ("train_file_dir", "`sources`"), ("validation_split_percentage", "`eval_fraction`")):
        with pytest.raises(ConfigError, match=f"`--{option}`. This toolkit's counterpart: {counterpart}"):
            pretrain.parse_args([f"--{option}", "1"])
    with pytest.raises(ConfigError, match="unknown key `load_in_4bit`. This toolkit's counterpart: `quantization_bit: 4`"):
        pretrain.parse_args([write_config(tmp_path, load_in_4bit=True)])
    # every foreign option at once, in the order given (it was one per run, a different one each time); fields
    # of TrainingArguments that this script does not use are refused too (run_clm's --do_train / --do_eval)
    with pytest.raises(ConfigError, match=r"the command line: 4 unknown options:\n- option `--use_peft`\. This "
                                          r"toolkit's counterpart: `finetuning: lora`.*\n- option `--device_map`\. Not "
                                          r"needed here: .*; drop it\.\n- option `--do_train`\. Not needed here: a run "
                                          r"always trains \(`eval_only: true` evaluates a model without training it\); drop it\.\n- option `--do_eval`\. .*`eval_fraction: 0`"):
        pretrain.parse_args(["--use_peft", "true", "--device_map", "auto", "--do_train", "--do_eval"])
    with pytest.raises(ConfigError, match=r"2 unknown options:\n- key `do_eval`\. .*\n- key `stage`\. Not needed "
                                          r"here: this toolkit only pretrains"):
        pretrain.parse_args([write_config(tmp_path, stage="pt", do_eval=False)])
    # MedicalGPT's --lora_* flags without --use_peft trained every weight and ignored them
    with pytest.raises(ConfigError, match=r"lora_rank, lora_target are for `finetuning: lora`, but finetuning is "
                                          r"`full` \(every weight trains\), which would ignore them"):
        pretrain.parse_args(["--lora_rank", "8", "--lora_target", "q_proj"])
    with pytest.raises(ConfigError, match=r"freeze_trainable_layers is for `finetuning: freeze`, but finetuning is `lora`"):
        pretrain.parse_args(["--finetuning", "lora", "--freeze_trainable_layers", "1"])
    # report_to as a list (YAML) or comma-separated, as transformers takes it
    assert pretrain.parse_args([write_config(tmp_path, report_to=["tensorboard"])])[2].report_to == ["tensorboard"]
    assert pretrain.parse_args(["--report_to", "tensorboard,none"])[2].report_to == ["tensorboard", "none"]
    # a logger that is not installed or not known stops at the start, not with a traceback after the data work
    with pytest.raises(ConfigError, match=r"report_to `tensorbord` is not a logger transformers knows\. Did you mean "
                                          r"`tensorboard`\?"):
        pretrain.parse_args(["--report_to", "tensorbord"])
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"report_to swanlab, comet_ml: not installed here\. `pip install swanlab "
                                          r"comet-ml`, or drop them"):
        pretrain.parse_args(["--report_to", "tensorboard,swanlab,comet_ml"])
    with pytest.raises(ConfigError, match=r"`sources` is replaced whole from the command line: `--sources '\[...\]'`"):
        pretrain.parse_args(["--sources.0.path", "x.txt"])
    with pytest.raises(pretrain.DataError, match=r"eval_fraction must be in \[0, 1\)"):
        pretrain.parse_args(["--eval_fraction", "-0.1"])
    with pytest.raises(ConfigError, match="torch_dtype must be one of .*`auto` loads a model in its saved dtype"):
        pretrain.parse_args(["--torch_dtype", "auto"])


def test_any_run_length_on_the_command_line_replaces_the_configs(tmp_path):
    config = write_config(tmp_path, max_steps=20, max_train_tokens=1000)
    training = pretrain.parse_args([config, "--num_train_epochs", "1"])[2]
    assert training.max_steps == -1 and training.num_train_epochs == 1
    assert pretrain.parse_args([config, "--num_train_epochs", "1"])[1].max_train_tokens is None
    assert pretrain.parse_args([write_config(tmp_path, num_train_epochs=2), "--max_steps", "5"])[2].max_steps == 5


def test_fp16_asked_for_wins_over_the_automatic_precision():
    training = pretrain.parse_args(["--fp16", "true", "--use_cpu", "true"])[2]
    assert training.fp16 and not training.bf16 and training.mixed_precision != "bf16"


def test_bf16_asked_for_trains_on_the_cpu_where_there_is_no_gpu_and_is_refused_on_a_gpu_without_it(monkeypatch):
    training = pretrain.parse_args(["--mixed_precision", "bf16"])[2]  # this machine has no GPU
    assert training.bf16 and training.use_cpu
    monkeypatch.setattr(pretrain.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pretrain.torch.cuda, "get_device_name", lambda *_: "Tesla V100-SXM2-32GB")
    # torch says a V100 supports bf16 unless asked about bf16 units: it emulates it, slower than fp32
    monkeypatch.setattr(pretrain.torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not pretrain.gpu_has_bf16()
    monkeypatch.setattr(pretrain.torch.cuda, "is_available", lambda: False)  # another accelerator (MPS, XPU, ...)
    monkeypatch.setattr(pretrain, "is_torch_bf16_gpu_available", lambda: True)
    assert pretrain.gpu_has_bf16()
    monkeypatch.setattr(pretrain.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"this GPU \(Tesla V100-SXM2-32GB\) has no bfloat16.*mixed_precision: fp16"):
        pretrain.parse_args(["--mixed_precision", "bf16"])


def test_training_into_the_continued_models_directory_is_refused(tmp_path, base_model):
    model, _, training = pretrain.parse_args(["--model_name_or_path", str(base_model), "--output_dir",
                                              str(base_model)])
    with pytest.raises(ConfigError, match="is the model being continued"):
        pretrain.check_output_dir_writable(training, model)


def test_a_model_directory_without_a_model_is_named_with_what_it_holds(tmp_path, base_model, monkeypatch):
    """A LoRA adapter's directory, or the folder above the model: a traceback ("Unrecognized model") before; a
    missing `models/...` (the README's layout) was taken for a hub id and its download advice was wrong."""
    def build(path):  # as a run does: the tokenizer from the model's directory first
        pretrain.load_tokenizer(*pretrain.parse_args(["--model_name_or_path", str(path)]))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}')
    with pytest.raises(ConfigError, match=r"holds a LoRA adapter \(adapter_config.json\), not a model. Pass its "
                                          r"base model \(`Qwen/Qwen2.5-0.5B`\) as `model_name_or_path`"):
        build(adapter)
    shutil.copytree(base_model, tmp_path / "parent" / "micro")
    with pytest.raises(ConfigError, match="has no config.json, so it holds no Hugging Face model. These folders in "
                                          "it do: micro; pass one of them."):
        build(tmp_path / "parent")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model directory `models/Qwen2.5-0.5B` does not exist \(relative paths "
                                          f"start from {tmp_path}"):
        pretrain.load_tokenizer(*pretrain.parse_args(["--model_name_or_path", "models/Qwen2.5-0.5B"]))


def test_a_tokenizer_that_does_not_extend_the_models_own_is_refused(caplog):
    """Continuing a model with another tokenizer reads each id's row for another text: only an extension (the
    model's tokens at their ids, new ones after) may train; moved special tokens are warned about."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def tokenizer(vocab, special=()):
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            {t: i for i, t in enumerate(vocab)}, unk_token="<unk>")))
        fast.add_special_tokens({"additional_special_tokens": list(special)})
        return fast

    base = tokenizer(["<unk>", "高", "血", "压"], special=["<eos>"])
    args = pretrain.ModelArguments(model_name_or_path="base-model", tokenizer_name_or_path="other")
    pretrain.check_tokenizer_extends(tokenizer(["<unk>", "高", "血", "压", "<eos>", "高血压"]), base, args)
    with pytest.raises(ConfigError, match=r"does not extend the tokenizer of `base-model`: 2 of its 5 tokens are "
                                          r"missing or at other ids \('血' \(id 2: now 3\), '压' \(id 3: now 2\)\)"
                                          r".*tools/vocab.py extend --base base-model --add other"):
        pretrain.check_tokenizer_extends(tokenizer(["<unk>", "高", "压", "血"], special=["<eos>"]), base, args)
    with caplog.at_level("WARNING"):
        pretrain.check_tokenizer_extends(tokenizer(["<unk>", "高", "血", "压"], special=["<|endoftext|>"]), base, args)
    assert "moves 1 special token(s) of the model's tokenizer: <eos>" in caplog.text


def test_a_model_vocab_size_below_the_tokenizers_is_refused(tmp_path, micro_model_config, tokenizer):
    model_args = pretrain.parse_args([write_config(tmp_path, model_config=str(micro_model_config),
                                                   model_vocab_size=len(tokenizer) - 1)])[0]
    with pytest.raises(ConfigError, match=rf"model_vocab_size {len(tokenizer) - 1} is smaller than the tokenizer "
                                          rf"\({len(tokenizer)} tokens\)"):
        pretrain.build_model(model_args, tokenizer, 32)
    model_args.model_vocab_size = len(tokenizer) + 100
    model = pretrain.build_model(model_args, tokenizer, 32)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 100


def test_config_overrides_change_a_new_models_config_and_refuse_what_it_would_not_read(tmp_path, micro_model_config,
                                                                                       tokenizer):
    def model_args(overrides, **more):
        return pretrain.parse_args([write_config(tmp_path, model_config=str(micro_model_config),
                                                 config_overrides=overrides, **more)])[0]

    model = pretrain.build_model(model_args("num_hidden_layers=3, hidden_size=64,rms_norm_eps=1e-5"), tokenizer, 32)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.rms_norm_eps) == (3, 64, 1e-5)
    assert config.head_dim == 32 and len(model.model.layers) == 3  # derived settings follow (64 / 2 heads)
    # a mapping in the config file, nested settings too
    config = pretrain.build_model(model_args({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                                              "num_hidden_layers": 1}), tokenizer, 32).config
    assert config.rope_parameters["rope_theta"] == 5e5 and config.num_hidden_layers == 1
    written = tmp_path / "by_hand.yaml"  # YAML 1.1 reads 1e-6 as text; a key=value override reads it as a number
    written.write_text(f"model_config: {micro_model_config}\nconfig_overrides: {{num_hidden_layers: 1, "
                       "rms_norm_eps: 1e-6, rope_parameters: {rope_type: default, rope_theta: 5e5}}\n", encoding="utf-8")
    config = pretrain.build_model(pretrain.parse_args([str(written)])[0], tokenizer, 32).config
    assert config.rms_norm_eps == 1e-6 and config.rope_parameters["rope_theta"] == 5e5
    for overrides, message in (
            ("num_hiden_layers=3", r"`num_hiden_layers` is not a setting of llama models\. Did you mean "
                                   r"`num_hidden_layers`\?"),
            ("num_hidden_layers=three", r"`num_hidden_layers` holds int values \(now 2\), got 'three'"),
            ("tie_word_embeddings=yes", r"`tie_word_embeddings` holds bool values \(now True\), got 'yes'"),
            ("vocab_size=100", r"`vocab_size` is set by `model_vocab_size`"),
            ("num_hidden_layers", r"`num_hidden_layers` is not `key=value`")):
        with pytest.raises(ConfigError, match=rf"config_overrides `{overrides}`: {message}"):
            pretrain.build_model(model_args(overrides), tokenizer, 32)
    with pytest.raises(ConfigError, match=r"config_overrides changes the architecture of a model trained from "
                                          r"scratch \(`model_config`\); a pretrained model keeps its own"):
        model_args("num_hidden_layers=3", model_name_or_path=str(tmp_path))


def test_the_block_record_restarts_with_a_fresh_run_and_keeps_a_resumes_steps(tmp_path):
    training = pretrain.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--record_block_ids", "true"])[2]
    path = tmp_path / "block_ids" / "rank0.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"step": s, "block_ids": [s]}) + "\n" for s in range(1, 6)))  # died at 5
    checkpoint = tmp_path / "saved-at-3"  # an explicit resume path need not be named checkpoint-N
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert pretrain.start_block_record(training, str(checkpoint)) == path
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    pretrain.start_block_record(training, None)
    assert path.read_text() == ""


def test_use_liger_kernel_without_liger_is_refused_when_the_arguments_parse(monkeypatch):
    """Not at the first step, after the data work (and under torchrun as a crash it would restart)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="use_liger_kernel needs liger-kernel"):
        pretrain.parse_args(["--use_liger_kernel", "true"])


def test_save_only_model_is_refused_since_nothing_could_resume():
    with pytest.raises(ConfigError, match="save_only_model writes checkpoints without the optimizer"):
        pretrain.parse_args(["--save_only_model", "true"])


def test_resume_from_checkpoint_spelt_empty_false_or_true(tmp_path):
    """`--resume_from_checkpoint "$EMPTY"` starts fresh (it removed checkpoints, then crashed); the Trainer's and
    run_clm's `true` is `auto` (it was taken for a path)."""
    import torch

    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    torch.save({}, checkpoint / "optimizer.pt")
    for value, expected in (("", None), ("false", None), ("True", str(checkpoint)), ("auto", str(checkpoint))):
        args = pretrain.parse_args(["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", value])[2]
        assert pretrain.resolve_resume(args) == expected, value



def test_model_and_tokenizer_paths_may_start_with_home(tmp_path, monkeypatch, tokenizer_dir):
    """`~/models/x` in a config went to transformers unexpanded, which took it for a malformed hub id."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    args = pretrain.parse_args(["--tokenizer_name_or_path", "~/tok", "--output_dir", str(tmp_path / "out")])
    assert args[0].tokenizer_name_or_path == str(tmp_path / "tok")
    assert len(pretrain.load_tokenizer(*args)) > 100
    monkeypatch.chdir(tmp_path)  # a relative directory is made absolute: a LoRA adapter's base named by it
    args = pretrain.parse_args(["--model_name_or_path", "tok", "--output_dir", str(tmp_path / "out")])  # was looked
    assert args[0].model_name_or_path == str(tmp_path / "tok")  # up on the hub when read from elsewhere
