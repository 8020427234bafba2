"""run_pretrain2.sh: offline it fails fast with the fixes; pointed at local copies of the hub datasets
(hub layout, found through hub_local_dir) it streams, mixes by tokens and reports per-domain perplexity
with a step-0 baseline. Also the hub search command against a fake hub on loopback."""
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, ZH_LINES
from test_end_to_end import run_pretrain


def wikitext_rows(n_articles):
    rows = [" \n"]
    for a in range(n_articles):
        rows += [f" = Article {a} = \n", " \n", f" Article {a} is about topic {a % 7} and its history . \n", " \n",
                 " = = Details = = \n", " \n", f" Detail {a} says the value is {a * 3} units . \n"]
    return rows


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory):
    """data/hub-style local copies of the two hub datasets the default config names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hub")
    wiki = root / "Salesforce" / "wikitext"
    (wiki / "wikitext-103-raw-v1").mkdir(parents=True)
    pq.write_table(pa.table({"text": wikitext_rows(40)}), wiki / "wikitext-103-raw-v1" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": wikitext_rows(8)}), wiki / "wikitext-103-raw-v1" / "validation-00000-of-00001.parquet")
    (wiki / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-103-raw-v1\n  data_files:\n  - split: train\n"
        "    path: wikitext-103-raw-v1/train-*\n  - split: validation\n    path: wikitext-103-raw-v1/validation-*\n---\n")
    med = root / "shibing624" / "medical" / "pretrain"
    med.mkdir(parents=True)
    for name, n in (("train_encyclopedia.json", 40), ("valid_encyclopedia.json", 8)):
        with open(med / name, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name[:5]}第{i}条：{ZH_LINES[i % 5]}"}, ensure_ascii=False) + "\n")
    return root


def common_overrides(tmp_path, micro_model_config, tokenizer_dir):
    return ["--model_name_or_path", "", "--model_config", micro_model_config, "--tokenizer_name_or_path",
            tokenizer_dir, "--block_size", 32, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps",
            1, "--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache", "--report_to", "none",
            "--sample_prompts", ""]


def test_offline_fails_fast_with_the_fixes(tmp_path, micro_model_config, tokenizer_dir):
    start = time.time()
    proc = run_pretrain(["--hub_local_dir", tmp_path / "none", "--max_train_tokens", 512,
                         *common_overrides(tmp_path, micro_model_config, tokenizer_dir)],
                        script="run_pretrain2.sh", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.time() - start < 90  # no minutes of retries; (30 s failed on this 2-core machine under load)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")][0]
    assert "hub dataset `Salesforce/wikitext` cannot be loaded" in error
    assert "HF_ENDPOINT" in error and "hf download --repo-type dataset Salesforce/wikitext" in error


def test_local_copies_train_with_per_domain_perplexity(tmp_path, micro_model_config, tokenizer_dir, hub_copies):
    run_pretrain(["--hub_local_dir", hub_copies, "--max_train_tokens", 4 * 4 * 32, "--eval_steps", 2,
                  "--logging_steps", 1, "--dataloader_num_workers", 2, *common_overrides(tmp_path, micro_model_config, tokenizer_dir)],
                 script="run_pretrain2.sh")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["train"]["steps"] == 4
    for when in ("before_training", "final"):
        for domain in ("wikitext", "medical", "local"):
            assert f"eval_{domain}_ppl" in metrics["eval"][when], (when, domain)
    assert set(metrics["eval"]["ppl_change_pct_over_baseline"]) == {"wikitext"}  # watched for forgetting
    achieved = metrics["mixture"]["achieved"]
    assert achieved["medical"] == pytest.approx(0.5, abs=1 / 16)  # 16 blocks: within one block of 0.5
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert report["sources"]["wikitext"]["streaming"] is True
    assert report["sources"]["local"]["share_of_training_tokens"] == 0.2


def test_search_lists_hub_datasets(tmp_path, capsys):
    import data_utils

    class FakeHub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            rows = [{"id": "shibing624/medical", "downloads": 1234, "likes": 56}, {"id": "a/med", "downloads": 3}]
            body = json.dumps(rows if self.path.startswith("/api/datasets") else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0",
                   HF_HOME=str(tmp_path / "hf"))
        proc = subprocess.run([sys.executable, str(ROOT / "data_utils.py"), "search", "medical", "--limit", "2"],
                              env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "shibing624/medical\tdownloads 1234\tlikes 56"
    assert data_utils.main(["search", "medical"]) == 2  # offline (conftest), in this process
    assert "cannot search the hub" in capsys.readouterr().err
