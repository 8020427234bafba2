"""Two processes on the CPU (gloo): DDP and FSDP through torchrun/run_torchrun.sh and DeepSpeed ZeRO-2 / ZeRO-3
through deepspeed/run_deepspeed.sh run pretrain.py end to end, against a single-process run with the
same global batch. Kill-and-resume: every rank SIGKILLed right after a checkpoint, then resumed with the
same launcher, ends with the weights of the uninterrupted run and trains on exactly its blocks."""
import json
import os
import re
import socket
import subprocess
import sys

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
    questions = base / "questions.jsonl"  # 9 questions in eval batches of 4: the ranks run 2 and 1 batches
    questions.write_text("".join(json.dumps({"question": f"第{i}题：发热的常见原因有", "A": "感染", "B": "中暑" * (i + 1),
                                             "C": "外伤", "answer": "ABC"[i % 3]}, ensure_ascii=False) + "\n"
                                 for i in range(9)), encoding="utf-8")
    config = base / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(tokenizer_dir),
        "sources": [{"name": "notes", "path": str(text)}, {"name": "records", "path": str(jsonl)}],
        "benchmarks": [{"name": "quiz", "path": str(questions)}], "per_device_eval_batch_size": 4,
        "block_size": BLOCK, "eval_fraction": 0.1, "max_steps": STEPS, "learning_rate": 3.0e-3,
        "logging_steps": 1, "eval_strategy": "no", "eval_on_start": False, "save_steps": 3, "report_to": "none",
        "seed": 11, "record_block_ids": True,
    }, allow_unicode=True), encoding="utf-8")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return base, config


LAUNCHERS = {  # name: (launcher script, its environment, what torchrun is given for the same run)
    "single": ("pretrain.py", {}, None),
    "bf16_weights": ("pretrain.py", {}, None),
    "ddp": ("torchrun/run_torchrun.sh", {"NPROC_PER_NODE": "2"}, []),
    "zero2": ("deepspeed/run_deepspeed.sh", {"DS_CONFIG": "deepspeed/ds_zero2.json", "NUM_GPUS": "2"},
              ["--deepspeed", "deepspeed/ds_zero2.json"]),
    "zero3": ("deepspeed/run_deepspeed.sh", {"DS_CONFIG": "deepspeed/ds_zero3.json", "NUM_GPUS": "2"},
              ["--deepspeed", "deepspeed/ds_zero3.json"]),
}


FLAGS = {"bf16_weights": ["--mixed_precision", "bf16_weights"]}  # flags of both the uninterrupted and the killed run


def launch(setup, name, script, env=None, extra=(), check=True):
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
        proc = run_pretrain(args, script=script, check=check)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out, proc


def metrics(out):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def single(setup):
    return launch(setup, "single", "pretrain.py")


@pytest.fixture(scope="module")
def bf16_weights(setup):
    return launch(setup, "bf16_weights", "pretrain.py", extra=FLAGS["bf16_weights"])


@pytest.fixture(scope="module")
def ddp(setup):
    return launch(setup, "ddp", *LAUNCHERS["ddp"][:2])


@pytest.fixture(scope="module")
def zero2(setup):
    return launch(setup, "zero2", *LAUNCHERS["zero2"][:2])


def check_two_process_run(out, proc, single_out):
    m = metrics(out)
    assert m["train"]["world_size"] == 2
    assert m["train"]["tokens"] == STEPS * 2 * PER_DEVICE * BLOCK
    # the ranks read disjoint blocks
    rank0, rank1 = ([i for batch in block_lines(out, rank) for i in batch] for rank in (0, 1))
    assert len(rank0) == STEPS * PER_DEVICE and len(rank1) == STEPS * PER_DEVICE  # what trained, not what was fetched
    assert not set(rank0) & set(rank1)
    # tokenization ran once (main process first, the other rank read the cache): one progress bar per source
    for source in ("notes", "records"):
        assert len(re.findall(rf"tokenize {source}:\s+0%", proc.stderr)) == 1, source
    # same global batch as the single-process run -> the same losses, up to float reduction order
    assert m["train"]["final_logged_loss"] == pytest.approx(metrics(single_out)["train"]["final_logged_loss"],
                                                            rel=2e-3)


def test_ddp_two_processes(ddp, single):
    check_two_process_run(*ddp, single[0])
    # each source's eval loss as in one process, also where its blocks do not fill the last batch of every rank
    # (accelerate pads that batch with copies; averaging them in is off by about 1e-3 here, float order 1e-5)
    final, single_final = metrics(ddp[0])["eval"]["final"], metrics(single[0])["eval"]["final"]
    assert final.keys() == single_final.keys() and "eval_bench_quiz_accuracy" in final  # questions split over the ranks
    for key in final:
        assert final[key] == pytest.approx(single_final[key], rel=1e-4), key


def test_ddp_with_bf16_weights_averages_gradients_in_fp32(setup, bf16_weights):
    out, proc = launch(setup, "ddp-bf16_weights", *LAUNCHERS["ddp"][:2], extra=FLAGS["bf16_weights"])
    assert "gradients are averaged across ranks in fp32" in proc.stderr  # the hook (rank 0 logs)
    assert metrics(out)["train"]["world_size"] == 2
    assert metrics(out)["train"]["final_logged_loss"] == pytest.approx(
        metrics(bf16_weights[0])["train"]["final_logged_loss"], rel=1e-2)  # bf16 compute: looser than fp32


def test_fsdp_on_the_cpu_is_refused_not_run_as_ddp(setup):
    """accelerate turns FSDP on for accelerators only: on the CPU a FSDP=1 run trained as plain DDP, silently."""
    proc = launch(setup, "fsdp", "torchrun/run_torchrun.sh", env={"NPROC_PER_NODE": "2", "FSDP": "1"}, check=False)[1]
    printed = [line for line in proc.stderr.splitlines()
               if line.startswith("error: fsdp on the CPU: accelerate shards models on accelerators only")]
    assert proc.returncode != 0 and len(printed) == 1, proc.stderr[-3000:]  # both ranks stop; printed once per node


def test_deepspeed_zero2_two_processes(zero2, single):
    check_two_process_run(*zero2, single[0])


def test_deepspeed_over_a_hostfile_trains_on_every_slot(setup, single, tmp_path):
    """The multi-node path of run_deepspeed.sh (the deepspeed launcher), on one host named in the hostfile."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, proc = launch(setup, "zero2_hostfile", "deepspeed/run_deepspeed.sh", env={
        "HOSTFILE": str(hostfile), "DS_LAUNCHER_ARGS": "--no_ssh_check", "MASTER_PORT": str(port)})
    assert "--no_local_rank" in proc.stdout + proc.stderr
    check_two_process_run(out, proc, single[0])


def block_lines(out, rank):
    path = out / "block_ids" / f"rank{rank}.jsonl"
    return [json.loads(line)["block_ids"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("name", ["single", "bf16_weights", "ddp", "zero2"])
def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(name, setup, request):
    """Every rank dies by SIGKILL right after checkpoint-3 of 6; the same launcher resumes with `auto`.
    The final weights equal the uninterrupted run's (bitwise in one process; to float reduction order over
    gloo; with bf16 weights also their fp32 masters), and each rank trains on exactly the blocks of the two mixed sources that it trained on there."""
    from safetensors.torch import load_file

    straight = request.getfixturevalue(name)[0]
    script, env, torchrun_args = LAUNCHERS[name]
    base, config = setup
    killed = base / f"{name}-killed"
    world = 1 if torchrun_args is None else 2
    args = [str(config), "--output_dir", str(killed), "--cache_dir", str(base / f"cache-{name}"),
            "--per_device_train_batch_size", str(PER_DEVICE * (2 // world)), *FLAGS.get(name, [])]
    harness = str(ROOT / "tests" / "kill_after_checkpoint.py")
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    extra = [] if world == 1 else ["--use_cpu", "true", *torchrun_args]
    proc = subprocess.run([sys.executable, *launcher, harness, *args, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, KILL_AFTER_CHECKPOINT="3", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode != 0 and (killed / "checkpoint-3" / "trainer_state.json").is_file(), proc.stderr[-3000:]
    assert not (killed / "model.safetensors").exists() and not (killed / "checkpoint-6").exists()
    before = {rank: len(block_lines(killed, rank)) for rank in range(world)}

    launch(setup, f"{name}-killed", script, env=env, extra=["--resume_from_checkpoint", "auto", *FLAGS.get(name, [])])
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if world == 1:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    if name == "bf16_weights":  # the fp32 masters came back from checkpoint-3 exactly, not from the bf16 weights
        masters = [torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)["fp32_master_weights"]
                   for out in (straight, killed)]
        assert all(torch.equal(a, b) for a, b in zip(*masters))
    for rank in range(world):
        # steps 1-3 before the kill, then the resumed run's steps 4-6: exactly the uninterrupted run's batches
        seen, uninterrupted = block_lines(killed, rank), block_lines(straight, rank)
        assert before[rank] == 3 and seen == uninterrupted and len(seen) == STEPS, rank
        assert len({i for batch in uninterrupted for i in batch}) == STEPS * PER_DEVICE * 2 // world


def test_a_torchrun_restart_after_a_lost_rank_resumes_and_ends_like_the_uninterrupted_run(setup, ddp):
    """MAX_RESTARTS: torchrun starts the processes again after they die right after checkpoint-3; the restart continues
    from it (resume_from_checkpoint auto, which restarts require), and the run ends with the uninterrupted run's
    weights."""
    from safetensors.torch import load_file

    base, config = setup
    out = base / "ddp-restarted"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max_restarts", "1",
         str(ROOT / "tests" / "kill_after_checkpoint.py"), str(config), "--output_dir", str(out), "--cache_dir",
         str(base / "cache-ddp"), "--per_device_train_batch_size", str(PER_DEVICE), "--use_cpu", "true",
         "--resume_from_checkpoint", "auto"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, KILL_AFTER_CHECKPOINT="3", CUDA_VISIBLE_DEVICES="",
                 TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))  # as run_torchrun.sh sets it with MAX_RESTARTS
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun restart 1: resuming from the newest complete checkpoint" in proc.stderr
    a, b = load_file(ddp[0] / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_deepspeed_zero3_saves_a_model_with_the_engine_outputs(setup, single):
    from transformers import AutoModelForCausalLM

    out, proc = launch(setup, "zero3", "deepspeed/run_deepspeed.sh",
                       env={"DS_CONFIG": "deepspeed/ds_zero3.json", "NUM_GPUS": "2"})
    check_two_process_run(out, proc, single[0])
    assert (out / "model.safetensors").is_file()
    check = metrics(out)["model"]["saved_model_check"]  # the run's own check: reloaded == engine logits
    assert check["max_abs_logit_diff"] < 1e-4
    # the benchmark's forward passes in step on both ranks (ZeRO-3 gathers weights in each): one process's score
    bench = metrics(out)["eval"]["final"]["eval_bench_quiz_accuracy"]
    assert bench == pytest.approx(metrics(single[0])["eval"]["final"]["eval_bench_quiz_accuracy"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # and ours, against the engine's logits
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([check["probe_input_ids"]])).logits[0, -1, :8]
    assert logits.tolist() == pytest.approx(check["trained_last_logits_head"], abs=1e-4)


def test_deepspeed_zero3_continues_a_model_with_new_tokens(setup, single):
    """ZeRO-3 partitions the embedding (weight.shape is 0 outside a gather): new tokens' rows must still start at
    real values, not at the mean of an empty slice (NaN everywhere)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = setup
    tokenizer = AutoTokenizer.from_pretrained(single[0])
    tokenizer.add_tokens(["高血压病", "糖尿病人"])
    tokenizer.save_pretrained(base / "extended")
    out, proc = launch(setup, "zero3_new_tokens", "deepspeed/run_deepspeed.sh",
                       env={"DS_CONFIG": "deepspeed/ds_zero3.json", "NUM_GPUS": "2"},
                       extra=["--model_name_or_path", single[0], "--tokenizer_name_or_path", base / "extended",
                              "--max_steps", 2, "--save_steps", 100])
    assert "2 new token rows" in proc.stderr
    weight = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    assert weight.shape[0] >= len(tokenizer) and torch.isfinite(weight).all()


@pytest.fixture(scope="module")
def lora_flags(setup, single):
    """Continue the single run's model with LoRA and two new tokens (rare: their rows may get no gradient in a
    step, which DDP must not mistake for an unused parameter)."""
    from transformers import AutoTokenizer

    base, _ = setup
    tokenizer = AutoTokenizer.from_pretrained(single[0])
    tokenizer.add_tokens(["高血压病", "糖尿病人"])
    tokenizer.save_pretrained(base / "extended-lora")
    return ["--model_name_or_path", single[0], "--tokenizer_name_or_path", base / "extended-lora", "--finetuning",
            "lora", "--lora_rank", 4, "--max_steps", 4, "--save_steps", 100]


@pytest.fixture(scope="module")
def lora_single(setup, lora_flags):
    return launch(setup, "lora-single", "pretrain.py", extra=lora_flags)[0]


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_lora_with_new_tokens_two_processes(name, setup, lora_flags, lora_single):
    from transformers import AutoModelForCausalLM

    one = lora_single
    two, _ = launch(setup, f"lora-{name}", *LAUNCHERS[name][:2], extra=lora_flags)
    assert metrics(two)["train"]["world_size"] == 2 and metrics(two)["model"]["finetuning"] == "lora"
    assert metrics(two)["train"]["final_logged_loss"] == pytest.approx(
        metrics(one)["train"]["final_logged_loss"], rel=2e-3)  # the same global batch as one process
    assert metrics(two)["model"]["saved_model_check"]["max_abs_logit_diff"] < 1e-4
    weight = AutoModelForCausalLM.from_pretrained(two).get_input_embeddings().weight
    assert torch.isfinite(weight).all() and (two / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_under_deepspeed_zero3_matches_one_process(setup, single):
    """The base partitioned across the ranks (LoRA on a model too large for one GPU's memory): the adapter
    trains as in one process, is gathered, and is merged into the base loaded whole in the main process."""
    from safetensors.torch import load_file

    flags = ["--model_name_or_path", single[0], "--finetuning", "lora", "--lora_rank", 4, "--max_steps", 4,
             "--save_steps", 2, "--save_total_limit", 1, "--lora_dropout", 0]  # (dropout masks differ by rank)
    one, _ = launch(setup, "lora-zero3-single", "pretrain.py", extra=flags)
    two, proc = launch(setup, "lora-zero3", *LAUNCHERS["zero3"][:2], extra=flags)
    assert metrics(two)["train"]["world_size"] == 2 and metrics(two)["model"]["finetuning"] == "lora"
    assert metrics(two)["train"]["final_logged_loss"] == pytest.approx(
        metrics(one)["train"]["final_logged_loss"], rel=2e-3)
    assert metrics(two)["model"]["saved_model_check"]["max_abs_logit_diff"] < 1e-4
    merged, merged_one = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert merged.keys() == merged_one.keys() and not any("lora" in key for key in merged)
    for key in merged:
        torch.testing.assert_close(merged[key], merged_one[key], rtol=1e-4, atol=1e-5)
    adapter, adapter_one = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (two, one))
    assert adapter.keys() == adapter_one.keys() and all(t.numel() for t in adapter.values())
    assert (two / "checkpoint-4" / "adapter_model.safetensors").is_file()
    # every rank killed after checkpoint-2, then resumed: the uninterrupted run's model
    base, config = setup
    killed = base / "lora-zero3-killed"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "kill_after_checkpoint.py"), str(config), "--output_dir", str(killed), "--cache_dir",
         str(base / "cache-lora-zero3"), "--per_device_train_batch_size", str(PER_DEVICE), "--use_cpu", "true",
         *LAUNCHERS["zero3"][2], *map(str, flags)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, KILL_AFTER_CHECKPOINT="2", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode != 0 and (killed / "checkpoint-2" / "trainer_state.json").is_file(), proc.stderr[-3000:]
    launch(setup, "lora-zero3-killed", *LAUNCHERS["zero3"][:2], extra=[*flags, "--resume_from_checkpoint", "auto"])
    assert metrics(killed)["train"]["resumed_from_step"] == 2
    resumed = load_file(killed / "model.safetensors")
    for key in merged:
        torch.testing.assert_close(resumed[key], merged[key], rtol=1e-5, atol=1e-6)


def test_qlora_under_deepspeed_zero2_matches_one_process(setup, tmp_path):
    """4-bit frozen weights in DeepSpeed's engine (which casts and wraps the module) train as in one process,
    and the merge into the unquantized base is saved once."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base, config = setup
    tokenizer_dir = yaml.safe_load(config.read_text(encoding="utf-8"))["tokenizer_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)  # hidden size 64: bitsandbytes packs 4-bit weights for CPU inference in blocks of 64
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    flags = ["--model_name_or_path", tmp_path / "base", "--finetuning", "lora", "--lora_rank", 4,
             "--quantization_bit", 4, "--max_steps", 4, "--save_steps", 100]
    one, _ = launch(setup, "qlora-single", "pretrain.py", extra=flags)
    two, _ = launch(setup, "qlora-zero2", *LAUNCHERS["zero2"][:2], extra=flags)
    assert metrics(two)["train"]["world_size"] == 2
    assert metrics(two)["train"]["final_logged_loss"] == pytest.approx(
        metrics(one)["train"]["final_logged_loss"], rel=2e-3)
    check = metrics(two)["model"]["saved_model_check"]
    assert check["max_abs_logit_diff"] <= check["tolerance"] and check["quantization"]["probe_loss_saved"] > 0
    assert "quantization_config" not in json.loads((two / "config.json").read_text())


def test_deepspeed_configs_that_would_replace_settings_or_lose_the_model_are_refused(tmp_path):
    import pretrain

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(pretrain.ConfigError, match="`scheduler` block"):
        pretrain.check_deepspeed_config(str(bad))
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(pretrain.ConfigError, match="stage3_gather_16bit_weights_on_model_save: true"):
        pretrain.check_deepspeed_config(str(bad))
    for shipped in sorted((ROOT / "deepspeed").glob("ds_*.json")):
        pretrain.check_deepspeed_config(str(shipped))  # the shipped ones leave both to the Trainer
