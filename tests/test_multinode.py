"""Two nodes on one machine: torchrun/run_torchrun.sh started twice (NNODES=2, NODE_RANK 0 and 1), as a cluster
would start it on each node. A node can be given its own disk at a path (a private mount namespace, `unshare -m`):
a node-local cache is prepared once per node, a node-local output_dir, other settings or settings that do not parse
on one node stop every rank at start with the reason, instead of leaving the other ranks waiting in a collective
until ddp_timeout."""
import os
import re
import shutil
import socket
import subprocess

import pytest
import yaml

from conftest import ROOT, make_jsonl_corpus, make_text_corpus

UNSHARE = shutil.which("unshare") and subprocess.run(
    ["unshare", "-m", "true"], capture_output=True).returncode == 0
needs_unshare = pytest.mark.skipif(not UNSHARE, reason="needs `unshare -m` (a private mount namespace) for node-local disks")


@pytest.fixture(scope="module")
def config(tmp_path_factory, micro_model_config, tokenizer_dir):
    base = tmp_path_factory.mktemp("nodes")
    text, jsonl = make_text_corpus(base, repeat=30), make_jsonl_corpus(base, repeat=30)
    path = base / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(tokenizer_dir),
        "sources": [{"name": "notes", "path": str(text)}, {"name": "records", "path": str(jsonl)}],
        "block_size": 32, "eval_fraction": 0.1, "max_steps": 2, "per_device_train_batch_size": 2,
        "logging_steps": 1, "eval_strategy": "no", "eval_on_start": False, "save_steps": 2, "report_to": "none",
        "sample_prompts": [],
    }, allow_unicode=True), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(config, args, node1_args=(), nproc=1, node1_private=()):
    """Run both nodes to the end; node 1 sees each directory in `node1_private` replaced by an empty one of its own."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
                   NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   NPROC_PER_NODE=str(nproc))
        cmd = ["bash", str(ROOT / "torchrun/run_torchrun.sh"), str(config), *map(str, args),
               *(map(str, node1_args) if node == 1 else ())]
        if node == 1 and node1_private:
            mounts = []
            for i, path in enumerate(node1_private):
                own = path.parent / f"{path.name}-node1-{i}"
                own.mkdir(parents=True, exist_ok=True)
                path.mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount --bind {own} {path}")
            cmd = ["unshare", "-m", "bash", "-c", " && ".join(mounts) + ' && exec "$@"', "node1", *cmd]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a node hung: the ranks did not stop together")
        results.append((proc.returncode, out + err))
    return results


def test_other_settings_on_one_node_stop_every_rank_at_start(config, tmp_path):
    results = two_nodes(config, ["--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache"],
                        node1_args=["--learning_rate", "1e-3"])
    for rc, log in results:
        assert rc != 0
        assert "rank 1 on" in log and "has other settings" in log, log[-3000:]
        assert "Start every node with the same config file and options" in log
    assert not list((tmp_path / "out").glob(".shared-check-*"))


@pytest.mark.parametrize("bad,message", [(["--max_steps", "abc"], "invalid setting: argument --max_steps"),
                                         (["--eval_fraction", "2"], "eval_fraction")])  # a ConfigError, a DataError
def test_settings_that_do_not_parse_on_one_node_stop_every_rank_at_start(config, tmp_path, bad, message):
    """Node 1 stops before the process group forms; it joins the group to tell node 0, which used to wait for it
    until ddp_timeout."""
    results = two_nodes(config, ["--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache"],
                        node1_args=bad)
    for rc, log in results:
        assert rc != 0
    assert re.search(f"error: rank 1 on .* could not read its settings: .*{message}", results[0][1]), \
        results[0][1][-3000:]
    assert re.search(f"error: .*{message}", results[1][1]), results[1][1][-3000:]


@needs_unshare
def test_an_output_dir_that_is_not_shared_stops_every_rank_at_start(config, tmp_path):
    out = tmp_path / "out"
    results = two_nodes(config, ["--output_dir", out, "--cache_dir", tmp_path / "cache"], node1_private=[out])
    for rc, log in results:
        assert rc != 0
        assert "is not one shared directory: rank 1 on" in log, log[-3000:]
        printed = [line for line in log.splitlines() if line.startswith("error:") and "is not one shared" in line]
        assert len(printed) == 1  # once per node (and in torchrun's closing box)
    assert not list(out.glob(".shared-check-*")) and not list(out.glob("checkpoint-*"))


@needs_unshare
def test_data_missing_on_one_node_stops_every_rank(config, tmp_path):
    """Node 1 sees an empty data directory: its error, raised while it prepares the data, stops node 0 too."""
    data = tmp_path / "data"
    data.mkdir()
    run = yaml.safe_load(config.read_text(encoding="utf-8"))
    for source in run["sources"]:
        source["path"] = shutil.copy(source["path"], data)
    own = tmp_path / "run.yaml"
    own.write_text(yaml.safe_dump(run, allow_unicode=True), encoding="utf-8")
    results = two_nodes(own, ["--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache"],
                        node1_private=[data])
    for rc, log in results:
        assert rc != 0
    assert re.search(r"error: rank 1 on \S+: source `notes`", results[0][1]), results[0][1][-3000:]


@needs_unshare
def test_a_node_local_cache_is_prepared_once_per_node(config, tmp_path):
    """Rank 0 tokenizes into its cache; on node 1, whose cache_dir is its own disk, local rank 0 tokenizes next
    and its other rank reads that cache: two preparations, not one per rank of node 1."""
    cache = tmp_path / "cache"
    results = two_nodes(config, ["--output_dir", tmp_path / "out", "--cache_dir", cache], nproc=2,
                        node1_private=[cache])
    for rc, log in results:
        assert rc == 0, log[-5000:]
    for node, (_, log) in enumerate(results):
        assert len(re.findall(r"tokenize notes:\s+0%", log)) == 1, (node, log[-5000:])
    assert "waiting for rank 0 to prepare the data first" in results[1][1]
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_the_settings_compared_across_nodes_are_the_options_and_the_configs_content(tmp_path):
    import pretrain

    here, there = tmp_path / "a" / "run.yaml", tmp_path / "b" / "run.yaml"
    for path in (here, there):
        path.parent.mkdir()
        path.write_text("max_steps: 3\n")
    fingerprint = pretrain.settings_fingerprint([str(here), "--seed", "1"])
    assert pretrain.settings_fingerprint(["--local_rank=1", str(there), "--seed", "1"]) == fingerprint  # same content
    assert pretrain.settings_fingerprint([str(here), "--seed", "2"]) != fingerprint
    there.write_text("max_steps: 4\n")
    assert pretrain.settings_fingerprint([str(there), "--seed", "1"]) != fingerprint


def test_a_rank_that_could_not_parse_joins_the_others_on_their_backend(tmp_path):
    """It reads use_cpu as parsing would: the command line's last value over the config file's (a gloo rank among
    NCCL ones, or the reverse, could not reach them)."""
    import pretrain

    config = tmp_path / "run.yaml"
    config.write_text("use_cpu: true\n")
    for argv, on_cpu in (([], False), ([str(config)], True), ([str(config), "--use_cpu", "false"], False),
                         (["--use_cpu=yes"], True), (["--use_cpu"], True), ([str(config), "--use_cpu=no"], False)):
        assert pretrain.asked_for_cpu(argv) == on_cpu, argv
