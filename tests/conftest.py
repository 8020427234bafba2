"""Shared fixtures: small corpora, a tokenizer trained inside the tests, a tiny model config.

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole session.
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ZH_LINES = [
    "高血压是以体循环动脉血压增高为主要特征的临床综合征，长期高血压可损伤心、脑、肾等器官。",
    "糖尿病患者应规律监测血糖，合理饮食，适量运动，并在医生指导下使用降糖药物。",
    "发热是机体在致热原作用下体温调节中枢调定点上移而引起的调节性体温升高。",
    "北京是中国的首都，也是全国的政治、文化和国际交往中心，有三千多年的建城史。",
    "长江是中国第一长河，全长约六千三百公里，流经青藏高原、四川盆地和长江中下游平原。",
    "Aspirin 100 mg daily is used for secondary prevention of cardiovascular events.",
]


def logged_losses(checkpoint: Path) -> dict[int, float]:
    """The training loss at each logged step, from a checkpoint's trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def make_text_corpus(directory: Path, name: str = "corpus.txt", repeat: int = 8) -> Path:
    """A plain-text file, one sample per line, with distinct lines (numbered variants)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{line}（第{i}例）" for i in range(repeat) for line in ZH_LINES]
    path = directory / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_jsonl_corpus(directory: Path, name: str = "corpus.jsonl", repeat: int = 8, field: str = "text") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with open(path, "w", encoding="utf-8") as f:
        for i in range(repeat):
            for line in ZH_LINES:
                f.write(json.dumps({field: f"{line} 记录{i}", "title": f"病例{i}", "id": i}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece BPE tokenizer trained by the toolkit on a small corpus (no downloads)."""
    import data_utils

    base = tmp_path_factory.mktemp("tok")
    corpus = make_text_corpus(base / "data", repeat=20)
    return data_utils.train_sentencepiece_tokenizer([{"path": str(corpus)}], str(base / "cache"), vocab_size=600)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def micro_model_config(tmp_path_factory) -> Path:
    """A model config far smaller than configs/model/tiny.json, so end-to-end tests take seconds."""
    path = tmp_path_factory.mktemp("model") / "micro.json"
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": True, "vocab_size": 512}))
    return path


def save_base_model(tmp_path_factory, micro_model_config, tokenizer_dir, **shape):
    """A saved 'pretrained' model (untied head, so both embedding matrices are checked) with its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    import pretrain

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = json.loads(micro_model_config.read_text())
    config_path = tmp_path_factory.mktemp("untied") / "micro_untied.json"
    config_path.write_text(json.dumps({**spec, "tie_word_embeddings": False, **shape}))
    torch.manual_seed(0)
    model = pretrain.build_model(pretrain.parse_args(["--model_config", str(config_path)])[0], tokenizer, 32)
    directory = tmp_path_factory.mktemp("base")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, micro_model_config, tokenizer_dir):
    return save_base_model(tmp_path_factory, micro_model_config, tokenizer_dir)


@pytest.fixture(scope="session")
def base_model_64(tmp_path_factory, micro_model_config, tokenizer_dir):
    """Hidden size 64: bitsandbytes packs 4-bit weights for CPU inference in blocks of 64 inputs."""
    return save_base_model(tmp_path_factory, micro_model_config, tokenizer_dir, hidden_size=64,
                           intermediate_size=128)
