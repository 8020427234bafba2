"""Multiple-choice benchmarks scored at every evaluation: the question formats of C-Eval/CMMLU, MedQA, CMExam and
MMLU read as data is (encodings, line endings, bad records named), prompts with worked examples, and an accuracy
equal to scoring each answer letter by its own unpadded forward pass."""
import json
import types

import pytest
import torch

import data_utils
import pretrain
from data_utils import BenchmarkConfig, DataError

CEVAL_CSV = ("id,question,A,B,C,D,answer,explanation\r\n"
             "0,胰岛素由哪个器官分泌？,肝脏,胰腺,肾脏,脾脏,B,胰岛β细胞\r\n"
             "1,人体最大的器官是,皮肤,肝脏,大脑,肺,A,\r\n")


def questions_of(tmp_path, name, content, encoding="utf-8", **options):
    path = tmp_path / name
    path.write_bytes(content.encode(encoding))
    bench = BenchmarkConfig.from_dict({"path": str(path), **options}, 0)
    return data_utils.read_choice_questions(bench, bench.path)


def test_the_common_question_formats_read_alike(tmp_path):
    ceval, skipped, _ = questions_of(tmp_path, "ceval_val.csv", CEVAL_CSV, encoding="gbk")  # GBK, CRLF
    assert [(q.question, q.choices, q.answer) for q in ceval] == [
        ("胰岛素由哪个器官分泌？", ["肝脏", "胰腺", "肾脏", "脾脏"], 1), ("人体最大的器官是", ["皮肤", "肝脏", "大脑", "肺"], 0)]
    assert not skipped and ceval[1].where.endswith("ceval_val.csv line 3")
    medqa = json.dumps({"question": "胰岛素由哪个器官分泌？", "answer": "胰腺",  # MedQA: the text, and the letter
                        "options": {"B": "胰腺", "A": "肝脏", "C": "肾脏", "D": "脾脏"}, "answer_idx": "B"},
                       ensure_ascii=False)
    mmlu = json.dumps({"question": "胰岛素由哪个器官分泌？", "choices": ["肝脏", "胰腺", "肾脏", "脾脏"], "answer": 1},
                      ensure_ascii=False)
    cmexam = json.dumps({"Question": "胰岛素由哪个器官分泌？", "Options": "A 肝脏\nB 胰腺\nC 肾脏\nD 脾脏", "Answer": "B"},
                        ensure_ascii=False)
    for name, line in (("medqa", medqa), ("mmlu", mmlu), ("cmexam", cmexam)):
        (q,), _, _ = questions_of(tmp_path, f"{name}.jsonl", line + "\n")
        assert (q.question, q.choices, q.answer) == (ceval[0].question, ceval[0].choices, 1), name
    assert ceval[0].text("答案：") == "胰岛素由哪个器官分泌？\nA. 肝脏\nB. 胰腺\nC. 肾脏\nD. 脾脏\n答案："


@pytest.mark.parametrize("answer", ["B", "b", " B. ", "(B)", "答案：B", 1, "1", 1.0, "胰腺"])
def test_an_answer_is_a_letter_an_index_from_0_or_a_choices_text(answer):
    assert data_utils.answer_index(answer, ["肝脏", "胰腺", "肾脏", "D"]) == 1
    assert data_utils.answer_index("D", ["肝脏", "胰腺", "肾脏", "D"]) == 3  # a letter before a choice's text


def test_a_question_that_cannot_be_scored_is_named_or_counted(tmp_path):
    lines = [json.dumps({"question": "多选题", "A": "甲", "B": "乙", "C": "丙", "answer": "AB"}, ensure_ascii=False),
             json.dumps({"question": "答案越界", "A": "甲", "B": "乙", "answer": "E"}, ensure_ascii=False),
             json.dumps({"stem": "题干", "A": "甲", "B": "乙", "answer": "A"}, ensure_ascii=False),
             json.dumps({"question": "缺项", "A": "甲", "B": "", "C": "丙", "answer": "A"}, ensure_ascii=False),
             json.dumps({"question": "好题", "A": "甲", "B": "乙", "answer": "A"}, ensure_ascii=False)]
    content = "\n".join(lines) + "\n"
    with pytest.raises(DataError, match=r"benchmark `b`: `.*b.jsonl` line 1 has several answers \(AB\): only "
                                        r"single-answer questions are scored\. .*on_error: skip"):
        questions_of(tmp_path, "b.jsonl", content)
    questions, skipped, _ = questions_of(tmp_path, "b.jsonl", content, on_error="skip")
    assert [q.question for q in questions] == ["好题"]
    assert skipped == {"multiple_answers": 1, "bad_answer": 1, "missing_field": 1, "bad_choices": 1}
    with pytest.raises(DataError, match="line 1 has choice C but no choice B"):
        questions_of(tmp_path, "e.jsonl", lines[3] + "\n")
    with pytest.raises(DataError, match=r"line 1 has no question \(looked for `question`, .*; its fields are `stem`, `A`, "
                                        r"`B`, `answer`\)\. Set `question_field`"):
        questions_of(tmp_path, "c.jsonl", lines[2] + "\n")
    (q,), _, _ = questions_of(tmp_path, "d.jsonl", lines[2] + "\n", question_field="stem")
    assert q.question == "题干"
    with pytest.raises(DataError, match="benchmarks\\[0\\]: unknown key `shot`. Did you mean `shots`"):
        BenchmarkConfig.from_dict({"path": "x.jsonl", "shot": 5}, 0)
    with pytest.raises(DataError, match="dev_path holds the worked examples of `shots`, which is 0"):
        BenchmarkConfig.from_dict({"path": "x.jsonl", "dev_path": "dev.csv"}, 0)


def test_shots_come_from_dev_path_or_the_files_first_questions(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(CEVAL_CSV + "2,发热最常见的原因是,感染,中暑,甲亢,过敏,A,\n", encoding="utf-8")
    dev = tmp_path / "dev.csv"
    dev.write_text(CEVAL_CSV.replace("胰岛素", "胰高血糖素"), encoding="utf-8")
    questions, shots, report = data_utils.load_benchmark(BenchmarkConfig.from_dict({"path": str(path), "shots": 1}, 0))
    assert [q.question for q in shots] == ["胰岛素由哪个器官分泌？"] and len(questions) == 2  # the first: not scored
    questions, shots, report = data_utils.load_benchmark(BenchmarkConfig.from_dict(
        {"path": str(path), "shots": 2, "dev_path": str(dev), "max_questions": 2}, 0))
    assert [q.question[:5] for q in shots] == ["胰高血糖素", "人体最大的"] and len(questions) == 2
    assert [q.question[:2] for q in questions] == ["胰岛", "发热"]  # spread over the file: first and last
    assert report["questions_available"] == 3 and report["chance_accuracy"] == 0.25
    with pytest.raises(DataError, match="shots 5, but .*dev.csv holds only 2 usable worked examples"):
        data_utils.load_benchmark(BenchmarkConfig.from_dict({"path": str(path), "shots": 5, "dev_path": str(dev)}, 0))


class SplitLetters:
    """A tokenizer whose letters A-J encode as two tokens (a marker, then the letter): the path for answers of
    several tokens."""

    bos_token_id = None

    def __init__(self, tokenizer):
        self.inner = tokenizer

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for part in __import__("re").split(r"([A-J])", text):
            if len(part) == 1 and part in data_utils.CHOICE_LETTERS:
                ids += [7, 20 + data_utils.CHOICE_LETTERS.index(part)]
            elif part:
                ids += self.inner(part, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids}


@pytest.mark.parametrize("split_letters", [False, True])
def test_accuracy_equals_scoring_each_letter_on_its_own(tmp_path, tokenizer, micro_model_config, split_letters):
    """Batches of prompts of different lengths (left-padded), a benchmark with more questions than fit one
    batch: each question's answer is the letter whose tokens the model finds most likely after its prompt,
    as one unpadded forward pass per letter computes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads(micro_model_config.read_text())
    torch.manual_seed(0)
    spec["initializer_range"] = 0.5  # large random weights: predictions that depend on the prompt
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).eval()
    rows = [{"question": "问" * (1 + 3 * i), "A": "甲", "B": "乙" * (i + 1), "C": "丙", "answer": "ABC"[i % 3]}
            for i in range(7)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    encoder = SplitLetters(tokenizer) if split_letters else tokenizer
    data_args = types.SimpleNamespace(benchmarks=[{"path": str(path), "instruction": "选择："}], add_bos="never",
                                      block_size=128)
    data = types.SimpleNamespace(eval={"x": None}, report={"sources": {}})
    (bench,) = pretrain.prepare_benchmarks(data_args, encoder, data)
    assert len(bench.items) == (21 if split_letters else 7) and bench.report["prompt_tokens_max"] < 128  # whole
    args = pretrain.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--per_device_eval_batch_size",
                                "3", "--eval_strategy", "no"])[2]
    trainer = pretrain.PretrainTrainer(model=model, args=args, processing_class=tokenizer, tokens_per_step=0,
                                       block_size=64, meter=None, data_plan={})
    predicted = []
    with torch.no_grad():
        for row in rows:
            prompt = "选择：\n\n" + data_utils.ChoiceQuestion(row["question"], [row[k] for k in "ABC"], 0, "").text("答案：")
            context = encoder(prompt)["input_ids"]
            scores = []
            for letter in "ABC":
                letter_ids = encoder(prompt + letter)["input_ids"][len(context):]
                logprobs = model(torch.tensor([context + letter_ids])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(letter_ids)))
            predicted.append(max(range(3), key=scores.__getitem__))
    assert trainer.benchmark_accuracy(bench) == pytest.approx(
        sum("ABC"[p] == row["answer"] for p, row in zip(predicted, rows)) / 7)
    for letter in range(3):  # every question's prediction, not only their count
        bench.answers = [letter] * 7
        assert trainer.benchmark_accuracy(bench) == pytest.approx(predicted.count(letter) / 7), letter
    assert model.training is False and len(set(predicted)) > 1


def test_a_benchmark_a_source_trains_on_is_refused_and_per_file_leaves_the_folder_out(tmp_path, tokenizer, caplog):
    (tmp_path / "data" / "benchmarks").mkdir(parents=True)
    (tmp_path / "data" / "notes.txt").write_text("高血压是常见病。\n", encoding="utf-8")
    questions = tmp_path / "data" / "benchmarks" / "q.csv"
    questions.write_text(CEVAL_CSV, encoding="utf-8")
    assert [s["name"] for s in data_utils.sources_per_file({"path": str(tmp_path / "data"), "per_file": True}, 0)] == [
        "notes"]
    data_args = types.SimpleNamespace(benchmarks=[{"path": str(questions)}], add_bos="never", block_size=64)
    data = types.SimpleNamespace(eval={"notes": None}, report={"sources": {"notes": {"files": [
        {"path": str(questions), "format": "csv"}]}}})
    with pytest.raises(DataError, match=r"benchmark `q`: .*q.csv is also training data \(source `notes`\): the model "
                                        "would learn the answers"):
        pretrain.prepare_benchmarks(data_args, tokenizer, data)
    with caplog.at_level("WARNING", logger="pretrain"):  # eval_fraction 0 on a config with benchmarks: not an error
        assert pretrain.prepare_benchmarks(data_args, tokenizer, types.SimpleNamespace(eval={}, report={})) == []
    assert "this run has no eval split (so no evaluation): they are not scored" in caplog.text


def test_a_prompt_longer_than_the_block_loses_its_start(tokenizer):
    prompt = "以下是单项选择题。\n\n" + "很长的病历摘要。" * 40 + "\n问题？\nA. 甲\nB. 乙\n答案："
    full = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    (item,) = pretrain.choice_items(0, prompt, 2, tokenizer, None, max_tokens=48)
    assert len(full) > 48 and item.ids == full[-48:]
    assert [targets[0][0] for targets in item.targets.values()] == [47, 47]


def test_the_best_checkpoint_can_be_chosen_by_a_benchmark(tmp_path, micro_model_config, tokenizer_dir, capsys):
    from conftest import ROOT
    from test_reliability import config

    run = config(tmp_path, micro_model_config, tokenizer_dir, max_steps=4, eval_strategy="steps", eval_steps=2,
                 save_steps=2, load_best_model_at_end=True, metric_for_best_model="bench_medical_choice_accuracy",
                 benchmarks=[{"path": str(ROOT / "data" / "benchmarks" / "medical_choice.jsonl")}])
    assert pretrain.main([str(run)]) == 0, capsys.readouterr().err[-3000:]
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    scores = [h["eval_bench_medical_choice_accuracy"] for h in state["log_history"]
              if "eval_bench_medical_choice_accuracy" in h]
    assert len(scores) == 2 and state["best_metric"] == max(scores)


def test_a_watched_benchmark_warns_when_its_accuracy_falls_and_the_curve_shows_it(tmp_path, caplog):
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=0, log_history=[
        {"step": 0, "eval_bench_ceval_accuracy": 0.5, "eval_general_ppl": 20.0}])  # a resumed run's baseline
    watch = pretrain.ForgettingCallback(["general"], ["ceval"], threshold_pct=10)
    watch.on_train_begin(None, state, None)
    state.global_step = 100
    with caplog.at_level("WARNING", logger="pretrain"):
        watch.on_log(None, state, None, logs={"eval_bench_ceval_accuracy": 0.47, "eval_general_ppl": 21.0})
        assert not caplog.records  # 6% and 5%: within the threshold
        watch.on_log(None, state, None, logs={"eval_bench_ceval_accuracy": 0.40, "eval_general_ppl": 20.0})
    assert watch.benchmark_changes == {"ceval": -20.0} and watch.changes == {"general": 0.0}
    assert "forgetting: eval_bench_ceval_accuracy 0.4 is 20.0% below its baseline 0.5" in caplog.text
    history = [*state.log_history, {"step": 100, "loss": 3.0}, {"step": 100, "eval_bench_ceval_accuracy": 0.4}]
    pretrain.plot_loss_curve(history, tmp_path / "loss.png")
    from PIL import Image

    assert Image.open(tmp_path / "loss.png").size == (1600, 400)  # a third panel: the benchmarks
