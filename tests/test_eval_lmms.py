"""The lmms-eval plugin (`nanovlm.eval.lmms`): found through lmms-eval's own entry-point
registry, answering as `answer()` does, scoring as a direct computation does, and a whole
`lmms-eval` run on a local task that reports the accuracy `nanovlm eval --data` reports.

The entry point is read from this checkout's pyproject.toml and written as a distribution's
metadata in a temporary folder on the path, so the test sees the declaration this branch makes
(an installed nanovlm may predate it)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make setup installs it; or pip install '.[eval]')")

from lmms_eval.api.instance import Instance  # noqa: E402

from nanovlm import VLMConfig, VisionLanguageModel  # noqa: E402
from nanovlm.data.tokenizer import tokenizer_for  # noqa: E402
from nanovlm.generation import build_prompts, prompt_renderer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def entry_points_text() -> str:
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    return "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in table.items())


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A folder whose dist-info declares this checkout's entry points, first on sys.path."""
    import importlib

    site = tmp_path_factory.mktemp("site")
    info = site / "nanovlm_entry_points_under_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nanovlm-entry-points-under-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text(entry_points_text())
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))


def _png(colour, size=(40, 30)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """A random tiny model with an untied head: its greedy answers differ from prompt to prompt
    (a tied random one repeats the prompt's last token, a newline: empty answers)."""
    path = tmp_path_factory.mktemp("model") / "random"
    torch.manual_seed(0)
    VisionLanguageModel(VLMConfig.from_preset("tiny", lm_tie_weights=False), load_backbone=False).save_pretrained(path)
    return path


def red_model() -> VisionLanguageModel:
    """A tiny model that answers "red" to everything and then stops. The final norm keeps
    dimensions 0 and 1, where every token's embedding dominates the residual stream: (1000, 0)
    for most tokens, (1500, -1000) for " red", (0, -5000) for EOS. The head being tied, after
    any other token " red" scores highest (1500 against 1000, EOS 0); after " red" EOS does
    (0.55 x 5000 against 0.83 x 1500 + 0.55 x 1000 for " red" itself)."""
    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False)
    model.tokenizer = tokenizer_for(model.cfg)
    (red,) = model.tokenizer.encode(" red")
    eos = model.cfg.lm_eos_token_id
    with torch.no_grad():
        emb = model.decoder.token_embedding.weight
        emb[:, 0], emb[:, 1] = 1000.0, 0.0
        emb[red, 0], emb[red, 1] = 1500.0, -1000.0
        emb[eos, 0], emb[eos, 1] = 0.0, -5000.0
        model.decoder.norm.weight.zero_()
        model.decoder.norm.weight[:2] = 1.0
    return model


def _requests(kind: str, rows: list[tuple], task: str = "t", split: str = "test") -> list[Instance]:
    return [Instance(request_type=kind, arguments=(*row, i, task, split), idx=0,
                     metadata={"task": task, "doc_id": i, "repeats": 1}) for i, row in enumerate(rows)]


IMG_A = Image.new("RGB", (40, 30), (200, 10, 10))
IMG_B = Image.new("RGB", (20, 50), (10, 10, 200))
IMG_C = Image.new("RGB", (64, 64), (240, 240, 240))
DOCS = [{"q": "What colour is it?", "images": [IMG_A]},
        {"q": "Which picture is taller?", "images": [IMG_A, IMG_B]},
        {"q": "Say something.", "images": []},
        {"q": "Is the first <image> brighter than <image>?", "images": [IMG_C, IMG_A]},
        {"q": "What is this?", "images": [IMG_C]}]


def _visuals(doc):
    return doc["images"]


# ---------------------------------------------------------------------------------- registry
def test_lmms_eval_registry_resolves_nanovlm_to_our_classes(plugin_site):
    from lmms_eval import models

    from nanovlm.eval.lmms import NanoVLM, NanoVLMChat

    # What lmms-eval builds when it starts: its built-in manifests, then the entry points.
    registry = models._initialize_model_registry()
    assert registry.get_model_class("nanovlm") is NanoVLMChat  # the CLI's default: the chat class
    assert registry.get_model_class("nanovlm", force_simple=True) is NanoVLM  # --force_simple
    assert NanoVLMChat.is_simple is False and NanoVLM.is_simple is True


def test_importing_nanovlm_does_not_import_lmms_eval():
    code = ("import sys, nanovlm, nanovlm.eval, nanovlm.eval.vqa, nanovlm.generation, nanovlm.cli; "
            "from nanovlm import VisionLanguageModel; print('lmms_eval' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# ---------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("batch_size", [1, 2])
def test_generate_until_answers_as_answer_does(random_dir, batch_size):
    from nanovlm.eval.lmms import NanoVLM

    lm = NanoVLM.create_from_arg_string(f"pretrained={random_dir},device=cpu", {"batch_size": batch_size})
    lm.task_dict = {"t": {"test": DOCS}}
    gen = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    got = lm.generate_until(_requests("generate_until", [(d["q"], gen, _visuals) for d in DOCS]))
    want = lm.model.answer([d["images"] or None for d in DOCS], [d["q"] for d in DOCS], max_new_tokens=6,
                           batch_size=batch_size)
    assert got == want
    assert len(set(want)) == len(want) and all(want)  # a real check: five different, non-empty answers


def test_generate_until_cuts_at_until_and_groups_settings(random_dir):
    from nanovlm.eval.lmms import NanoVLM

    lm = NanoVLM(pretrained=str(random_dir), device="cpu", batch_size=4)
    lm.task_dict = {"t": {"test": DOCS}}
    images, questions = [d["images"] or None for d in DOCS], [d["q"] for d in DOCS]
    six = lm.model.answer(images, questions, max_new_tokens=6)
    three = lm.model.answer(images, questions, max_new_tokens=3)
    stop = three[1][3:5]  # a stop string inside the second three-token answer
    assert len(stop) == 2
    long, short = {"max_new_tokens": 6}, {"max_new_tokens": 3, "until": stop}
    rows = [(d["q"], long if i % 2 == 0 else short, _visuals) for i, d in enumerate(DOCS)]
    got = lm.generate_until(_requests("generate_until", rows))
    assert got[0::2] == six[0::2]
    assert got[1] == three[1].split(stop)[0] != three[1] and got[3] == three[3].split(stop)[0]


def _chat_docs():
    """The same questions as lmms-eval's chat requests: image and text parts in their places."""
    def parts(doc):
        if "<image>" in doc["q"]:  # the placeholders become image parts where they stand
            pieces = doc["q"].split("<image>")
            content = [{"type": "text", "text": pieces[0]}]
            for img, text in zip(doc["images"], pieces[1:]):
                content += [{"type": "image", "url": img}, {"type": "text", "text": text}]
        else:
            content = [{"type": "image", "url": img} for img in doc["images"]] + [{"type": "text", "text": doc["q"]}]
        return [{"role": "user", "content": content}]
    return parts


def test_chat_requests_answer_as_answer_does(random_dir):
    from nanovlm.eval.lmms import NanoVLMChat

    lm = NanoVLMChat.create_from_arg_string(f"pretrained={random_dir},device=cpu,dtype=float32", {"batch_size": 3})
    lm.task_dict = {"t": {"test": DOCS}}
    gen = {"max_new_tokens": 6, "temperature": 0}
    got = lm.generate_until(_requests("generate_until", [(d["q"], _chat_docs(), gen) for d in DOCS]))
    want = lm.model.answer([d["images"] or None for d in DOCS], [d["q"] for d in DOCS], max_new_tokens=6,
                           batch_size=3)
    assert got == want


def test_sampling_follows_the_task_temperature(random_dir):
    from nanovlm.eval.lmms import NanoVLM, generation_settings

    assert generation_settings({"temperature": 0.7, "top_p": 0.9}, 32) == {
        "max_new_tokens": 32, "greedy": False, "temperature": 0.7, "top_k": 0, "top_p": 0.9, "until": ()}
    assert generation_settings({"temperature": 0.7, "do_sample": False, "until": "Q:"}, 32)["greedy"] is True
    assert generation_settings({"num_beams": 1, "max_new_tokens": 5}, 32)["max_new_tokens"] == 5
    with pytest.raises(ValueError, match=r"^num_beams=3 asks for beam search; the nanovlm model decodes greedily "
                                         r"or by sampling \(set num_beams: 1\)\.$"):
        generation_settings({"num_beams": 3}, 32)
    lm = NanoVLM(pretrained=str(random_dir), device="cpu", batch_size=5)
    lm.task_dict = {"t": {"test": DOCS}}
    gen = {"max_new_tokens": 6, "temperature": 5.0, "top_p": 1.0}
    torch.manual_seed(3)
    first = lm.generate_until(_requests("generate_until", [(d["q"], gen, _visuals) for d in DOCS]))
    torch.manual_seed(3)
    again = lm.generate_until(_requests("generate_until", [(d["q"], gen, _visuals) for d in DOCS]))
    greedy = lm.model.answer([d["images"] or None for d in DOCS], [d["q"] for d in DOCS], max_new_tokens=6)
    assert first == again and first != greedy


# ---------------------------------------------------------------------------------- loglikelihood
def test_loglikelihood_agrees_with_a_direct_computation(random_dir):
    from nanovlm.eval.lmms import NanoVLM

    lm = NanoVLM(pretrained=str(random_dir), device="cpu", batch_size=3)
    lm.task_dict = {"t": {"test": DOCS}}
    model, tok = lm.model, lm.tokenizer
    ids, mask, tiles = build_prompts(model, [DOCS[1]["images"]], [DOCS[1]["q"]])
    (first,) = model.generate(ids, tiles, mask, max_new_tokens=1, greedy=True)[0].tolist()
    greedy = tok.decode([first], skip_special_tokens=False)  # the greedy first token, as text
    assert tok.encode(greedy) == [first]
    rows = [(d["q"], cont, _visuals) for d, cont in zip(DOCS, [" red", greedy, " a long continuation here", "B"])]
    rows.append((DOCS[4]["q"], lambda doc: " a target from the doc", _visuals))  # doc_to_target, as loglikelihood tasks give
    got = lm.loglikelihood(_requests("loglikelihood", rows))

    renderer = prompt_renderer(model)
    for (context, cont, _), doc, (logprob, is_greedy) in zip(rows, DOCS, got):
        cont = cont(doc) if callable(cont) else cont
        chat = renderer.render([{"role": "user", "content": context}], doc["images"], add_generation_prompt=True)
        ids = torch.tensor([chat.input_ids + tok.encode(cont)])
        n = len(tok.encode(cont))
        with torch.no_grad():
            logits, _ = model(ids, [chat.tiles])  # (1, T, vocab), one unpadded row
        logp = logits[0, -n - 1:-1].log_softmax(-1)
        want = logp.gather(1, ids[0, -n:, None]).sum()
        # fp32, a padded batch against one row: rounding of order 1e-6 per logit, summed over
        # at most 5 tokens after a log-softmax over 49k entries.
        torch.testing.assert_close(torch.tensor(logprob), want, rtol=1e-5, atol=1e-4)
        assert is_greedy == bool((logp.argmax(-1) == ids[0, -n:]).all())
    assert got[1][1] is True and got[0][1] is False  # the model's own greedy answer is greedy


# ---------------------------------------------------------------------------------- bad model_args
@pytest.mark.parametrize("args, extra, message", [
    ("pretrained=DIR,colour=red", {}, "unknown model_args colour; nanovlm takes pretrained, device, dtype, "
                                      "batch_size, max_new_tokens (and --batch_size / --device on the command line)."),
    ("device=cpu", {}, "model_args needs pretrained=DIR: a nanovlm checkpoint directory or hub id."),
    ("pretrained=DIR,dtype=float8", {}, "dtype='float8' is not one of auto, float32, fp32, bfloat16, bf16, float16, fp16."),
    ("pretrained=DIR", {"batch_size": "auto"}, "batch_size='auto' must be a positive whole number (nanovlm has no "
                                               "'auto' batch size)."),
    ("pretrained=DIR,device=gpu0", {}, "device='gpu0' is not a torch device; give cpu, cuda or cuda:N."),
])
def test_bad_model_args_give_one_sentence(random_dir, args, extra, message):
    from nanovlm.eval.lmms import NanoVLM

    with pytest.raises(ValueError) as e:
        NanoVLM.create_from_arg_string(args.replace("DIR", str(random_dir)), extra)
    assert str(e.value) == message


def test_a_missing_checkpoint_says_so(tmp_path):
    from nanovlm.eval.lmms import NanoVLM

    with pytest.raises(FileNotFoundError, match=r"config\.json is missing; a checkpoint directory needs"):
        NanoVLM.create_from_arg_string(f"pretrained={tmp_path}")


# ---------------------------------------------------------------------------------- a whole run
TASK_YAML = """\
task: mine
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function nanovlm.eval.lmms.cauldron_doc_to_visual
doc_to_text: !function nanovlm.eval.lmms.cauldron_doc_to_text
doc_to_target: !function nanovlm.eval.lmms.cauldron_doc_to_target
process_results: !function nanovlm.eval.lmms.vqa_process_results
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _local_task(tmp_path) -> tuple[Path, Path, Path]:
    """A model that answers "red", a Cauldron parquet file (one and two images per record; 3 of
    5 answers are red after normalisation) and a task YAML over it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model_dir = tmp_path / "red"
    red_model().save_pretrained(model_dir)
    images = [[_png((200, 10, 10))], [_png((10, 200, 10)), _png((10, 10, 200), (20, 50))], [_png((9, 9, 9))],
              [_png((120, 0, 0)), _png((250, 250, 250))], [_png((100, 100, 0))]]
    answers = ["red", "blue", "Red.", "green", "the red"]
    texts = [[{"user": f"<image>Question {i}?" if len(im) == 1 else f"Question {i}?", "assistant": a}]
             for i, (im, a) in enumerate(zip(images, answers))]
    data = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"images": images, "texts": texts}), data)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(TASK_YAML.format(data=data))
    return model_dir, data, tasks


def _lmms_eval(plugin_site, tmp_path, model_dir, tasks, *extra) -> dict:
    out = tmp_path / "lmms_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(plugin_site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cli = Path(sys.executable).with_name("lmms-eval")  # the console script lmms-eval installs
    cmd = [str(cli), "--model", "nanovlm", "--model_args", f"pretrained={model_dir},device=cpu",
           "--tasks", "mine", "--include_path", str(tasks), "--batch_size", "2", "--output_path", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (results,) = list(out.rglob("*_results.json"))
    return json.loads(results.read_text())["results"]["mine"]


@pytest.mark.parametrize("mode", ["chat", pytest.param("simple", marks=pytest.mark.slow)])
def test_an_lmms_eval_run_reports_what_nanovlm_eval_reports(plugin_site, tmp_path, monkeypatch, mode):
    from nanovlm.cli import main

    model_dir, data, tasks = _local_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["accuracy"] == 3 / 5  # "red" is right three times: the check below is not vacuous
    theirs = _lmms_eval(plugin_site, tmp_path, model_dir, tasks, *(["--force_simple"] if mode == "simple" else []))
    assert theirs["exact_match,none"] == ours["accuracy"]
