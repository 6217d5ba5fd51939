"""ReSTR's data format: ``build_batches.py --family restr`` (scikit-image 0.19.3 resize, ``im_name_batch``) and the
explicit ``--resize`` choice, checked against the installed scikit-image, a SciPy reconstruction of 0.19.3's code and
digests of ReSTR's own ``resize_and_pad`` run in its pinned environment."""
import hashlib
import json
import logging
import os

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage
import skimage.transform

import build_batches
from util import image as im_proc
from util.refer import Refer, ann_to_mask, coco_image_name, load_referit_gt_mask
from util.sample_data import make_sample

SIZE = 40  # small enough that every sample image shrinks (anti-aliasing on) and the suite stays fast


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    return make_sample(str(tmp_path_factory.mktemp("sample_restr")))


def _argv(root, out, d, t, *extra):
    return ["-d", d, "-t", t, "--data-root", root, "--output-dir", str(out)] + list(extra)


def _resize_0193(im, out_h, out_w):
    """scikit-image 0.19.3 ``resize(im, (out_h, out_w))`` with its defaults, spelled out with SciPy: img_as_float,
    gaussian_filter(sigma = max(0, (in/out − 1)/2), mode 'mirror') when shrinking, zoom(order 1, grid_mode, 'mirror'),
    clip to the unfiltered input's [min, max]."""
    img = skimage.img_as_float(im)
    out_shape = (out_h, out_w) + img.shape[2:]
    factors = np.divide(img.shape, out_shape)
    filtered = img
    if any(o < i for o, i in zip(out_shape, img.shape)):
        filtered = ndi.gaussian_filter(img, np.maximum(0, (factors - 1) / 2), cval=0, mode="mirror")
    out = ndi.zoom(filtered, [1 / f for f in factors], order=1, mode="mirror", cval=0, grid_mode=True)
    return np.clip(out, img.min(), img.max())


def _random_inputs():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (41, 29), dtype=np.uint8)
    mask = np.zeros((37, 53), np.float32)
    mask[10:20, 5:30] = 1
    return rgb, gray, mask


@pytest.mark.parametrize("out_hw", [(20, 29), (37, 53), (60, 90), (15, 70)])
def test_resize_skimage019_matches_installed_and_0193_code(out_hw):
    for im in _random_inputs():
        ours = im_proc.resize_skimage019(im, *out_hw)
        assert ours.shape == out_hw + im.shape[2:]
        assert ours.dtype == (np.float32 if im.dtype == np.float32 else np.float64)
        np.testing.assert_array_equal(ours, skimage.transform.resize(im, out_hw))
        np.testing.assert_array_equal(ours, _resize_0193(im, *out_hw))


# sha256[:16] of (dtype, shape, bytes) of ReSTR's own ``utils/im_processing.resize_and_pad`` output, and of
# ``img_as_ubyte`` of it (images) or ``> 0`` of it (masks), computed in ReSTR's pinned environment (Python 3.7.16,
# scikit-image 0.19.3, SciPy 1.7.3, NumPy 1.21.5) on the inputs of ``_hash_inputs``.
RESTR_ENV_DIGESTS = {
    ("rgb", 24): ("d825df7c4f88139e", "e7ff57fdc315fc3d"), ("rgb", 40): ("eef0b01f209286aa", "28c67699567ac561"),
    ("rgb", 96): ("de8127329144cb07", "c8665ae15b1d98f7"), ("gray", 24): ("abdc46a325e8950b", "9e36288fb2a44532"),
    ("gray", 40): ("42d2780edc6769f1", "4095641230b2a839"), ("gray", 96): ("1616b39aaf78ab8c", "70030edc739bc911"),
    ("mask", 24): ("ade01ccf3a72bb28", "6595f0da3f31d6eb"), ("mask", 40): ("c4766b9bb6f1578a", "6ffa5d7fbb7c4e89"),
    ("mask", 96): ("6578dfba871ff49d", "26034df2050eacca"),
}


def _hash_inputs():
    i, j, c = np.meshgrid(np.arange(37), np.arange(53), np.arange(3), indexing="ij")
    rgb = ((i * 37 + j * 11 + c * 101 + (i * j) % 7 * 29) % 256).astype(np.uint8)
    gi, gj = np.meshgrid(np.arange(41), np.arange(29), indexing="ij")
    gray = ((gi * gi * 3 + gj * 17) % 256).astype(np.uint8)
    mask = (((i[..., 0] - 18) / 9.0) ** 2 + ((j[..., 0] - 25) / 16.0) ** 2 < 1).astype(np.float32)
    return {"rgb": rgb, "gray": gray, "mask": mask}


def _digest(a):
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_resize_and_pad_skimage019_bit_identical_to_restr_environment():
    inputs = _hash_inputs()
    for (name, size), (want, want_final) in RESTR_ENV_DIGESTS.items():
        out = im_proc.resize_and_pad_skimage019(inputs[name], size, size)
        final = im_proc.img_as_ubyte(out) if name != "mask" else out > 0
        assert (_digest(out), _digest(final)) == (want, want_final), (name, size)
    assert _digest(im_proc.resize_and_pad(inputs["rgb"], 24, 24)) != RESTR_ENV_DIGESTS[("rgb", 24)][0]


def test_resize_skimage019_refuses_bool():
    with pytest.raises(ValueError, match="bool"):
        im_proc.resize_skimage019(np.zeros((8, 8), bool), 4, 4)


def test_resize_and_pad_skimage019_geometry_and_dilation():
    rgb, gray, mask = _random_inputs()
    out = im_proc.resize_and_pad_skimage019(rgb, 30, 30)
    rh, rw = int(np.round(37 * 30 / 53)), 30
    top = int(np.floor(30 - rh) / 2)
    assert out.dtype == np.float64 and out.shape == (30, 30, 3)
    assert not out[:top].any() and not out[top + rh:].any()  # black padding
    np.testing.assert_array_equal(out[top:top + rh], im_proc.resize_skimage019(rgb, rh, rw))
    # img_as_ubyte is the same in 0.13 and 0.19.3 (×255, rint, clip): ours equals the installed one.
    np.testing.assert_array_equal(im_proc.img_as_ubyte(out), skimage.img_as_ubyte(out))
    assert im_proc.resize_and_pad_skimage019(gray, 30, 30).shape == (30, 30)
    new, old = im_proc.resize_and_pad_skimage019(mask, 30, 30), im_proc.resize_and_pad(mask, 30, 30)
    assert new.dtype == np.float32 and old.dtype == np.float64
    assert ((old > 0) & ~(new > 0)).sum() == 0 and (new > 0).sum() > (old > 0).sum()  # 0.19 grows shrunk masks
    assert im_proc.RESIZE_AND_PAD["skimage013"] is im_proc.resize_and_pad


def _npz(folder):
    names = sorted(os.listdir(folder), key=lambda n: int(n.rsplit("_", 1)[1][:-4]))
    out = []
    for n in names:
        with np.load(folder / n) as z:
            out.append({k: z[k] for k in z.files})
    return out


# ReSTR's own build_batches.py (SouthFlame/restr 371f102) run on ``make_sample`` in its pinned environment (Python
# 3.7.16, scikit-image 0.19.3, SciPy 1.7.3, NumPy 1.21.5, Pillow 9.2.0, imageio 2.22.1, pycocotools), ``--img-size 40``
# for the training splits: (number of files, ``_split_digest``). A change here means the sample dataset changed or we no
# longer write what ReSTR writes.
RESTR_SAMPLE_DIGESTS = {("unc", "train"): (80, "d80233c999f197fb"), ("referit", "trainval"): (36, "53148cf35d5889fb"),
                        ("unc", "val"): (32, "43a5566d5972edea"), ("referit", "test"): (15, "b2be00eb9421d739")}


def _split_digest(folder):
    """sha256[:16] over the files in sample order: name, then per key (sorted) key, dtype, shape and bytes."""
    h = hashlib.sha256()
    names = sorted(os.listdir(folder), key=lambda n: int(n.rsplit("_", 1)[1][:-4]))
    for n in names:
        h.update(n.encode())
        with np.load(os.path.join(folder, n)) as z:
            for k in sorted(z.files):
                a = z[k]
                h.update(f"{k}{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
    return len(names), h.hexdigest()[:16]


def test_family_restr_writes_what_restr_writes(sample_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="build_batches"):
        for (d, t), want in RESTR_SAMPLE_DIGESTS.items():
            assert build_batches.main(_argv(sample_root, tmp_path, d, t, "--family", "restr",
                                            "--img-size", str(SIZE))) == 0
            assert _split_digest(tmp_path / d / f"{t}_batch") == want, (d, t)
    assert "with --resize skimage019, with im_name_batch" in caplog.text
    refer = Refer(os.path.join(sample_root, "external/refer/data"), "refcoco", "unc")
    file_order = [rid for rid, ref in refer.refs.items() if ref["split"] == "train"]
    assert file_order != refer.ref_ids("train")  # the sample's refs are not sorted: ReSTR's order is the file's
    expected = [(rid, s) for rid in file_order for s in refer.refs[rid]["sentences"]]
    samples = _npz(tmp_path / "unc/train_batch")
    assert len(samples) == len(expected)
    for z, (rid, sentence) in zip(samples[:6], expected[:6]):
        ref = refer.refs[rid]
        assert sorted(z) == ["im_batch", "im_name_batch", "mask_batch", "sent_batch", "text_batch"]
        assert z["im_name_batch"].shape == () and z["im_name_batch"].dtype.kind == "U"
        assert str(z["im_name_batch"]) == f"COCO_train2014_{ref['image_id']:012d}"
        assert str(z["sent_batch"][0]) == sentence["sent"]
        im = im_proc.read_image(os.path.join(sample_root, "data/coco/images/train2014",
                                             coco_image_name(ref["image_id"])))[0]
        mask = ann_to_mask(refer.anns[ref["ann_id"]]["segmentation"], *im.shape[:2])
        assert max(im.shape[:2]) > SIZE
        want_im = im_proc.img_as_ubyte(im_proc.resize_and_pad_skimage019(im, SIZE, SIZE))
        np.testing.assert_array_equal(z["im_batch"], want_im if want_im.ndim == 3 else np.dstack([want_im] * 3))
        np.testing.assert_array_equal(z["mask_batch"], im_proc.resize_and_pad_skimage019(mask, SIZE, SIZE) > 0)
    queries = json.load(open(os.path.join(sample_root, "data", "referit_query_test.json")))
    key = next(iter(queries))
    z = _npz(tmp_path / "referit/test_batch")[0]
    assert str(z["im_name_batch"]) == key.split("_", 1)[0] + ".jpg"
    mask = load_referit_gt_mask(os.path.join(sample_root, "data/referit/mask", key + ".mat"))
    np.testing.assert_array_equal(z["mask_batch"], mask > 0)  # evaluation splits keep the original size


def test_resize_flag_is_the_only_pixel_difference(sample_root, tmp_path):
    common = ("-d", "referit", "-t", "trainval", "--data-root", sample_root, "--img-size", str(SIZE))
    runs = {"tf1": [], "restr013": ["--family", "restr", "--resize", "skimage013"],
            "tf1_019": ["--resize", "skimage019"], "restr": ["--family", "restr"]}
    out = {}
    for name, extra in runs.items():
        assert build_batches.main(list(common) + ["--output-dir", str(tmp_path / name)] + extra) == 0
        out[name] = _npz(tmp_path / name / "referit/trainval_batch")
    assert "im_name_batch" not in out["tf1"][0] and "im_name_batch" not in out["tf1_019"][0]
    differs = 0
    for a, b, c, d in zip(out["tf1"], out["restr013"], out["tf1_019"], out["restr"]):
        for key in ("im_batch", "mask_batch", "text_batch", "sent_batch"):
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(c[key], d[key])
        differs += not np.array_equal(a["mask_batch"], c["mask_batch"])
        assert not (a["mask_batch"] & ~c["mask_batch"]).any()  # 0.19 masks contain every 0.13 pixel
    assert differs > 0


def test_rerun_verifies_im_name_and_reader_ignores_it(sample_root, tmp_path, caplog):
    argv = _argv(sample_root, tmp_path, "referit", "trainval", "--family", "restr", "--img-size", str(SIZE))
    assert build_batches.main(argv) == 0
    folder = tmp_path / "referit/trainval_batch"
    n = len(os.listdir(folder))
    first = folder / "referit_trainval_0.npz"
    good = _npz(folder)[0]
    build_batches.save_npz_atomic(str(first), **dict(good, im_name_batch=np.array("other.jpg")))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="build_batches"):
        assert build_batches.main(argv) == 0
    assert f"1 samples written, {n - 1} already present" in caplog.text and "another im_name_batch" in caplog.text
    assert str(_npz(folder)[0]["im_name_batch"]) == str(good["im_name_batch"])
    from util.data import load_sample

    sample = load_sample(str(first))
    assert sorted(sample) == ["im_batch", "mask_batch", "sent_batch", "text_batch"]
    assert sample["im_batch"].shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("extra", [["--family", "pytorch"], ["--resize", "skimage020"]])
def test_bad_choice_is_a_usage_error(sample_root, tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as e:
        build_batches.main(_argv(sample_root, tmp_path, "unc", "train", *extra))
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_family_sag_fits_without_padding_and_verifies_reruns(sample_root, tmp_path, caplog):
    """``--family sag``: training images fit inside size×size by min(size/h, size/w) (longer side = size, the other
    ``np.round``ed), not padded; skimage019 resize, masks thresholded > 0; ``im_name_batch`` as ReSTR's; the same
    sample order as ``--family restr``; a re-run finds every sample present; ``--resize skimage013`` is refused."""
    from util.sag_batches import process_pair_nopad

    argv = _argv(sample_root, tmp_path / "sag", "unc", "train", "--family", "sag", "--img-size", str(SIZE))
    with caplog.at_level(logging.INFO, logger="build_batches"):
        assert build_batches.main(argv) == 0
    assert "resized to fit inside (no padding)" in caplog.text
    assert build_batches.main(_argv(sample_root, tmp_path / "restr", "unc", "train", "--family", "restr",
                                    "--img-size", str(SIZE))) == 0
    refer = Refer(os.path.join(sample_root, "external/refer/data"), "refcoco", "unc")
    file_order = [ref for ref in refer.refs.values() if ref["split"] == "train"]
    expected = [ref for ref in file_order for _ in ref["sentences"]]
    shapes = set()
    samples = _npz(tmp_path / "sag/unc/train_batch")
    assert len(samples) == len(expected)
    for z, r, ref in zip(samples, _npz(tmp_path / "restr/unc/train_batch"), expected):
        assert sorted(z) == sorted(r) and str(z["sent_batch"][0]) == str(r["sent_batch"][0])
        assert str(z["im_name_batch"]) == str(r["im_name_batch"]) == f"COCO_train2014_{ref['image_id']:012d}"
        im = im_proc.read_image(os.path.join(sample_root, "data/coco/images/train2014",
                                             coco_image_name(ref["image_id"])))[0]
        mask = ann_to_mask(refer.anns[ref["ann_id"]]["segmentation"], *im.shape[:2])
        want_im, want_mask = process_pair_nopad(im, mask, True, SIZE)
        np.testing.assert_array_equal(z["im_batch"], want_im)
        np.testing.assert_array_equal(z["mask_batch"], want_mask)
        assert max(z["im_batch"].shape[:2]) == SIZE
        shapes.add(z["im_batch"].shape)
    assert len(shapes) > 1                                     # not padded to one size
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="build_batches"):
        assert build_batches.main(argv) == 0
    assert "0 samples written" in caplog.text
    assert build_batches.main(argv + ["--resize", "skimage013"]) == 2
