import pytest
import torch

import fastinterp
from fastinterp.models import check_layers, vision_transformer, weights_hash


def test_tiny_vit_info(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    info = fastinterp.vit_info(model)
    assert (info.layers, info.heads, info.width, info.head_dim, info.output_dim) == (4, 4, 64, 16, 32)
    assert info.patch_grid == (8, 8) and info.image_size == (64, 64) and info.num_patches == 64
    img = torch.rand(2, 3, 64, 64)
    assert model.encode_image(img).shape == (2, 32)
    assert model.encode_text(tokenizer(["a", "b"])).shape == (2, 32)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean: .*ViT-B-16"):
        fastinterp.load_clip("ViT-B-61")


def test_non_vit_tower_is_refused():
    model, _, _ = fastinterp.load_clip("RN50")
    with pytest.raises(TypeError, match="needs a ViT image tower.*ModifiedResNet"):
        fastinterp.vit_info(model)
    with pytest.raises(TypeError):
        vision_transformer(model)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastinterp.load_clip(fastinterp.TINY_MODEL, checkpoint=tmp_path / "nope.pt")


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not load checkpoint"):
        fastinterp.load_clip(fastinterp.TINY_MODEL, checkpoint=bad)


def test_checkpoint_roundtrip(tmp_path, tiny_clip):
    model = tiny_clip[0]
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded, _, _ = fastinterp.load_clip(fastinterp.TINY_MODEL, checkpoint=path)
    assert weights_hash(loaded) == weights_hash(model)
    assert loaded.fastinterp_weights == str(path)


def test_pretrained_and_checkpoint_are_exclusive(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not both"):
        fastinterp.load_clip(fastinterp.TINY_MODEL, pretrained="openai", checkpoint=path)


@pytest.mark.parametrize("device", ["gpu", "cuda:notanumber", 7])
def test_bad_device_string(device):
    with pytest.raises(ValueError, match="device="):
        fastinterp.load_clip(fastinterp.TINY_MODEL, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_says_so():
    with pytest.raises(ValueError, match="no GPU"):
        fastinterp.load_clip(fastinterp.TINY_MODEL, device="cuda")


def test_check_layers(tiny_clip):
    model = tiny_clip[0]
    assert check_layers(model, [0, -1, 2]) == [0, 3, 2]
    with pytest.raises(IndexError, match="out of range.*4 layers"):
        check_layers(model, [4])
    with pytest.raises(TypeError):
        check_layers(model, [1.0])


def test_weights_hash_sees_edits_and_can_skip_visual(tiny_clip):
    model = tiny_clip[0]
    full, text_only = weights_hash(model), weights_hash(model, exclude_prefix="visual.")
    w = model.visual.transformer.resblocks[0].attn.out_proj.weight
    with torch.no_grad():
        w[0, 0] += 1.0
        try:
            assert weights_hash(model) != full
            assert weights_hash(model, exclude_prefix="visual.") == text_only
        finally:
            w[0, 0] -= 1.0
