"""Model sources: one resolver for every `--model`, `from_pretrained`, `vit_model_type`,
`lm_model_type` and tokenizer value, so the same bad value gets the same sentence everywhere.

The hub is never contacted: `nanovlm.sources._snapshot_download` (the one download site) is
replaced, either by a stand-in that must not be called or by one that raises what
huggingface_hub raises for a DNS failure or an unknown repository.
"""

import os
import socket
from pathlib import Path

import pytest

from nanovlm import sources
from nanovlm.cli import main
from nanovlm.config import VLMConfig
from nanovlm.data.tokenizer import get_tokenizer
from nanovlm.models.language_model import LanguageModel
from nanovlm.models.vision_language_model import VisionLanguageModel
from nanovlm.models.vision_transformer import ViT
from nanovlm.sources import PACKAGED_SMOLLM2, SourceError, looks_like_path, resolve

NO_SUCH = (": no such file or directory; a value that looks like a path is never looked up on the hub, "
           "so check the path.")


def offline(value, flag="1"):
    return (f"{value} is not a local directory, and HF_HUB_OFFLINE={flag} forbids downloading it from the hub; "
            "give a local path, or unset HF_HUB_OFFLINE.")


def hub_failed(value, reason):
    return f"{value} could not be downloaded from the hub ({reason}); if it was meant as a local path, it does not exist."


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Online as far as nanovlm can tell, in an empty working directory; `hub.calls` records
    downloads, `hub.error` (when set) is raised by them, else `hub.answer` is returned."""

    class Hub:
        calls: list = []
        error: Exception | None = None
        answer = str(tmp_path / "snapshot")

    def download(repo_id, **kwargs):
        Hub.calls.append((repo_id, kwargs))
        if Hub.error is not None:
            raise Hub.error
        return Hub.answer

    Hub.calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_snapshot_download", download)
    monkeypatch.chdir(tmp_path)
    return Hub


def _hub_error(name: str, message: str) -> Exception:
    """huggingface_hub's own error class, built without the HTTP response its __init__ wants."""
    errors = pytest.importorskip("huggingface_hub.errors")
    cls = getattr(errors, name)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize("value", ["./ckpt", "/does/not/exist", "~/no-such-nanovlm-dir", "a/b/c", "runs\\final",
                                   "model.gguf", "org/weights.safetensors", "my model", "runs/nope", "org/a..b"])
def test_a_value_that_looks_like_a_path_is_never_sent_to_the_hub(hub, value):
    Path("runs").mkdir()  # makes runs/nope a path: its first component is a local directory
    assert looks_like_path(value)
    with pytest.raises(SourceError) as err:
        resolve(value)
    assert str(err.value) == value + NO_SUCH
    assert hub.calls == []


@pytest.mark.parametrize("value", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B", "gpt2",
                                   "google/siglip2-base-patch16-256", "runs/nope"])
def test_hub_ids_are_downloaded_when_online(hub, value):
    assert not looks_like_path(value)  # no runs/ here: runs/nope could be a repo
    assert resolve(value, allow_patterns=["config.json"], revision="main") == hub.answer
    assert hub.calls == [(value, {"allow_patterns": ["config.json"], "revision": "main"})]


def test_local_paths_win_and_tilde_is_expanded(hub, monkeypatch, tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve("org/name") == "org/name"  # a hub-looking id that exists locally is the local one
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/org") == str(tmp_path / "org")
    assert hub.calls == []


@pytest.mark.parametrize("flag", ["1", "true", "TRUE", "yes", "On"])
def test_offline_as_huggingface_hub_reads_it(hub, monkeypatch, flag):
    monkeypatch.setenv("HF_HUB_OFFLINE", flag)
    with pytest.raises(SourceError) as err:
        resolve("someone/model")
    assert str(err.value) == offline("someone/model", flag)
    assert hub.calls == []


@pytest.mark.parametrize("flag", ["0", "false", "no", ""])
def test_not_offline(hub, monkeypatch, flag):
    monkeypatch.setenv("HF_HUB_OFFLINE", flag)
    assert resolve("someone/model") == hub.answer


@pytest.mark.parametrize("error, reason", [
    (lambda: _hub_error("RepositoryNotFoundError", "404 Client Error. Repository Not Found for url: ..."),
     "no such repository, or it is private"),
    (lambda: _hub_error("GatedRepoError", "401 Client Error"), "the repository is gated; accept its terms and log in"),
    (lambda: _hub_error("LocalEntryNotFoundError", "An error happened while trying to locate the files on the Hub"),
     "the hub cannot be reached and nothing is cached"),
    (lambda: socket.gaierror(-3, "Temporary failure in name resolution"),
     "the hub's address cannot be resolved; is there a network?"),
    (lambda: RuntimeError("something else\nwith a second line"), "something else"),
], ids=["404", "gated", "dns", "gaierror", "other"])
def test_a_hub_failure_is_one_sentence(hub, error, reason):
    hub.error = error()
    with pytest.raises(SourceError) as err:
        resolve("someone/model")
    assert str(err.value) == hub_failed("someone/model", reason)


def test_packaged_model():
    assert resolve(PACKAGED_SMOLLM2).endswith(".gguf")
    assert os.path.isfile(os.path.join(resolve("packaged:small-vit"), "model.safetensors"))
    with pytest.raises(SourceError, match=r"^unknown packaged model 'packaged:nothing'; there are "
                                          r"packaged:smollm2-135m and packaged:small-vit\.$"):
        resolve("packaged:nothing")


# ------------------------------------------------------------------ every entry point, one sentence
def _entry_points():
    tiny = VLMConfig.from_preset("tiny")

    def command(*args):
        def run(value, capsys):
            assert main([*args[:1], "--model", value, *args[1:]]) == 1
            err = capsys.readouterr().err.strip()
            assert err.startswith("nanovlm: error: ") and "\n" not in err
            raise SourceError(err[len("nanovlm: error: "):])
        return run

    return {
        "VisionLanguageModel.from_pretrained": lambda v, _: VisionLanguageModel.from_pretrained(v),
        "ViT.from_pretrained": lambda v, _: ViT.from_pretrained(tiny.replace(vit_model_type=v)),
        "LanguageModel.from_pretrained": lambda v, _: LanguageModel.from_pretrained(tiny.replace(lm_model_type=v)),
        "get_tokenizer": lambda v, _: get_tokenizer(v),
        "nanovlm generate": command("generate", "--prompt", "x"),
        "nanovlm eval": command("eval", "--task", "easyvqa"),
        "nanovlm serve": command("serve", "--port", "0"),
    }


ENTRY_POINTS = _entry_points()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_says_the_same_for_the_same_bad_value(hub, monkeypatch, capsys, entry):
    call = ENTRY_POINTS[entry]
    Path("runs").mkdir()
    cases = [("runs/nope", "runs/nope" + NO_SUCH), ("no/such/dir", "no/such/dir" + NO_SUCH)]
    for value, message in cases:
        with pytest.raises(SourceError) as err:
            call(value, capsys)
        assert str(err.value) == message, entry
    hub.error = _hub_error("RepositoryNotFoundError", "404 Client Error")
    with pytest.raises(SourceError) as err:
        call("someone/not-here", capsys)
    assert str(err.value) == hub_failed("someone/not-here", "no such repository, or it is private"), entry
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        call("someone/not-here", capsys)
    assert str(err.value) == offline("someone/not-here"), entry
    assert [repo for repo, _ in hub.calls] == ["someone/not-here"]  # paths never reached the hub


def test_one_download_site_and_one_offline_check():
    root = Path(__file__).resolve().parents[1] / "nanovlm"
    texts = {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*.py")}
    assert [p for p, t in texts.items() if "snapshot_download(" in t] == ["sources.py"]
    assert [p for p, t in texts.items() if '"HF_HUB_OFFLINE"' in t] == ["sources.py"]
