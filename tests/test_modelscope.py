"""ModelScope: `modelscope:OWNER/NAME` models and datasets are downloaded (rank 0 first), then read from local
directories; offline, the ModelScope cache and a dataset's completed copy answer; failures name the fixes.

The client is a stand-in with the real one's signatures (`modelscope.snapshot_download(model_id, revision=...,
local_files_only=...)`, `modelscope.dataset_snapshot_download(dataset_id, revision=..., local_dir=...,
allow_patterns=...)`), serving repositories from a folder: no test touches the network.
"""
import json
import logging
import shutil
import socket
import sys

import pytest

import data_utils
import pretrain
from conftest import ROOT, make_jsonl_corpus
from data_utils import DataError
from pretrain import ConfigError
from test_end_to_end import run_pretrain

FAKE_CLIENT = '''
import fnmatch, json, os, shutil
from pathlib import Path


class NotExistError(Exception):
    pass


def _log(**call):
    with open(os.environ["FAKE_MODELSCOPE_LOG"], "a") as f:
        f.write(json.dumps(call) + "\\n")


def snapshot_download(model_id, revision=None, cache_dir=None, local_files_only=False, **kwargs):
    _log(kind="model", id=model_id, revision=revision, local_files_only=local_files_only)
    cached = Path(os.environ["MODELSCOPE_CACHE"]) / "models" / model_id
    if local_files_only:
        if not cached.is_dir():
            raise ValueError(f"Cannot find the requested files in the cached path {cached}")
        return str(cached)
    repo = Path(os.environ["FAKE_MODELSCOPE_REPOS"]) / "models" / model_id
    if not repo.is_dir():
        raise NotExistError(f"The model: {model_id} not exists")
    shutil.copytree(repo, cached, dirs_exist_ok=True)
    return str(cached)


def dataset_snapshot_download(dataset_id, revision=None, cache_dir=None, local_dir=None, allow_patterns=None,
                              **kwargs):
    _log(kind="dataset", id=dataset_id, revision=revision, allow_patterns=allow_patterns)
    repo = Path(os.environ["FAKE_MODELSCOPE_REPOS"]) / "datasets" / (dataset_id + (f"@{revision}" if revision else ""))
    if not repo.is_dir():
        raise NotExistError(f"The dataset: {dataset_id} not exists")
    copied = 0
    for f in sorted(repo.rglob("*")):
        rel = f.relative_to(repo).as_posix()  # matched as the real client does (fnmatch on the path)
        if f.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)):
            if copied == int(os.environ.get("FAKE_MODELSCOPE_FAIL_AFTER", -1)):
                raise ConnectionError("[E1020] Connection failed")
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, Path(local_dir) / rel)
            copied += 1
    return local_dir
'''


class FakeModelScope:
    def __init__(self, root):
        self.repos, self.log = root / "repos", root / "calls.jsonl"
        self.hub_local_dir = root / "hub"
        root.mkdir(parents=True, exist_ok=True)
        self.log.touch()

    def calls(self, kind=None):
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r for r in rows if kind is None or r["kind"] == kind]

    def add_dataset(self, dataset_id, files: dict):
        for rel, text in files.items():
            (self.repos / "datasets" / dataset_id / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.repos / "datasets" / dataset_id / rel).write_text(text, encoding="utf-8")


@pytest.fixture
def modelscope(tmp_path, monkeypatch):
    """The stand-in client importable as `modelscope`, its endpoint a listening local socket (reachable)."""
    site = tmp_path / "site"
    (site / "modelscope").mkdir(parents=True)
    (site / "modelscope" / "__init__.py").write_text(FAKE_CLIENT)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "modelscope", raising=False)
    fake = FakeModelScope(tmp_path / "ms")
    monkeypatch.setenv("FAKE_MODELSCOPE_REPOS", str(fake.repos))
    monkeypatch.setenv("FAKE_MODELSCOPE_LOG", str(fake.log))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms" / "cache"))
    endpoint = socket.socket()
    endpoint.bind(("127.0.0.1", 0))
    endpoint.listen()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{endpoint.getsockname()[1]}")
    yield fake
    endpoint.close()
    sys.modules.pop("modelscope", None)


def go_offline(monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")


def test_a_modelscope_model_and_dataset_train_and_a_rerun_reads_the_copy(tmp_path, modelscope, base_model):
    shutil.copytree(base_model, modelscope.repos / "models" / "acme" / "base")
    corpus = make_jsonl_corpus(tmp_path / "corpus", repeat=20).read_text(encoding="utf-8")
    modelscope.add_dataset("acme/medical", {"data/train.jsonl": corpus, "raw/other.csv": "text\nnot this\n"})
    args = ["--model_name_or_path", "modelscope:acme/base", "--hub_local_dir", modelscope.hub_local_dir,
            "--sources", json.dumps([{"hub": "modelscope:acme/medical", "data_files": ["data/*.jsonl"]}]),
            "--block_size", 32, "--eval_fraction", 0.1, "--cache_dir", tmp_path / "cache", "--max_steps", 2,
            "--per_device_train_batch_size", 2, "--report_to", "none", "--sample_prompts", ""]
    proc = run_pretrain([*args, "--output_dir", tmp_path / "out"])
    copy = modelscope.hub_local_dir / "acme" / "medical"
    assert (copy / "data" / "train.jsonl").is_file() and not (copy / "raw").exists()  # only its data_files
    assert modelscope.calls("dataset") == [{"kind": "dataset", "id": "acme/medical", "revision": None,
                                            "allow_patterns": ["data/*.jsonl"]}]
    assert modelscope.calls("model") == [{"kind": "model", "id": "acme/base", "revision": None,
                                          "local_files_only": False}]  # main -> ModelScope's default branch
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert list(report["sources"]) == ["acme_medical"]  # named by its id, not by the copy's path
    assert report["sources"]["acme_medical"]["modelscope"] == {"dataset": "acme/medical", "revision": None,
                                                               "data_files": ["data/*.jsonl"]}  # what was downloaded
    assert "ModelScope dataset `acme/medical` (revision default), downloaded: `" in (
        tmp_path / "out" / "data_report.md").read_text(encoding="utf-8")
    assert "eval_acme_medical_ppl" in json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]["final"]
    assert "modelscope:acme/medical ->" in proc.stderr

    run_pretrain([*args, "--output_dir", tmp_path / "again"])
    assert len(modelscope.calls("dataset")) == 1  # the completed copy is read without asking the hub
    again = json.loads((tmp_path / "again" / "data_report.json").read_text(encoding="utf-8"))
    assert again["sources"]["acme_medical"]["cache"] == "hit"


def test_a_dataset_is_fetched_again_only_for_another_revision_or_other_files(tmp_path, modelscope):
    modelscope.add_dataset("acme/notes", {"a/x.jsonl": '{"text": "x"}\n', "b/y.jsonl": '{"text": "y"}\n'})
    modelscope.add_dataset("acme/notes@v2", {"a/x.jsonl": '{"text": "x2"}\n'})
    root = modelscope.hub_local_dir

    def fetch(**options):
        return data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes", **options}], str(root))[0][0]

    source = fetch(data_files="a/*.jsonl")
    assert source == {"hub": str(root / "acme" / "notes"), "name": "acme_notes", "data_files": "a/*.jsonl"}
    fetch(data_files="a/*.jsonl")
    fetch(data_files="b/*.jsonl")  # other files: fetched
    fetch()  # the whole repository
    fetch(data_files="a/*.jsonl")  # held by the whole copy
    assert "revision" not in fetch(revision="v2", name="notes")  # the copy holds the revision
    assert [(c["revision"], c["allow_patterns"]) for c in modelscope.calls()] == [
        (None, ["a/*.jsonl"]), (None, ["b/*.jsonl"]), (None, None), ("v2", None)]
    with pytest.raises(DataError, match="paths or patterns inside its repository"):
        fetch(data_files=str(tmp_path / "x.jsonl"))
    with pytest.raises(DataError, match=r"not a ModelScope id: write `modelscope:OWNER/NAME`"):
        data_utils.fetch_modelscope_sources([{"hub": "modelscope:notes"}], str(root))


def test_offline_the_cache_and_completed_copies_answer_and_failures_name_the_fixes(tmp_path, modelscope, monkeypatch,
                                                                                 caplog):
    modelscope.add_dataset("acme/notes", {"x.jsonl": '{"text": "x"}\n'})
    (modelscope.repos / "models" / "acme" / "base").mkdir(parents=True)
    root = str(modelscope.hub_local_dir)
    cached = data_utils.fetch_modelscope_model("modelscope:acme/base", "main", "model", "model_name_or_path",
                                               ConfigError)
    data_utils.fetch_modelscope_sources({"hub": "modelscope:acme/notes"}, root)
    go_offline(monkeypatch)
    assert data_utils.fetch_modelscope_model("modelscope:acme/base", "main", "model", "model_name_or_path",
                                             ConfigError) == cached
    assert modelscope.calls()[-1] == {"kind": "model", "id": "acme/base", "revision": None, "local_files_only": True}
    assert data_utils.fetch_modelscope_sources({"hub": "modelscope:acme/notes"}, root)[0]["hub"].endswith("acme/notes")
    with pytest.raises(ConfigError) as error:
        data_utils.fetch_modelscope_model("modelscope:acme/other", "main", "model", "model_name_or_path", ConfigError)
    assert "unreachable" in str(error.value) and "modelscope download --model acme/other" in str(error.value)
    with pytest.raises(DataError) as error:
        data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/other"}], root)
    assert f"modelscope download --dataset acme/other --local_dir {root}/acme/other" in str(error.value)
    by_hand = modelscope.hub_local_dir / "acme" / "by_hand"  # `modelscope download` elsewhere, copied here
    by_hand.mkdir(parents=True)
    (by_hand / "x.jsonl").write_text('{"text": "x"}\n')
    with caplog.at_level(logging.WARNING, logger="data_utils"):
        assert data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/by_hand"}], root)[0][0]["hub"] == str(
            by_hand)
    assert "read as they are" in caplog.text
    assert len(modelscope.calls("dataset")) == 1


def test_download_failures_and_a_missing_client_are_named(tmp_path, modelscope, monkeypatch):
    with pytest.raises(ConfigError, match=r"NotExistError: The model: acme/none not exists.*acme/none"):
        data_utils.fetch_modelscope_model("modelscope:acme/none", None, "model", "model_name_or_path", ConfigError)
    with pytest.raises(DataError, match=r"NotExistError.*/datasets/acme/none"):
        data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/none"}], str(modelscope.hub_local_dir))
    with monkeypatch.context() as patch, pytest.raises(ConfigError, match=r"pip install modelscope"):
        patch.setitem(sys.modules, "modelscope", None)  # not installed
        data_utils.fetch_modelscope_model("modelscope:acme/base", None, "model", "model_name_or_path", ConfigError)


def test_use_modelscope_hub_sends_model_ids_to_modelscope_and_leaves_paths(tmp_path, modelscope, monkeypatch,
                                                                           base_model):
    shutil.copytree(base_model, modelscope.repos / "models" / "acme" / "base")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")  # LLaMA-Factory's switch
    model_args, data_args, training_args = pretrain.parse_args(
        ["--model_name_or_path", "acme/base", "--tokenizer_name_or_path", str(base_model),
         "--output_dir", str(tmp_path / "out")])
    pretrain.fetch_from_modelscope(model_args, data_args, training_args)
    assert model_args.model_name_or_path == str(tmp_path / "ms" / "cache" / "models" / "acme" / "base")
    assert model_args.tokenizer_name_or_path == str(base_model)  # a directory stays one
    assert [c["id"] for c in modelscope.calls()] == ["acme/base"]
    model_args.model_name_or_path = "my_model"  # a directory misspelt, not an OWNER/NAME id
    pretrain.fetch_from_modelscope(model_args, data_args, training_args)
    assert model_args.model_name_or_path == "my_model"


def test_the_real_client_offline_names_the_fixes(tmp_path, monkeypatch):
    """The installed modelscope client itself (no stand-in): a model not in its cache, with the endpoint out
    of reach, fails within seconds with the fixes, not after the client's minutes of retries."""
    monkeypatch.delitem(sys.modules, "modelscope", raising=False)  # (a stand-in another test imported)
    assert hasattr(pytest.importorskip("modelscope"), "__version__")  # the real client, not the stand-in
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "home"))  # its credentials folder, not the user's
    monkeypatch.setenv("HOME", str(tmp_path))
    go_offline(monkeypatch)
    with pytest.raises(ConfigError) as error:
        data_utils.fetch_modelscope_model("modelscope:acme/base", "main", "model", "model_name_or_path", ConfigError)
    assert "CacheNotFound" in str(error.value) and "modelscope download --model acme/base" in str(error.value)


def test_the_vocabulary_tool_reads_modelscope_tokenizers_and_sources(tmp_path, modelscope, base_model, capsys,
                                                                    monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import vocab

    shutil.copytree(base_model, modelscope.repos / "models" / "acme" / "base")
    modelscope.add_dataset("acme/notes", {"notes.jsonl": make_jsonl_corpus(tmp_path / "c").read_text("utf-8")})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"sources": [{"hub": "modelscope:acme/notes"}], "cache_dir": str(tmp_path / "cache"),
                                  "hub_local_dir": str(modelscope.hub_local_dir)}), encoding="utf-8")
    assert vocab.main(["report", str(config), "--tokenizer", "modelscope:acme/base"]) == 0
    assert "acme_notes" in capsys.readouterr().out
    assert [c["id"] for c in modelscope.calls()] == ["acme/notes", "acme/base"]


def test_convert_reads_modelscope_sources_without_fetching_a_model(tmp_path, modelscope):
    modelscope.add_dataset("acme/notes", {"notes.jsonl": '{"text": "高血压"}\n{"text": "糖尿病"}\n'})
    out = tmp_path / "all.jsonl"
    assert data_utils.main(["convert", "--out", str(out), "--model_name_or_path", "modelscope:acme/base", "--sources",
                            json.dumps([{"hub": "modelscope:acme/notes"}]), "--hub_local_dir",
                            str(modelscope.hub_local_dir)]) == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"text": "高血压", "source": "acme_notes"}, {"text": "糖尿病", "source": "acme_notes"}]
    assert [c["kind"] for c in modelscope.calls()] == ["dataset"]


def test_data_files_globs_download_what_datasets_reads_and_a_glob_matching_nothing_is_named(tmp_path, modelscope,
                                                                                        monkeypatch):
    """The client matches `data_files` with fnmatch (`**/` needs a folder there), `datasets` as globs: a top-level
    train.jsonl under `**/*.jsonl` was not downloaded, and the copy recorded as complete without it."""
    modelscope.add_dataset("acme/notes", {"train.jsonl": '{"text": "t"}\n', "data/x.jsonl": '{"text": "x"}\n',
                                          "data/sub/y.jsonl": '{"text": "y"}\n', "raw/z.csv": "text\nz\n"})
    root, copy = str(modelscope.hub_local_dir), modelscope.hub_local_dir / "acme" / "notes"

    def fetch(data_files):
        return data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes", "data_files": data_files}], root)

    fetch(["**/*.jsonl"])
    assert {p.relative_to(copy).as_posix() for p in data_utils.local_hub_files(copy)} == {
        "train.jsonl", "data/x.jsonl", "data/sub/y.jsonl"}
    fetch(["./raw/z.csv"])
    assert (copy / "raw" / "z.csv").is_file()
    with pytest.raises(DataError, match=r"`data_files` data/\*\.json match no file of the repository"):
        fetch(["data/*.json"])  # a typo: nothing to download, and nothing recorded as complete
    go_offline(monkeypatch)
    with pytest.raises(DataError, match="did not complete"):
        fetch(["data/*.json"])


def test_an_interrupted_download_is_resumed_not_read_and_another_revision_starts_clean(tmp_path, modelscope,
                                                                                       monkeypatch):
    modelscope.add_dataset("acme/notes", {"a.jsonl": '{"text": "a"}\n', "old.jsonl": '{"text": "old"}\n'})
    modelscope.add_dataset("acme/notes@v2", {"a.jsonl": '{"text": "a2"}\n', "new.jsonl": '{"text": "new"}\n'})
    root, copy = str(modelscope.hub_local_dir), modelscope.hub_local_dir / "acme" / "notes"
    monkeypatch.setenv("FAKE_MODELSCOPE_FAIL_AFTER", "1")
    with pytest.raises(DataError, match=r"cannot be downloaded: ConnectionError.*rerunning resumes the download"):
        data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes"}], root)
    assert (copy / "a.jsonl").is_file()  # half of it arrived
    with monkeypatch.context() as offline:
        go_offline(offline)
        with pytest.raises(DataError, match=r"the download into .* did not complete"):
            data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes"}], root)
    monkeypatch.delenv("FAKE_MODELSCOPE_FAIL_AFTER")
    data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes"}], root)
    assert sorted(p.name for p in data_utils.local_hub_files(copy)) == ["a.jsonl", "old.jsonl"]
    data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes", "revision": "v2"}], root)
    assert sorted(p.name for p in data_utils.local_hub_files(copy)) == ["a.jsonl", "new.jsonl"]  # old.jsonl: gone
    go_offline(monkeypatch)
    with pytest.raises(DataError, match="holds revision v2"):
        data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes"}], root)
    assert data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes", "revision": "v2"}], root)[0]


def test_modelscope_endpoints_follow_the_client(monkeypatch):
    for name in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "MODELSCOPE_PREFER_AI_SITE"):
        monkeypatch.delenv(name, raising=False)
    assert data_utils.modelscope_endpoints() == ["https://modelscope.cn", "https://www.modelscope.ai"]
    monkeypatch.setenv("MODELSCOPE_PREFER_AI_SITE", "true")
    assert data_utils.modelscope_endpoints() == ["https://www.modelscope.ai", "https://modelscope.cn"]
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "mirror.example.cn")
    assert data_utils.modelscope_endpoints() == ["https://mirror.example.cn"]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://10.0.0.1:8080/")
    assert data_utils.modelscope_endpoints() == ["http://10.0.0.1:8080"]


def test_ids_that_would_leave_hub_local_dir_are_refused(tmp_path, modelscope):
    """`modelscope:../..` passed the id check: its record was written two folders above hub_local_dir, and a
    later revision emptied that folder (the working directory)."""
    root = modelscope.hub_local_dir / "deep"
    for bad in ("../..", "a/..", "../b", "./b", "a/."):
        with pytest.raises(DataError, match="is not a ModelScope id"):
            data_utils.fetch_modelscope_sources([{"hub": f"modelscope:{bad}", "revision": "v2"}], str(root))
    assert not (modelscope.hub_local_dir / data_utils.MODELSCOPE_FETCHED).exists() and not root.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "notes").symlink_to(elsewhere)
    with pytest.raises(DataError, match="is a symbolic link"):
        data_utils.fetch_modelscope_sources([{"hub": "modelscope:acme/notes"}], str(root))
    assert elsewhere.is_dir() and not list(elsewhere.iterdir())
