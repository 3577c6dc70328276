"""`nanovlm eval --data FILE` and the generic VQA scoring it and the training loop share."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from PIL import Image

from nanovlm.cli import main
from nanovlm.data.datasets import DataError, SkipCounter
from nanovlm.eval import vqa
from nanovlm.eval.run import default_report_path

sys.path.insert(0, os.path.dirname(__file__))
import shapes_data  # noqa: E402

KINDS = ["count", "position", "colour"]


# ---------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("  RED ", "red"), ("ÉTÉ", "été"),                          # case, spaces
    ("yes.", "yes"), ("Top-left!", "top left"), ("(blue)", "blue"), ("50%", "50"),  # punctuation
    ("dog's", "dogs"), ("don\u2019t", "dont"), ("1,000", "1000"), ("3.5", "3.5"),  # apostrophes, numbers
    ("the red one", "red 1"), ("An apple", "apple"), ("a cat and a dog", "cat and dog"),  # articles
    ("A", "a"), ("the", "the"),                                                 # nothing left: kept
    ("Two", "2"), ("zero", "0"), ("twenty", "20"), ("twenty one", "20 1"), ("twenty-two", "20 2"),
    ("thirty", "thirty"), ("eleven cats", "11 cats"),                          # number words
    ("bottom\t\n right", "bottom right"), ("", ""), (None, ""), (3, "3"),
])
def test_normalize_answer(text, expected):
    assert vqa.normalize_answer(text) == expected


def test_answer_types_and_question_keys():
    assert [vqa.answer_type(a) for a in ["Yes.", "no", "2", "Three", "3.5", "red", "the 2 cats"]] == \
        ["yes/no", "yes/no", "number", "number", "number", "other", "other"]
    assert vqa.question_key("  What colour is the Square? ") == vqa.question_key("what colour is the square")
    assert vqa.question_key("What colour is it?") != vqa.question_key("What colour is the square?")


# ---------------------------------------------------------------------------------- items
def test_qa_items_from_a_llava_jsonl_with_several_turns(tmp_path):
    rows = shapes_data.write_llava(str(tmp_path / "data.jsonl"), 5, KINDS, seed=1, one_per_record=False)
    items = vqa.qa_items(str(tmp_path / "data.jsonl"))
    assert [(it["question"], it["answer"]) for it in items] == [(r["question"], r["answer"]) for r in rows]
    assert len({it["id"] for it in items}) == len(items) == 15
    for it, r in zip(items, rows):
        assert it["images"] == [str(tmp_path / "data_images" / f"{r['image']}.png")]
        assert "<image>" not in it["question"] and it["question"] == it["question"].strip()
    # A copy of the file elsewhere finds its images through image_folder.
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "data.jsonl"
    shutil.copy(tmp_path / "data.jsonl", copy)
    moved = vqa.qa_items(str(copy), image_folder=str(tmp_path))
    assert [it["images"] for it in moved] == [it["images"] for it in items]
    assert [it["images"] for it in vqa.qa_items(str(copy))][0] == [str(tmp_path / "elsewhere" / "data_images/0.png")]


def test_qa_items_from_a_cauldron_parquet_indices_and_limit(tmp_path):
    rows = shapes_data.write_parquet(str(tmp_path / "data.parquet"), 4, KINDS, seed=2)
    items = vqa.qa_items(str(tmp_path / "data.parquet"))
    assert [(it["question"], it["answer"]) for it in items] == [(r["question"], r["answer"]) for r in rows]
    assert all(len(it["images"]) == 1 and it["images"][0]["bytes"].startswith(b"\x89PNG") for it in items)
    assert items[0]["images"] is items[2]["images"]  # one record's questions share its images
    assert items[0]["images"] != items[3]["images"]
    # indices pick records, in the order given; limit counts questions.
    picked = vqa.qa_items(str(tmp_path / "data.parquet"), indices=[3, 1])
    assert [it["answer"] for it in picked] == [r["answer"] for r in rows[9:12] + rows[3:6]]
    assert [it["id"] for it in picked][:2] == ["data.parquet row 3 q1", "data.parquet row 3 q2"]
    assert len(vqa.qa_items(str(tmp_path / "data.parquet"), limit=5)) == 5


def test_qa_items_skips_and_counts_unreadable_records(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>only a question"}]}), json.dumps(good)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    skips = SkipCounter()
    items = vqa.qa_items(str(tmp_path / "d.jsonl"), skips=skips)
    assert [it["id"] for it in items] == ["d.jsonl line 1 q1", "d.jsonl line 4 q1"]  # lines as an editor counts them
    assert skips.as_dict() == {"bad_record": 1, "empty_text": 1} and skips.seen == {"d.jsonl line 2", "d.jsonl line 3"}


def test_qa_items_turns_of_a_conversation(tmp_path):
    record = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\n<image>\nWhich is red?\nA. the first\nB. the second"},
        {"from": "gpt", "value": " B "},
        {"from": "human", "value": "And the other one?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "No answer to this one."}]}
    (tmp_path / "c.json").write_text(json.dumps([record]))
    items = vqa.qa_items(str(tmp_path / "c.json"))
    assert [(it["question"], it["answer"]) for it in items] == [
        ("Which is red?\nA. the first\nB. the second", "B"), ("And the other one?", "blue")]
    assert items[1]["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]  # every turn: all images


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "data file {dir}/missing.jsonl does not exist."),
    ("d.csv", "a,b\n", "{dir}/d.csv: unknown data file type .csv; use .parquet, .arrow, .json or .jsonl."),
    ("d.jsonl", '{"foo": 1}\n', "d.jsonl: records have keys ['foo']; expected Cauldron (images, texts) or LLaVA "
                                "(image, conversations)."),
    ("d.json", "[1, 2", "{dir}/d.json is not valid JSON"),
    ("d.parquet", "not parquet", "cannot read {dir}/d.parquet (ArrowInvalid: "),
])
def test_qa_items_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        vqa.qa_items(str(tmp_path / name))
    assert str(e.value).startswith(message.format(dir=tmp_path))
    with pytest.raises(ValueError, match=r"^limit must be >= 0 \(0: every question\), got -1\.$"):
        vqa.qa_items(str(tmp_path / name), limit=-1)


# ---------------------------------------------------------------------------------- evaluate
class StandIn:
    """A model whose `answer` gives the predictions it was handed, in order, and records its calls."""

    def __init__(self, predictions):
        self.predictions = list(predictions)
        self.calls = []

    def answer(self, images, questions, **kwargs):
        self.calls.append({"images": images, "questions": list(questions), **kwargs})
        out, self.predictions = self.predictions[:len(questions)], self.predictions[len(questions):]
        return out


# (question, reference, prediction, image): right for every other item, the right ones with case,
# punctuation, article and number-word noise.
CASES = [
    ("Is there a circle?", "yes", "Yes.", "a"),
    ("Is there a circle?", "no", "yes", "a"),
    ("How many squares are there?", "2", "two", "a"),
    ("How many squares are there?", "3", "4", "a"),
    ("What colour is the square?", "red", "The red.", "b"),
    ("what colour is the square", "blue", "green", "b"),
    ("Where is it?", "top left", "Top-left!", "c"),
    ("What is this?", "an apple", "pear", "c"),
]


@pytest.fixture
def case_items(tmp_path):
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        Image.new("RGB", (12, 10), colour).save(tmp_path / f"{name}.png")
    return [{"id": f"r{k}", "images": [str(tmp_path / f"{img}.png")], "question": q, "answer": a}
            for k, (q, a, _, img) in enumerate(CASES)]


def test_evaluate_scores_known_answers(case_items, monkeypatch):
    opened = []
    real = vqa.load_image
    monkeypatch.setattr(vqa, "load_image", lambda s, **kw: opened.append(s) or real(s, **kw))
    model = StandIn([p for _, _, p, _ in CASES])
    report = vqa.evaluate(model, case_items, batch_size=3, max_new_tokens=7)
    assert report["accuracy"] == 0.5 and report["n"] == 8 and report["correct"] == 4
    assert report["per_type"] == {"yes/no": {"n": 2, "correct": 1, "accuracy": 0.5},
                                  "number": {"n": 2, "correct": 1, "accuracy": 0.5},
                                  "other": {"n": 4, "correct": 2, "accuracy": 0.5}}
    # Asked twice (the colour question in two spellings); the last two questions once each.
    assert report["per_question"] == {"how many squares are there": {"n": 2, "correct": 1, "accuracy": 0.5},
                                      "is there a circle": {"n": 2, "correct": 1, "accuracy": 0.5},
                                      "what colour is the square": {"n": 2, "correct": 1, "accuracy": 0.5}}
    assert [r["correct"] for r in report["items"]] == [True, False] * 4
    first = report["items"][0]
    assert first == {"id": "r0", "question": "Is there a circle?", "reference": "yes", "prediction": "Yes.",
                     "correct": True, "type": "yes/no", "images": [case_items[0]["images"][0]]}
    assert report["skipped"] == {} and report["max_new_tokens"] == 7
    # Batches of 3 through answer(), each question with its PIL images; each image decoded once.
    assert [len(c["questions"]) for c in model.calls] == [3, 3, 2]
    assert [c["batch_size"] for c in model.calls] == [3, 3, 2]
    assert all(c["max_new_tokens"] == 7 and c["greedy"] is True for c in model.calls)
    assert model.calls[0]["questions"] == [q for q, _, _, _ in CASES[:3]]
    entry = model.calls[0]["images"][0]
    assert isinstance(entry, list) and isinstance(entry[0], Image.Image) and entry[0].size == (12, 10)
    assert sorted(opened) == sorted({it["images"][0] for it in case_items}) and report["images_decoded"] == 3
    json.dumps(report)  # the report is plain JSON


def test_evaluate_images_held_as_bytes_and_unreadable_images(tmp_path):
    rows = shapes_data.write_parquet(str(tmp_path / "d.parquet"), 3, KINDS, seed=3)
    items = vqa.qa_items(str(tmp_path / "d.parquet"))
    items.append({"id": "x", "images": [str(tmp_path / "gone.png")], "question": "Q?", "answer": "A"})
    items.append({"id": "y", "images": [], "question": "No image?", "answer": "no"})
    model = StandIn([r["answer"] for r in rows] + ["no"])
    report = vqa.evaluate(model, items, batch_size=4)
    assert report["n"] == 10 and report["accuracy"] == 1.0 and report["images_decoded"] == 3
    assert report["skipped"] == {"missing_image": 1}
    assert report["skip_examples"]["missing_image"] == f"x: image file {tmp_path}/gone.png does not exist."
    assert report["items"][9]["prediction"] is None and report["items"][9]["correct"] is None
    assert report["items"][0]["images"] == [None]  # bytes have no name
    assert model.calls[-1]["images"][-1] is None  # a question without images
    assert "skipped 1 question(s) whose images could not be read (missing_image 1)" in vqa.format_report(report)


def test_evaluate_over_two_ranks_gives_the_single_process_report(case_items):
    preds = [p for _, _, p, _ in CASES]
    single = vqa.evaluate(StandIn(preds), case_items, batch_size=2, max_new_tokens=5)
    rank1 = vqa.predict(StandIn(preds[1::2]), case_items[1::2], batch_size=2, max_new_tokens=5)
    two = vqa.evaluate(StandIn(preds[0::2]), case_items, batch_size=2, max_new_tokens=5, rank=0, world_size=2,
                       gather=lambda mine: [mine, rank1])
    for key in ("accuracy", "n", "per_type", "per_question", "items"):
        assert two[key] == single[key]


def test_format_report():
    report = vqa.score([{"id": str(k), "images": [], "question": q, "answer": a} for k, (q, a, _, _) in
                        enumerate(CASES)], [p for _, _, p, _ in CASES])
    lines = vqa.format_report(report, title="mine.jsonl").splitlines()
    assert lines[0] == "mine.jsonl: accuracy 50.00% (4/8) exact match after VQA normalisation"
    assert lines[1] == "  by answer type: yes/no 50.00% (1/2) | number 50.00% (1/2) | other 50.00% (2/4)"
    assert lines[2] == "  by question (3 asked more than once):"
    assert lines[3].split() == ["50.00%", "(1/2)", "how", "many", "squares", "are", "there"]
    assert len(lines) == 6
    assert vqa.format_report(report, max_questions=1).splitlines()[2] == \
        "  by question (3 asked more than once, the 1 most asked):"
    empty = vqa.score([], [])
    assert empty["accuracy"] is None and vqa.format_report(empty) == "eval: no question could be scored"


# ---------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from nanovlm.config import VLMConfig
    from nanovlm.models.vision_language_model import VisionLanguageModel

    path = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).save_pretrained(path)
    return path


@pytest.mark.parametrize("layout", ["llava", "parquet"])
def test_cli_eval_on_data(layout, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if layout == "llava":
        data = data_dir / "mine.jsonl"
        rows = shapes_data.write_llava(str(data), 5, ["count", "position"], seed=4)
    else:
        data = data_dir / "mine.parquet"
        rows = shapes_data.write_parquet(str(data), 5, ["count", "position"], seed=4)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    name = f"eval-{tiny_model_dir.parent.name}-tiny-mine.json"  # one rule for --data and --task, the model named
    report = json.loads((work / name).read_text())
    assert not any(p.name.startswith("eval") for p in tiny_model_dir.iterdir())  # nothing in the model's folder
    assert report["data"] == str(data) and report["model"] == str(tiny_model_dir) and report["n"] == 10
    assert [(r["question"], r["reference"]) for r in report["items"]] == [(r["question"], r["answer"]) for r in rows]
    assert all(isinstance(r["prediction"], str) for r in report["items"])
    for r in report["items"]:  # a random model: whatever it says, the verdict follows the normalisation
        assert r["correct"] == (vqa.normalize_answer(r["prediction"]) == vqa.normalize_answer(r["reference"]))
    assert report["correct"] == sum(r["correct"] for r in report["items"])
    assert report["accuracy"] == report["correct"] / 10
    assert sum(e["n"] for e in report["per_type"].values()) == 10 and report["per_type"]["number"]["n"] == 5
    assert report["images_decoded"] == 5
    assert printed[0] == (f"{data}: accuracy {100 * report['accuracy']:.2f}% ({report['correct']}/10) "
                          "exact match after VQA normalisation")
    assert printed[-1].startswith("10 questions in ") and printed[-1].endswith(f"report written to {name}")
    # --limit: a report of its own; --out: where asked.
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "3",
                 "--out", str(tmp_path / "r" / "three.json")]) == 0
    assert json.loads((tmp_path / "r" / "three.json").read_text())["n"] == 3
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"report written to {tmp_path / 'r' / 'three.json'}")
    assert default_report_path(str(tiny_model_dir), str(data), None, 3) == name.replace(".json", "-first3.json")


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'; choose one of: easyvqa, or give --data FILE."),
    (["--task", "easyvqa", "--data", "DATA"],
     "give --task or --data, not both: --task scores a benchmark, --data your own questions."),
    ([], "give --task NAME (one of: easyvqa) or --data FILE (your own questions); see nanovlm eval --help."),
    (["--data", "DIR/missing.jsonl"], "data file DIR/missing.jsonl does not exist."),
    (["--data", "DIR/d.csv"], "DIR/d.csv: unknown data file type .csv; use .parquet, .arrow, .json or .jsonl."),
    (["--data", "DIR/odd.jsonl"], "odd.jsonl: records have keys ['foo']; expected Cauldron (images, texts) or "
                                  "LLaVA (image, conversations)."),
    (["--data", "DIR/broken.parquet"], "cannot read DIR/broken.parquet (ArrowInvalid: "),
    (["--data", "DIR/empty.jsonl"], "DIR/empty.jsonl holds no question with an answer that can be read "
                                    "(skipped 1 sample(s): empty_text 1; first: empty.jsonl line 1: the record has "
                                    "no question with an answer)."),
    (["--data", "DATA", "--image-folder", "DIR/nowhere"], "image folder DIR/nowhere does not exist."),
    (["--data", "DIR/lost.jsonl"], "none of the 1 image files that DIR/lost.jsonl names exists (the first: "
                                   "DIR/gone.png); check the image paths, or give --image-folder."),
    (["--data", "DIR/corrupt.jsonl"], "none of the 1 questions' images could be read (first: corrupt.jsonl line 1 q1: "
                                      "DIR/d.csv is not in an image format PIL can read); check the image paths, "
                                      "or give --image-folder."),
    (["--task", "easyvqa", "--image-folder", "DIR"], "--image-folder goes with --data"),
])
def test_cli_eval_errors_are_one_sentence(args, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shapes_data.write_llava(str(tmp_path / "data.jsonl"), 1, ["count"], seed=5)
    (tmp_path / "d.csv").write_text("a,b\n")
    (tmp_path / "odd.jsonl").write_text('{"foo": 1}\n')
    (tmp_path / "broken.parquet").write_text("not parquet")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>hello"}]}) + "\n")
    (tmp_path / "lost.jsonl").write_text(json.dumps({"image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A"}]}) + "\n")
    (tmp_path / "corrupt.jsonl").write_text(json.dumps({"image": "d.csv", "conversations": [
        {"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A"}]}) + "\n")
    subst = {"DATA": str(tmp_path / "data.jsonl")}
    args = [subst.get(a, a).replace("DIR", str(tmp_path)) for a in args]
    assert main(["eval", "--model", str(tiny_model_dir), *args]) == 1
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the progress bar, if one was drawn
    assert err.startswith("nanovlm: error: " + message.replace("DIR", str(tmp_path)))
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("eval*.json"))
