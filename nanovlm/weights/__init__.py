"""Weights: one file per foreign format (transformers SigLIP / Llama / Idefics3 directories, GGUF,
PEFT adapters, nanovlm and nanoVLM checkpoints), each a key table plus named transforms.
`weights/` never imports `models/`: a model's `from_pretrained` calls in with the class to fill."""
