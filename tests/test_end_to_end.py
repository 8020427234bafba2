"""End to end: pretrain.py from scratch, continue from the saved model, resume from a checkpoint,
and bad input stopping before training, with a micro model. Runs call pretrain.py's `main` in-process (what
a subprocess would print and return, without paying its imports each time); the shell-script runs and the CLI
error path run in a fresh process."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, logged_losses, make_jsonl_corpus, make_text_corpus


def run_pretrain(args, cwd=ROOT, script="pretrain.py", check=True, fresh_process=False):
    """pretrain.py's `main` in this process (the ~4 s of imports paid once per session), or the script in a fresh
    process where the test needs the command line itself: a shell script, another working directory."""
    argv = [str(a) for a in args]
    if script == "pretrain.py" and cwd == ROOT and not fresh_process:
        proc = run_in_process(argv)
    else:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
        cmd = ["bash", str(ROOT / script)] if script.endswith(".sh") else [sys.executable, str(ROOT / script)]
        proc = subprocess.run(cmd + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """What the command line would give: the exit code, stdout and stderr (logs, the error line, a traceback)."""
    import pretrain

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pretrain.main(argv)
        except SystemExit as e:  # argparse's --help and usage errors
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    return make_text_corpus(base, repeat=30), make_jsonl_corpus(base, repeat=30)


def write_config(path: Path, corpus, micro_model_config, output_dir, **extra) -> Path:
    text, jsonl = corpus
    config = {
        "model_config": str(micro_model_config), "tokenizer_vocab_size": 600,
        "sources": [{"name": "notes", "path": str(text)}, {"name": "records", "path": str(jsonl)}],
        "block_size": 32, "eval_fraction": 0.1, "cache_dir": str(path.parent / "cache"),
        "output_dir": str(output_dir), "max_steps": 12, "per_device_train_batch_size": 4,
        "learning_rate": 3.0e-3, "logging_steps": 1, "eval_steps": 6, "save_steps": 6,
        "seed": 7, "sample_prompts": ["高血压是"], "sample_max_new_tokens": 8,
    }
    config.update(extra)
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, micro_model_config):
    """One from-scratch run shared by the tests below."""
    base = tmp_path_factory.mktemp("scratch")
    config = write_config(base / "run.yaml", corpus, micro_model_config, base / "out",
                          benchmarks=[{"path": str(ROOT / "data" / "benchmarks" / "medical_choice.jsonl"),
                                       "watch_forgetting": True}])
    proc = run_pretrain([config])
    return base, config, base / "out", proc


def test_from_scratch_outputs_load_and_perplexity_falls(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out, proc = trained
    assert "preflight: 12 optimizer steps x 128 tokens = 1,536 tokens" in proc.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "metrics.json", "data_report.json", "loss.png"):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert not list(out.glob("*.bin"))  # no pickles: training_args.bin named a class only pretrain.py has
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # readers on transformers 4 (was null)
    flags = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert flags["add_bos_token"] is False and flags["add_eos_token"] is False  # llama.cpp assumed BOS without them
    assert AutoTokenizer.from_pretrained(out)("高血压")["input_ids"][0] != AutoTokenizer.from_pretrained(out).bos_token_id
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    before, after = metrics["eval"]["before_training"], metrics["eval"]["final"]
    for name in ("notes", "records"):
        assert after[f"eval_{name}_ppl"] < before[f"eval_{name}_ppl"], name
    assert after["eval_ppl"] < 0.7 * before["eval_ppl"]
    assert after["eval_accuracy"] > before["eval_accuracy"]
    assert 0 <= before["eval_bench_medical_choice_accuracy"] <= 1 and "eval_bench_medical_choice_accuracy" in after
    assert metrics["eval"]["benchmarks"]["medical_choice"]["questions"] == 30
    assert list(metrics["eval"]["benchmark_accuracy_change_pct_over_baseline"]) == ["medical_choice"]  # watched
    assert "benchmark medical_choice: 30 of 30 questions, 0-shot, chance accuracy 25.0%" in proc.stderr
    assert min(after["eval_notes_accuracy"], after["eval_records_accuracy"]) <= after["eval_accuracy"] <= max(
        after["eval_notes_accuracy"], after["eval_records_accuracy"])
    assert metrics["train"]["steps"] == 12
    assert metrics["train"]["tokens"] == 12 * 4 * 32
    assert metrics["train"]["tokens_per_second"] > 0
    assert metrics["samples"][0]["prompt"] == "高血压是"

    tokenizer = AutoTokenizer.from_pretrained(out)  # offline: HF_HUB_OFFLINE=1
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("高血压是一种常见病。", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert tokenizer.decode(ids[0]) == "高血压是一种常见病。"


def test_the_evaluation_at_the_last_step_is_the_final_one(tmp_path, corpus, micro_model_config, monkeypatch):
    """transformers 5 evaluates at max_steps by itself: the run reports that evaluation instead of a second one."""
    import pretrain

    evaluated, evaluate = [], pretrain.PretrainTrainer.evaluate

    def counted(self, eval_dataset=None, *args, **kwargs):
        if eval_dataset is None:  # an evaluation of every source (each then evaluated alone)
            evaluated.append(self.state.global_step)
        return evaluate(self, eval_dataset, *args, **kwargs)

    monkeypatch.setattr(pretrain.PretrainTrainer, "evaluate", counted)
    config = write_config(tmp_path / "run.yaml", corpus, micro_model_config, tmp_path / "out", max_steps=3,
                          eval_steps=2, save_steps=100, sample_prompts=[])
    run_pretrain([config])
    assert evaluated == [0, 2, 3]
    final = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["eval"]["final"]
    assert {"eval_loss", "eval_ppl", "eval_notes_loss", "eval_records_ppl"} <= final.keys()
    evaluated.clear()  # load_best_model_at_end puts the best checkpoint back after the last step's evaluation
    run_pretrain([config, "--output_dir", tmp_path / "best", "--max_steps", 4, "--save_steps", 2,
                  "--load_best_model_at_end", "true"])
    assert evaluated == [0, 2, 4, 4]


def test_second_run_is_a_data_cache_hit(trained, micro_model_config, corpus):
    base, config, _, _ = trained
    proc = run_pretrain([config, "--output_dir", base / "again", "--max_steps", 1, "--eval_strategy", "no",
                         "--eval_on_start", "false", "--sample_prompts", ""])
    log = proc.stderr + proc.stdout
    assert "tokenizer: cache hit" in log
    assert "(cache hit)" in log and "tokenizing" not in log


def test_continue_pretraining_from_the_saved_model(trained, tmp_path):
    base, config, out, _ = trained
    from transformers import AutoModelForCausalLM

    proc = run_pretrain([config, "--model_name_or_path", out, "--output_dir", tmp_path / "cont", "--max_steps", 4,
                         "--learning_rate", "1e-3"])
    assert f"model_config {yaml.safe_load(config.read_text())['model_config']}: for a model trained from scratch; " \
           f"this run continues {out}" in proc.stderr  # the config file's, not used: said, not silent
    metrics = json.loads((tmp_path / "cont" / "metrics.json").read_text())
    first = json.loads((out / "metrics.json").read_text())
    # it starts where the first run ended, not from scratch
    assert metrics["eval"]["before_training"]["eval_loss"] == pytest.approx(first["eval"]["final"]["eval_loss"],
                                                                          rel=1e-3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cont")
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(out).config.vocab_size


def test_model_config_takes_a_model_directory_or_hub_id_for_its_architecture(trained, tmp_path):
    """run_clm's --config_name: a model's config.json as the architecture of a model trained from scratch."""
    from safetensors.torch import load_file

    import pretrain

    base, config, out, _ = trained
    run_pretrain([config, "--model_config", out, "--config_overrides", "num_hidden_layers=1", "--output_dir",
                  tmp_path / "scratch", "--max_steps", 1, "--eval_strategy", "no", "--eval_on_start", "false"])
    trained_config, new_config = (json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "scratch"))
    assert new_config["num_hidden_layers"] == 1 and trained_config["num_hidden_layers"] == 2
    assert all(new_config[k] == trained_config[k] for k in ("model_type", "hidden_size", "vocab_size"))
    trained_weights, new_weights = (load_file(d / "model.safetensors") for d in (out, tmp_path / "scratch"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(new_weights[name], trained_weights[name], atol=1e-3)  # its own start, not the weights
    remote = tmp_path / "remote"  # an architecture of remote code: refused with the fix, not a traceback
    remote.mkdir()
    (remote / "configuration_xllama.py").write_text(
        "from transformers import LlamaConfig\n\nclass XLlamaConfig(LlamaConfig):\n    model_type = 'xllama'\n")
    (remote / "config.json").write_text(json.dumps({**trained_config, "model_type": "xllama", "auto_map": {
        "AutoConfig": "configuration_xllama.XLlamaConfig"}}))
    with pytest.raises(pretrain.ConfigError, match="is an architecture of remote code .* continue pretraining it"):
        pretrain.model_config_settings(pretrain.parse_args(["--model_config", str(remote), "--trust_remote_code",
                                                            "true"])[0])
    proc = run_pretrain([config, "--model_config", "someone/some-model"], check=False)
    assert proc.returncode == 2 and "model_config `someone/some-model` cannot be loaded: the hub is unreachable" in \
        proc.stderr and "pass that directory as `model_config`" in proc.stderr and "ModelScope" not in proc.stderr


def test_push_to_hub_pushes_the_final_model_without_checkpoints(trained, tmp_path, monkeypatch):
    """The Trainer pushes checkpoints only; the final model went nowhere. It is pushed once written and checked
    (a stand-in for the hub: no network in tests)."""
    import huggingface_hub
    import transformers

    def fake_repo(trainer, *args, **kwargs):
        trainer.hub_model_id, trainer.push_in_progress = "me/tiny-medical", None

    pushed = []
    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", fake_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: pushed.append(
        {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())}) or "https://hub/me")
    base, config, out, _ = trained
    run_pretrain([config, "--output_dir", tmp_path / "out", "--max_steps", 2, "--save_strategy", "no",
                  "--push_to_hub", "true", "--eval_strategy", "no", "--eval_on_start", "false"])
    [push] = pushed
    assert push["repo_id"] == "me/tiny-medical" and push["folder_path"] == str(tmp_path / "out")
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json", "loss.png"} <= set(push["files"])
    assert {"checkpoint-*", "runs/*"} <= set(push["ignore_patterns"])


def test_evaluation_reports_each_sources_next_token_accuracy_and_their_token_weighted_mean(micro_model_config,
                                                                                          tokenizer, tmp_path):
    """run_clm.py's eval_accuracy: the share of labelled tokens whose argmax prediction is the next token, per
    source and over all (also where a batch is not full and a block has ignored labels)."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM

    import pretrain

    spec = json.loads(micro_model_config.read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).eval()
    ids = torch.randint(0, 40, (7, 16))  # a small alphabet: the untrained model hits some tokens
    labels = ids.clone()
    labels[2, :5] = -100
    sets = {"a": Dataset.from_dict({"input_ids": ids[:3].tolist(), "labels": labels[:3].tolist()}),
            "b": Dataset.from_dict({"input_ids": ids[3:].tolist(), "labels": labels[3:].tolist()})}
    args = pretrain.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--per_device_eval_batch_size",
                                "2", "--report_to", "none"])[2]
    trainer = pretrain.PretrainTrainer(model=model, args=args, eval_dataset=sets, data_collator=pretrain.BlockCollator(),
                                       processing_class=tokenizer, tokens_per_step=0, block_size=16, meter=None, data_plan={})
    metrics = trainer.evaluate()
    with torch.no_grad():
        predicted = model(ids).logits[:, :-1].argmax(-1)
    valid = labels[:, 1:] != -100
    hits = (predicted == labels[:, 1:]) & valid
    for name, rows in (("a", slice(0, 3)), ("b", slice(3, 7))):
        assert metrics[f"eval_{name}_accuracy"] == pytest.approx(hits[rows].sum().item() / valid[rows].sum().item())
    assert metrics["eval_accuracy"] == pytest.approx(hits.sum().item() / valid.sum().item())
    assert 0 < metrics["eval_accuracy"] < 1
    logged = {key for entry in trainer.state.log_history for key in entry}  # TensorBoard's too
    assert {"eval_a_accuracy", "eval_b_accuracy", "eval_accuracy"} <= logged


def test_choosing_the_best_model_by_an_accuracy_liger_does_not_measure_is_refused(micro_model_config):
    """Liger's fused loss returns no logits in evaluation: the Trainer would fail on the missing key mid-run."""
    import types

    from transformers import AutoConfig, AutoModelForCausalLM

    import pretrain

    spec = json.loads(micro_model_config.read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    settings = types.SimpleNamespace(use_liger_kernel=True, metric_for_best_model="eval_accuracy", loraplus_lr_ratio=None)
    with pytest.raises(pretrain.ConfigError, match="no accuracy is measured. Choose the best model by `loss`"):
        pretrain.preflight(settings, None, model, 0)


def test_eval_only_reports_the_perplexity_the_run_ended_with(trained, tmp_path):
    """run_clm's --do_eval without --do_train: the finished run's model evaluated on the same sources gives the
    final evaluation of its run, per source, in eval_results.json; nothing is trained or saved."""
    import pretrain

    base, config, out, _ = trained
    proc = run_pretrain([config, "--model_name_or_path", out, "--output_dir", tmp_path / "eval", "--eval_only", "true"])
    # TensorBoard files of this process went into the working directory (the repository)
    assert not [f for f in (ROOT / "runs").glob("*/*") if f".{os.getpid()}." in f.name]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    final = json.loads((out / "metrics.json").read_text())["eval"]["final"]
    assert results["eval"].keys() == final.keys() and results["model"] == str(out)
    for key, value in final.items():
        assert results["eval"][key] == pytest.approx(value, rel=1e-5), key
    assert results["samples"][0]["prompt"] == "高血压是" and "eval_only: eval loss" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["data_report.json", "data_report.md",
                                                                     "eval_results.json"]
    assert "output_router_logits" not in json.loads((out / "config.json").read_text())  # (a MoE setting only)
    for argv, message in ((["--model_name_or_path", out, "--output_dir", out], "is the model being evaluated"),
                          (["--model_name_or_path", out / "checkpoint-12", "--output_dir", out],
                           "holds a training run (metrics.json or checkpoints), whose data report"),
                          ([], "eval_only evaluates a trained model: set `model_name_or_path`"),
                          (["--model_name_or_path", out, "--resume_from_checkpoint", "auto"], "drop resume_from")):
        proc = run_pretrain([config, "--eval_only", "true", *argv], check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    proc = run_pretrain([config, "--do_eval"], check=False)
    assert proc.returncode == 2 and "`eval_only: true` evaluates a model without training it" in proc.stderr
    with pytest.raises(pretrain.ConfigError, match="eval_only with DeepSpeed ZeRO-1/2: evaluation needs no DeepSpeed"):
        pretrain.parse_args(["--model_name_or_path", str(out), "--eval_only", "true", "--use_cpu", "true",
                             "--deepspeed", str(ROOT / "deepspeed" / "ds_zero2.json")])


def test_resume_from_checkpoint_continues_the_same_run(trained, tmp_path):
    base, config, out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    run_pretrain([config, "--output_dir", resumed, "--resume_from_checkpoint", "auto"])
    losses, losses_resumed = logged_losses(out / "checkpoint-12"), logged_losses(resumed / "checkpoint-12")
    for step in range(7, 13):  # steps trained after the resume match the uninterrupted run
        assert losses_resumed[step] == pytest.approx(losses[step], rel=1e-4), step


def test_resume_with_another_batch_split_keeps_the_global_batch(trained, tmp_path):
    """Resumed with half the per-device batch (as on half the GPUs), gradient accumulation doubles: the same
    blocks per step, so the same data position, schedule and (up to summation order) losses."""
    base, config, out, _ = trained
    assert json.loads((out / "checkpoint-6" / "batch_plan.json").read_text())["tokens_per_step"] == 4 * 32
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    proc = run_pretrain([config, "--output_dir", resumed, "--resume_from_checkpoint", "auto",
                         "--per_device_train_batch_size", 2])
    assert "gradient_accumulation_steps 1 -> 2 keeps its 128 tokens per step" in proc.stderr
    losses, losses_resumed = logged_losses(out / "checkpoint-12"), logged_losses(resumed / "checkpoint-12")
    for step in range(7, 13):
        assert losses_resumed[step] == pytest.approx(losses[step], rel=1e-3), step
    with pytest.raises(AssertionError, match="Resume with a per_device_train_batch_size"):
        run_pretrain([config, "--output_dir", resumed, "--resume_from_checkpoint", resumed / "checkpoint-6",
                      "--per_device_train_batch_size", 3])


def test_every_step_is_full_across_passes_and_epochs_become_steps(tmp_path, corpus, micro_model_config):
    """The Trainer's own epochs ended each pass with a short step (its remainder, a full update on fewer blocks):
    the global batch shrank and tokens, tokens/s, MFU and the mixture overcounted. The run reads the mixture as one
    stream of full steps; num_train_epochs and `epoch` strategies become steps."""
    config = write_config(tmp_path / "run.yaml", corpus, micro_model_config, tmp_path / "out", max_steps=-1,
                          num_train_epochs=3, per_device_train_batch_size=4, gradient_accumulation_steps=5,
                          eval_strategy="epoch", save_strategy="epoch", record_block_ids=True,
                          sample_prompts=[])
    run_pretrain([config])
    out = tmp_path / "out"
    blocks = json.loads((out / "data_report.json").read_text())["train_blocks"]
    assert blocks % 20, "the test needs passes that do not end on a step"
    steps, per_pass = -(-3 * blocks // 20), -(-blocks // 20)
    lines = [json.loads(line) for line in (out / "block_ids" / "rank0.jsonl").read_text().splitlines()]
    per_step = {}
    for line in lines:
        per_step.setdefault(line["step"], []).extend(line["block_ids"])
    assert sorted(per_step) == list(range(1, steps + 1))
    assert [b for step in sorted(per_step) for b in per_step[step]] == list(range(steps * 20))  # full, in order
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == steps and metrics["train"]["tokens"] == steps * 20 * 32
    assert steps % per_pass and sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [
        per_pass, 2 * per_pass, steps]  # after each pass's worth of steps, and the last
    history = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert {per_pass, 2 * per_pass} <= {h["step"] for h in history["log_history"] if "eval_loss" in h}
    last = [h for h in history["log_history"] if "data_passes" in h][-1]
    assert last["data_passes"] == pytest.approx(last["step"] * 20 / blocks, abs=1e-4)


def test_resume_on_other_data_is_refused_unless_it_reads_that_data_from_its_start(trained, tmp_path):
    base, config, out, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    resume = [config, "--output_dir", resumed, "--resume_from_checkpoint", "auto"]
    reordered = json.dumps(yaml.safe_load(config.read_text(encoding="utf-8"))["sources"][::-1])
    for change, expected in ((["--eval_fraction", 0.3], "source `notes` eval_documents"), (["--seed", 8], "seed 7 -> 8"),
                             (["--sources", reordered], "source order notes, records -> records, notes")):
        proc = run_pretrain([*resume, *change], check=False)
        assert proc.returncode != 0 and "trained on other data (" in proc.stderr and expected in proc.stderr, change
    proc = run_pretrain([*resume, "--seed", 8, "--ignore_data_skip", "true", "--learning_rate", 1e-2,
                         "--weight_decay", 0.0])
    assert "ignore_data_skip reads it from its start" in proc.stderr
    assert "learning_rate 0.003 -> 0.01, weight_decay 0.1 -> 0.0 has no effect on a resumed run" in proc.stderr


def test_a_resume_after_an_ignore_data_skip_start_reads_on_from_where_that_start_was(tmp_path, corpus,
                                                                                     micro_model_config):
    """ignore_data_skip reads the data from its start at the resume step S; a later resume at step T must read on
    at block (T - S) x blocks per step, not skip T steps of it (blocks never trained, in the reproduction)."""
    from safetensors.torch import load_file

    def blocks(out):
        lines = (out / "block_ids" / "rank0.jsonl").read_text(encoding="utf-8").splitlines()
        return {row["step"]: row["block_ids"] for row in map(json.loads, lines)}

    runs = {}
    for name in ("straight", "interrupted"):
        out = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", corpus, micro_model_config, out, max_steps=2, save_steps=2,
                              eval_strategy="no", eval_on_start=False, lr_scheduler_type="constant", warmup_steps=0,
                              record_block_ids=True, sample_prompts=[], verify_saved_model=False)
        run_pretrain([config])
        resume = [config, "--resume_from_checkpoint", out / "checkpoint-2", "--ignore_data_skip", "true"]
        if name == "straight":
            run_pretrain([*resume, "--max_steps", 6])
        else:
            run_pretrain([*resume, "--max_steps", 4])
            proc = run_pretrain([config, "--resume_from_checkpoint", "auto", "--max_steps", 6])
            assert "resume_from_checkpoint auto: " in proc.stderr
        runs[name] = out
    straight, interrupted = blocks(runs["straight"]), blocks(runs["interrupted"])
    assert straight[3] == [0, 1, 2, 3] and straight[6] == [12, 13, 14, 15]  # the data from its start at step 3
    assert {step: interrupted[step] for step in (3, 4, 5, 6)} == {step: straight[step] for step in (3, 4, 5, 6)}
    weights = [load_file(out / "model.safetensors") for out in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    mixture = json.loads((runs["interrupted"] / "metrics.json").read_text(encoding="utf-8"))["mixture"]["achieved"]
    assert sum(mixture.values()) == pytest.approx(1.0)


def test_run_pretrain_sh_passes_config_and_overrides(trained, tmp_path):
    _, config, _, _ = trained
    run_pretrain([config, "--output_dir", tmp_path / "sh", "--max_steps", 2, "--eval_strategy", "no",
                  "--eval_on_start", "false"], script="run_pretrain.sh")
    assert (tmp_path / "sh" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "sh" / "metrics.json").read_text())["train"]["steps"] == 2


def test_bad_input_from_the_command_line_ends_in_one_error_line_and_exit_code_2(tmp_path, corpus, micro_model_config):
    """The command line's side of the bad-input suite (tests/test_bad_inputs.py runs every case in-process)."""
    (tmp_path / "bad.jsonl").write_text('{"text": "好的一行"}\n{"text": "坏\n', encoding="utf-8")
    config = write_config(tmp_path / "run.yaml", corpus, micro_model_config, tmp_path / "out",
                          sources=[{"path": str(tmp_path / "bad.jsonl")}])
    proc = run_pretrain([config], check=False, fresh_process=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl` line 2 is not valid JSON" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
