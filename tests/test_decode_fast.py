"""The decode path, eager and `torch.compile`d, on float and int8 weights, gives the greedy
tokens of the uncached reference (`decode_reference`), left-padded batches included; preparing
a model for it (fused q/k/v and gate/up) changes neither what it saves nor how it trains.
Never timed.

Tolerances, where they come from:
- One int8 linear: each weight is off by at most half its row's scale s_n, so an output is off by
  at most s_n / 2 * sum_k |x_k|; the kernel also rounds its input and output to bf16 (2^-8
  relative each): `quantization.int8_error_bound`, asserted element by element.
- The whole int8 model: with weights already on the int8 grid (quantize, dequantize) only the
  bf16 roundings remain, two per matmul (input and output, 2^-8 relative each), over the
  matmuls one token's logits pass through in sequence (4 per block, and the head): the logits
  stay within that many times 2 * 2^-8 of their largest magnitude.
"""

import subprocess
import sys
import warnings

import pytest
import torch
from decode_reference import greedy_without_cache
from safetensors.torch import load_file

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm import generation
from nanovlm.generation import generate
from nanovlm.models import quantization
from nanovlm.models.quantization import Int8Linear, check_quantize, int8_error_bound, quantize_rows

NEW = 12


def _model() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False).eval()


def _batch(model):
    """Two prompts with one image each, the first left-padded by 3."""
    cfg = model.cfg
    ids = torch.randint(0, 1000, (2, 10 + cfg.mp_image_token_length))
    ids[:, 3:3 + cfg.mp_image_token_length] = model.image_token_id
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    images = torch.rand(2, 3, cfg.vit_img_size, cfg.vit_img_size)
    return ids, images, mask


def _greedy(model, ids, images, mask, **kwargs):
    return generate(model, ids, images, mask, max_new_tokens=NEW, greedy=True, eos_token_id=-1, **kwargs)


def _on_int8_grid(model) -> None:
    """Round every decoder linear weight to what int8 with bf16 scales stores (in place)."""
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.Linear):  # the head too (tied: the embedding with it)
                q, s = quantize_rows(module.weight)
                module.weight.copy_(q.float() * s.to(torch.bfloat16).float()[:, None])


def test_generate_prepares_the_model_and_gives_the_uncached_tokens_with_left_padding():
    model = _model()
    ids, images, mask = _batch(model)
    ref = greedy_without_cache(model, ids, images, mask, NEW)
    assert model.decoder.blocks[0].attn.qkv_weight is None
    assert torch.equal(_greedy(model, ids, images, mask), ref)
    attn = model.decoder.blocks[0].attn
    assert attn.qkv_weight is not None and attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    alone = _greedy(model, ids[1:], images[1:], mask[1:])  # no padding at all
    assert torch.equal(alone, ref[1:])


def test_compiled_step_gives_the_uncached_tokens():
    model = _model()
    ids, images, mask = _batch(model)
    ref = greedy_without_cache(model, ids, images, mask, NEW)
    assert torch.equal(_greedy(model, ids, images, mask, compile=True), ref)
    # A shorter prompt in the same cache bucket reuses the compiled step (and is still right).
    short = _greedy(model, ids[:, 1:], images, mask[:, 1:], compile=True)
    assert torch.equal(short, greedy_without_cache(model, ids[:, 1:], images, mask[:, 1:], NEW))


def test_a_prepared_model_saves_the_same_file_and_trains_the_same(tmp_path):
    """Preparing (what generate does) keeps the saved checkpoint, the Parameter objects an
    optimizer made before holds, and every training step bit for bit."""
    plain, prepared = _model().train(), _model().train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, prepared)]
    ids, images, mask = _batch(plain)
    plain.save_pretrained(tmp_path / "plain")
    params = list(prepared.parameters())
    prepared.decoder.prepare_for_inference()
    assert all(a is b for a, b in zip(prepared.parameters(), params))
    assert prepared.decoder.blocks[0].mlp.gate_up_weight is not None
    prepared.save_pretrained(tmp_path / "prepared")
    assert (tmp_path / "plain" / "config.json").read_text() == (tmp_path / "prepared" / "config.json").read_text()
    saved = [load_file(tmp_path / name / "model.safetensors") for name in ("plain", "prepared")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(v, saved[1][k]) for k, v in saved[0].items())
    targets = ids.roll(-1, dims=1)
    for model, optimizer in zip((plain, prepared), optimizers):
        for _ in range(2):
            optimizer.zero_grad()
            model(ids, images, mask, targets)[1].backward()
            optimizer.step()
    for (name, a), b in zip(plain.named_parameters(), prepared.parameters()):
        assert torch.equal(a, b), name
    prepared.eval()  # the fused matrices hold the trained weights: decoding sees them
    assert torch.equal(_greedy(prepared, ids, images, mask), greedy_without_cache(prepared, ids, images, mask, NEW))
    prepared.to(torch.float64).to(torch.float32)  # a recast parts the layers from the fused matrix: fused again
    assert torch.equal(_greedy(prepared, ids, images, mask), greedy_without_cache(prepared, ids, images, mask, NEW))


def test_layers_with_lora_adapters_keep_their_own_path():
    from nanovlm.models.lora import add_lora

    model = _model()
    add_lora(model, 4, 8.0, 0.0, ["lm_q", "lm_down"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the answer
    ids, images, mask = _batch(model)
    ref = greedy_without_cache(model, ids, images, mask, NEW)
    assert torch.equal(_greedy(model, ids, images, mask), ref)
    block = model.decoder.blocks[0]
    assert block.attn.qkv_weight is None and block.mlp.gate_up_weight is not None  # q has an adapter, gate/up not


def test_compiled_batch_one_uses_the_row_loop_and_gives_the_eager_tokens(monkeypatch):
    """Batch 1 under compile computes every linear with `row_matmul` (fp32 and int8 weights)."""
    model = _model()
    _on_int8_grid(model)  # so that the int8 model's reference is the fp32 one
    ids, images, mask = _batch(model)
    ids, images, mask = ids[1:], images[1:], mask[1:]  # one unpadded row
    ref = _greedy(model, ids, images, mask)
    calls = []
    real = quantization.row_matmul
    monkeypatch.setattr(quantization, "row_matmul", lambda *a: calls.append(a[1].dtype) or real(*a))
    model.decoder.prepare_for_inference()
    assert torch.equal(_greedy(model, ids, images, mask, compile=True), ref)
    assert torch.float32 in calls  # traced once per linear of the step
    quant = _model()
    _on_int8_grid(quant)
    quant.quantize("int8")
    calls.clear()
    assert torch.equal(_greedy(quant, ids, images, mask, compile=True), ref)
    assert torch.int8 in calls


def test_a_decoder_changed_after_compiling_gets_a_new_compiled_step(monkeypatch):
    """The compiled step skips Dynamo's module guards; quantizing (or recasting) the decoder
    afterwards must still compile anew, not run the old graph."""
    model = _model()
    _on_int8_grid(model)
    ids, images, mask = (t[1:] for t in _batch(model))
    ref = _greedy(model, ids, images, mask)
    assert torch.equal(_greedy(model, ids, images, mask, compile=True), ref)
    float_step = generation._STEPS[model.decoder][1]
    calls = []
    real = quantization.row_matmul
    monkeypatch.setattr(quantization, "row_matmul", lambda *a: calls.append(a[1].dtype) or real(*a))
    model.quantize("int8")
    assert torch.equal(_greedy(model, ids, images, mask, compile=True), ref)
    assert torch.int8 in calls  # traced again, now with the int8 weights
    int8_step = generation._STEPS[model.decoder][1]
    assert int8_step is not float_step
    _greedy(model, ids, images, mask, compile=True)
    assert generation._STEPS[model.decoder][1] is int8_step  # unchanged decoder: the same step


def test_the_static_cache_gives_each_layer_its_own_buffers():
    """A compiled in-place write into a view of one shared buffer is replayed on the whole buffer
    (every layer would rewrite all layers' caches each token): one allocation per layer."""
    cache = _model().decoder.new_kv_cache(2, 16)
    buffers = cache.k + cache.v
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == len(buffers)
    assert all(b.shape[0] == 2 and b.shape[2] == 16 for b in buffers)


def test_row_matmul_matches_the_linear_kernels():
    """One row: fp32 weights as F.linear (fp32 sums over K = 96: a few ulps of the output's
    scale); int8 within the quantization bound (no bf16 rounding of the row here)."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(96, 40, bias=False)
    x = torch.randn(1, 1, 96)
    ref = x @ linear.weight.T.detach()
    torch.testing.assert_close(quantization.row_matmul(x, linear.weight.detach()), ref)
    q = Int8Linear.from_linear(linear)
    err = (quantization.row_matmul(x, q.weight_int8, q.scales) - ref).abs()
    bound = int8_error_bound(x, q.scales, ref)
    assert (err <= bound).all(), f"max error {err.max():.3g} over max bound {bound.max():.3g}"


def test_a_compile_that_fails_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = _model()
    ids, images, mask = _batch(model)
    ref = _greedy(model, ids, images, mask)
    generation._STEPS.pop(model.decoder, None)
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        assert torch.equal(_greedy(model, ids, images, mask, compile=True), ref)


@pytest.mark.parametrize("rows", [5, quantization.DEQUANTIZE_ROWS + 3], ids=["int8 kernel", "widened to bf16"])
def test_one_int8_linear_is_within_its_quantization_bound(rows):
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40, bias=False)
    x = torch.randn(rows, 96)
    ref = x @ linear.weight.T.detach()
    q = Int8Linear.from_linear(linear)
    bound = int8_error_bound(x, q.scales, ref)
    err = (q(x) - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} over max bound {bound.max():.3g}"
    assert q.weight is linear.weight and q.weight_int8.dtype == torch.int8


def test_int8_model_gives_the_eager_tokens_and_close_logits():
    model = _model()
    _on_int8_grid(model)
    ids, images, mask = _batch(model)
    ref = _greedy(model, ids, images, mask)
    with torch.inference_mode():
        ref_logits = model(ids, images, mask)[0]
    quant = _model()
    _on_int8_grid(quant)
    quant.quantize("int8")
    assert quant.decoder.quantization == "int8"
    head = quant.decoder.head
    assert isinstance(head, Int8Linear) and head.weight is quant.decoder.token_embedding.weight
    with torch.inference_mode():
        logits = quant(ids, images, mask)[0]
    sequential = 4 * quant.cfg.lm_n_blocks + 1  # qkv, out, gate/up, down per block; the head
    tol = sequential * 2 * 2.0**-8 * float(ref_logits.abs().max())
    err = float((logits - ref_logits)[mask.bool()].abs().max())
    assert err <= tol, f"max |logit error| {err:.3g} > {tol:.3g}"
    assert torch.equal(_greedy(quant, ids, images, mask), ref)


def test_quantized_model_saves_its_float_weights(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.quantize("int8")
    assert model.state_dict().keys() == before.keys()
    model.save_pretrained(tmp_path / "m")
    again = VisionLanguageModel.from_pretrained(tmp_path / "m")
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k
    int8 = VisionLanguageModel.from_pretrained(tmp_path / "m", quantize="int8")
    assert int8.decoder.quantization == "int8"


def test_unsupported_int8_warns_and_keeps_the_weights(monkeypatch):
    monkeypatch.setattr("nanovlm.models.language_model.int8_supported",
                        lambda device: "int8 weight-only quantization needs torch's _weight_int8pack_mm on cpu.")
    model = _model()
    with pytest.warns(UserWarning, match="_weight_int8pack_mm"):
        model.quantize("int8")
    assert model.decoder.quantization == "none"


def test_bad_quantize_values_are_one_sentence():
    with pytest.raises(ValueError) as e:
        check_quantize("int4")
    assert str(e.value) == "unknown quantization 'int4'; use one of none, int8."
    with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
        VisionLanguageModel.from_pretrained("does-not-matter", quantize="fp8")
    assert quantization.int8_supported("cpu") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _model().quantize("none")  # fusion only: no warning
    r = subprocess.run([sys.executable, "-m", "nanovlm", "generate", "--lm", "packaged:smollm2-135m",
                        "--prompt", "hi", "--quantize", "int4"], capture_output=True, text=True, timeout=240)
    assert (r.returncode, r.stderr) == (1, "nanovlm: error: unknown quantization 'int4'; use one of none, int8.\n")
