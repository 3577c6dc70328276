"""The decode loop without a cache: the reference the cached path (`nanovlm.generation`) is
checked against. Every step runs the whole sequence through the model's own forward again (no
KV cache, no `decode_step`), so it shares no decode code with the path it checks."""

import torch


@torch.no_grad()
def greedy_without_cache(model, input_ids, images=None, attention_mask=None, max_new_tokens: int = 16):
    """Greedy new tokens (B, max_new_tokens), EOS not special; rows left-padded where the mask is 0."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(input_ids, images, mask)  # (B, T, vocab)
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        input_ids, mask = torch.cat([input_ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(out, 1)
