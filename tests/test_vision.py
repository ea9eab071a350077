"""Vision side of the mutual-knowledge method (fastinterp.vision, SPEC.md 3.1)."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastinterp import vision as V


# ---------------------------------------------------------------- connected components

def test_largest_component_uses_8_connectivity():
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True          # diagonal chain: one 8-connected component of 3
    m[4, 4] = m[4, 5] = True                    # 2 pixels
    out = V.largest_components(m)
    assert out.sum() == 3 and out[0, 0] and out[2, 2] and not out[4, 4]


def test_second_component_added_only_with_at_least_5_pixels():
    m = np.zeros((8, 8), bool)
    m[0, :7] = True                              # 7 pixels
    m[5, 0:5] = True                             # 5 pixels -> included
    out = V.largest_components(m)
    assert out.sum() == 12
    m[5, 4] = False                              # now 4 pixels -> excluded
    out = V.largest_components(m)
    assert out.sum() == 7 and not out[5].any()
    # a third component never enters, even if >= 5
    m = np.zeros((9, 9), bool)
    m[0, :8] = True
    m[3, :6] = True
    m[6, :5] = True
    out = V.largest_components(m)
    assert out.sum() == 14 and not out[6].any()


def test_component_ties_go_to_first_in_raster_order_and_empty_is_empty():
    m = np.zeros((5, 5), bool)
    m[0, 3:5] = True
    m[4, 0:2] = True
    out = V.largest_components(m, second_min=5)
    assert out[0, 3] and out[0, 4] and not out[4].any()
    assert not V.largest_components(np.zeros((4, 4), bool)).any()
    with pytest.raises(ValueError, match="2-D"):
        V.largest_components(np.zeros(4, bool))


# ---------------------------------------------------------------- foreground

def test_sign_rule():
    u = np.array([1.0, 2.0, 3.0, -1.0])          # 75 % positive -> flipped
    np.testing.assert_array_equal(V.orient_minority_positive(u), -u)
    u = np.array([1.0, -2.0, -3.0, -1.0])        # 25 % positive -> kept
    np.testing.assert_array_equal(V.orient_minority_positive(u), u)
    u = np.array([1.0, 2.0, 3.0])                # all positive (mean 1) -> kept, as the reference
    np.testing.assert_array_equal(V.orient_minority_positive(u), u)
    u = np.array([1.0, -5.0, 2.0, -1.0])         # tie: the largest |u| becomes positive
    np.testing.assert_array_equal(V.orient_minority_positive(u), -u)


@pytest.mark.parametrize("n,d", [(6, 10), (40, 5)])
def test_second_singular_vector_matches_svd(n, d):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = V.second_singular_vector(X)
    U, S, _ = np.linalg.svd(F.normalize(X, dim=-1).numpy(), full_matrices=False)
    ref = U[:, 1]
    assert abs(abs(float(u @ ref)) - 1.0) < 1e-9


def test_foreground_on_constructed_features_picks_the_minority_block():
    rng = np.random.default_rng(0)
    B, h, w, D = 2, 5, 5, 8
    a, b = np.eye(D)[0], np.eye(D)[1]
    fg_true = np.zeros((B, h, w), bool)
    fg_true[0, 1:3, 1:4] = True                  # 6 patches
    fg_true[1, 2:5, 0:2] = True                  # 6 patches: 12 of 50 are foreground (minority)
    feats = np.where(fg_true[..., None], a + 0.3 * b, b + 0.3 * a) + 0.01 * rng.standard_normal((B, h, w, D))
    masks, u = V.foreground_masks(torch.tensor(feats.reshape(B, h * w, D), dtype=torch.float32), (h, w))
    np.testing.assert_array_equal(masks, fg_true)
    assert (u[fg_true] > 0).all() and (u[~fg_true] < 0).all()
    with pytest.raises(ValueError, match="grid"):
        V.foreground_masks(torch.zeros(1, 7, 3), (2, 3))


# ---------------------------------------------------------------- parts

def _pca_parts_plain(X, k):
    """PCA (covariance eigenvectors; sklearn's sign rule: the largest-|.| entry of each component
    positive), MinMax scaling per component, argmax."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(0)
    w, V_ = np.linalg.eigh(Xc.T @ Xc)
    comps = V_[:, ::-1][:, :k].T
    for c in comps:
        if c[np.argmax(np.abs(c))] < 0:
            c *= -1
    Z = Xc @ comps.T
    Z = (Z - Z.min(0)) / (Z.max(0) - Z.min(0))
    return Z.argmax(1)


def test_pca_parts_match_a_plain_implementation():
    rng = np.random.default_rng(1)
    scales = np.array([9.0, 6.0, 4.0, 2.5, 1.5, 0.5, 0.3, 0.1])
    X = rng.standard_normal((120, 8)) * scales
    np.testing.assert_array_equal(V.pca_parts(X.astype(np.float32), 5), _pca_parts_plain(X, 5))
    assert V.pca_parts(X[:1], 5).tolist() == [0]
    assert set(V.pca_parts(X[:3], 5).tolist()) <= {0, 1, 2}     # fewer rows than parts


def _clustered(seed=0, n_per=30, D=6, k=3):
    rng = np.random.default_rng(seed)
    dirs = np.eye(D)[:k]
    X = np.concatenate([dirs[i] * rng.uniform(1, 5, (n_per, 1)) + 0.05 * rng.standard_normal((n_per, D))
                        for i in range(k)])
    truth = np.repeat(np.arange(k), n_per)
    return X, truth


def test_kmeans_parts_recover_direction_clusters_and_are_deterministic():
    X, truth = _clustered()
    labels = V.kmeans_parts(X, 3, seed=0)
    # a perfect partition up to relabelling
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3
    np.testing.assert_array_equal(labels, V.kmeans_parts(X, 3, seed=0))
    np.testing.assert_array_equal(labels, V.kmeans_parts(torch.tensor(X), 3, seed=0))
    assert V.kmeans_parts(X[:2], 5, seed=0).tolist() in ([0, 1], [1, 0])
    assert V.kmeans_parts(np.zeros((0, 4)), 5).shape == (0,)


def test_kmeans_matches_a_plain_lloyd_loop():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 4))
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    g = np.random.default_rng(7)
    centres = Xn[g.choice(50, size=4, replace=False)].copy()
    for _ in range(500):
        d = ((Xn[:, None, :] - centres[None]) ** 2).sum(-1)
        lab = d.argmin(1)
        prev = centres.copy()
        for c in range(4):
            centres[c] = Xn[lab == c].mean(0) if (lab == c).any() else Xn[int(g.integers(50))]
        if np.sqrt(((centres - prev) ** 2).sum(1)).sum() ** 2 < 1e-4:
            break
    np.testing.assert_array_equal(V.kmeans_parts(X, 4, seed=7), lab)


def test_assign_parts_labels_only_foreground():
    X, _ = _clustered(n_per=4, D=6, k=2)               # 8 foreground tokens
    feats = torch.zeros(2, 9, 6)
    fg = np.zeros((2, 3, 3), bool)
    fg[0, 0, :] = fg[1, 2, :] = True
    fg[0, 1, 0] = fg[1, 1, 2] = True
    feats.reshape(18, 6)[torch.from_numpy(fg.reshape(-1))] = torch.tensor(X, dtype=torch.float32)
    for method in ("pca", "kmeans"):
        parts = V.assign_parts(feats, fg, method=method, n_parts=2)
        assert (parts[~fg] == -1).all() and (parts[fg] >= 0).all()
    assert (V.assign_parts(feats, np.zeros_like(fg), method="pca") == -1).all()
    with pytest.raises(ValueError, match="parts="):
        V.assign_parts(feats, fg, method="spectral")


# ---------------------------------------------------------------- ellipses and prompts

def test_fit_part_ellipse():
    assert V.fit_part_ellipse(np.zeros((10, 10), bool)) is None
    disk = np.zeros((64, 64), np.uint8)
    cv2.circle(disk, (30, 20), 10, 1, -1)
    (cx, cy), (ew, eh), _ = V.fit_part_ellipse(disk.astype(bool))
    assert abs(cx - 30) < 1 and abs(cy - 20) < 1 and 18 < ew < 23 and 18 < eh < 23
    for m in (np.zeros((16, 16), bool), np.zeros((16, 16), bool)):
        pass
    dot = np.zeros((16, 16), bool)
    dot[5, 7] = True                               # one pixel: contour of 1 point
    line = np.zeros((16, 16), bool)
    line[3, 2:12] = True                           # collinear contour
    for m in (dot, line):
        (cx, cy), (ew, eh), ang = V.fit_part_ellipse(m)
        assert np.isfinite([cx, cy, ew, eh, ang]).all() and ew > 0 and eh > 0
        ys, xs = np.nonzero(m)
        assert xs.min() - 2 <= cx <= xs.max() + 2 and ys.min() - 2 <= cy <= ys.max() + 2


def test_visual_prompts_differ_only_where_expected():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    ell = ((20.0, 24.0), (18.0, 26.0), 30.0)
    out = V.visual_prompts(img, [ell, ((10.0, 10.0), (6.0, 8.0), 0.0)])
    assert out.shape == (2, 3, 48, 48, 3) and out.dtype == np.uint8
    outline = np.zeros((48, 48), np.uint8)
    cv2.ellipse(outline, ell, 255, thickness=1)
    outline = outline > 0
    inside = np.zeros((48, 48), np.uint8)
    cv2.ellipse(inside, ell, 255, thickness=-1)
    inside = (inside > 0) & ~outline
    outside = ~inside & ~outline
    red = np.array([255, 0, 0], np.uint8)
    grey = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
    blur = cv2.GaussianBlur(img, (11, 11), 2.0)
    for j in range(3):
        assert (out[0, j][outline] == red).all()
        np.testing.assert_array_equal(out[0, j][inside], img[inside])
    np.testing.assert_array_equal(out[0, 0][~outline], img[~outline])
    np.testing.assert_array_equal(out[0, 1][outside], grey[outside])
    np.testing.assert_array_equal(out[0, 2][outside], blur[outside])
    assert V.visual_prompts(img, []).shape == (0, 3, 48, 48, 3)


def test_crf_only_trims():
    img = np.zeros((64, 64, 3), np.uint8)
    img[24:40, 24:40] = 200
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True                      # the bright square and a dark rim
    out = V.crf_refine(img, mask)
    assert not (out & ~mask).any()
    assert out[24:40, 24:40].all()                 # the bright square stays foreground
    assert out.sum() < mask.sum()                  # the dark rim is trimmed
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert not V.crf_refine(img, outside)[24:40, 24:40].any()  # never adds pixels
    assert not V.crf_refine(img, np.zeros((64, 64), bool)).any()
    with pytest.raises(ValueError, match="sizes"):
        V.crf_refine(img[:16], mask)


def test_uint8_round_trip_and_upsample():
    x = torch.rand(2, 3, 8, 8)
    u8 = V.to_uint8_images((x - 0.5) / 0.25, (0.5,) * 3, (0.25,) * 3)
    assert u8.shape == (2, 8, 8, 3) and u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, (x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    back = V.from_uint8_images(u8, (0.5,) * 3, (0.25,) * 3)
    assert torch.allclose(back * 0.25 + 0.5, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255, atol=1e-6)
    m = np.array([[True, False], [False, True]])
    up = V.upsample_mask(m, 4)
    np.testing.assert_array_equal(up, np.kron(m, np.ones((2, 2), bool)))


# ---------------------------------------------------------------- model side

def test_patch_features_tokens_and_keys(tiny_clip):
    model, preprocess, _ = tiny_clip
    visual = model.visual
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tok, emb = V.patch_features(model, pixels, facet="tokens", batch_size=2)
    keys, emb2 = V.patch_features(model, pixels, facet="keys")
    with torch.no_grad():
        x = visual._embeds(pixels)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        last = visual.transformer.resblocks[-1]
        D = last.attn.embed_dim
        k_ref = last.ln_1(x) @ last.attn.in_proj_weight[D:2 * D].T
        t_ref = last(x)
        e_ref = model.encode_image(pixels)
    assert tok.shape == (3, 64, 64) and keys.shape == (3, 64, 64)
    assert torch.allclose(tok, t_ref[:, 1:], atol=1e-5)
    assert torch.allclose(keys, k_ref[:, 1:], atol=1e-5)
    assert torch.allclose(emb, e_ref, atol=1e-5) and torch.allclose(emb2, e_ref, atol=1e-5)
    with pytest.raises(ValueError, match="facet"):
        V.patch_features(model, pixels, facet="values")


def _generated_images():
    rng = np.random.default_rng(0)
    ims = []
    for i in range(4):
        a = np.full((80, 96, 3), 30 + 40 * i, np.uint8)
        cv2.circle(a, (30 + 8 * i, 40), 18, (200, 60 + 30 * i, 20), -1)
        a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
        ims.append(Image.fromarray(a))
    return ims


def test_extract_visual_concepts_shapes_determinism_and_modes(tiny_clip):
    model, preprocess, _ = tiny_clip
    ims = _generated_images()
    ims[1] = ims[1].convert("L")                       # grayscale
    ims[2] = ims[2].convert("RGBA")                    # alpha
    ims.append(Image.fromarray(np.full((5, 3, 3), 120, np.uint8)))   # tiny
    vc = V.extract_visual_concepts(model, preprocess, ims, methods=("pca", "kmeans"), seed=3)
    vc2 = V.extract_visual_concepts(model, preprocess, ims, methods=("pca", "kmeans"), seed=3)
    B = len(ims)
    assert vc.images.shape == (B, 64, 64, 3) and vc.foreground.shape == (B, 8, 8)
    assert vc.crf_masks.shape == (B, 64, 64)
    for method in ("pca", "kmeans"):
        r, r2 = vc.parts[method], vc2.parts[method]
        np.testing.assert_array_equal(r.pixel_parts, r2.pixel_parts)
        assert r.part_ids == r2.part_ids and r.ellipses == r2.ellipses
        for b in range(B):
            assert r.embeddings[b].shape == (len(r.part_ids[b]), 32)
            assert torch.equal(r.embeddings[b], r2.embeddings[b])
            assert sorted(set(np.unique(r.pixel_parts[b]).tolist()) - {-1}) == r.part_ids[b]
            # parts live inside the CRF foreground, which lives inside the patch foreground
            assert not ((r.pixel_parts[b] >= 0) & ~vc.crf_masks[b]).any()
        # each part embedding is the mean of three unit vectors
        for e in r.embeddings:
            assert (e.norm(dim=-1) <= 1 + 1e-5).all()


def test_part_embedding_is_mean_of_three_prompt_embeddings(tiny_clip):
    model, preprocess, _ = tiny_clip
    vc = V.extract_visual_concepts(model, preprocess, _generated_images(), methods=("pca",), crf=False)
    r = vc.parts["pca"]
    b = next(i for i, ids in enumerate(r.part_ids) if ids)
    prompts = V.visual_prompts(vc.images[b], r.ellipses[b])
    mean, std = V.normalization_of(preprocess)
    with torch.no_grad():
        embs = []
        for j in range(len(r.part_ids[b])):
            x = torch.stack([preprocess(Image.fromarray(prompts[j, a])) for a in range(3)])
            embs.append(F.normalize(model.encode_image(x).float(), dim=-1).mean(0))
    assert torch.allclose(r.embeddings[b], torch.stack(embs), atol=1e-5)


def test_non_vit_model_and_bad_input_are_clear_errors(tiny_clip):
    model, preprocess, _ = tiny_clip

    class NotViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 3)

    with pytest.raises(TypeError, match="ViT"):
        V.extract_visual_concepts(NotViT(), preprocess, _generated_images()[:1])
    with pytest.raises(ValueError, match="no images"):
        V.extract_visual_concepts(model, preprocess, [])
    with pytest.raises(ValueError, match="parts="):
        V.extract_visual_concepts(model, preprocess, _generated_images()[:1], methods=("nmf",))
    with pytest.raises(TypeError, match="PIL"):
        V.extract_visual_concepts(model, preprocess, [np.zeros((8, 8, 3))])


def test_part_ellipse_is_deterministic_on_near_degenerate_parts():
    # OpenCV's fitEllipse jitters near-line point sets with its global RNG: the same mask
    # must still give the same ellipse, call after call
    from fastinterp.vision import fit_part_ellipse

    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.zeros((40, 40), dtype=bool)
        xs = rng.integers(0, 18, size=8)
        mask[np.clip(xs * 2 + rng.integers(0, 2, size=8), 0, 39), xs] = True
        assert fit_part_ellipse(mask) == fit_part_ellipse(mask)
