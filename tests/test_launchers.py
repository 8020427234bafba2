"""The shell launchers' decisions, read off the command they start: a stand-in interpreter (PYTHON) reports a
chosen GPU count and prints what it was asked to run, with the GPUs it was left to see."""
import os
import subprocess

import pytest

from conftest import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then case "$2" in *mps*) echo "${FAKE_GPUS:-0} ${FAKE_MPS:-0}" ;; *) echo "${FAKE_GPUS:-0}" ;; esac; exit 0; fi
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} RUN $*"
for name in TORCH_DISABLE_SHARE_RDZV_TCP_STORE TORCH_ELASTIC_SHUTDOWN_TIMEOUT; do
    [ -z "${!name:-}" ] || echo "$name=${!name}"
done
"""


@pytest.fixture
def launch(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)

    def run(script, gpus=0, **env):
        full = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "FSDP",
                                                                  "NPROC_PER_NODE", "HOSTFILE", "DS_CONFIG")}
        full.update({"PYTHON": str(python), "FAKE_GPUS": str(gpus), **env})
        proc = subprocess.run(["bash", str(ROOT / script)], cwd=tmp_path, env=full, capture_output=True, text=True,
                              timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    return run


def test_one_process_on_a_machine_with_several_gpus_sees_one(launch):
    rc, out = launch("run_pretrain.sh", gpus=4, NUM_GPUS="1")
    assert rc == 0 and "CUDA_VISIBLE_DEVICES=0 RUN pretrain.py" in out
    rc, out = launch("run_pretrain.sh", gpus=2, NUM_GPUS="1", CUDA_VISIBLE_DEVICES="2,3")
    assert rc == 0 and "CUDA_VISIBLE_DEVICES=2 RUN pretrain.py" in out
    rc, out = launch("run_pretrain.sh", gpus=4, NUM_GPUS="0")
    assert rc == 0 and "CUDA_VISIBLE_DEVICES= RUN pretrain.py" in out
    rc, out = launch("run_pretrain.sh", gpus=1)
    assert rc == 0 and "CUDA_VISIBLE_DEVICES=unset RUN pretrain.py" in out
    for script in ("run_pretrain.sh", "torchrun/run_torchrun.sh"):  # a relative PYTHON is the caller's, not the repo's
        rc, out = launch(script, gpus=1, PYTHON="./python")
        assert rc == 0 and "RUN " in out, out


def test_a_mac_trains_on_the_cpu_unless_num_gpus_asks_for_its_gpu(launch):
    """transformers picks MPS by itself when it is there: NUM_GPUS=0 (the default without CUDA) said CPU."""
    rc, out = launch("run_pretrain.sh", FAKE_MPS="1")
    assert rc == 0 and "RUN pretrain.py" in out and "--use_cpu true" in out, out
    assert "NUM_GPUS=1 trains on this Mac's GPU" in out
    rc, out = launch("run_pretrain.sh", FAKE_MPS="1", NUM_GPUS="1")
    assert rc == 0 and "RUN pretrain.py" in out and "--use_cpu" not in out, out
    rc, out = launch("run_pretrain.sh")  # no GPU of any kind: as before
    assert rc == 0 and "RUN pretrain.py" in out and "--use_cpu" not in out, out


def test_without_python_on_path_python3_runs_and_sh_starts_bash(launch, tmp_path):
    """Macs and Ubuntu have python3 but often no `python` (exec: python: not found, exit 127); dash has no
    pipefail (`sh run_pretrain.sh`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    for tool in ("bash", "dirname", "basename", "env"):
        (bin_dir / tool).symlink_to(subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                                                   text=True).stdout.strip())
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    for shell in ("bash", "sh"):
        proc = subprocess.run([shell if shell == "bash" else "/bin/sh", str(ROOT / "run_pretrain.sh")], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "RUN pretrain.py" in proc.stdout, (shell, proc.stdout + proc.stderr)
    (bin_dir / "python3").unlink()
    proc = subprocess.run(["bash", str(ROOT / "run_pretrain.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no python3 or python on PATH" in proc.stderr


def test_several_gpus_go_to_torchrun_one_process_each(launch):
    rc, out = launch("run_pretrain.sh", gpus=4)
    assert rc == 0 and "-m torch.distributed.run --standalone --nproc_per_node 4 --max_restarts 0 pretrain.py" in out
    assert "--use_cpu" not in out
    rc, out = launch("run_pretrain.sh", gpus=0, NUM_GPUS="2")
    assert rc == 0 and "--nproc_per_node 2" in out and "--use_cpu true" in out and "on the CPU" in out


@pytest.mark.parametrize("script, env, message", [
    ("run_pretrain.sh", {"NUM_GPUS": "two"}, "NUM_GPUS must be a whole number, got 'two'"),
    ("run_pretrain.sh", {"NUM_GPUS": "4", "FAKE_GPUS": "2"}, "NUM_GPUS=4 but this machine has 2 GPU(s) visible"),
    ("torchrun/run_torchrun.sh", {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a whole number of at least 1"),
    ("torchrun/run_torchrun.sh", {"MAX_RESTARTS": "-1"}, "MAX_RESTARTS must be a whole number, got '-1'"),
    ("torchrun/run_torchrun.sh", {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5m"},
     "TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number, got '5m'"),
    ("torchrun/run_torchrun.sh", {"FSDP": "maybe"}, "FSDP must be 1 (on) or 0 (off), got 'maybe'"),
    ("deepspeed/run_deepspeed.sh", {"NUM_GPUS": "0"}, "NUM_GPUS must be a whole number of at least 1, got '0'"),
])
def test_launcher_settings_that_cannot_work_are_named(launch, script, env, message):
    gpus = env.pop("FAKE_GPUS", "0")
    rc, out = launch(script, gpus=gpus, **env)
    assert rc == 2 and message in out and "RUN" not in out


def test_preempted_ranks_get_time_to_save_a_checkpoint(launch):
    """torchrun passes SIGTERM on and kills the ranks 30 s later by default, before a large model's checkpoint is
    written: the launcher gives them 300 s unless told otherwise."""
    rc, out = launch("torchrun/run_torchrun.sh")
    assert rc == 0 and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in out
    rc, out = launch("torchrun/run_torchrun.sh", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="900")
    assert rc == 0 and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=900" in out


def test_fsdp_is_switched_on_the_transformers_5_way(launch):
    for value in ("1", "true"):
        rc, out = launch("torchrun/run_torchrun.sh", FSDP=value)
        assert rc == 0 and "--fsdp true --fsdp_config torchrun/fsdp_config.json" in out


def test_a_hostfile_run_goes_through_the_deepspeed_launcher_of_the_chosen_interpreter(launch, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    rc, out = launch("deepspeed/run_deepspeed.sh", HOSTFILE=str(hostfile), NUM_GPUS="4",
                     DS_LAUNCHER_ARGS="--launcher openmpi")
    assert rc == 0, out
    assert (f"RUN -m deepspeed.launcher.runner --hostfile {hostfile} --no_local_rank --num_gpus 4 --launcher openmpi "
            "--master_addr node1 --master_port 29500 pretrain.py") in out
    assert "--use_cpu true" in out  # node 0 has no CUDA here


def test_a_hostfile_run_hands_the_hub_settings_to_the_other_nodes(tmp_path):
    """The deepspeed launcher passes on only PYTHON*, NCCL*, ... and .deepspeed_env lines: HF_ENDPOINT (a mirror)
    or HF_HUB_OFFLINE never reached nodes 1 and up. Read off the command a stand-in pdsh is given."""
    import sys

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pdsh").write_text('#!/usr/bin/env bash\nprintf "PDSH %s\\n" "$*"\n')
    (tmp_path / "bin" / "pdsh").chmod(0o755)
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "DS_CONFIG", "NUM_GPUS", "DS_ENV_FILE")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", PYTHON=sys.executable, HOSTFILE=str(tmp_path / "hosts"),
               DS_LAUNCHER_ARGS="--no_ssh_check", HF_ENDPOINT="https://hf-mirror.com", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", UNRELATED_SETTING="x", CUDA_VISIBLE_DEVICES="",
               WANDB_NOTES="lr $(touch pwned) sweep")  # run as code by the other nodes' shell if forwarded
    proc = subprocess.run(["bash", str(ROOT / "deepspeed/run_deepspeed.sh"), "--max_steps", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    pdsh = [line for line in proc.stdout.splitlines() if line.startswith("PDSH ")]
    assert proc.returncode == 0 and len(pdsh) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    for setting in ("HF_ENDPOINT=https://hf-mirror.com;", "HF_HUB_OFFLINE=1;", "TOKENIZERS_PARALLELISM=false;"):
        assert f"export {setting}" in pdsh[0]
    assert "UNRELATED_SETTING" not in pdsh[0] and "-w node1,node2" in pdsh[0]
    assert "WANDB_NOTES" not in pdsh[0] and "WANDB_NOTES is not passed to the other nodes" in proc.stderr


def test_fsdp_true_from_a_config_file_turns_fsdp_on(tmp_path):
    import pretrain

    for value, on in (("true", True), ("yes", True), ("false", None), ("", None)):
        _, _, training_args = pretrain.parse_args(["--output_dir", str(tmp_path), "--fsdp", value, "--use_cpu", "true"])
        assert training_args.fsdp == on, value


def test_a_setting_error_under_torchrun_is_printed_once_per_node():
    env = dict(os.environ, NPROC_PER_NODE="2", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", str(ROOT / "torchrun/run_torchrun.sh"), "--block_size", "abc"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    printed = [line for line in proc.stderr.splitlines() if line.startswith("error: invalid setting")]
    assert len(printed) == 1, proc.stderr[-3000:]
    root_cause = proc.stderr.split("Root Cause")[1]  # torchrun's closing box names it too, not just a link
    assert f"traceback : {printed[0]}" in root_cause, root_cause
    # with restarts left, torchrun is stopped instead: each attempt would fail the same way
    proc = subprocess.run(["bash", str(ROOT / "torchrun/run_torchrun.sh"), "--block_size", "abc",
                           "--resume_from_checkpoint", "auto"], cwd=ROOT, env=dict(env, MAX_RESTARTS="2"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: invalid setting")] == printed
    assert "stopping torchrun rather than restarting" in proc.stderr


def test_restarts_get_a_fresh_store_for_each_attempt(launch, tmp_path, monkeypatch):
    """torchrun's shared store keeps a dead attempt's addresses: restarts go through the c10d rendezvous without it,
    and a run started on it with restarts is refused before it can hang."""
    import pretrain

    rc, out = launch("torchrun/run_torchrun.sh", MAX_RESTARTS="1")
    assert rc == 0 and "--standalone" in out and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out
    rc, out = launch("torchrun/run_torchrun.sh", MAX_RESTARTS="2", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert rc == 0 and "--rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29500" in out and "--node_rank" not in out
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out
    rc, out = launch("torchrun/run_torchrun.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert rc == 0 and "--node_rank 1" in out and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in out

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(pretrain.ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        pretrain.train(["--output_dir", str(tmp_path), "--use_cpu", "true", "--resume_from_checkpoint", "auto"])
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    pretrain.refuse_restarts_on_a_shared_store()  # a store of the attempt's own


def test_restarts_need_resume_from_the_newest_checkpoint(tmp_path, monkeypatch):
    import pretrain

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    for resume in ([], ["--resume_from_checkpoint", str(tmp_path / "checkpoint-2")]):
        training_args = pretrain.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", *resume])[2]
        with pytest.raises(pretrain.ConfigError, match="MAX_RESTARTS 3.*pass `--resume_from_checkpoint auto`"):
            pretrain.resolve_resume(training_args)
    training_args = pretrain.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true",
                                         "--resume_from_checkpoint", "auto"])[2]
    assert pretrain.resolve_resume(training_args) is None  # nothing there yet: a fresh start


def test_a_path_relative_to_where_the_script_was_started_is_named_with_the_fix(tmp_path, micro_model_config,
                                                                                tokenizer_dir):
    """run_pretrain.sh runs from the repository root, so `mydata/...` given from another directory is not found:
    the error says where it is and what to pass."""
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "cases.txt").write_text("高血压\n", encoding="utf-8")
    (tmp_path / "run.yaml").write_text(
        f"model_config: {micro_model_config}\ntokenizer_name_or_path: {tokenizer_dir}\n"
        f"sources: [{{path: mydata/cases.txt}}]\noutput_dir: {tmp_path / 'out'}\nblock_size: 32\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PRETRAIN_CALLER_DIR", "NUM_GPUS")}
    proc = subprocess.run(["bash", str(ROOT / "run_pretrain.sh"), "run.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"path `mydata/cases.txt` does not exist. Fix `path` (a file, a directory or a glob), relative to {ROOT}. "
            f"It is there relative to the directory the script was started from: pass `{tmp_path}/mydata/cases.txt`"
            ) in proc.stderr
