"""Per-head decomposition (SPEC 2.1) and TextSpan (SPEC 2.2) against the reference semantics."""
import numpy as np
import pytest
import torch

import fastinterp
from fastinterp.images import demo_images
from fastinterp.reference.textspan import decompose_reference, textspan_head_reference, textspan_reference
from fastinterp.textspan import (builtin_text_bank, head_contributions, load_contributions, textspan)


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 64, 64, generator=g)


def test_terms_sum_to_normalised_embedding(tiny_clip, pixels):
    model = tiny_clip[0]
    c = head_contributions(model, pixels, batch_size=2, progress=False)
    info = fastinterp.vit_info(model)
    assert c.heads.shape == (5, info.layers, info.heads, info.output_dim)
    assert c.mlps.shape == (5, info.layers + 1, info.output_dim)
    with torch.no_grad():
        emb = model.encode_image(pixels, normalize=True)
    total = c.mlps.sum(1) + c.heads.sum((1, 2)) + c.other
    assert torch.allclose(total, emb, atol=1e-5)
    assert torch.allclose(c.embedding, emb, atol=1e-5)
    assert c.other.abs().max() == 0  # all layers stored


def test_layer_subset_keeps_the_rest(tiny_clip, pixels):
    model = tiny_clip[0]
    full = head_contributions(model, pixels, progress=False)
    part = head_contributions(model, pixels, layers=[-2, -1], progress=False)
    assert part.layers == [2, 3]
    assert torch.allclose(part.heads, full.heads[:, 2:], atol=1e-6)
    assert torch.allclose(part.other, full.heads[:, :2].sum((1, 2)), atol=1e-5)
    assert torch.allclose(part.total(), full.embedding, atol=1e-5)


def test_matches_reference_per_token_decomposition(tiny_clip, pixels):
    model = tiny_clip[0]
    c = head_contributions(model, pixels[:2], progress=False)
    attn, mlps, emb = decompose_reference(model, pixels[:2])
    assert attn.shape[:3] == (2, 4, 65)  # (B, L, source tokens)
    assert torch.allclose(attn.sum(2), c.heads, atol=1e-6)
    assert torch.allclose(mlps, c.mlps, atol=1e-6)
    assert torch.allclose(attn.sum((1, 2, 3)) + mlps.sum(1), emb, atol=1e-5)


def test_resumable_batches(tiny_clip, pixels, tmp_path):
    model = tiny_clip[0]
    first = head_contributions(model, pixels, batch_size=2, output=tmp_path, progress=False)
    files = sorted(tmp_path.glob("batch_*.pt"))
    assert len(files) == 3
    # mark a finished batch (rewritten with its checksum): if it is reused, the sentinel survives
    from fastinterp.io import load_checked, save_checked

    data = load_checked(files[1])
    data["heads"] = data["heads"] + 1000.0
    save_checked(data, files[1])
    files[2].write_bytes(b"corrupt")  # reported by name and recomputed
    with pytest.warns(UserWarning, match=r"batch_000002\.pt.*recomputing"):
        again = head_contributions(model, pixels, batch_size=2, output=tmp_path, progress=False)
    assert torch.allclose(again.heads[2:4], first.heads[2:4] + 1000.0)
    assert torch.allclose(again.heads[4:], first.heads[4:], atol=1e-6)
    loaded = load_contributions(tmp_path)
    assert torch.equal(loaded.heads, again.heads)
    with pytest.raises(ValueError, match="another run"):
        head_contributions(model, pixels, layers=[0], batch_size=2, output=tmp_path, progress=False)
    torch.manual_seed(123)  # same name, other random weights: never reuse the stored batches
    other = fastinterp.load_clip(fastinterp.TINY_MODEL)[0]
    with pytest.raises(ValueError, match="another run"):
        head_contributions(other, pixels, batch_size=2, output=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another run"):
        head_contributions(model, pixels[:4], batch_size=2, output=tmp_path, progress=False)


def test_pil_input_and_loader(tiny_clip):
    model, preprocess, _ = tiny_clip
    images = list(demo_images().values())[:3]
    a = head_contributions(model, images, preprocess=preprocess, batch_size=2, progress=False)
    pix = torch.stack([preprocess(im) for im in images])
    b = head_contributions(model, [(pix[:2], 0), (pix[2:], 1)], progress=False)
    assert torch.allclose(a.heads, b.heads, atol=1e-6)


def test_mean_ablation(tiny_clip, pixels):
    model = tiny_clip[0]
    c = head_contributions(model, pixels, progress=False)
    ab = c.mean_ablate([(3, 1), (-1, 2)])
    expected = c.embedding.clone()
    for layer, head in ((3, 1), (3, 2)):
        h = c.heads[:, layer, head]
        expected += h.mean(0) - h
    assert torch.allclose(ab, expected, atol=1e-6)
    # a mean-ablated head contributes the same to every image
    diff = ab - c.embedding + c.heads[:, 3, 1] + c.heads[:, 3, 2]
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-5)
    assert torch.allclose(c.mean_ablate([(3, 1)], normalize=True).norm(dim=-1), torch.ones(5))
    with pytest.raises(IndexError, match="head 7"):
        c.mean_ablate([(3, 7)])
    with pytest.raises(IndexError, match="layer 9"):
        c.mean_ablate([(9, 0)])


def test_bad_inputs(tiny_clip):
    model = tiny_clip[0]
    with pytest.raises(ValueError, match="empty"):
        head_contributions(model, [], progress=False)
    with pytest.raises(ValueError, match="empty tensor"):
        head_contributions(model, torch.zeros(0, 3, 64, 64), progress=False)
    with pytest.raises(IndexError, match="out of range"):
        head_contributions(model, torch.zeros(1, 3, 64, 64), layers=[4], progress=False)
    with pytest.raises(ValueError, match="preprocess"):
        head_contributions(model, ["a.jpg"], progress=False)


def _random_problem(seed, K=240, L=2, H=3, d=32, M=150):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((L, H, d, d)) * np.geomspace(1, 0.05, d)[:, None]
    C = np.einsum("klhe,lhed->klhd", rng.standard_normal((K, L, H, d)), mix) + rng.standard_normal((L, H, d))
    T = rng.standard_normal((M, d))
    return C, T / np.linalg.norm(T, axis=1, keepdims=True)


@pytest.mark.parametrize("seed,rank", [(0, 8), (1, 20), (2, 32), (3, 80)])
def test_textspan_matches_reference_loop(seed, rank):
    C, T = _random_problem(seed)
    ref_idx, ref_rec = textspan_reference(C, T, n_texts=5, rank=rank)
    res = textspan(torch.from_numpy(C), torch.from_numpy(T), n_texts=5, rank=rank, return_details=True)
    assert res.indices.shape == (2, 3, 5)
    np.testing.assert_array_equal(res.indices.numpy(), ref_idx)
    np.testing.assert_allclose(res.reconstruction.numpy(), ref_rec, atol=1e-10)
    # the reported spreads are the reference's std of the projection at each step
    picks, _ = textspan_head_reference(C[:, 1, 2], T, 2, rank)
    proj = (C[:, 1, 2] - C[:, 1, 2].mean(0)) @ (T[picks[0]] @ np.linalg.svd(C[:, 1, 2], full_matrices=False)[2][:rank].T
                                                  @ np.linalg.svd(C[:, 1, 2], full_matrices=False)[2][:rank])
    assert res.stds[1, 2, 0].item() == pytest.approx(proj.std(ddof=1), rel=1e-9)
    # fp32 input (fp32 Gram) picks the same texts on this data
    idx32 = textspan(torch.from_numpy(C).float(), torch.from_numpy(T).float(), n_texts=5, rank=rank)
    np.testing.assert_array_equal(idx32.numpy(), ref_idx)


def test_textspan_head_chunks_and_single_head():
    C, T = _random_problem(5, L=3, H=4)
    full = textspan(torch.from_numpy(C), torch.from_numpy(T), 4, 16)
    chunked = textspan(torch.from_numpy(C), torch.from_numpy(T), 4, 16, head_chunk=5)
    assert torch.equal(full, chunked)
    single = textspan(torch.from_numpy(C[:, 2, 1]), torch.from_numpy(T), 4, 16)
    assert torch.equal(single, full[2, 1])
    # picks are distinct (a picked text is deflated to zero)
    assert all(len(set(row.tolist())) == 4 for row in full.reshape(-1, 4))


def test_textspan_duplicate_texts_pick_the_first():
    C, T = _random_problem(9, L=1, H=2)
    ref_idx, _ = textspan_reference(C, T, n_texts=5, rank=16)
    first = int(ref_idx[0, 0, 0])
    T2 = np.concatenate([T[: first + 1], T[first:first + 1], T[first + 1:]])  # duplicate of the first pick
    ref2, _ = textspan_reference(C, T2, n_texts=5, rank=16)
    ours = textspan(torch.from_numpy(C), torch.from_numpy(T2), n_texts=5, rank=16).numpy()
    np.testing.assert_array_equal(ours, ref2)
    assert ours[0, 0, 0] == first and first + 1 not in ours[0, 0].tolist()  # the copy is deflated away


def test_textspan_rank_exceeds_images():
    C, T = _random_problem(6, K=12, d=32)  # rank 80 > 12 images: subspace = row space of C
    ref_idx, _ = textspan_reference(C, T, n_texts=5, rank=80)
    np.testing.assert_array_equal(textspan(torch.from_numpy(C), torch.from_numpy(T), 5, 80).numpy(), ref_idx)


def test_textspan_reconstruction_at_full_rank_is_exact():
    C, T = _random_problem(7, K=50, d=6, M=40)
    res = textspan(torch.from_numpy(C), torch.from_numpy(T), n_texts=6, rank=6, return_details=True)
    np.testing.assert_allclose(res.reconstruction.numpy(), C, atol=1e-9)


def test_textspan_bad_inputs():
    C, T = _random_problem(8)
    Ct, Tt = torch.from_numpy(C), torch.from_numpy(T)
    with pytest.raises(ValueError, match="dim"):
        textspan(Ct, Tt[:, :10])
    with pytest.raises(ValueError, match="n_texts"):
        textspan(Ct, Tt, n_texts=9, rank=8)
    with pytest.raises(ValueError, match="at least 2 images"):
        textspan(Ct[:1], Tt)
    with pytest.raises(ValueError, match=r"images - 1 = 4"):  # 5 images: 4 directions of spread
        textspan(Ct[:5], Tt, n_texts=5)
    assert textspan(Ct[:5], Tt, n_texts=4).shape == (2, 3, 4)
    bad = Ct.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        textspan(bad, Tt)
    with pytest.raises(ValueError, match="all zeros"):
        textspan(Ct, torch.cat([Tt, torch.zeros(1, Tt.shape[1], dtype=Tt.dtype)]))


def test_builtin_text_bank():
    bank = builtin_text_bank()
    assert 300 <= len(bank) == len(set(bank))
    assert all(t.strip() == t and t for t in bank)
