"""Two processes on the CPU (gloo): DDP and FSDP through torchrun/run_torchrun.sh and DeepSpeed ZeRO-2 / ZeRO-3
through deepspeed/run_deepspeed.sh run pretrain.py end to end, against a single-process run with the
same global batch."""
import json
import os
import re
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, make_jsonl_corpus, make_text_corpus
from test_end_to_end import run_pretrain

STEPS, PER_DEVICE, BLOCK = 6, 4, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, micro_model_config, tokenizer_dir):
    base = tmp_path_factory.mktemp("dist")
    text, jsonl = make_text_corpus(base, repeat=30), make_jsonl_corpus(base, repeat=30)
    config = base / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(tokenizer_dir),
        "sources": [{"name": "notes", "path": str(text)}, {"name": "records", "path": str(jsonl)}],
        "block_size": BLOCK, "eval_fraction": 0.1, "max_steps": STEPS, "learning_rate": 3.0e-3,
        "logging_steps": 1, "eval_strategy": "no", "eval_on_start": False, "save_steps": 3, "report_to": "none",
        "seed": 11, "record_block_ids": True,
    }, allow_unicode=True), encoding="utf-8")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return base, config


def launch(setup, name, script, env=None, extra=()):
    base, config = setup
    out = base / name
    args = [config, "--output_dir", out, "--cache_dir", base / f"cache-{name}", *extra]
    if script == "pretrain.py":
        args += ["--per_device_train_batch_size", 2 * PER_DEVICE]
    else:
        args += ["--per_device_train_batch_size", PER_DEVICE]
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        proc = run_pretrain(args, script=script)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out, proc


def metrics(out):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def losses(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def single(setup):
    return launch(setup, "single", "pretrain.py")


def check_two_process_run(out, proc, single_out):
    m = metrics(out)
    assert m["train"]["world_size"] == 2
    assert m["train"]["tokens"] == STEPS * 2 * PER_DEVICE * BLOCK
    # the ranks read disjoint blocks
    rank0 = [i for line in (out / "block_ids" / "rank0.jsonl").read_text().splitlines() for i in json.loads(line)]
    rank1 = [i for line in (out / "block_ids" / "rank1.jsonl").read_text().splitlines() for i in json.loads(line)]
    assert len(rank0) >= STEPS * PER_DEVICE and len(rank1) >= STEPS * PER_DEVICE
    assert not set(rank0) & set(rank1)
    # tokenization ran once (main process first, the other rank read the cache): one progress bar per source
    for source in ("notes", "records"):
        assert len(re.findall(rf"tokenize {source}:\s+0%", proc.stderr)) == 1, source
    # same global batch as the single-process run -> the same losses, up to float reduction order
    assert m["train"]["final_logged_loss"] == pytest.approx(metrics(single_out)["train"]["final_logged_loss"],
                                                            rel=2e-3)


def test_ddp_two_processes(setup, single):
    out, proc = launch(setup, "ddp", "torchrun/run_torchrun.sh", env={"NPROC_PER_NODE": "2"})
    check_two_process_run(out, proc, single[0])


def test_fsdp_two_processes(setup, single):
    out, proc = launch(setup, "fsdp", "torchrun/run_torchrun.sh", env={"NPROC_PER_NODE": "2", "FSDP": "1"})
    check_two_process_run(out, proc, single[0])
    assert metrics(out)["model"]["saved_model_check"]["max_abs_logit_diff"] < 1e-4


def test_deepspeed_zero2_and_exact_resume(setup, single):
    out, proc = launch(setup, "zero2", "deepspeed/run_deepspeed.sh",
                       env={"DS_CONFIG": "deepspeed/ds_zero2.json", "NUM_GPUS": "2"})
    check_two_process_run(out, proc, single[0])
    # stop after step 3 (only its checkpoint survives), resume, and continue with the same losses
    resumed = setup[0] / "zero2-resumed"
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    launch(setup, "zero2-resumed", "deepspeed/run_deepspeed.sh",
           env={"DS_CONFIG": "deepspeed/ds_zero2.json", "NUM_GPUS": "2"},
           extra=["--resume_from_checkpoint", "auto", "--record_block_ids", "false"])
    full, again = losses(out / "checkpoint-6"), losses(resumed / "checkpoint-6")
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], rel=1e-5), step


def test_deepspeed_zero3_saves_a_model_with_the_engine_outputs(setup, single):
    from transformers import AutoModelForCausalLM

    out, proc = launch(setup, "zero3", "deepspeed/run_deepspeed.sh",
                       env={"DS_CONFIG": "deepspeed/ds_zero3.json", "NUM_GPUS": "2"})
    check_two_process_run(out, proc, single[0])
    assert (out / "model.safetensors").is_file()
    check = metrics(out)["model"]["saved_model_check"]  # the run's own check: reloaded == engine logits
    assert check["max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # and ours, against the engine's logits
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([check["probe_input_ids"]])).logits[0, -1, :8]
    assert logits.tolist() == pytest.approx(check["trained_last_logits_head"], abs=1e-4)


def test_deepspeed_config_with_optimizer_or_scheduler_is_refused(tmp_path):
    import pretrain

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(pretrain.ConfigError, match="`scheduler` block"):
        pretrain.check_deepspeed_config(str(bad))
    for shipped in sorted((ROOT / "deepspeed").glob("ds_*.json")):
        pretrain.check_deepspeed_config(str(shipped))  # the shipped ones leave both to the Trainer
