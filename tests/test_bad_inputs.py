"""The bad-input suite: every broken input, config or disk ends in one clear message (file, line or record,
field, what to do) and exit code 2 before training starts, or in a skip that is counted and reported.
No case leaves a half-written output directory or a cache entry that a later run would take as complete.

Each case runs `pretrain.main` in-process with a micro model, so the whole suite takes seconds per case."""
import errno
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

import data_utils
import pretrain
from conftest import ZH_LINES, make_text_corpus

COMPLETE_REPORTS = {"data_report.json", "data_report.md"}  # written atomically once the data is ready


def write_run(tmp_path: Path, micro_model_config, tokenizer_dir, **fields) -> Path:
    config = {
        "model_config": str(micro_model_config), "tokenizer_name_or_path": str(tokenizer_dir),
        "sources": [{"name": "notes", "path": str(make_text_corpus(tmp_path / "good", repeat=20))}],
        "block_size": 32, "eval_fraction": 0.1, "per_device_train_batch_size": 4, "max_steps": 4,
        "eval_strategy": "no", "eval_on_start": False, "report_to": "none", "sample_prompts": [],
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "logging_steps": 1,
    }
    config.update(fields)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def run(capsys, argv) -> tuple[int, str]:
    code = pretrain.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_nothing_half_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    if out.exists():
        left = {p.name for p in out.iterdir()}
        assert left <= COMPLETE_REPORTS, f"output_dir holds {sorted(left)} after a failed start"
    cache = tmp_path / "cache"
    for directory in cache.rglob("*") if cache.exists() else []:
        assert not directory.name.startswith(".tmp"), f"temporary {directory} left in the cache"
    for store in (cache / "token_stores").glob("*") if (cache / "token_stores").exists() else []:
        assert (store / "meta.json").is_file(), f"{store} has no meta.json: an incomplete store was kept"


def source(path: Path, **extra) -> list[dict]:
    return [{"name": "bad", "path": str(path), **extra}]


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


GOOD = "\n".join(f"{line}（第{i}例）" for i in range(20) for line in ZH_LINES)


def case_setup(case: str, d: Path) -> dict:
    """The config fields of one bad-input case (files are created under d)."""
    jsonl = lambda name, *lines: write_bytes(d / name, "\n".join(lines).encode("utf-8"))  # noqa: E731
    good_record = json.dumps({"text": ZH_LINES[0]}, ensure_ascii=False)
    return {
        "missing_path": lambda: {"sources": source(d / "nope.txt")},
        "empty_directory": lambda: (d / "emptydir").mkdir() or {"sources": source(d / "emptydir")},
        "empty_file": lambda: {"sources": source(write_bytes(d / "empty.txt", b""))},
        "only_blank_lines": lambda: {"sources": source(write_bytes(d / "blank.txt", b"\n  \n\t\n\n"))},
        "invalid_utf8": lambda: {"sources": source(write_bytes(d / "bad.txt", GOOD.encode() + b"\n\xff\xfe broken\n"),
                                                   encoding="utf-8")},
        "gbk_declared_utf8": lambda: {"sources": source(write_bytes(d / "gbk.txt", GOOD.encode("gbk")),
                                                        encoding="utf-8")},
        "json_array_as_jsonl": lambda: {"sources": source(jsonl("arr.jsonl", f"[{good_record},", f"{good_record}]"),
                                                          format="jsonl")},
        "json_array_on_each_line": lambda: {"sources": source(jsonl("lists.jsonl", f"[{good_record}]",
                                                                    f"[{good_record}]"))},
        "json_array_on_each_line_as_jsonl": lambda: {"sources": source(jsonl("lists2.jsonl", f"[{good_record}]",
                                                                             f"[{good_record}]"), format="jsonl")},
        "mixed_encodings": lambda: {"sources": source(write_bytes(
            d / "mixed.txt", "\n".join(ZH_LINES[:2]).encode() + b"\n" + "\n".join(ZH_LINES[2:]).encode("gbk")))},
        "invalid_json_line": lambda: {"sources": source(jsonl("bad.jsonl", good_record, '{"text": "坏', ""))},
        "truncated_last_line": lambda: {"sources": source(jsonl("cut.jsonl", good_record, '{"text": "高血压是以'))},
        "line_not_an_object": lambda: {"sources": source(jsonl("arr2.jsonl", good_record, "[1, 2, 3]"))},
        "missing_text_field": lambda: {"sources": source(jsonl("qa.jsonl", good_record, '{"question": "q", "answer": "a"}'))},
        "text_is_a_number": lambda: {"sources": source(jsonl("num.jsonl", good_record, '{"text": 42}'))},
        "text_is_a_list": lambda: {"sources": source(jsonl("list.jsonl", good_record, '{"text": ["a", "b"]}'))},
        "text_is_null": lambda: {"sources": source(jsonl("null.jsonl", good_record, '{"text": null}'))},
        "one_50mb_line": lambda: {"sources": source(write_bytes(d / "huge.txt", b"a" * (50 * 2**20) + b"\n"))},
        "binary_file": lambda: {"sources": source(write_bytes(d / "model.bin", bytes(range(256)) * 64))},
        "unknown_config_key": lambda: {"blok_size": 32},
        "wrong_value_type": lambda: {"block_size": "long"},
        "block_size_above_max_positions": lambda: {"block_size": 4096},
        "eval_empty_after_split": lambda: {"sources": source(jsonl("few.jsonl", *(json.dumps({"text": t}, ensure_ascii=False)
                                                                                for t in ZH_LINES * 40)),
                                                             eval_fraction=0.001)},
        "every_text_removed_by_dedup": lambda: {"sources": [
            {"name": "first", "path": str(make_text_corpus(d / "a", repeat=20))},
            {"name": "copy", "path": str(make_text_corpus(d / "b", repeat=20))}]},
        "eval_files_all_in_training": lambda: {"sources": [{"name": "bad", "path": str(make_text_corpus(d / "t")),
                                                            "eval_path": str(make_text_corpus(d / "e"))}]},
        "source_weight_zero": lambda: {"sources": [{"name": "w", "path": str(make_text_corpus(d / "w")), "weight": 0}]},
        "source_weight_negative": lambda: {"sources": [{"name": "w", "path": str(make_text_corpus(d / "w")), "weight": -1}]},
        "unwritable_output_dir": lambda: {"output_dir": str(write_bytes(d / "a_file", b"x") / "out")},
        "resume_from_missing_checkpoint": lambda: {"resume_from_checkpoint": str(d / "out" / "checkpoint-99")},
        "hub_name_unreachable": lambda: {"sources": [{"name": "open", "hub": "no-such-org/no-such-dataset"}]},
        "batch_larger_than_data": lambda: {"per_device_train_batch_size": 40000},
        "optimizer_package_missing": lambda: {"optim": "schedule_free_adamw"},
        "attention_misspelt": lambda: {"attn_implementation": "spda"},
        "watch_forgetting_without_eval_data": lambda: {"sources": [{"name": "general", "watch_forgetting": True,
                                                                    "path": str(make_text_corpus(d / "g"))}],
                                                       "eval_fraction": 0},
    }[case]()


CASES = {  # case: what the one error line must say (the file and line where there is one)
    "missing_path": r"nope\.txt.*does not exist",
    "empty_directory": r"emptydir.*holds no data files",
    "empty_file": r"empty\.txt.*is empty",
    "only_blank_lines": r"no text left in \S*blank\.txt.*blank_lines",
    "invalid_utf8": r"bad\.txt.*line 121.*encoding",
    "gbk_declared_utf8": r"gbk\.txt.*line 1\b.*gb18030",
    "json_array_as_jsonl": r"arr\.jsonl.*line 1 .*one JSON array, not JSON Lines.*format: json",
    "json_array_on_each_line": r"lists\.jsonl.*line 1 is a JSON array \(a list\) and so is every line.*jq -c '\.\[\]'",
    "json_array_on_each_line_as_jsonl": r"lists2\.jsonl.*line 1 is a JSON list, not an object.*jq -c '\.\[\]'",
    "mixed_encodings": r"`bad`.*mixed\.txt.*mixes encodings: line 1 is UTF-8 but line 3 is not.*iconv.*on_error: skip",
    "invalid_json_line": r"bad\.jsonl.*line 2 is not valid JSON",
    "truncated_last_line": r"cut\.jsonl.*line 2 .*no line break: the file looks truncated",
    "line_not_an_object": r"arr2\.jsonl.*line 2 is a JSON list, not an object",
    "missing_text_field": r"qa\.jsonl.*line 2 .*no field `text`",
    "text_is_a_number": r"num\.jsonl.*line 2 .*`text`.*(int|number)",
    "text_is_a_list": r"list\.jsonl.*line 2 .*`text`.*list",
    "text_is_null": r"null\.jsonl.*line 2 .*`text`.*(null|None)",
    "one_50mb_line": r"huge\.txt.*line 1 is 52,428,800 characters long.*max_document_chars",
    "binary_file": r"model\.bin.*binary",
    "unknown_config_key": r"run\.yaml.*unknown key `blok_size`.*Did you mean `block_size`",
    "wrong_value_type": r"block_size.*invalid int value",
    "block_size_above_max_positions": r"block_size 4096 exceeds the model.s max_position_embeddings 128. Lower "
                                      r"`block_size`, or raise it for this model from scratch \(`--config_overrides "
                                      r"max_position_embeddings=4096`",
    "eval_empty_after_split": r"`bad`.*eval split.*(no documents|fewer than one block).*eval_fraction",
    "every_text_removed_by_dedup": r"`copy`.*all 120 documents duplicate documents of earlier sources",
    "eval_files_all_in_training": r"`bad`: every one of the 48 documents of its eval set also occurs in the training",
    "source_weight_zero": r"\(w\).*weight must be a number above 0.*got 0\b",
    "source_weight_negative": r"\(w\).*weight must be a number above 0.*got -1\b",
    "unwritable_output_dir": r"output_dir .*a_file/out.*cannot be (created|written)",
    "resume_from_missing_checkpoint": r"checkpoint-99.*does not exist",
    "hub_name_unreachable": r"no-such-org/no-such-dataset.*(offline|reach)",
    "batch_larger_than_data": r"one optimizer step needs 40000 blocks",
    "attention_misspelt": r"attn_implementation `spda`: Specified `attn_implementation=\"spda\"` is not supported.*sdpa",
    "optimizer_package_missing": r"optim `schedule_free_adamw`: .*schedulefree.* Install it, or choose another `optim`",
    "watch_forgetting_without_eval_data": r"source `general`: `watch_forgetting` needs eval data.*`eval_split`",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_in_one_clear_message(case, tmp_path, capsys, micro_model_config, tokenizer_dir):
    if case == "optimizer_package_missing" and importlib.util.find_spec("schedulefree"):
        pytest.skip("schedulefree is installed here")
    config = write_run(tmp_path, micro_model_config, tokenizer_dir, **case_setup(case, tmp_path))
    code, err = run(capsys, [config])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and re.search(CASES[case], errors[0]), err[-3000:]
    assert "Traceback" not in err
    assert_nothing_half_written(tmp_path)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("block_size: 32\nsources: [{path: a.txt\nmax_steps: 3\n")
    code, err = run(capsys, [broken])
    assert code == 2 and re.search(r"broken\.yaml.*not valid YAML.*line \d+", err), err


def test_bom_crlf_and_gbk_are_read_without_any_option(tmp_path, capsys, micro_model_config, tokenizer_dir):
    """Not errors: decoded and reported (the encoding detected, not the one lines are handed on in, appears in
    data_report.json). A file that mixes encodings is read under `on_error: skip`, its odd lines counted."""
    lines = [f"{line}（第{i}例）" for i in range(20) for line in ZH_LINES]
    bom_crlf = write_bytes(tmp_path / "bom_crlf.txt", "\ufeff".encode() + "\r\n".join(lines).encode() + b"\r\n")
    gbk = write_bytes(tmp_path / "gbk.txt", "\n".join(lines).encode("gb18030"))
    utf16 = write_bytes(tmp_path / "utf16.txt", "\n".join(lines).encode("utf-16"))  # with a byte-order mark
    gbk_cr = write_bytes(tmp_path / "gbk_cr.txt", "\r".join(lines).encode("gbk"))  # old Mac line breaks
    mixed = write_bytes(tmp_path / "mixed.txt", b"\n".join(line.encode("gbk" if i % 10 == 3 else "utf-8")
                                                           for i, line in enumerate(lines)))
    config = write_run(tmp_path, micro_model_config, tokenizer_dir, max_steps=1, sources=[
        {"name": "bom_crlf", "path": str(bom_crlf)}, {"name": "gbk", "path": str(gbk)},
        {"name": "utf16", "path": str(utf16)}, {"name": "gbk_cr", "path": str(gbk_cr)},
        {"name": "mixed", "path": str(mixed), "on_error": "skip"}], dedup=False)
    code, err = run(capsys, [config])
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())["sources"]
    for name, encoding in (("bom_crlf", "utf-8"), ("gbk", "gb18030"), ("utf16", "utf-16"), ("gbk_cr", "gb18030")):
        assert report[name]["files"][0]["encoding"] == encoding, (name, report[name]["files"])
        assert report[name]["documents"] == len(lines) and report[name]["characters"] == sum(map(len, lines))
    bad = [i + 1 for i in range(len(lines)) if i % 10 == 3]
    assert report["mixed"]["documents"] == len(lines) - len(bad)
    assert report["mixed"]["skipped"] == {"bad_encoding": len(bad)}, report["mixed"]
    assert re.search(r"mixed\.txt` mixes encodings", err)
    assert [int(n) for n in re.findall(r"skipped `\S*mixed\.txt` line (\d+): is not valid utf-8", err)] == bad[:3]


def test_skip_policy_counts_and_reports_every_skipped_record(tmp_path, capsys, micro_model_config, tokenizer_dir):
    good = [json.dumps({"text": f"{line}（第{i}例）"}, ensure_ascii=False) for i in range(20) for line in ZH_LINES]
    broken = good + ['{"text": 42}', '{"title": "no text"}', "[1]", '{"text": "cut']
    path = write_bytes(tmp_path / "mixed.jsonl", "\n".join(broken).encode())
    config = write_run(tmp_path, micro_model_config, tokenizer_dir, max_steps=1,
                       sources=[{"name": "mixed", "path": str(path), "on_error": "skip"}])
    code, err = run(capsys, [config])
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())["sources"]["mixed"]
    assert report["documents"] == len(good) and sum(report["skipped"].values()) == 4, report
    assert len(re.findall(r"skipped `\S*mixed\.jsonl` line \d+", err)) == 4


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_the_token_store(tmp_path, capsys, micro_model_config, tokenizer_dir, monkeypatch):
    real_write = data_utils.atomic_write_text
    monkeypatch.setattr(data_utils, "atomic_write_text", lambda path, text: no_space() if path.name == "meta.json"
                        else real_write(path, text))  # the disk fills as the store's last file is written
    config = write_run(tmp_path, micro_model_config, tokenizer_dir)
    code, err = run(capsys, [config])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert re.search(r"no space left on device.*token store.*cache_dir", errors[0]), errors
    assert_nothing_half_written(tmp_path)
    monkeypatch.undo()  # the disk has space again: the next run builds the store from scratch and trains
    code, err = run(capsys, [config])
    assert code == 0, err[-3000:]


def test_full_disk_while_writing_a_checkpoint(tmp_path, capsys, micro_model_config, tokenizer_dir, monkeypatch):
    """The checkpoint being written when the disk filled is never resumed from; the last complete one is."""
    from transformers import Trainer

    config = write_run(tmp_path, micro_model_config, tokenizer_dir, max_steps=6, save_steps=2, save_total_limit=10)
    original = Trainer._save_optimizer_and_scheduler

    def fill_disk_at_step_4(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            no_space()
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", fill_disk_at_step_4)
    code, err = run(capsys, [config])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert re.search(r"no space left on device.*checkpoint-4.*checkpoint-2.*resume_from_checkpoint auto", errors[0])
    assert not (tmp_path / "out" / "model.safetensors").exists()
    monkeypatch.undo()
    code, err = run(capsys, [config, "--resume_from_checkpoint", "auto"])
    assert code == 0, err[-3000:]
    assert "checkpoint-4 is incomplete" in err and "resume_from_checkpoint auto: " in err
    assert re.search(r"resume_from_checkpoint auto: \S*checkpoint-2\b", err)


@pytest.mark.parametrize("damage", ["truncated_weights", "broken_trainer_state", "missing_optimizer"])
def test_resuming_from_a_corrupted_checkpoint(damage, tmp_path, capsys, micro_model_config, tokenizer_dir):
    config = write_run(tmp_path, micro_model_config, tokenizer_dir, max_steps=4, save_steps=2, save_total_limit=10)
    code, err = run(capsys, [config])
    assert code == 0, err[-3000:]
    last = tmp_path / "out" / "checkpoint-4"
    target = {"truncated_weights": "model.safetensors", "broken_trainer_state": "trainer_state.json",
              "missing_optimizer": "optimizer.pt"}[damage]
    if damage == "missing_optimizer":
        (last / target).unlink()
    else:
        data = (last / target).read_bytes()
        (last / target).write_bytes(data[: len(data) // 2])
    code, err = run(capsys, [config, "--resume_from_checkpoint", last, "--max_steps", 6])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert re.search(rf"checkpoint-4.*{re.escape(target)}.*checkpoint-2", errors[0]), errors
    code, err = run(capsys, [config, "--resume_from_checkpoint", "auto", "--max_steps", 6])
    assert code == 0 and re.search(r"resume_from_checkpoint auto: \S*checkpoint-2\b", err), err[-3000:]


@pytest.mark.parametrize("checkpoints", [True, False])
def test_full_disk_while_writing_the_final_model(tmp_path, capsys, micro_model_config, tokenizer_dir, monkeypatch,
                                                 checkpoints):
    """The final model is staged and renamed: a failed save leaves no model file in output_dir, and the error
    says whether a checkpoint holds the training."""
    from transformers import Trainer

    config = write_run(tmp_path, micro_model_config, tokenizer_dir, max_steps=4,
                       **({"save_steps": 2} if checkpoints else {"save_strategy": "no"}))
    original = Trainer.save_model

    def fill_disk_in_final_save(self, output_dir=None, _internal_call=False):
        original(self, output_dir, _internal_call)
        if output_dir.endswith(".final-model.tmp"):
            no_space()  # after the weights were written into the staging directory

    monkeypatch.setattr(Trainer, "save_model", fill_disk_in_final_save)
    code, err = run(capsys, [config])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "while writing the final model" in errors[0], err[-3000:]
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists() and not (out / ".final-model.tmp").exists()
    if checkpoints:
        assert (out / "checkpoint-4" / "trainer_state.json").is_file()
        assert "(it resumes at the last one, checkpoint-4)" in errors[0]
    else:
        assert "No checkpoint holds the training (none was saved)" in errors[0]


def test_auto_resume_refuses_when_no_checkpoint_is_usable(tmp_path, capsys, micro_model_config, tokenizer_dir):
    """Starting fresh would let checkpoint rotation delete the damaged checkpoints: stop and say so."""
    config = write_run(tmp_path, micro_model_config, tokenizer_dir, max_steps=4, save_steps=2, save_total_limit=10)
    code, err = run(capsys, [config])
    assert code == 0, err[-3000:]
    for checkpoint in (tmp_path / "out").glob("checkpoint-*"):
        (checkpoint / "trainer_state.json").unlink()
    code, err = run(capsys, [config, "--resume_from_checkpoint", "auto", "--max_steps", 6])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert re.search(r"none of the 2 checkpoint\(s\) .* can be resumed \(checkpoint-4 has no trainer_state", errors[0])
    assert {p.name for p in (tmp_path / "out").glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
