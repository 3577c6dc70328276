"""Evaluation: VQA scoring of any data (`vqa.py`), `nanovlm eval` (`run.py`), the accuracy a
training run measures (`tasks.py`), and the lmms-eval plugin (`lmms.py`)."""


def lmms_eval_models():
    """The `lmms_eval.models` entry point (pyproject.toml): lmms-eval's registry calls it while it
    starts up and imports `nanovlm.eval.lmms` only when `--model nanovlm` is asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="nanovlm", simple_class_path="nanovlm.eval.lmms.NanoVLM",
                         chat_class_path="nanovlm.eval.lmms.NanoVLMChat")
