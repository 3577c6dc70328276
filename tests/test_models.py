import pytest
import torch
from decode_reference import greedy_without_cache

from nanovlm import VLMConfig, VisionLanguageModel
from nanovlm.config import IGNORE_INDEX
from nanovlm.generation import filter_logits
from nanovlm.models.language_model import LanguageModel, positions_from_segments
from nanovlm.models.modality_projector import ModalityProjector
from nanovlm.models.vision_transformer import ViT


@pytest.fixture(scope="module")
def cfg():
    return VLMConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return VisionLanguageModel(cfg, load_backbone=False).eval()


def prompt(model, n_text=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = model.cfg.mp_image_token_length
    ids = torch.randint(10, 1000, (1, n_text + k + 2), generator=g)
    ids[0, 1:1 + k] = model.image_token_id
    return ids, torch.rand(1, 3, model.cfg.vit_img_size, model.cfg.vit_img_size, generator=g)


def test_shapes(cfg):
    x = torch.rand(2, 3, 32, 32)
    assert ViT(cfg)(x).shape == (2, 16, 32)
    assert ViT(cfg.replace(vit_cls_flag=True))(x).shape == (2, 32)
    assert ModalityProjector(cfg)(torch.rand(2, 16, 32)).shape == (2, cfg.mp_image_token_length, cfg.lm_hidden_dim)
    lm = LanguageModel(cfg.replace(lm_use_tokens=True))
    logits, _ = lm(torch.randint(0, 100, (2, 5)))
    assert logits.shape == (2, 5, cfg.lm_vocab_size)


def test_pixel_shuffle_groups_2x2_neighbourhoods(cfg):
    mp = ModalityProjector(cfg)
    grid = torch.arange(16.0).view(1, 16, 1)  # 4x4 patches, one channel = its index
    out = mp.pixel_shuffle(grid)
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]


def test_vit_rejects_wrong_image_size(cfg):
    with pytest.raises(ValueError, match=r"ViT expects images of 32x32 pixels, got \(64, 64\)"):
        ViT(cfg)(torch.rand(1, 3, 64, 64))


def test_image_token_count_mismatch_is_clear(model):
    ids, img = prompt(model)
    with pytest.raises(ValueError, match=r"the prompts hold 4 image tokens but 2 image\(s\) x 4 tokens = 8"):
        model(ids, torch.cat([img, img]))
    with pytest.raises(ValueError, match=r"hold 4 image tokens but 0 image\(s\)"):
        model(ids, None)


def test_images_as_list_per_sample_equals_tensor(model):
    ids, img = prompt(model)
    a, _ = model(ids, img)
    b, _ = model(ids, [img])
    c, _ = model(ids, [img[0]])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_forward_returns_one_contract_and_the_loss_only_on_supervised_positions(model):
    """(logits (B, T, vocab), loss) with and without targets; return_logits=False: no logits."""
    ids, img = prompt(model)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, -3:] = ids[0, -3:]
    logits, loss = model(ids, img, targets=targets)
    full, none = model(ids, img)
    assert none is None and logits.shape == full.shape == (1, ids.shape[1], model.cfg.lm_vocab_size)
    torch.testing.assert_close(logits, full)
    ref = torch.nn.functional.cross_entropy(full[0, -3:], ids[0, -3:])
    torch.testing.assert_close(loss, ref)
    no_logits, summed = model(ids, img, targets=targets, loss_reduction="sum", return_logits=False)
    assert no_logits is None
    torch.testing.assert_close(summed, ref * 3)


def test_a_fresh_model_builds_its_tokenizer_on_first_use(cfg):
    """As the original nanoVLM's model carries one: from cfg.lm_tokenizer, once; an attached one wins."""
    fresh = VisionLanguageModel(cfg, load_backbone=False)
    tok = fresh.tokenizer
    assert tok is fresh.tokenizer and tok.image_token_id == fresh.image_token_id
    fresh.tokenizer = "attached"
    assert fresh.tokenizer == "attached"
    offline = VisionLanguageModel(cfg.replace(lm_tokenizer="someone/no-such-tokenizer"), load_backbone=False)
    with pytest.raises((ValueError, OSError), match="someone/no-such-tokenizer"):
        offline.tokenizer


def test_greedy_same_with_and_without_kv_cache(model):
    ids, img = prompt(model)
    a = model.generate(ids, img, max_new_tokens=16, greedy=True, eos_token_id=-1)
    assert a.shape == (1, 16)
    assert torch.equal(a, greedy_without_cache(model, ids, img, max_new_tokens=16))


def test_the_language_model_goes_on_from_its_cache_and_refuses_a_mask_with_it(cfg):
    lm = LanguageModel(cfg.replace(lm_use_tokens=True)).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        full, none = lm(ids)
        cache = lm.new_kv_cache(2, 16)
        first, same = lm(ids[:, :4], kv_cache=cache)
        rest, _ = lm(ids[:, 4:], kv_cache=cache)
    assert none is None and same is cache and cache.length == 7
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    with pytest.raises(ValueError, match="a call with a kv_cache takes unpadded rows: pass no attention_mask or "
                                         r"position_ids \(nanovlm.generation decodes padded batches\)."):
        lm(ids, torch.ones_like(ids), kv_cache=lm.new_kv_cache(2, 16))


def test_left_padded_rows_equal_rows_alone(model):
    (ids0, img0), (ids1, img1) = prompt(model, 9, seed=1), prompt(model, 4, seed=2)
    T = ids0.shape[1]
    batch = torch.full((2, T), 7)
    mask = torch.zeros(2, T, dtype=torch.long)
    batch[0], mask[0] = ids0[0], 1
    batch[1, T - ids1.shape[1]:], mask[1, T - ids1.shape[1]:] = ids1[0], 1
    images = torch.cat([img0, img1])
    together = model.generate(batch, images, mask, max_new_tokens=12, greedy=True, eos_token_id=-1)
    alone0 = model.generate(ids0, img0, max_new_tokens=12, greedy=True, eos_token_id=-1)
    alone1 = model.generate(ids1, img1, max_new_tokens=12, greedy=True, eos_token_id=-1)
    assert torch.equal(together[0], alone0[0]) and torch.equal(together[1], alone1[0])  # a batch = its rows alone
    assert torch.equal(together, greedy_without_cache(model, batch, images, mask, max_new_tokens=12))
    logits, _ = model(batch, images, mask)
    torch.testing.assert_close(logits[1, T - ids1.shape[1]:], model(ids1, img1)[0][0])


def test_rows_stop_at_eos_and_pad_with_eos(model):
    ids, img = prompt(model)
    free = model.generate(ids, img, max_new_tokens=8, greedy=True, eos_token_id=-1)
    eos = int(free[0, 2])  # pretend the third greedy token is EOS
    out = model.generate(ids, img, max_new_tokens=8, greedy=True, eos_token_id=eos)
    first = (free[0] == eos).nonzero()[0].item()
    assert out.shape[1] == first + 1  # the loop ended early: every row was done
    two = model.generate(torch.cat([ids, ids]), torch.cat([img, img]), max_new_tokens=8, greedy=True, eos_token_id=eos)
    assert (two[:, first:] == eos).all()


def test_packed_documents_do_not_see_each_other(model):
    (a, ia), (b, ib) = prompt(model, 5, seed=3), prompt(model, 7, seed=4)
    packed = torch.cat([a, b], dim=1)
    segments = torch.cat([torch.full_like(a, 1), torch.full_like(b, 2)], dim=1)
    logits, _ = model(packed, torch.cat([ia, ib]), segments)
    torch.testing.assert_close(logits[0, :a.shape[1]], model(a, ia)[0][0])
    torch.testing.assert_close(logits[0, a.shape[1]:], model(b, ib)[0][0])


def test_branches_see_their_shared_prefix_and_not_each_other(model):
    (prefix, image), (other, other_image) = prompt(model, 3, seed=5), prompt(model, 4, seed=6)
    g = torch.Generator().manual_seed(7)
    c1, c2 = torch.randint(10, 1000, (1, 4), generator=g), torch.randint(10, 1000, (1, 6), generator=g)
    P = prefix.shape[1]
    # one row: [other document][prefix, branch 1, branch 2][padding]
    row = torch.cat([other, prefix, c1, c2, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * other.shape[1] + [2] * (P + 4 + 6) + [0, 0]])
    positions = torch.cat([torch.arange(other.shape[1]), torch.arange(P + 4), torch.arange(P, P + 6),
                           torch.zeros(2, dtype=torch.long)])[None]
    images = torch.cat([other_image, image])
    logits, _ = model(row, images, segments, position_ids=positions)
    at = other.shape[1]
    torch.testing.assert_close(logits[0, :at], model(other, other_image)[0][0])
    alone1, alone2 = model(torch.cat([prefix, c1], 1), image)[0][0], model(torch.cat([prefix, c2], 1), image)[0][0]
    torch.testing.assert_close(logits[0, at:at + P + 4], alone1)
    torch.testing.assert_close(logits[0, at + P + 4:at + P + 10], alone2[P:])
    # without the positions the second branch reads the first one: a different answer
    plain, _ = model(row, images, segments)
    assert not torch.allclose(plain[0, at + P + 4:at + P + 10], alone2[P:], atol=1e-3)
    # explicit positions that only increase are the plain mask
    torch.testing.assert_close(model(row, images, segments, position_ids=positions_from_segments(segments))[0], plain)


def test_positions_restart_per_segment_and_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]])
    assert positions_from_segments(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 0, 1, 0]]


def test_sampling_options(model):
    ids, img = prompt(model)
    torch.manual_seed(0)
    a = model.generate(ids, img, max_new_tokens=6, temperature=1.0, top_k=5, top_p=0.9, eos_token_id=-1)
    torch.manual_seed(0)
    b = model.generate(ids, img, max_new_tokens=6, temperature=1.0, top_k=5, top_p=0.9, eos_token_id=-1)
    assert torch.equal(a, b)  # a seed repeats, with the global generator or a given one
    g = [torch.Generator().manual_seed(5) for _ in range(2)]
    c, d = (model.generate(ids, img, max_new_tokens=6, temperature=1.0, eos_token_id=-1, generator=x) for x in g)
    assert torch.equal(c, d)

    # top_k=1, or a top_p so small that only the most likely token reaches it, leaves one token:
    # sampling must then give the greedy tokens in every row. Were the option ignored, a row's
    # first token would be the greedy one with probability p_max (the random model's distribution
    # is nearly flat; asserted < 0.01), so 8 rows pass by chance with probability < 0.01**8.
    rows = 8
    with torch.no_grad():
        p_max = float(model(ids, img)[0][0, -1].softmax(-1).max())
    assert p_max < 0.01
    ids_n, img_n = ids.repeat(rows, 1), img.repeat(rows, 1, 1, 1)
    batch = dict(max_new_tokens=4, eos_token_id=-1)
    greedy = model.generate(ids_n, img_n, greedy=True, **batch)
    assert torch.equal(greedy, greedy[:1].expand(rows, -1))
    torch.manual_seed(1)
    assert torch.equal(model.generate(ids_n, img_n, temperature=1.0, top_k=1, top_p=1.0, **batch), greedy)
    torch.manual_seed(2)
    assert torch.equal(model.generate(ids_n, img_n, temperature=1.0, top_k=0, top_p=1e-6, **batch), greedy)

    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        model.generate(ids, img, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        model.generate(ids, img, temperature=-1)


_P = (0.4, 0.3, 0.2, 0.1)


@pytest.mark.parametrize("top_k, top_p, temperature, expected", [
    (0, 1.0, 1.0, [0.4, 0.3, 0.2, 0.1]),  # nothing filtered
    (3, 1.0, 1.0, [4 / 9, 3 / 9, 2 / 9, 0]),  # the 3 largest, renormalised
    (0, 0.6, 1.0, [4 / 7, 3 / 7, 0, 0]),  # 0.4 < 0.6 <= 0.4 + 0.3: the smallest set reaching top_p
    (0, 0.85, 1.0, [4 / 9, 3 / 9, 2 / 9, 0]),  # 0.7 < 0.85 <= 0.9
    (0, 0.95, 1.0, [0.4, 0.3, 0.2, 0.1]),  # 0.9 < 0.95: all four needed
    (3, 0.6, 1.0, [4 / 7, 3 / 7, 0, 0]),  # both: the stricter wins
    (0, 1.0, 2.0, [q ** 0.5 / sum(r ** 0.5 for r in _P) for q in _P]),  # temperature 2: p^(1/2), renormalised
])
def test_sampling_draws_from_the_filtered_distribution(top_k, top_p, temperature, expected):
    """20,000 draws from a hand-built distribution (probabilities 0.4, 0.3, 0.2, 0.1): tokens that
    top-k / top-p remove never appear, and each kept token's frequency is within 0.02 of its
    renormalised probability. Hoeffding: P(|freq - p| >= 0.02) <= 2 exp(-2 * 20000 * 0.02**2)
    = 2.3e-7 per token, so with any seed this passes with probability > 1 - 1e-5 (seeded: fixed)."""
    from nanovlm.generation import sample_next

    n = 20_000
    logits = torch.log(torch.tensor(_P)).expand(n, 4)
    g = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, False, temperature, top_k, top_p, generator=g)
    freq = torch.bincount(tokens, minlength=4).double() / n
    for token, (f, p) in enumerate(zip(freq.tolist(), expected)):
        if p == 0:
            assert f == 0, f"token {token} should have been filtered out, drawn {f:.4f} of the time"
        else:
            assert abs(f - p) < 0.02, f"token {token}: drawn {f:.4f} of the time, expected {p:.4f}"


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p=0.7: 0.5 alone is below, 0.5+0.3 reaches it -> the two most likely stay
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_save_load_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    ids, img = prompt(model)
    assert torch.equal(model(ids, img)[0], loaded(ids, img)[0])
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert loaded.tokenizer.image_token_id == model.image_token_id


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        VisionLanguageModel.from_pretrained(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file; --model / from_pretrained expects a checkpoint directory"):
        VisionLanguageModel.from_pretrained(tmp_path / "f.txt")
    with pytest.raises(FileNotFoundError, match="^someone/not-here is not a local directory, and HF_HUB_OFFLINE=1 "
                                                "forbids downloading it from the hub; "):
        VisionLanguageModel.from_pretrained("someone/not-here")


def test_checkpoint_with_wrong_tensors_is_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file

    from nanovlm.weights.common import WeightLoadError

    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(path)
    state.pop("MP.proj.weight")
    state["decoder.norm.weight"] = torch.ones(3)
    state["extra.weight"] = torch.ones(1)
    save_file(state, path)
    with pytest.raises(WeightLoadError) as err:
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    msg = str(err.value)
    assert "missing tensors: MP.proj.weight" in msg
    assert "unexpected tensors: extra.weight" in msg
    assert "decoder.norm.weight: file has (3,), model needs (64,)" in msg


def test_pixel_normalisation_feeds_the_vit_centred_pixels(cfg):
    torch.manual_seed(0)
    plain = VisionLanguageModel(cfg, load_backbone=False).eval()
    centred = VisionLanguageModel(cfg.replace(vit_pixel_mean=0.5, vit_pixel_std=0.5), load_backbone=False).eval()
    centred.load_state_dict(plain.state_dict())
    ids, img = prompt(plain)
    torch.testing.assert_close(centred(ids, img)[0], plain(ids, img * 2 - 1)[0])


def test_lm_init_std_scales_the_block_projections_only():
    """The same draws in the same order whatever lm_init_std: block projections scale with it,
    the embedding (and so the tied head) and the norms do not."""
    base = VLMConfig.from_preset("tiny")
    models = {}
    for std in (0.02, 0.08):
        torch.manual_seed(0)
        models[std] = LanguageModel(base.replace(lm_init_std=std))
    small, large = (dict(models[s].named_parameters()) for s in (0.02, 0.08))
    scaled = [n for n in small if n.startswith("blocks.") and n.endswith("proj.weight")]
    assert len(scaled) == 7 * base.lm_n_blocks
    for name in small:
        if name in scaled:
            torch.testing.assert_close(large[name], small[name] * 4)
            assert abs(float(large[name].std()) - 0.08) < 0.01
        else:
            torch.testing.assert_close(large[name], small[name])
