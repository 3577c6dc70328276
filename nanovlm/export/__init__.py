"""`nanovlm export`: a checkpoint written for the runtimes small VLMs run on, answering there as
it answers here: a transformers Idefics3 directory (`idefics3.py`) or llama.cpp's GGUF model +
mmproj pair (`gguf.py`); what both share is in `common.py`, the command in `run.py`.
"""
