"""SITH (fastinterp.sith) against the reference semantics (fastinterp.reference.sith) and
against direct computations on the tiny random-weight ViT."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastinterp
from fastinterp import sith
from fastinterp.reference import sith as ref
from fastinterp.reference import sparse as ref_sparse


@pytest.fixture(scope="module")
def model(tiny_clip):
    """The tiny ViT with perturbed LayerNorm affines and biases, so folding matters."""
    m = copy.deepcopy(tiny_clip[0])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in m.visual.transformer.resblocks:
            for p in (blk.ln_1.weight, blk.ln_1.bias, blk.attn.in_proj_bias, blk.attn.out_proj.bias):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        m.visual.ln_post.bias.add_(0.2 * torch.randn(m.visual.ln_post.bias.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def concepts(tiny_clip, model):
    d = fastinterp.ConceptDictionary.builtin("demo")
    return d, d.encode(model, tiny_clip[2], progress=False, use_cache=False)


@pytest.fixture(scope="module")
def mean_vec():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(32, generator=g)
    return 0.4 * v / v.norm()


def _images(n=2, seed=3):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _blocks(m):
    return m.visual.transformer.resblocks


# ---------------------------------------------------------------- 1.1 VO matrices
@pytest.mark.parametrize("fold_ln", [True, False])
def test_vo_matrices_match_reference(model, fold_ln):
    for layer in range(4):
        ours, bias = sith.vo_matrices(model, layer, fold_ln=fold_ln, return_bias=True)
        theirs, ref_bias = ref.vo_matrices(_blocks(model)[layer], fold_ln=fold_ln)
        assert ours.shape == (4, 64, 64) and bias.shape == (64,)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bias, ref_bias, atol=1e-6, rtol=1e-5)


def test_vo_is_the_heads_actual_contribution(model):
    """Unfolded: attn(ln_1(x)) == sum_h A_h (x_ln @ W[h]) + b_o + W_o b_v (attention from hooks)."""
    blk = _blocks(model)[1]
    x = torch.randn(2, 65, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x_ln = blk.ln_1(x)
        out, probs = blk.attn(x_ln, x_ln, x_ln, need_weights=True, average_attn_weights=False)  # probs (B,H,N,N)
        w = sith.vo_matrices(model, 1, fold_ln=False)
        const = blk.attn.out_proj.bias + blk.attn.out_proj.weight @ blk.attn.in_proj_bias[128:]
        torch.testing.assert_close(sith.vo_matrices(model, 1, fold_ln=False, return_bias=True)[1], const)
        mine = sum(probs[:, h] @ (x_ln @ w[h]) for h in range(4)) + const
        torch.testing.assert_close(mine, out, atol=2e-5, rtol=1e-4)
        # folded + centered: reads the normalised residual; equal up to a multiple of ones per token
        wf = sith.vo_matrices(model, 1, fold_ln=True)
        x_hat = F.layer_norm(x, (64,), eps=blk.ln_1.eps)
        mine_f = sum(probs[:, h] @ (x_hat @ wf[h]) for h in range(4))
        diff = (mine_f - out)
        spread = diff - diff.mean(-1, keepdim=True)
        # the remaining difference is a per-token constant vector (the folded biases), same for all tokens
        torch.testing.assert_close(spread, spread[:, :1].expand_as(spread), atol=2e-5, rtol=1e-4)


def test_explicit_vo_module_reproduces_model(model):
    """Folded + centered VO matrices, run explicitly, give the model's output (function preserving)."""
    m2 = copy.deepcopy(model)
    for layer in (0, 3):
        ref.ExplicitVOAttention.install(_blocks(m2)[layer], fold_ln=True)
    with torch.no_grad():
        torch.testing.assert_close(m2.encode_image(_images()), model.encode_image(_images()), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- 1.2 SVD
@pytest.mark.parametrize("fold_ln", [True, False])
def test_svd_matches_dense_svd_with_sign_convention(model, fold_ln):
    u, s, vh = sith.vo_svd(model, 2, fold_ln=fold_ln)
    assert u.shape == (4, 64, 16) and s.shape == (4, 16) and vh.shape == (4, 16, 64)
    w = sith.vo_matrices(model, 2, fold_ln=fold_ln)
    ur, sr, vhr = ref.svd(ref.vo_matrices(_blocks(model)[2], fold_ln=fold_ln)[0].double(), 16)
    torch.testing.assert_close(s.double(), sr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(u.double(), ur, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vh.double(), vhr, atol=1e-5, rtol=1e-4)
    # convention: each U column's largest-|.| entry is positive; reconstruction; orthonormal
    top = u.gather(1, u.abs().argmax(dim=1, keepdim=True))
    assert bool((top > 0).all())
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, w, atol=1e-6, rtol=1e-5)
    eye = torch.eye(16).expand(4, 16, 16)
    torch.testing.assert_close(u.transpose(1, 2) @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.transpose(1, 2), eye, atol=1e-5, rtol=0)
    assert bool((s[:, :-1] >= s[:, 1:]).all())


def test_singular_vectors_left_right_and_rank(model):
    u, s, vh = sith.vo_svd(model, 0, rank=5)
    assert s.shape == (4, 5)
    torch.testing.assert_close(sith.singular_vectors(model, 0, sv_type="right", rank=5), vh)
    torch.testing.assert_close(sith.singular_vectors(model, 0, sv_type="left", rank=5), u.transpose(1, 2))
    with pytest.warns(RuntimeWarning, match="exceeds the head dim 16"):
        assert sith.vo_svd(model, 0, rank=64)[1].shape == (4, 16)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        sith.vo_svd(model, 0, rank=0)
    with pytest.raises(ValueError, match="sv_type='middle'"):
        sith.singular_vectors(model, 0, sv_type="middle")


# ---------------------------------------------------------------- 1.3 projection, image mean
def test_project_matches_reference(model, mean_vec):
    v = sith.singular_vectors(model, 3)
    for im in (None, mean_vec):
        ours = sith.project(model, v.reshape(-1, 64), image_mean=im)
        theirs = ref.project(model.visual, v.reshape(-1, 64), im)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(64))


def test_image_mean_folder_and_list(tiny_clip, tmp_path):
    from PIL import Image

    model, preprocess, _ = tiny_clip
    rng = torch.Generator().manual_seed(5)
    ims = [Image.fromarray((torch.rand(40, 50, 3, generator=rng) * 255).byte().numpy()) for _ in range(5)]
    (tmp_path / "sub").mkdir()
    for i, im in enumerate(ims):
        im.save(tmp_path / ("sub" if i % 2 else ".") / f"im{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        from_folder = sith.image_mean(model, preprocess, tmp_path, batch_size=2, progress=False,
                                      save_to=tmp_path / "out" / "image_mean.pt")
    with torch.no_grad():
        emb = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in ims])), dim=-1)
    torch.testing.assert_close(from_folder, emb.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.load(tmp_path / "out" / "image_mean.pt"), from_folder)
    from_list = sith.image_mean(model, preprocess, ims, batch_size=3, progress=False)
    torch.testing.assert_close(from_list, emb.mean(0), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        sith.image_mean(model, preprocess, [], progress=False)


# ---------------------------------------------------------------- decompose
def _assert_codes_match(ours, theirs):
    """Equal nonzero (index, score) pairs, in order; zero-score slots may name any atom."""
    torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-4, rtol=1e-3)
    pos = theirs["scores"] > 1e-4
    assert torch.equal(ours["indices"][pos], theirs["indices"][pos])


@pytest.mark.parametrize("method,sv_type,fold_ln", [("comp-0.3", "right", True), ("omp", "left", False),
                                                    ("topk", "right", True)])
def test_decompose_matches_reference_flow(model, concepts, mean_vec, tmp_path, method, sv_type, fold_ln):
    d, emb = concepts
    res = sith.decompose(model, emb, [1, -1], rank=12, method=method, sparsity=5, sv_type=sv_type, fold_ln=fold_ln,
                         image_mean=mean_vec, dictionary_name="demo", output_dir=tmp_path, batch_size=20,
                         progress=False)
    assert sorted(res) == [1, 3]
    g = fastinterp.center_embeddings(emb)
    for layer in (1, 3):
        r = res[layer]
        assert r["scores"].shape == r["indices"].shape == (4, 12, 5)
        assert r["indices"].dtype == torch.long
        theirs = ref.decompose_layer(model.visual, layer, g, rank=12, method=method, sparsity=5, sv_type=sv_type,
                                     fold_ln=fold_ln, image_mean=mean_vec)
        _assert_codes_match(r, theirs)
        name = f"layer-{layer:02d}_{sv_type}_{'foldln' if fold_ln else 'nofoldln'}_demo_{method}_sparsity-5.pt"
        saved = torch.load(tmp_path / name, weights_only=True)
        assert torch.equal(saved["scores"], r["scores"]) and torch.equal(saved["indices"], r["indices"])
        torch.testing.assert_close(saved["singular_values"], sith.vo_svd(model, layer, rank=12, fold_ln=fold_ln)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"layer-{l:02d}_{sv_type}_{'foldln' if fold_ln else 'nofoldln'}_demo_{method}_sparsity-5.pt" for l in (1, 3))


def test_decompose_scores_sorted_descending(model, concepts):
    assert list(sith.decompose(model, concepts[1], [3, -1], rank=2, progress=False)) == [3]  # one layer
    res = sith.decompose(model, concepts[1], 2, rank=16, progress=False)[2]
    s = res["scores"]
    assert bool((s[..., :-1] >= s[..., 1:]).all()) and bool((s >= 0).all())
    assert bool((s[..., 0] > 0).all())


def test_decompose_resume_and_invalid_files(model, concepts, tmp_path, monkeypatch):
    d, emb = concepts
    kw = dict(rank=8, sparsity=3, dictionary_name="demo", output_dir=tmp_path, progress=False)
    first = sith.decompose(model, emb, [0, 2], **kw)
    name = tmp_path / "layer-02_right_foldln_demo_comp-0.3_sparsity-3.pt"
    assert name.exists()

    import fastinterp.sparse as sp

    def boom(*a, **k):
        raise AssertionError("should not recompute a valid layer")

    monkeypatch.setattr(sp, "sparse_code", boom)
    again = sith.decompose(model, emb, [0, 2], **kw)
    assert again[2]["resumed"] and torch.equal(again[2]["scores"], first[2]["scores"])
    monkeypatch.undo()

    # a corrupt file and a file for other signals (different image mean) are recomputed
    name.write_bytes(b"garbage")
    other = tmp_path / "layer-00_right_foldln_demo_comp-0.3_sparsity-3.pt"
    redo = sith.decompose(model, emb, [0, 2], **{**kw}, image_mean=F.normalize(torch.ones(32), dim=0) * 0.1)
    assert not redo[2].get("resumed") and not redo[0].get("resumed")
    assert sith.load_decomposition(name)["meta"]["image_mean"] is True
    assert sith.load_decomposition(other)["meta"]["image_mean"] is True
    # a reference-style file (no meta) with the right shape is accepted as is
    torch.save({"scores": first[2]["scores"], "indices": first[2]["indices"]}, name)
    kept = sith.decompose(model, emb, [2], **kw)
    assert kept[2]["resumed"]
    # force recomputes
    assert not sith.decompose(model, emb, [2], force=True, **kw)[2].get("resumed")


def test_decompose_resumes_inside_a_layer(model, concepts, tmp_path, monkeypatch):
    d, emb = concepts
    kw = dict(rank=16, sparsity=3, dictionary_name="demo", output_dir=tmp_path, progress=False, batch_size=8,
              save_every=1)
    full = sith.decompose(model, emb, [3], **{**kw, "output_dir": None})[3]
    import fastinterp.sparse as sp

    real = sp.sparse_code
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sp, "sparse_code", flaky)
    with pytest.raises(KeyboardInterrupt):
        sith.decompose(model, emb, [3], **kw)
    partial = tmp_path / "layer-03_right_foldln_demo_comp-0.3_sparsity-3.pt.partial"
    assert torch.load(partial, weights_only=True)["done"] == 32
    calls["n"] = -100
    seen = []

    def counting(x, *a, **k):
        seen.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(sp, "sparse_code", counting)
    res = sith.decompose(model, emb, [3], **kw)[3]
    assert sum(seen) == 64 - 32  # only the remaining singular vectors were coded
    assert torch.equal(res["indices"], full["indices"]) and torch.equal(res["scores"], full["scores"])
    assert not partial.exists()


def test_filenames_roundtrip_and_checks():
    n = sith.decomposition_filename(20, sv_type="right", fold_ln=True, dictionary="conceptnet", method="comp-0.3",
                                    sparsity=5)
    assert n == "layer-20_right_foldln_conceptnet_comp-0.3_sparsity-5.pt"
    assert sith.parse_decomposition_filename("/a/b/" + n) == {
        "layer": 20, "sv_type": "right", "fold_ln": True, "dictionary": "conceptnet", "method": "comp-0.3",
        "sparsity": 5}
    assert sith.decomposition_filename(3, sv_type="left", fold_ln=False, dictionary="d", method="omp",
                                       sparsity=10) == "layer-03_left_nofoldln_d_omp_sparsity-10.pt"
    with pytest.raises(ValueError, match="readers split on '_'"):
        sith.decomposition_filename(1, dictionary="my_words", method="omp", sparsity=2)
    with pytest.raises(ValueError, match="not a SITH decomposition file name"):
        sith.parse_decomposition_filename("layer-1_right.pt")


# ---------------------------------------------------------------- bad input
def test_bad_inputs(model, concepts, tmp_path):
    d, emb = concepts
    with pytest.raises(IndexError, match="out of range"):
        sith.decompose(model, emb, [4], progress=False)
    with pytest.raises(IndexError, match="out of range"):
        sith.vo_matrices(model, -5)
    with pytest.raises(ValueError, match="joint space has dimension 32"):
        sith.decompose(model, torch.randn(10, 48), [0], progress=False)
    bad = emb.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sith.decompose(model, bad, [0], progress=False)
    with pytest.raises(ValueError, match="unknown sparse-coding method"):
        sith.decompose(model, emb, [0], method="lasso", progress=False)
    with pytest.raises(ValueError, match="sv_type='up'"):
        sith.decompose(model, emb, [0], sv_type="up", progress=False)
    with pytest.raises(ValueError, match="image_mean"):
        sith.decompose(model, emb, [0], image_mean=torch.full((32,), float("inf")), progress=False)
    with pytest.raises(ValueError, match="joint space has dimension 32"):
        sith.decompose(model, emb, [0], image_mean=torch.zeros(64), progress=False)
    with pytest.raises(ValueError, match="sparsity=300 exceeds"):
        sith.decompose(model, emb, [0], sparsity=300, progress=False)
    with pytest.raises(ValueError, match="readers split"):
        sith.decompose(model, emb, [0], dictionary_name="a_b", output_dir=tmp_path, progress=False)

    class NotViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 3)

    with pytest.raises(TypeError, match="needs a ViT image tower"):
        sith.vo_matrices(NotViT(), 0)
    with pytest.raises(TypeError, match="needs a ViT image tower"):
        sith.decompose(NotViT(), emb, [0], progress=False)
    with pytest.raises(ValueError, match="dictionary mode"):
        sith.prepare_dictionary(emb, "whiten")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.visual.transformer.resblocks[0].attn.in_proj_weight[150, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sith.vo_svd(broken, 0)


# ---------------------------------------------------------------- 1.6 fidelity
def test_fidelity_matches_reference_and_summaries(model, concepts, mean_vec, tmp_path):
    d, emb = concepts
    g = fastinterp.center_embeddings(emb)
    for sv_type, im in (("right", mean_vec), ("left", None)):
        res = sith.decompose(model, emb, [2], rank=10, sparsity=4, sv_type=sv_type, image_mean=im,
                             dictionary_name="demo", output_dir=tmp_path, progress=False)[2]
        f = sith.fidelity(model, 2, res["scores"], res["indices"], g, sv_type=sv_type, image_mean=im)
        theirs = ref.fidelity(model.visual, 2, res["scores"], res["indices"], g, sv_type=sv_type, image_mean=im)
        assert f["cos"].shape == (4, 10)
        torch.testing.assert_close(f["cos"], theirs, atol=1e-5, rtol=1e-4)
        for h, row in enumerate(f["heads"]):
            c = theirs[h]
            assert row["head"] == h
            assert row["mean"] == pytest.approx(float(c.mean()), abs=1e-5)
            assert row["std"] == pytest.approx(float(c.std()), abs=1e-5)  # unbiased, as torch's default
            assert row["min"] == pytest.approx(float(c.min()), abs=1e-5)
            assert row["max"] == pytest.approx(float(c.max()), abs=1e-5)
        assert f["overall"]["mean"] == pytest.approx(float(theirs.mean()), abs=1e-5)
        assert f["overall"]["std"] == pytest.approx(float(theirs.std()), abs=1e-5)
        assert -1 <= f["overall"]["min"] <= f["overall"]["max"] <= 1
        path = tmp_path / sith.decomposition_filename(2, sv_type=sv_type, dictionary="demo", method="comp-0.3",
                                                      sparsity=4)
        ff = sith.fidelity_from_file(model, path, emb, image_mean=im)
        torch.testing.assert_close(ff["cos"], f["cos"])
        assert ff["layer"] == 2 and ff["sv_type"] == sv_type
    with pytest.raises(ValueError, match="3 heads but layer 2 has 4"):
        sith.fidelity(model, 2, torch.ones(3, 4, 2), torch.zeros(3, 4, 2, dtype=torch.long), g)


def test_fidelity_perfect_when_dictionary_contains_the_signal(model):
    """Atoms = the projected singular vectors themselves: sparsity 1 gives cos = 1 when proj is
    invertible on them (here: compare against the pinv round trip computed directly)."""
    v = sith.singular_vectors(model, 1, rank=4)  # (4, 4, 64)
    z = sith.project(model, v.reshape(16, 64))  # unit (16, 32)
    g = z.clone()
    scores = torch.ones(4, 4, 1)
    indices = torch.arange(16).reshape(4, 4, 1)
    f = sith.fidelity(model, 1, scores, indices, g)
    proj = model.visual.proj.detach()
    y = F.normalize(z @ torch.linalg.pinv(proj), dim=-1)
    torch.testing.assert_close(f["cos"].reshape(-1), F.cosine_similarity(y, v.reshape(16, 64), dim=-1),
                               atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- 1.7 edits
def _ref_edited(model, layer, mult, *, fold_ln=True, center=None, truncate_rank=None):
    m = copy.deepcopy(model)
    blk = _blocks(m)[layer]
    w, _ = ref.vo_matrices(_blocks(model)[layer], fold_ln=fold_ln, center=center)
    u, s, vh = ref.svd(w.double())
    full = torch.ones_like(s)
    if truncate_rank is not None:
        full[:, truncate_rank:] = 0
    full[:, :mult.shape[1]] = mult.double()
    w_new = (u @ torch.diag_embed(s * full) @ vh).float()
    ref.ExplicitVOAttention.install(blk, w_new, fold_ln=fold_ln, center=center)
    return m, w_new


def test_identity_multipliers_leave_model_unchanged(model):
    x = _images()
    with torch.no_grad():
        base = model.encode_image(x)
    m = copy.deepcopy(model)
    for layer in range(4):
        sith.apply_multipliers(m, layer, torch.ones(4, 16))
        sith.apply_multipliers(m, layer, {0: torch.ones(16)}, fold_ln=False)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), base, atol=1e-5, rtol=0)
    # uniform multiplier c scales each head's VO by c exactly (C = c I)
    m2 = copy.deepcopy(model)
    sith.apply_multipliers(m2, 2, torch.full((4, 16), 0.5))
    torch.testing.assert_close(sith.vo_matrices(m2, 2), 0.5 * sith.vo_matrices(model, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fold_ln,center", [(True, True), (True, False), (False, False)])
def test_edit_equals_reference_edited_forward(model, fold_ln, center):
    mult = torch.rand(4, 16, generator=torch.Generator().manual_seed(6)) * 2.5 - 1.0
    m = copy.deepcopy(model)
    handle = sith.apply_multipliers(m, 2, mult, fold_ln=fold_ln, center=center)
    theirs, w_new = _ref_edited(model, 2, mult, fold_ln=fold_ln, center=center)
    x = _images()
    with torch.no_grad():
        a, b, base = m.encode_image(x), theirs.encode_image(x), model.encode_image(x)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert float((a - base).abs().max()) > 1e-2  # the edit does change the model
    torch.testing.assert_close(sith.vo_matrices(m, 2, fold_ln=fold_ln, center=center), w_new, atol=2e-6, rtol=1e-4)
    # other layers and q/k/out_proj untouched
    for name, p in m.named_parameters():
        if "resblocks.2.attn.in_proj" not in name:
            assert torch.equal(p, dict(model.named_parameters())[name]), name
    assert torch.equal(m.visual.transformer.resblocks[2].attn.in_proj_weight[:128],
                       model.visual.transformer.resblocks[2].attn.in_proj_weight[:128])
    handle.undo()
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), base, atol=0, rtol=0)


def test_zeroing_a_head_removes_its_vo_contribution(model):
    """All multipliers of head 1 = 0: the head then adds only its (folded) bias; the block's
    attention output changes by exactly -A_1 (x_hat @ W[1]) (up to a multiple of ones)."""
    layer, head = 3, 1
    m = copy.deepcopy(model)
    sith.apply_multipliers(m, layer, {head: torch.zeros(16)})
    assert float(sith.vo_matrices(m, layer)[head].abs().max()) < 1e-6
    others = [h for h in range(4) if h != head]
    torch.testing.assert_close(sith.vo_matrices(m, layer)[others], sith.vo_matrices(model, layer)[others],
                               atol=1e-6, rtol=1e-5)
    blk, blk_new = _blocks(model)[layer], _blocks(m)[layer]
    x = torch.randn(2, 65, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x_ln = blk.ln_1(x)
        out, probs = blk.attn(x_ln, x_ln, x_ln, need_weights=True, average_attn_weights=False)
        out_new, _ = blk_new.attn(x_ln, x_ln, x_ln, need_weights=False)
        x_hat = F.layer_norm(x, (64,), eps=blk.ln_1.eps)
        expected = out - probs[:, head] @ (x_hat @ sith.vo_matrices(model, layer)[head])
        diff = out_new - expected
        torch.testing.assert_close(diff - diff.mean(-1, keepdim=True), torch.zeros_like(diff), atol=2e-5, rtol=0)
    theirs, _ = _ref_edited(model, layer, torch.tensor([[1.0] * 16 if h != head else [0.0] * 16 for h in range(4)]))
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(_images()), theirs.encode_image(_images()), atol=2e-5, rtol=1e-4)


def test_edit_partial_rank_and_truncate(model):
    mult = torch.tensor([[0.0, 2.0, -1.0]] * 4)
    for truncate in (False, True):
        m = copy.deepcopy(model)
        sith.apply_multipliers(m, 0, mult, truncate=truncate)
        theirs, w_new = _ref_edited(model, 0, mult, truncate_rank=3 if truncate else None)
        torch.testing.assert_close(sith.vo_matrices(m, 0), w_new, atol=2e-6, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(m.encode_image(_images()), theirs.encode_image(_images()), atol=2e-5,
                                       rtol=1e-4)
    m = copy.deepcopy(model)
    sith.apply_multipliers(m, 0, {(2, 0): 0.0, (2, 5): 3.0})
    u, s, vh = sith.vo_svd(model, 0)
    s2 = s.clone()
    s2[2, 0], s2[2, 5] = 0.0, 3.0 * s[2, 5]
    torch.testing.assert_close(sith.vo_matrices(m, 0), u @ torch.diag_embed(s2) @ vh, atol=2e-6, rtol=1e-4)


def test_edit_bad_inputs(model):
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="shape"):
        sith.apply_multipliers(m, 0, torch.ones(3, 16))
    with pytest.raises(ValueError, match="shape"):
        sith.apply_multipliers(m, 0, torch.ones(4, 17))
    with pytest.raises(ValueError, match="NaN or Inf"):
        sith.apply_multipliers(m, 0, torch.full((4, 2), float("nan")))
    with pytest.raises(IndexError, match="out of range"):
        sith.apply_multipliers(m, 0, {(4, 0): 1.0})
    with pytest.raises(ValueError, match="not function-preserving"):
        sith.apply_multipliers(m, 0, torch.ones(4, 2), fold_ln=False, center=True)
    with pytest.raises(IndexError):
        sith.apply_multipliers(m, 9, torch.ones(4, 2))


# ---------------------------------------------------------------- recipes
def test_suppress_and_sign_flip_tables():
    dec = torch.tensor([[1, 2, 3, 4, 5]])
    assert sith.suppress_multipliers(dec).tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    assert sith.sign_flip_multipliers(dec).tolist() == [[1.0, 1.0, -1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="integers 1-5"):
        sith.suppress_multipliers(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="integers 1-5"):
        sith.sign_flip_multipliers(torch.tensor([[2.5]]))


def test_classification_recipe_matches_manual(model, concepts, tiny_clip):
    d, emb = concepts
    g = sith.prepare_dictionary(emb, "normalize")
    cls = fastinterp.encode_texts(model, tiny_clip[2], ["a small cat", "a dog running", "red car"], progress=False)
    task = sith.task_concepts(cls, g, sparsity=10, coh=0.3)
    dense = ref_sparse.coherent_orthogonal_matching_pursuit(F.normalize(cls, dim=-1), g, max_sparsity=10, coh=0.3,
                                                            positive=True)
    # the reference's approximate NNLS leaves ~1e-7 where the exact optimum has 0: compare the
    # clearly selected atoms, and require ours to be a subset of the reference's nonzero atoms
    ours = {tuple(row) for row in task.tolist()}
    assert {tuple(row) for row in g[(dense > 1e-4).any(dim=0)].tolist()} <= ours
    assert ours <= {tuple(row) for row in g[dense.any(dim=0)].tolist()}
    assert len(ours) >= 10
    res = sith.decompose(model, emb, [3], rank=16, progress=False)[3]
    mult = sith.classification_multipliers(res["scores"], res["indices"], g, task)
    assert mult.shape == (4, 16)
    for h in range(4):
        for j in range(0, 16, 5):
            r = sum(float(res["scores"][h, j, k]) * float((g[res["indices"][h, j, k]] @ task.T).max())
                    for k in range(5))
            assert float(mult[h, j]) == pytest.approx(max(r + 0.3, 0.8), abs=1e-5)
    assert bool((mult >= 0.8).all())
    capped = sith.classification_multipliers(res["scores"], res["indices"], g, task, max_threshold=0.9)
    assert bool((capped <= 0.9).all())
    # excluding the class names removes them from the task atoms
    names = list(d.texts)
    excl = torch.tensor([t in ("cat", "dog") for t in names])
    task2 = sith.task_concepts(cls, g, exclude=excl)
    for i in excl.nonzero().flatten().tolist():
        assert not bool(((task2 - g[i]).abs().sum(-1) < 1e-7).any())


# ---------------------------------------------------------------- scorers
def test_parse_score_variants():
    assert sith.parse_score("Score: 4") == 4
    assert sith.parse_score("**Score:** 2\nbecause...") == 2
    assert sith.parse_score("score=5") == 5
    assert sith.parse_score("  3 ") == 3
    assert sith.parse_score("I would rate this 1 out of 5") == 1
    with pytest.raises(ValueError, match="no score"):
        sith.parse_score("no idea")
    with pytest.raises(ValueError, match="no score"):
        sith.parse_score("Score: 9")


def test_llm_scorer_adapter_and_scoring_with_cache(tmp_path):
    class FakeClient:
        def __init__(self, replies):
            self.replies, self.seen = list(replies), []

        def complete(self, messages):
            self.seen.append(messages)
            return self.replies.pop(0)

    client = FakeClient(["garbage", "Score: 3"])
    scorer = sith.LLMScorer(client, system="be brief", retries=1)
    assert scorer("prompt") == 3
    assert client.seen[0][0] == {"role": "system", "content": "be brief"}
    assert client.seen[0][1] == {"role": "user", "content": "prompt"}
    with pytest.raises(ValueError, match="no score"):
        sith.LLMScorer(FakeClient(["x", "y"]), retries=1)("p")
    with pytest.raises(TypeError, match="complete"):
        sith.LLMScorer(object())

    concepts = [f"c{i}" for i in range(10)]
    scores = torch.tensor([[[0.5, 0.2, 0.0]], [[0.1, 0.9, 0.3]]])  # (H=2, r=1, K=3)
    indices = torch.tensor([[[3, 1, 7]], [[0, 2, 9]]])
    p = sith.format_concepts_prompt("X\n{concepts}", scores[1, 0], indices[1, 0], concepts)
    assert p == "X\n- 0.90 c2\n- 0.30 c9\n- 0.10 c0"
    assert "c7" not in sith.format_concepts_prompt("{concepts}", scores[0, 0], indices[0, 0], concepts)
    prompts = []

    def fake(prompt):
        prompts.append(prompt)
        return 5 if "c2" in prompt else 1

    cache = tmp_path / "dec.txt"
    out = sith.score_singular_vectors(scores, indices, concepts, fake, cache=cache, progress=False)
    assert out.tolist() == [[1], [5]]
    assert cache.read_text() == "1\n5\n"
    assert all("- 0.50 c3" in prompts[0] for _ in [0]) and "Score: <1-5>" in prompts[0]
    prompts.clear()
    again = sith.score_singular_vectors(scores, indices, concepts, fake, cache=cache, progress=False)
    assert again.tolist() == [[1], [5]] and prompts == []  # all answers reused
    cache.write_text("1\n")  # interrupted run: resume with the second
    assert sith.score_singular_vectors(scores, indices, concepts, fake, cache=cache, progress=False).tolist() == [[1], [5]]
    assert len(prompts) == 1
    with pytest.raises(ValueError, match="must return an int 1-5"):
        sith.score_singular_vectors(scores, indices, concepts, lambda p: 7, progress=False)
    sith.write_decisions(out, tmp_path / "w.txt")
    assert sith.read_decisions(tmp_path / "w.txt") == [1, 5]
    (tmp_path / "err.txt").write_text("1\nError\n")
    with pytest.raises(ValueError, match="not an integer score"):
        sith.read_decisions(tmp_path / "err.txt")


# ---------------------------------------------------------------- explanations
def test_explanations_text_and_figure(model, concepts, tmp_path):
    d, emb = concepts
    res = sith.decompose(model, emb, [1], rank=6, sparsity=3, progress=False)[1]
    rows = sith.explanation_rows(res, d.texts)
    nz = int((res["scores"] != 0).sum())
    assert len(rows) == nz
    first = [r for r in rows if r["head"] == 2 and r["sv"] == 4]
    k = int(torch.argmax(res["scores"][2, 4]))
    assert first[0]["concept"] == d.texts[int(res["indices"][2, 4, k])]
    assert first[0]["weight"] == pytest.approx(float(res["scores"][2, 4, k]), abs=1e-6)
    assert first[0]["singular_value"] == pytest.approx(float(res["singular_values"][2, 4]), abs=1e-5)
    assert [r["rank_in_sv"] for r in first] == list(range(len(first)))
    md, csv_path = sith.write_explanations(res, d.texts, tmp_path / "layer-01.x")
    assert md.name == "layer-01.x.md" and csv_path.name == "layer-01.x.csv"
    text = md.read_text()
    assert "## Head 3" in text and first[0]["concept"] in text
    assert len(csv_path.read_text().strip().splitlines()) == nz + 1
    png = sith.plot_explanations(res, d.texts, tmp_path / "fig.png", n_sv=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="concept texts"):
        sith.explanation_rows(res, d.texts[:3])


def test_tensor_hash_small_and_sampled():
    from fastinterp.sith.decomposition import _tensor_hash

    t = torch.randn(300, 8, generator=torch.Generator().manual_seed(8))
    for max_el in (1 << 24, 100):
        h = _tensor_hash(t, max_elements=max_el)
        assert h == _tensor_hash(t.clone(), max_elements=max_el)
        u = t.clone()
        u[1, 3] += 1e-3  # row 1 is not in the sample when sampling: the column sums catch it
        assert _tensor_hash(u, max_elements=max_el) != h
    assert _tensor_hash(t[:, :4]) != _tensor_hash(t[:, :4].reshape(600, 2))


@pytest.mark.parametrize("width,heads,layers", [(48, 3, 2), (32, 8, 1)])
def test_other_vit_shapes_vo_and_edits(width, heads, layers):
    """A bare open_clip VisionTransformer of other widths / head counts (head dims 16 and 4)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(9)
    vit = VisionTransformer(image_size=32, patch_size=8, width=width, layers=layers, heads=heads, mlp_ratio=2.0,
                            output_dim=24).eval()
    with torch.no_grad():
        for blk in vit.transformer.resblocks:
            blk.ln_1.bias.normal_(0, 0.3)
            blk.attn.in_proj_bias.normal_(0, 0.3)
    hd = width // heads
    last = layers - 1
    w, bias = sith.vo_matrices(vit, last, return_bias=True)
    w_ref, bias_ref = ref.vo_matrices(vit.transformer.resblocks[last])
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bias, bias_ref, atol=1e-6, rtol=1e-5)
    u, s, vh = sith.vo_svd(vit, last)
    assert s.shape == (heads, hd)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, w, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    mult = torch.rand(heads, hd, generator=torch.Generator().manual_seed(11)) * 2 - 0.5
    edited = copy.deepcopy(vit)
    sith.apply_multipliers(edited, last, mult)
    theirs = copy.deepcopy(vit)
    ur, sr, vhr = ref.svd(w_ref.double(), hd)
    ref.ExplicitVOAttention.install(theirs.transformer.resblocks[last], (ur @ torch.diag_embed(sr * mult) @ vhr).float())
    with torch.no_grad():
        torch.testing.assert_close(edited(x), theirs(x), atol=2e-5, rtol=1e-4)
        assert float((edited(x) - vit(x)).abs().max()) > 1e-3
    z = sith.project(vit, vh.reshape(-1, width))
    assert z.shape == (heads * hd, 24)
