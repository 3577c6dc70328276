"""Evaluation: VQA scoring of any data (`vqa.py`), `nanovlm eval` (`run.py`), the accuracy a
training run measures (`tasks.py`), and the lmms-eval plugin (`lmms.py`)."""


def lmms_eval_models():
    """The `lmms_eval.models` entry point (pyproject.toml): class paths imported only for `--model nanovlm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="nanovlm", simple_class_path="nanovlm.eval.lmms.NanoVLM",
                         chat_class_path="nanovlm.eval.lmms.NanoVLMChat")
