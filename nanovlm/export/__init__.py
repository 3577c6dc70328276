"""`nanovlm export`: a transformers Idefics3 directory (`idefics3.py`) or llama.cpp's GGUF model +
mmproj pair (`gguf.py`) that answers there as the model answers here."""
