"""Hostile-user inputs and damaged files (issue 13): each ends in a clear error (what, where,
the fix) or a defined result; saved artefacts are checked against their content checksum and
a damaged one is reported by name and rebuilt or refused, never used."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastinterp import sparse
from fastinterp.io import CorruptFileError, atomic_write_text, load_checked, load_tensor_checked, save_checked, \
    save_tensor_checked
from fastinterp.kernels.sinkhorn import sinkhorn_fixed

PATTERN = 1.2345


def _flip_tensor_byte(path: Path, value: float = PATTERN, dtype=np.float32) -> None:
    """Change one byte inside the stored tensor data (found by its value pattern), leaving the
    file a valid torch zip: only a content checksum can notice."""
    raw = bytearray(path.read_bytes())
    needle = np.full(4, value, dtype=dtype).tobytes()
    at = raw.find(needle)
    assert at >= 0, "pattern not found in the file"
    raw[at + 1] ^= 0x10
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- sparse coding


def test_coh_overflowing_float32_is_refused_not_used():
    torch.manual_seed(0)
    G = F.normalize(torch.randn(20, 8), dim=-1)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="float32"):
        sparse.comp_topk(x, G, k=3, coh=1e39)
    with pytest.raises(ValueError, match="overflow"):
        sparse.comp_topk(x * 1e38, G, k=3, coh=0.3)
    scores, idx = sparse.comp_topk(x.double(), G.double(), k=3, coh=1e39)  # fits float64: a defined result
    assert torch.isfinite(scores).all() and all(len(set(r)) == 3 for r in idx.tolist())


def test_requires_grad_inputs_to_the_pursuit():
    torch.manual_seed(1)
    G = F.normalize(torch.randn(30, 8), dim=-1)
    x = torch.randn(4, 8)
    want = sparse.comp_topk(x, G, k=3, coh=0.3)
    got = sparse.comp_topk(x.clone().requires_grad_(), G.clone().requires_grad_(), k=3, coh=0.3)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    dense = sparse.orthogonal_matching_pursuit(x.clone().requires_grad_(), G, max_sparsity=2)
    assert not dense.requires_grad


def test_sinkhorn_fixed_none():
    with pytest.raises(TypeError, match="S is None"):
        sinkhorn_fixed(None)
    with pytest.raises(TypeError, match=r"S\[1\]"):
        sinkhorn_fixed([np.ones((2, 2)), None])


# ---------------------------------------------------------------- files: io


def test_checked_tensor_file_detects_flipped_bytes(tmp_path):
    path = tmp_path / "t.pt"
    save_tensor_checked(torch.full((16,), PATTERN), path)
    assert torch.equal(load_tensor_checked(path, require_checksum=True), torch.full((16,), PATTERN))
    _flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(CorruptFileError, match="t.pt.*do not match"):
        load_tensor_checked(path)


def test_checked_dict_file_detects_flipped_bytes(tmp_path):
    path = tmp_path / "d.pt"
    save_checked({"x": torch.full((16,), PATTERN), "n": 3}, path)
    _flip_tensor_byte(path)
    with pytest.raises(CorruptFileError, match="d.pt.*do not match"):
        load_checked(path)


def test_a_folder_at_a_file_path(tmp_path):
    (tmp_path / "image_mean.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_tensor_checked(torch.zeros(3), tmp_path / "image_mean.pt")
    with pytest.raises(CorruptFileError, match="is a folder"):
        load_tensor_checked(tmp_path / "image_mean.pt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        atomic_write_text(tmp_path / "file" / "out.json", "{}")


def test_truncated_checkpoint_error_is_ours_first(tmp_path):
    from fastinterp import TINY_MODEL, load_clip

    bad = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(ValueError) as info:
        load_clip(TINY_MODEL, checkpoint=bad)
    msg = str(info.value)
    assert msg.startswith(f"could not load checkpoint {str(bad)!r}") and "truncated, corrupt" in msg
    assert msg.index("truncated") < (msg.lower().find("file an issue") % (len(msg) + 1) or len(msg))
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---------------------------------------------------------------- SITH artefacts


def test_image_mean_file_errors_name_the_file_and_the_fix(tmp_path):
    from fastinterp.cli.sith import _resolve_image_mean

    d = 8
    auto = tmp_path / "image_mean.pt"
    save_tensor_checked(torch.full((d,), PATTERN), auto)
    assert _resolve_image_mean("auto", auto, d).shape == (d,)
    auto.write_bytes(auto.read_bytes()[:200])  # truncated
    with pytest.raises(CorruptFileError, match=r"image_mean\.pt.*truncated.*--images FOLDER"):
        _resolve_image_mean("auto", auto, d)
    given = tmp_path / "mine.pt"
    torch.save({"mean": torch.zeros(d)}, given)  # not a tensor
    with pytest.raises(CorruptFileError, match=r"mine\.pt.*holds a dict.*torch\.save"):
        _resolve_image_mean(str(given), auto, d)
    given.write_bytes(b"not a torch file at all")
    with pytest.raises(CorruptFileError, match=r"mine\.pt.*cannot be read"):
        _resolve_image_mean(str(given), auto, d)
    save_tensor_checked(torch.full((d,), PATTERN), auto)
    _flip_tensor_byte(auto)  # flipped inside the data, with its checksum file
    with pytest.raises(CorruptFileError, match="do not match"):
        _resolve_image_mean("auto", auto, d)


def test_decomposition_files_carry_a_checksum(tmp_path):
    from fastinterp.sith.decomposition import _start_codes, _valid_existing, load_decomposition

    meta = {"heads": 2, "rank": 3, "sparsity": 4, "layer": 1}
    res = {"scores": torch.full((2, 3, 4), PATTERN), "indices": torch.zeros(2, 3, 4, dtype=torch.long),
           "singular_values": torch.ones(2, 3), "meta": meta}
    path = tmp_path / "layer-01_right_foldln_demo_comp-0.3_sparsity-4.pt"
    save_checked(res, path)
    assert _valid_existing(path, meta) is not None
    _flip_tensor_byte(path)
    with pytest.raises(CorruptFileError, match="do not match"):
        load_decomposition(path)
    with pytest.warns(UserWarning, match="decomposing the layer again"):
        assert _valid_existing(path, meta) is None
    # a reference file (no checksum, no meta) is read and reused; one of ours without its checksum is not
    torch.save({"scores": res["scores"], "indices": res["indices"]}, path)
    assert load_decomposition(path)["scores"].shape == (2, 3, 4)
    assert _valid_existing(path, meta) is not None
    torch.save(res, path)
    with pytest.warns(UserWarning, match="no checksum"):
        assert _valid_existing(path, meta) is None
    # a .partial checkpoint
    partial = tmp_path / "x.pt.partial"
    save_checked({"scores": torch.full((6, 4), PATTERN), "indices": torch.zeros(6, 4, dtype=torch.long),
                  "done": 3, "meta": meta}, partial)
    assert _start_codes(6, 4, partial, meta)[2] == 3
    _flip_tensor_byte(partial)
    with pytest.warns(UserWarning, match=r"x\.pt\.partial.*not resumed"):
        scores, _, done = _start_codes(6, 4, partial, meta)
    assert done == 0 and not scores.any()


def test_textspan_batch_files_carry_a_checksum(tmp_path):
    import json

    from fastinterp.textspan import _batch_path, _load_batch, load_contributions

    data = {"heads": torch.full((2, 1, 2, 4), PATTERN), "mlps": torch.zeros(2, 3, 4), "other": torch.zeros(2, 4),
            "embedding": torch.zeros(2, 4)}
    path = _batch_path(tmp_path, 0)
    save_checked(data, path)
    assert _load_batch(path) is not None
    (tmp_path / "meta.json").write_text(json.dumps({"n_batches": 1, "layers": [1], "n_layers": 2}))
    assert load_contributions(tmp_path).heads.shape == (2, 1, 2, 4)
    _flip_tensor_byte(path)
    with pytest.warns(UserWarning, match=r"batch_000000\.pt.*recomputing"):
        assert _load_batch(path) is None
    with pytest.raises(ValueError, match=r"batch_000000\.pt"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_contributions(tmp_path)


# ---------------------------------------------------------------- mutual knowledge


@pytest.mark.parametrize("kwargs", [{"u": 0}, {"u": -3}, {"n_parts": 0}, {"per_part": 0}, {"top_initial": 0},
                                    {"u_venn": 0}, {"u": 2.5}])
def test_mutual_sizes_must_be_positive(kwargs):
    from fastinterp import mutual

    with pytest.raises(ValueError, match="must be an integer >= 1"):
        mutual.explain(None, None, None, [object()], ["cat"], ["fur"], **kwargs)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        mutual.run_dataset("no-such-folder", None, None, None, ["fur"], output="out", **kwargs)
