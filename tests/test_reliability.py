"""Preemption (SIGTERM saves and stops; auto-resume continues) and a non-finite loss (stops before the
optimizer step, naming the last good checkpoint). SIGKILL-and-resume lives in test_distributed.py, beside
its DDP and ZeRO-2 versions."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, make_text_corpus
from test_end_to_end import run_pretrain


def config(tmp_path, micro_model_config, tokenizer_dir, **extra):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(tokenizer_dir),
        "sources": [{"path": str(make_text_corpus(tmp_path / "data", repeat=30))}], "block_size": 32,
        "eval_fraction": 0.1, "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
        "eval_strategy": "no", "eval_on_start": False, "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"), **extra}), encoding="utf-8")
    return path


def test_sigterm_to_one_rank_saves_one_checkpoint_and_the_next_start_resumes(tmp_path, micro_model_config,
                                                                             tokenizer_dir):
    """A scheduler's SIGTERM may reach the ranks at different moments (here only rank 1 gets it): they agree on one
    step, both save it and stop cleanly; a start on one process then resumes from it (with the accumulation the two
    processes' tokens per step need)."""
    import psutil

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=100000, save_steps=100000,
                 learning_rate=1.0e-4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", NPROC_PER_NODE="2")
    proc = subprocess.Popen(["bash", str(ROOT / "torchrun/run_torchrun.sh"), str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "data_report.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(4)  # a few steps in
    rank1 = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stops = re.findall(r"(SIGTERM|another rank's signal): saving a checkpoint at step (\d+)", stderr)
    assert sorted(who for who, _ in stops) == ["SIGTERM", "another rank's signal"], stderr[-3000:]
    stops = [step for _, step in stops]
    assert stops[0] == stops[1], stderr[-3000:]
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{stops[0]}"]
    stopped = int(stops[0])
    assert 0 < stopped < 100000
    assert not (tmp_path / "out" / "model.safetensors").exists()  # not a finished run
    resumed = run_pretrain([run, "--resume_from_checkpoint", "auto", "--max_steps", stopped + 3])
    assert f"resume_from_checkpoint auto: {checkpoints[0]}" in resumed.stderr
    assert "gradient_accumulation_steps 1 -> 2 keeps its 256 tokens per step" in resumed.stderr
    train = json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]
    assert train["steps"] == stopped + 3 and train["resumed_from_step"] == stopped


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, micro_model_config, tokenizer_dir):
    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=50, save_steps=1, learning_rate=1.0e+8,
                 max_grad_norm=0.0, warmup_steps=0, lr_scheduler_type="constant")
    proc = run_pretrain([run], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")][0]
    assert "the training loss or gradient norm became non-finite at step" in error
    step = int(error.split(" at step ")[1].split(" ")[0])
    assert f"found at step {step}:" in error  # checked at every checkpoint, and one is due every step
    assert f"the last good one is {tmp_path / 'out' / f'checkpoint-{step - 1}'}" in error
    assert not (tmp_path / "out" / f"checkpoint-{step}").exists()
    assert "Traceback" not in proc.stderr


def nan_loss_at(steps):
    """A compute_loss that returns NaN at the given (1-based) optimizer steps."""
    import pretrain

    original = pretrain.PretrainTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step + 1 in steps:
            loss = out[0] if isinstance(out, tuple) else out
            loss = loss * float("nan")
            return (loss, *out[1:]) if isinstance(out, tuple) else loss
        return out

    return compute_loss


def test_stop_policy_checks_before_each_checkpoint_and_log_not_every_step(tmp_path, micro_model_config,
                                                                         tokenizer_dir, monkeypatch, capsys):
    """The loss turns NaN at step 3; checks run (one host sync each) at the checkpoints of steps 2 and 4 and the
    log of step 5: the run stops at step 4, before writing checkpoint-4, naming step 3 and checkpoint-2."""
    import pretrain

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=10, save_steps=2, logging_steps=5,
                 save_total_limit=10)
    monkeypatch.setattr(pretrain.PretrainTrainer, "compute_loss", nan_loss_at({3}))
    assert pretrain.main([str(run)]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")][0]
    assert "became non-finite at step 3 (found at step 4:" in error
    assert f"the last good one is {tmp_path / 'out' / 'checkpoint-2'}" in error
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]


def test_stop_policy_checks_before_the_checkpoint_at_the_end_of_training(tmp_path, micro_model_config,
                                                                         tokenizer_dir, monkeypatch, capsys):
    """The Trainer saves an epoch-strategy checkpoint in a second call after the last step's: it is checked too."""
    import pretrain

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=5, save_strategy="epoch", logging_steps=4)
    monkeypatch.setattr(pretrain.PretrainTrainer, "compute_loss", nan_loss_at({5}))
    assert pretrain.main([str(run)]) == 2
    assert "became non-finite at step 5 (found at step 5:" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("precision", ["no", "bf16_weights"])
def test_skip_policy_drops_the_non_finite_update_and_counts_it(tmp_path, micro_model_config, tokenizer_dir,
                                                               monkeypatch, capsys, precision):
    import pretrain
    from safetensors.torch import load_file

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=5, save_steps=1, save_total_limit=10,
                 on_nonfinite_loss="skip", learning_rate=1.0e-3, verify_saved_model=False,
                 mixed_precision=precision)
    monkeypatch.setattr(pretrain.PretrainTrainer, "compute_loss", nan_loss_at({3}))
    assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["train"]["skipped_nonfinite_steps"] == [3]
    weights = {s: load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (2, 3, 4)}
    same = lambda a, b: all(a[k].equal(b[k]) for k in a)  # noqa: E731
    assert same(weights[2], weights[3]) and not same(weights[3], weights[4])  # step 3 changed nothing
    import torch

    optimizer = {s: torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=True) for s in (2, 3)}
    assert [v["step"] for v in optimizer[2]["state"].values()] == [v["step"] for v in optimizer[3]["state"].values()]
    if precision == "bf16_weights":  # the fp32 masters were not touched either
        assert all(a.equal(b) for a, b in zip(optimizer[2]["fp32_master_weights"], optimizer[3]["fp32_master_weights"]))
    assert "step 3: non-finite loss or gradient, update skipped" in capsys.readouterr().err


def test_skip_policy_stops_a_run_that_diverged(tmp_path, micro_model_config, tokenizer_dir, monkeypatch, capsys):
    import pretrain

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=20, on_nonfinite_loss="skip",
                 max_consecutive_skips=2)
    monkeypatch.setattr(pretrain.PretrainTrainer, "compute_loss", nan_loss_at(set(range(4, 21))))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    assert pretrain.main([str(run)]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")][0]
    assert "3 steps in a row had a non-finite loss or gradient" in error and "at step 6" in error
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # training raised: restored too


def test_skip_policy_counts_on_across_a_resume(tmp_path, micro_model_config, tokenizer_dir, monkeypatch, capsys):
    """Steps 3 and 4 skipped, the run ended at checkpoint-4, step 5 skipped after a resume: three in a row, as in a
    run without the interruption, and every skipped step reported."""
    import pretrain

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=4, save_steps=2, on_nonfinite_loss="skip",
                 max_consecutive_skips=3, verify_saved_model=False, sample_prompts=[])
    monkeypatch.setattr(pretrain.PretrainTrainer, "compute_loss", nan_loss_at({3, 4, 5, 6}))
    assert pretrain.main([str(run)]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["skipped_nonfinite_steps"] == [3, 4]
    assert pretrain.main([str(run), "--resume_from_checkpoint", "auto", "--max_steps", "5"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["skipped_nonfinite_steps"] == [3, 4, 5]
    assert pretrain.main([str(run), "--resume_from_checkpoint", "auto", "--max_steps", "8",
                          "--max_consecutive_skips", "2"]) == 2
    assert "4 steps in a row had a non-finite loss or gradient (more than max_consecutive_skips 2) at step 6" in (
        capsys.readouterr().err)  # resumed from checkpoint-5 (the last step's), three skips in a row before it


def test_a_resume_that_trains_no_step_reports_no_train_loss(tmp_path, micro_model_config, tokenizer_dir, capsys):
    """A preemption at the last step leaves its checkpoint and no final model; the start that writes the model
    trains nothing, and its loss is no number (the Trainer says 0.0)."""
    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=2, save_steps=2, sample_prompts=[],
                 verify_saved_model=False)
    assert main(capsys, run)[0] == 0
    assert main(capsys, run, "--resume_from_checkpoint", "auto")[0] == 0
    train = json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]
    assert train["loss"] is None and train["final_logged_loss"] > 0 and train["resumed_from_step"] == 2


# ------------------------------------------------------------- reruns and resumes into an output_dir
def main(capsys, *argv) -> tuple[int, str]:
    import pretrain

    code = pretrain.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path, micro_model_config, tokenizer_dir):
    """Ctrl-C reaches the whole foreground process group (DataLoader workers too): the first one during training
    saves a checkpoint at the step boundary and exits cleanly, as SIGTERM does."""
    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=100000, save_steps=100000,
                 dataloader_num_workers=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "data_report.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(4)  # a few steps in
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = re.findall(r"SIGINT: saving a checkpoint at step (\d+)", stderr)
    assert len(stopped) == 1 and stderr.count("Ctrl-C again stops at once") == 1, stderr[-3000:]  # not the workers
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == [f"checkpoint-{stopped[0]}"]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_ctrl_c_during_data_preparation_stops_cleanly_and_the_rerun_resumes(tmp_path, micro_model_config,
                                                                          tokenizer_dir):
    """Ctrl-C while tokenizer worker processes run: one message and exit code 130, no traceback from the main
    process or the workers, the saved tokenization progress kept for the next run."""
    run = config(tmp_path, micro_model_config, tokenizer_dir, preprocessing_num_workers=2, max_steps=1)
    child = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import data_utils, pretrain
data_utils.POOL_MIN_BYTES, data_utils.CHUNK_LINES, data_utils.PROGRESS_SECONDS = 0, 4, 0.0
real = data_utils.atomic_write_text
def slow_progress(path, text):
    real(path, text)
    if path.name == data_utils.PROGRESS:
        print("saved", flush=True)
        time.sleep(0.3)
data_utils.atomic_write_text = slow_progress
sys.exit(pretrain.main([{str(run)!r}]))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "saved\n"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.count("interrupted (Ctrl-C)") == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "the next run with the same data and settings resumes from there" in stderr
    progress = list((tmp_path / "cache" / "token_stores").glob("*/progress.json"))
    assert len(progress) == 1 and json.loads(progress[0].read_text())["chunks"] >= 1


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tmp_path, micro_model_config, tokenizer_dir, capsys):
    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=4, save_steps=2, sample_prompts=[],
                 verify_saved_model=False)
    out = tmp_path / "out"
    assert main(capsys, run)[0] == 0  # finished: checkpoint-2, checkpoint-4, metrics.json
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")  # resumed for more steps (one run id), then killed
    code, err = main(capsys, run, "--max_steps", 2)
    assert code == 2 and "holds checkpoint-6, checkpoint-4, checkpoint-2 of a run that did not finish" in err
    shutil.rmtree(out / "checkpoint-6")
    (out / "metrics.json").unlink()  # now they look like an unfinished run's
    code, err = main(capsys, run, "--max_steps", 2)
    assert code == 2 and "holds checkpoint-4, checkpoint-2 of a run that did not finish" in err
    assert "--resume_from_checkpoint auto" in err and "--overwrite_output_dir true" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # untouched
    assert main(capsys, run, "--max_steps", 2, "--overwrite_output_dir", "true")[0] == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # only this run's
    code, err = main(capsys, run, "--max_steps", 2, "--sources", "[{path: missing.txt}]")
    assert code == 2 and (out / "checkpoint-2").is_dir()  # a run that fails to start removes nothing
    for setting in ("--model_name_or_path", "--tokenizer_name_or_path"):  # its base: the run would delete it
        code, err = main(capsys, run, "--max_steps", 2, setting, out / "checkpoint-2", "--model_config", "")
        assert code == 2 and f"{setting[2:]} `{out / 'checkpoint-2'}` is checkpoint-2 of output_dir" in err, err[-2000:]
        assert (out / "checkpoint-2" / "model.safetensors").is_file()
    code, err = main(capsys, run, "--max_steps", 2)  # after a finished run: its checkpoints go, with a warning
    assert code == 0 and "checkpoint-2 of an earlier run: this run starts fresh and removes them" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    later = time.time() + 100  # a copy (cp, rsync without -t) that left the checkpoint newer than metrics.json
    os.utime(out / "checkpoint-2", (later, later))
    code, err = main(capsys, run, "--max_steps", 2)  # the run id says it finished
    assert code == 0 and "checkpoint-2 of an earlier run: this run starts fresh and removes them" in err


def test_checkpoints_from_before_content_keys_of_hub_data_files_still_resume(tmp_path, micro_model_config,
                                                                             tokenizer_dir, capsys):
    """`hub: json` stores of local data_files were keyed by the datasets fingerprint: such a checkpoint's store
    name is the source's `legacy_store` now, and the same files resume; other files are refused as before."""
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"text": f"第{i}条记录：高血压患者应当规律服药并监测血压。"}, ensure_ascii=False) + "\n"
                            for i in range(200)), encoding="utf-8")
    sources = json.dumps([{"name": "recs", "hub": "json", "data_files": str(data)}])
    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=4, save_steps=2, sample_prompts=[],
                 verify_saved_model=False)
    assert main(capsys, run, "--sources", sources)[0] == 0
    plan_file = tmp_path / "out" / "checkpoint-2" / "data_plan.json"
    plan = json.loads(plan_file.read_text())
    recs = plan["sources"]["recs"]
    recs["store"] = recs.pop("legacy_store")  # as the earlier version wrote it
    plan_file.write_text(json.dumps(plan))
    shutil.rmtree(tmp_path / "out" / "checkpoint-4")
    code, err = main(capsys, run, "--sources", sources, "--resume_from_checkpoint", "auto")
    assert code == 0, err[-2000:]
    data.write_text(data.read_text(encoding="utf-8").replace("第0条", "第零条"), encoding="utf-8")
    code, err = main(capsys, run, "--sources", sources, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2"))
    assert code == 2 and "trained on other data (source `recs` store" in err


def test_a_resume_keeps_its_tokenizer_and_refuses_another_model(tmp_path, micro_model_config, capsys):
    import json as json_

    from transformers import AutoTokenizer

    corpus = make_text_corpus(tmp_path / "data", repeat=30)
    run = config(tmp_path, micro_model_config, None, max_steps=2, save_steps=2, sample_prompts=[],
                 verify_saved_model=False, tokenizer_name_or_path=None, tokenizer_vocab_size=800,
                 sources=[{"path": str(corpus)}])
    assert main(capsys, run)[0] == 0
    checkpoint = tmp_path / "out" / "checkpoint-2"
    with open(corpus, "a", encoding="utf-8") as f:  # the sources change: a new tokenizer would be trained
        f.write("新增的句子改变了分词器的训练数据。\n" * 50)
    (tmp_path / "out" / "metrics.json").unlink()
    vocab = AutoTokenizer.from_pretrained(checkpoint).get_vocab()
    resume = ["--resume_from_checkpoint", "auto", "--max_steps", 4, "--save_steps", 1, "--save_total_limit", 1]
    code, err = main(capsys, run, *resume)  # other data: its data position means nothing
    assert code == 2 and "trained on other data (source `corpus` store" in err and "--ignore_data_skip true" in err
    code, err = main(capsys, run, *resume, "--ignore_data_skip", "true")  # rotation deletes checkpoint-2, where
    assert code == 0 and "it resumes with the tokenizer it was trained with" in err  # the tokenizer came from
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == vocab
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "tokenizer.model").is_file() and (tmp_path / "out" / "tokenizer.model").is_file()  # extendable
    shape = json_.loads(micro_model_config.read_text())
    other = tmp_path / "wider.json"
    other.write_text(json_.dumps({**shape, "hidden_size": shape["hidden_size"] * 2}))
    code, err = main(capsys, run, "--resume_from_checkpoint", str(checkpoint), "--model_config", other)
    assert code == 2 and "was saved from another model shape (hidden_size" in err and "Traceback" not in err
    code, err = main(capsys, run, "--resume_from_checkpoint", str(checkpoint), "--config_overrides", "head_dim=32")
    assert code == 2 and "was saved from another model shape (head_dim" in err and "Traceback" not in err


def test_forgetting_baseline_survives_a_resume(tmp_path, micro_model_config, tokenizer_dir, capsys):
    import json as json_

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=2, save_steps=2, eval_strategy="steps",
                 eval_steps=2, eval_on_start=True, sample_prompts=[], verify_saved_model=False, learning_rate=1e-2)
    sources = [{"name": "notes", "path": str(make_text_corpus(tmp_path / "data", repeat=30)), "watch_forgetting": True}]
    assert main(capsys, run, "--sources", json_.dumps(sources, ensure_ascii=False))[0] == 0
    (tmp_path / "out" / "metrics.json").unlink()
    assert main(capsys, run, "--sources", json_.dumps(sources, ensure_ascii=False), "--resume_from_checkpoint", "auto",
                "--max_steps", 4)[0] == 0
    metrics = json_.loads((tmp_path / "out" / "metrics.json").read_text())
    history = json_.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_notes_ppl" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]  # no second evaluation at the resumed step
    assert metrics["eval"]["ppl_change_pct_over_baseline"]["notes"] == round(
        100 * (evals[-1]["eval_notes_ppl"] / evals[0]["eval_notes_ppl"] - 1), 2)


def test_a_per_file_source_too_small_for_eval_is_not_watched_for_forgetting(tmp_path, micro_model_config,
                                                                              tokenizer_dir, capsys):
    import json as json_

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=1, sample_prompts=[], verify_saved_model=False)
    data = make_text_corpus(tmp_path / "data", repeat=30).parent
    (data / "notes.txt").write_text("一行\n两行\n", encoding="utf-8")
    sources = [{"path": str(data), "per_file": True, "watch_forgetting": True}]
    code, err = main(capsys, run, "--sources", json_.dumps(sources))
    assert code == 0, err[-2000:]
    assert "source `notes` (per_file) is not watched for forgetting: it is too small for an eval set" in err


def test_run_length_from_the_command_line_wins_over_the_configs(tmp_path, micro_model_config, tokenizer_dir, capsys):
    import pretrain

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_train_tokens=100000)
    assert pretrain.parse_args([str(run), "--max_steps", "7"])[1].max_train_tokens is None
    both = config(tmp_path, micro_model_config, tokenizer_dir, max_train_tokens=100000, max_steps=3)
    code, err = main(capsys, both)
    assert code == 2 and "max_steps 3 and max_train_tokens 100000 both set the run's length" in err
    assert pretrain.parse_args([str(both), "--max_train_tokens", "500"])[2].max_steps == -1


def test_many_sources_fit_under_a_low_soft_open_file_limit(tmp_path, tokenizer_dir):
    """Each source keeps ~8 memory maps open: 40 files in a per_file folder under a soft limit of 256 open files
    (macOS's default) failed with Errno 24; the soft limit is now raised towards the hard one."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        (data / f"f{i:02d}.txt").write_text("".join(f"第{i}个文件第{j}行：高血压患者应定期测量血压。\n" for j in range(20)),
                                            encoding="utf-8")
    sources = json.dumps([{"path": str(data), "per_file": True}])
    command = (f"ulimit -Sn 256 && {sys.executable} data_utils.py prepare --tokenizer_name_or_path {tokenizer_dir} "
               f"--sources '{sources}' --cache_dir {tmp_path / 'cache'} --block_size 32 --output_dir {tmp_path / 'out'}")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout[proc.stdout.index("{"):])["sources"]) == 40


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_deepspeed_checkpoint_that_would_run_code_is_not_resumed(tmp_path):
    """DeepSpeed unpickles its global_step*/ files (weights_only=False): a downloaded checkpoint ran its code.
    Their pickles are now read for the classes they name, without running them."""
    import torch

    import pretrain

    checkpoint = tmp_path / "checkpoint-10"
    (checkpoint / "global_step10").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "ds_version": "0.19.8"},
               checkpoint / "global_step10" / "mp_rank_00_model_states.pt")
    args = pretrain.parse_args(["--output_dir", str(tmp_path / "out")])[2]
    pretrain.check_checkpoint_code(str(checkpoint), args)  # tensors, dicts and strings: fine
    torch.save({"module": RunsCode()}, checkpoint / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(pretrain.ConfigError, match=r"would run code of posix\.system.*--trust_checkpoint true"):
        pretrain.check_checkpoint_code(str(checkpoint), args)
    args.trust_checkpoint = True
    pretrain.check_checkpoint_code(str(checkpoint), args)


def test_the_deepspeed_tag_to_load_is_checked_wherever_it_points(tmp_path):
    """DeepSpeed loads the folder `latest` names, not only global_step*/: a payload in another folder, named by
    `latest`, passed the check and ran."""
    import torch

    import pretrain

    checkpoint = tmp_path / "checkpoint-10"
    (checkpoint / "global_step10").mkdir(parents=True)
    torch.save({"module": {}}, checkpoint / "global_step10" / "mp_rank_00_model_states.pt")
    (checkpoint / "evil").mkdir()
    torch.save({"module": RunsCode()}, checkpoint / "evil" / "mp_rank_00_model_states.pt")
    (checkpoint / "latest").write_text("evil")
    args = pretrain.parse_args(["--output_dir", str(tmp_path / "out")])[2]
    with pytest.raises(pretrain.ConfigError, match=r"evil/mp_rank_00_model_states\.pt would run code"):
        pretrain.check_checkpoint_code(str(checkpoint), args)
    for tag in ("../elsewhere", "missing"):
        (checkpoint / "latest").write_text(tag)
        with pytest.raises(pretrain.ConfigError, match="is not a folder of the checkpoint"):
            pretrain.check_checkpoint_code(str(checkpoint), args)
    (checkpoint / "latest").write_text("global_step10")
    shutil.rmtree(checkpoint / "evil")
    (tmp_path / "payload").mkdir()
    torch.save({"module": RunsCode()}, tmp_path / "payload" / "mp_rank_00_model_states.pt")
    (checkpoint / "linked").symlink_to(tmp_path / "payload")  # rglob does not enter it
    (checkpoint / "latest").write_text("linked")
    with pytest.raises(pretrain.ConfigError, match="is a symbolic link"):
        pretrain.check_checkpoint_code(str(checkpoint), args)


def test_the_open_file_limit_steps_down_to_what_the_system_allows(monkeypatch):
    """macOS refuses a soft limit above kern.maxfilesperproc (often 10,240) even under an unlimited hard limit:
    one refused request left the limit at 256."""
    import resource

    import pretrain

    asked = []

    def setrlimit(which, limits):
        asked.append(limits[0])
        if limits[0] > 10240:
            raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    pretrain.raise_open_file_limit()
    assert asked == [16384, 10240]
