"""Hostile but ordinary inputs on the data side (issue 16): image modes, annotations, OS errors, corrupt outputs,
huge images — for build_batches.py, demo.py and the readers under util/.

The command-line cases run in two driver subprocesses (one per CLI, every case an in-process ``main(argv)`` call
there) so that "no Traceback" and the exit codes are asserted on what a user sees; cases that need an injected OS
error (disk full, permission denied, read-only file system) run in-process with the error patched in.
Situations exercised: see README, "Errors you may see".
"""
import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

import build_batches
from tests.conftest import REPO
from util import image as im_proc
from util import refer
from util.text import load_vocab_dict_from_file

WORDS = ["man", "red", "the", "left", "dog", "a", "b"]
SPECIALS = ["<pad>", "<go>", "<eos>", "<unk>"]


def png_bytes(width, height, color_type, bit_depth, rows):
    """A minimal PNG (one IDAT) from raw scanlines ``rows`` (filter byte 0 prepended here)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0,
                                                                0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def bomb_png(path):
    """A PNG whose header claims 20000×10000 pixels (over twice Pillow's decompression-bomb limit)."""
    path.write_bytes(png_bytes(20000, 10000, 0, 8, [b""])[:33] + png_bytes(1, 1, 0, 8, [b"\x00"])[33:])


GRAY16 = (np.arange(48 * 40, dtype=np.int64).reshape(48, 40) * 34 % 65536).astype(np.uint16)


def write_gray16(path, fmt="PNG"):
    Image.fromarray(GRAY16).save(path, format=fmt)


# ----------------------------------------------------------------------------------------------------------------
# The shared image reader (util/image.read_image): every Pillow mode to 8 bits


def test_16_bit_gray_png_and_tiff_are_scaled_not_saturated(tmp_path):
    for fmt in ("PNG", "TIFF"):
        path = tmp_path / f"g.{fmt.lower()}"
        write_gray16(path, fmt)
        arr, size = im_proc.read_image(str(path))
        assert size == (48, 40) and arr.dtype == np.uint8
        assert np.array_equal(arr, (GRAY16 >> 8).astype(np.uint8)), fmt
        assert (arr < 255).mean() > 0.9


def test_16_bit_rgb_png_uses_the_same_high_byte_rule(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(">u2")
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(5, 6, 2, 16, [rgb[r].tobytes() for r in range(6)]))
    arr, _ = im_proc.read_image(str(path))
    assert np.array_equal(arr, (rgb.astype(np.int64) >> 8).astype(np.uint8))
    assert np.array_equal(im_proc.sixteen_to_eight(np.arange(256) * 257), np.arange(256))


def test_32_bit_int_and_float_images(tmp_path):
    ints = np.array([[0, 257, 65535, 70000], [-5, 128, 32896, 1000]], np.int32)
    Image.fromarray(ints).save(tmp_path / "i.tif")
    assert im_proc.read_image(str(tmp_path / "i.tif"))[0].tolist() == [[0, 1, 255, 255], [0, 0, 128, 3]]
    unit = np.array([[0.0, 0.5], [0.2, 1.0]], np.float32)
    Image.fromarray(unit).save(tmp_path / "f.tif")
    assert im_proc.read_image(str(tmp_path / "f.tif"))[0].tolist() == [[0, 128], [51, 255]]
    Image.fromarray(unit * 200 + 10).save(tmp_path / "f255.tif")
    assert im_proc.read_image(str(tmp_path / "f255.tif"))[0].tolist() == [[10, 110], [50, 210]]
    Image.fromarray(np.array([[np.nan, 1]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(im_proc.ImageReadError, match=r"unreadable image: .*nan\.tif \(float image holds NaN"):
        im_proc.read_image(str(tmp_path / "nan.tif"))


def test_alpha_palette_cmyk_and_bilevel_modes(tmp_path):
    la = np.array([[[200, 255], [200, 0]], [[100, 128], [0, 255]]], np.uint8)
    Image.fromarray(la).save(tmp_path / "la.png")
    assert im_proc.read_image(str(tmp_path / "la.png"))[0].tolist() == [[200, 0], [50, 0]]
    rgba = np.array([[[10, 20, 30, 255], [255, 255, 255, 0]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert im_proc.read_image(str(tmp_path / "rgba.png"))[0].tolist() == [[[10, 20, 30], [0, 0, 0]]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    pal.putdata([1, 0])
    pal.save(tmp_path / "p.png", transparency=0)
    assert im_proc.read_image(str(tmp_path / "p.png"))[0].tolist() == [[[250, 10, 10], [0, 0, 0]]]
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = im_proc.read_image(str(tmp_path / "cmyk.jpg"))[0]
    assert cmyk.shape == (2, 3, 3) and (np.abs(cmyk.astype(int) - [255, 0, 0]) <= 2).all()
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "one.png")
    assert im_proc.read_image(str(tmp_path / "one.png"))[0].tolist() == [[255, 0]]


def test_reduced_size_decoding_jpeg_draft_and_reduce(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "big.jpg")
    arr, size = im_proc.read_image(str(tmp_path / "big.jpg"), max_side=900)
    assert size == (3000, 4000) and arr.shape == (750, 1000, 3)
    Image.new("L", (3000, 2000), 77).save(tmp_path / "big.png")
    arr, size = im_proc.read_image(str(tmp_path / "big.png"), max_side=900)
    assert size == (2000, 3000) and arr.shape == (667, 1000) and (arr == 77).all()
    assert im_proc.read_image(str(tmp_path / "big.png"))[0].shape == (2000, 3000)
    Image.fromarray(np.full((1000, 1500), 40000, np.uint16)).save(tmp_path / "big16.png")
    arr, size = im_proc.read_image(str(tmp_path / "big16.png"), max_side=700)
    assert size == (1000, 1500) and arr.shape == (500, 750) and (arr == 40000 >> 8).all()


def test_unusable_image_files_are_named(tmp_path, caplog, monkeypatch):
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(im_proc.ImageReadError, match=r"image too large: .*bomb\.png"):
        im_proc.read_image(str(tmp_path / "bomb.png"))
    with pytest.raises(im_proc.ImageReadError, match=r"unreadable image: .* \(a folder, not an image file\)"):
        im_proc.read_image(str(tmp_path))
    with pytest.raises(im_proc.ImageReadError, match=r"missing image: .*none\.png"):
        im_proc.read_image(str(tmp_path / "none.png"))
    Image.new("L", (50, 40)).save(tmp_path / "warn.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with caplog.at_level("WARNING", logger="util.image"):
        assert im_proc.read_image(str(tmp_path / "warn.png"))[0].shape == (40, 50)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'warn.png'}: 50×40 = 2000 pixels is over Pillow's decompression-bomb warning limit (1500); "
        f"decoding it anyway"]


# ----------------------------------------------------------------------------------------------------------------
# Annotation readers


def test_compressed_rle_decoder_matches_pycocotools():
    from pycocotools import mask as cocomask

    m = np.zeros((37, 23), np.uint8, order="F")
    m[3:30, 5:9] = 1
    m[10, :] = 1
    rle = cocomask.encode(m)
    runs, prev, count = [], 0, 0
    for v in m.flatten(order="F"):
        if v != prev:
            runs.append(count)
            prev, count = v, 0
        count += 1
    runs.append(count)
    assert refer.rle_string_counts(rle["counts"].decode()) == runs
    assert refer.segmentation_problem({"size": [37, 23], "counts": rle["counts"].decode()}) is None
    assert "ends inside a number" in refer.segmentation_problem({"size": [37, 23], "counts": "1o"})
    assert "character" in refer.segmentation_problem({"size": [37, 23], "counts": "12 3"})


@pytest.mark.parametrize("seg,problem", [
    ([[1, 1, 5, 1]], "polygon 0 has 4 coordinates"),
    ([[1, 1, 5, 1, 5, 5, 9]], "polygon 0 has 7 coordinates"),
    ([], "empty polygon list"),
    ([[1, 1, 5, float("nan"), 5, 5]], "polygon 0 is not a list of finite numbers"),
    ({"size": [4, 4], "counts": [3, 20]}, "RLE runs sum to 23, not height × width = 16"),
    ({"size": [4, 4], "counts": [-1, 17]}, "negative"),
    ({"size": [4], "counts": [16]}, "RLE size [4] is not [height, width]"),
    ("x", "segmentation is a str"),
])
def test_segmentations_pycocotools_cannot_decode_are_described(seg, problem):
    assert problem in refer.segmentation_problem(seg)


def test_vocabulary_bom_encoding_and_repeated_special_tokens(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(SPECIALS + WORDS).encode())
    assert load_vocab_dict_from_file(bom)["<pad>"] == 0
    latin = tmp_path / "latin.txt"
    latin.write_bytes("\n".join(SPECIALS + ["caf\xe9"]).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: line 5 is not UTF-8 \(byte 0xe9\)"):
        load_vocab_dict_from_file(latin)
    again = tmp_path / "again.txt"
    again.write_text("\n".join(SPECIALS + ["man", "<unk>"]))
    with pytest.raises(ValueError, match=r"again\.txt: <unk> appears again on line 6 \(it must only be line 4\)"):
        load_vocab_dict_from_file(again)
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join(["<pad>", "<eos>", "<go>", "<unk>"]))
    with pytest.raises(ValueError, match=r"must start with <pad>, <go>, <eos>, <unk> .*; line 2 is '<eos>'"):
        load_vocab_dict_from_file(swapped)


def test_mat_masks_v73_missing_variable_and_wrong_shape(tmp_path):
    import h5py

    seg = np.array([[0, 1, 1], [2, 0, 1]], np.uint8)
    with h5py.File(tmp_path / "v73.mat", "w", userblock_size=512) as f:
        f["segimg_t"] = seg.T
    with open(tmp_path / "v73.mat", "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file".ljust(124) + b"\x00\x02IM")
    assert refer.load_referit_gt_mask(str(tmp_path / "v73.mat")).tolist() == (seg == 0).astype(np.float32).tolist()
    scipy.io.savemat(tmp_path / "other.mat", {"mask": seg})
    with pytest.raises(ValueError, match=r"other\.mat: no variable segimg_t"):
        refer.load_referit_gt_mask(str(tmp_path / "other.mat"))
    scipy.io.savemat(tmp_path / "cube.mat", {"segimg_t": np.zeros((2, 2, 2))})
    with pytest.raises(ValueError, match=r"cube\.mat: segimg_t is float64 \[2, 2, 2\], expected a 2-D numeric"):
        refer.load_referit_gt_mask(str(tmp_path / "cube.mat"))
    (tmp_path / "empty.mat").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.mat: not a readable \.mat file"):
        refer.load_referit_gt_mask(str(tmp_path / "empty.mat"))


# ----------------------------------------------------------------------------------------------------------------
# Tiny datasets in the real layouts


def write_vocab(path, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(SPECIALS + WORDS).encode())


def referit_root(root, queries, bom=False):
    """data/referit_query_test.json = ``queries``; a 30×20 RGB noise image and a .mat mask for every key."""
    data = root / "data"
    write_vocab(data / "vocabulary_referit.txt", bom=bom)
    (data / "referit" / "images").mkdir(parents=True)
    (data / "referit" / "mask").mkdir(parents=True)
    rng = np.random.default_rng(3)
    seg = np.ones((20, 30), np.uint8)
    seg[5:15, 8:20] = 0
    for key in queries:
        Image.fromarray(rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)).save(
            data / "referit" / "images" / (key.split("_")[0] + ".jpg"), quality=95)
        scipy.io.savemat(data / "referit" / "mask" / f"{key}.mat", {"segimg_t": seg})
    (data / "referit_query_test.json").write_text(json.dumps(queries))
    return data


SQUARE = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]


def coco_root(root, refs, annotations):
    """refcoco refs(unc).p / instances.json with ``refs`` and ``annotations``, one 24×32 JPEG per image_id."""
    write_vocab(root / "data" / "vocabulary_Gref.txt")
    folder = root / "external" / "refer" / "data" / "refcoco"
    folder.mkdir(parents=True)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    images = sorted({r["image_id"] for r in refs if isinstance(r, dict) and isinstance(r.get("image_id"), int)})
    (folder / "instances.json").write_text(json.dumps(
        {"images": [{"id": i, "height": 24, "width": 32} for i in images], "annotations": annotations,
         "categories": [{"id": 1, "name": "square"}]}))
    img_dir = root / "data" / "coco" / "images" / "train2014"
    img_dir.mkdir(parents=True)
    for i in images:
        Image.new("RGB", (32, 24), (90, 90, 90)).save(img_dir / refer.coco_image_name(i))


def ref(ref_id, ann_id, sents=("the man",), image_id=1, split="val"):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
            "sentences": [{"sent": s, "sent_id": 10 * ref_id + k} for k, s in enumerate(sents)]}


def ann(ann_id, seg=None, image_id=1):
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": seg or [SQUARE]}


# ----------------------------------------------------------------------------------------------------------------
# build_batches.py: every case in one driver subprocess


BB_DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import build_batches
for name, argv in json.load(open(sys.argv[1])):
    print("@@CASE " + name, file=sys.stderr, flush=True)
    try:
        rc = build_batches.main(argv)
    except SystemExit as e:
        rc = e.code
    print("@@RC " + name + " " + str(rc), file=sys.stderr, flush=True)
"""


def run_driver(tmp_path, driver, cases, stream):
    """Run ``cases`` [(name, argv)] through ``driver``; {name: (rc, lines)} of that case's output on ``stream``."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "driver.py").write_text(driver.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cases.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    results, name, lines = {}, None, []
    for line in getattr(proc, stream).splitlines():
        if line.startswith("@@CASE "):
            name, lines = line[7:], []
        elif line.startswith("@@RC "):
            results[name] = (int(line.rsplit(" ", 1)[1]), lines)
        else:
            lines.append(line)
    assert sorted(results) == sorted(c[0] for c in cases), out[-4000:]
    return results


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """Inputs for each build_batches case, the driver's results, and the folders to inspect afterwards."""
    tmp = tmp_path_factory.mktemp("bb")
    out = tmp / "out"
    cases = []

    def case(name, root, *extra, split="test", dataset="referit"):
        cases.append((name, ["-d", dataset, "-t", split, "--data-root", str(root), "--output-dir", str(out / name),
                             *extra]))

    # ReferIt: a 16-bit PNG stored as .jpg, a single-string query, malformed query values, bad masks, BOM vocabulary
    queries = {"1_1": ["the man", "red dog"], "2_1": "the left man", "3_1": 7, "4_1": None, "5_1": ["a", 3],
               "6_1": ["b"], "7_1": ["the dog"], "8_1": ["a man"]}
    data = referit_root(tmp / "referit", queries, bom=True)
    write_gray16(data / "referit" / "images" / "1.jpg", "PNG")
    scipy.io.savemat(data / "referit" / "mask" / "1_1.mat", {"segimg_t": (GRAY16 > 30000).astype(np.uint8)})
    scipy.io.savemat(data / "referit" / "mask" / "6_1.mat", {"other": np.zeros((20, 30))})
    (data / "referit" / "mask" / "7_1.mat").write_bytes(b"")
    (data / "referit" / "images" / "8.jpg").unlink()
    (data / "referit" / "images" / "8.jpg").mkdir()
    case("referit", tmp / "referit")
    listed = referit_root(tmp / "listed", {"1_1": ["x"]})
    (listed / "referit_query_test.json").write_text('[["1_1", "x"]]')
    case("query_list", tmp / "listed")
    bad_vocab = referit_root(tmp / "badvocab", {"1_1": ["x"]})
    (bad_vocab / "vocabulary_referit.txt").write_text("\n".join(SPECIALS + ["man", "<pad>"]))
    case("vocab_repeat", tmp / "badvocab")
    folder_vocab = referit_root(tmp / "foldervocab", {"1_1": ["x"]})
    (folder_vocab / "vocabulary_referit.txt").unlink()
    (folder_vocab / "vocabulary_referit.txt").mkdir()
    case("vocab_folder", tmp / "foldervocab")

    # COCO: bad ref entries, bad annotations and segmentations pycocotools cannot decode
    refs = [ref(1, 1, ("the man", "red dog")), ref(2, 2), ref(2, 1), {"ref_id": 3, "image_id": 1, "split": "val"},
            "junk", {**ref(4, 1), "sentences": [{"sent": "a dog"}, {"sent_id": 5}, {"sent": 17}]},
            ref(5, 3), ref(6, 4), ref(7, 5), ref(8, 6), ref(9, 99)]
    anns = [ann(1), ann(2, [[1, 1, 5, 1]]), {"id": "3", "image_id": 1, "segmentation": [SQUARE]},
            ann(4, {"size": [24, 32], "counts": [5, 10]}), ann(5, {"size": [24, 32], "counts": "1o"}),
            ann(6, {"size": [24, 32], "counts": [700, 68]})]
    coco_root(tmp / "coco", refs, anns)
    case("coco", tmp / "coco", dataset="unc", split="val")
    for name, mutate in (("refs_dict", lambda f: f.write_bytes(pickle.dumps({"refs": []}, protocol=2))),
                         ("refs_folder", lambda f: (f.unlink(), f.mkdir())),
                         ("instances_no_annotations", lambda f: (f.parent / "instances.json").write_text('{"a": 1}'))):
        coco_root(tmp / name, [ref(1, 1)], [ann(1)])
        mutate(tmp / name / "external" / "refer" / "data" / "refcoco" / "refs(unc).p")
        case(name, tmp / name, dataset="unc", split="val")

    # OS errors: the output folder is a file; --make-sample into a file; data root is a file
    (out / "out_is_file").mkdir(parents=True)
    (out / "out_is_file" / "referit").write_text("a file where a folder is expected")
    case("out_is_file", tmp / "referit")
    (tmp / "sample_file").write_text("x")
    cases.append(("make_sample_file", ["--make-sample", str(tmp / "sample_file" / "root")]))
    return {"results": run_driver(tmp, BB_DRIVER, cases, "stderr"), "out": out, "tmp": tmp}


def errors_of(lines):
    return [line for line in lines if ": ERROR: " in line]


def test_referit_16_bit_image_string_query_bad_values_and_masks(bb):
    rc, lines = bb["results"]["referit"]
    assert rc == 0 and not errors_of(lines)
    folder = bb["out"] / "referit" / "referit" / "test_batch"
    first = np.load(folder / "referit_test_0.npz")
    assert np.array_equal(first["im_batch"], np.repeat((GRAY16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    sents = [str(np.load(folder / f"referit_test_{n}.npz")["sent_batch"][0]) for n in range(3)]
    assert sents == ["the man", "red dog", "the left man"]          # "2_1": one query, not 12 characters
    query_file = bb["tmp"] / "referit" / "data" / "referit_query_test.json"
    warnings = [line for line in lines if ": WARNING: " in line]
    for key, kind in (("3_1", "int"), ("4_1", "NoneType"), ("5_1", "list holding a non-string")):
        assert f"build_batches: WARNING: {query_file}: region '{key}': queries must be a list of strings, got a " \
               f"{kind}" in warnings
    assert any(f"{query_file}: 1 region(s) hold a single string instead of a list (first: '2_1')" in w
               for w in warnings)
    assert any("6_1.mat: no variable segimg_t" in w and "unreadable mask" in w for w in warnings)
    assert any("7_1.mat: not a readable .mat file" in w for w in warnings)
    assert any("8.jpg (a folder, not an image file)" in w for w in warnings)
    summary = [line for line in lines if "samples written" in line][0]
    assert "3 bad query entry" in summary and "2 unreadable mask" in summary and "1 unreadable image" in summary
    assert not [f for f in os.listdir(folder) if not f.endswith(".npz")]


def test_coco_bad_refs_annotations_and_segmentations_are_skipped_and_counted(bb):
    rc, lines = bb["results"]["coco"]
    assert rc == 0 and not errors_of(lines)
    refs_path = bb["tmp"] / "coco" / "external" / "refer" / "data" / "refcoco" / "refs(unc).p"
    inst_path = refs_path.parent / "instances.json"
    expected = [f"{refs_path}: entry 2 (ref_id 2) repeats an earlier ref_id",
                f"{refs_path}: entry 3 (ref_id 3) ann_id None is not an integer",
                f"{refs_path}: entry 4 is a str, not a dict",
                f"{refs_path}: ref_id 4: sentence 1 has no string 'sent'",
                f"{refs_path}: ref_id 4: sentence 2 has no string 'sent'",
                f"{inst_path}: annotations[2] has no integer id",
                f"{inst_path}: annotation id 2: polygon 0 has 4 coordinates (need an even number, at least 6)",
                f"{inst_path}: annotation id 4: RLE runs sum to 15, not height × width = 768",
                f"{inst_path}: annotation id 5: compressed RLE string ends inside a number"]
    warnings = [line.split(": WARNING: ", 1)[1] for line in lines if ": WARNING: " in line]
    for message in expected:
        assert message in warnings
    summary = [line for line in lines if "samples written" in line][0]
    assert "9 bad annotation entry" in summary and "annotation 2 unusable in instances.json" in summary
    assert "annotation 99 not in instances.json" in summary
    folder = bb["out"] / "coco" / "unc" / "val_batch"
    sents = [str(np.load(folder / f"unc_val_{n}.npz")["sent_batch"][0]) for n in range(len(os.listdir(folder)))]
    assert sents == ["the man", "red dog", "a dog", "the man"]     # refs 1, 4 (one valid sentence) and 8


@pytest.mark.parametrize("name,message", [
    ("query_list", r"referit_query_test\.json: expected an object \{region key: \[queries\]\}, got a list"),
    ("vocab_repeat", r"vocabulary_referit\.txt: <pad> appears again on line 6"),
    ("vocab_folder", r"vocabulary file is a folder, not a file: .*vocabulary_referit\.txt$"),
    ("refs_dict", r"refs\(unc\)\.p: expected a list of refs, got a dict"),
    ("refs_folder", r"refs\(unc\)\.p: cannot read \(Is a directory\)"),
    ("instances_no_annotations", r"instances\.json: expected an object with 'annotations' and 'images' lists"),
    ("out_is_file", r"(File exists|Not a directory): .*out_is_file/referit"),
    ("make_sample_file", r"Not a directory: .*sample_file"),
])
def test_unreadable_annotations_and_os_errors_are_one_line_exit_1(bb, name, message):
    import re

    rc, lines = bb["results"][name]
    errors = errors_of(lines)
    assert rc == 1 and len(errors) == 1 and re.search(message, errors[0]), lines


# ----------------------------------------------------------------------------------------------------------------
# build_batches.py: injected OS errors, verified re-runs, TFRecord packing (in-process)


@pytest.fixture
def small_referit(tmp_path):
    referit_root(tmp_path / "root", {f"{i}_1": ["the man", "a dog"] for i in range(1, 4)})
    return ["-d", "referit", "-t", "test", "--data-root", str(tmp_path / "root"), "--output-dir",
            str(tmp_path / "out")], tmp_path / "out" / "referit" / "test_batch"


def one_error(caplog):
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_disk_full_mid_write_leaves_no_partial_file(small_referit, caplog, monkeypatch):
    argv, folder = small_referit
    real = np.lib.format.write_array
    calls = []

    def write_array(f, arr, **kw):
        calls.append(1)
        if len(calls) == 9:                       # the first array of the third file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, arr, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    assert build_batches.main(argv) == 1
    assert one_error(caplog) == f"No space left on device: {folder / 'referit_test_2.npz'}"
    assert sorted(os.listdir(folder)) == ["referit_test_0.npz", "referit_test_1.npz"]
    for f in os.listdir(folder):
        np.load(folder / f)["im_batch"]


@pytest.mark.parametrize("err,where", [(errno.EACCES, "replace"), (errno.EROFS, "makedirs")])
def test_permission_denied_and_read_only_name_the_path(small_referit, caplog, monkeypatch, err, where):
    argv, folder = small_referit
    real = getattr(os, where)

    def failing(*args, **kw):
        if where == "makedirs" and "test_batch" not in str(args[0]):
            return real(*args, **kw)
        raise OSError(err, os.strerror(err), str(args[-1] if where == "replace" else args[0]))

    monkeypatch.setattr(os, where, failing)
    assert build_batches.main(argv) == 1
    assert one_error(caplog) == f"{os.strerror(err)}: {folder / 'referit_test_0.npz' if where == 'replace' else folder}"
    assert not folder.exists() or not [f for f in os.listdir(folder) if ".tmp" in f]


def test_rerun_rewrites_truncated_and_stale_files(small_referit, caplog):
    argv, folder = small_referit
    assert build_batches.main(argv) == 0
    good = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    (folder / "referit_test_0.npz").write_bytes(good["referit_test_0.npz"][:700])
    stale = dict(np.load(folder / "referit_test_3.npz"))
    stale["text_batch"] = stale["text_batch"] + 1
    np.savez(folder / "referit_test_3.npz", **stale)
    caplog.clear()
    with caplog.at_level("INFO", logger="build_batches"):
        assert build_batches.main(argv) == 0
    assert "2 samples written, 4 already present" in caplog.text
    assert "rewrote 2 existing file(s) that were incomplete or of another build (first: " in caplog.text
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == good


def test_train_rerun_at_another_img_size_rewrites(tmp_path, caplog):
    root = tmp_path / "root"
    data = referit_root(root, {"1_1": ["the man"]})
    (data / "referit_query_trainval.json").write_text(json.dumps({"1_1": ["the man"]}))
    argv = ["-d", "referit", "-t", "trainval", "--data-root", str(root), "--output-dir", str(tmp_path)]
    assert build_batches.main([*argv, "--img-size", "16"]) == 0
    with caplog.at_level("INFO", logger="build_batches"):
        assert build_batches.main([*argv, "--img-size", "24"]) == 0
    assert "1 samples written, 0 already present" in caplog.text and "image uint8 [16, 16, 3]" in caplog.text
    assert np.load(tmp_path / "referit/trainval_batch/referit_trainval_0.npz")["im_batch"].shape == (24, 24, 3)


def test_tfrecord_refuses_a_corrupt_npz(small_referit, caplog):
    argv, folder = small_referit
    assert build_batches.main(argv) == 0
    (folder / "referit_test_6.npz").write_bytes(b"PK\x03\x04 not really")
    caplog.clear()
    assert build_batches.main([*argv, "--format", "tfrecord"]) == 1
    message = one_error(caplog)
    assert message.startswith("not packing TFRecords: ") and "referit_test_6.npz: unreadable .npz" in message
    assert message.endswith("delete that file and re-run build_batches.py")
    shards = folder.parent / "test_tfrecord"
    assert not shards.exists() or not os.listdir(shards)


# ----------------------------------------------------------------------------------------------------------------
# demo.py: one driver subprocess (a seeded RRN snapshot at 64×64, then every case through demo.main)


DEMO_DRIVER = """
import errno, json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
sys.path.insert(0, {repo!r})
start = time.time()
import tensorflow as tf
from PIL import Image
import demo
from models import build_model
from util.train import initialize_backbone

cases = json.load(open(sys.argv[1]))
model = build_model("RRN_model", image_size=64)
initialize_backbone(model.backbone, "random", 0)
tf.train.Checkpoint(model=model).write(cases[0][1][cases[0][1].index("-f") + 1] + "/unc_iter_0")
print("@@TIME setup " + str(round(time.time() - start, 1)), flush=True)
real_save = Image.Image.save


def failing_save(self, fp, *args, **kw):
    if "_overlay.png" in str(fp):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, fp, *args, **kw)


for name, argv in cases:
    print("@@CASE " + name, flush=True)
    Image.Image.save = failing_save if name == "disk_full" else real_save
    try:
        rc = demo.main(argv)
    except SystemExit as e:
        rc = e.code
    print("@@TIME " + str(round(time.time() - start, 1)), flush=True)
    print("@@RC " + name + " " + str(rc), flush=True)
"""


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    write_vocab(tmp / "vocab.txt")
    write_gray16(tmp / "gray16.png")
    Image.new("RGB", (10000, 10000), (40, 120, 200)).save(tmp / "huge.jpg", quality=50)
    bomb_png(tmp / "bomb.png")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp / "whole.jpg")
    (tmp / "cut.jpg").write_bytes((tmp / "whole.jpg").read_bytes()[:200])
    Image.fromarray(np.array([[np.nan, 1]], np.float32)).save(tmp / "nan.tif")
    (tmp / "a_file").write_text("x")
    for suffix in ("mask", "overlay"):
        (tmp / f"old_{suffix}.png").write_bytes(b"the previous result")
    common = ["--text", "the man", "-n", "RRN_model", "-f", str(tmp / "ckpt"), "-i", "0", "--img-size", "64",
              "--vocab-file", str(tmp / "vocab.txt")]
    cases = [(name, [*common, "--img", str(tmp / img), "--out", str(tmp / out), *extra]) for name, img, out, extra in (
        ("bomb", "bomb.png", "o_bomb", []),
        ("folder", ".", "o_folder", []),
        ("truncated", "cut.jpg", "o_cut", []),
        ("float_nan", "nan.tif", "o_nan", []),
        ("max_side_0", "whole.jpg", "o_zero", ["--max-side", "0"]),
        ("out_under_file", "whole.jpg", "a_file/o", []),
        ("disk_full", "gray16.png", "old", []),
        ("huge", "huge.jpg", "o_huge", []))]
    results = run_driver(tmp, DEMO_DRIVER, cases, "stdout")
    return {"results": results, "tmp": tmp}


@pytest.mark.parametrize("name,rc,message", [
    ("bomb", 1, r"^error: image too large: .*bomb\.png \(Image size \(200000000 pixels\) exceeds limit"),
    ("folder", 1, r"^error: unreadable image: .* \(a folder, not an image file\)$"),
    ("truncated", 1, r"^error: unreadable image: .*cut\.jpg \("),
    ("float_nan", 1, r"^error: unreadable image: .*nan\.tif \(float image holds NaN or infinity\)$"),
    ("out_under_file", 1, r"^error: (Not a directory|File exists): .*a_file"),
    ("disk_full", 1, r"^error: No space left on device: .*old_overlay\.png$"),
])
def test_demo_bad_inputs_are_one_line_exit_1(demo_runs, name, rc, message):
    import re

    got_rc, lines = demo_runs["results"][name]
    errors = [line for line in lines if line.startswith("error: ")]
    assert got_rc == rc and len(errors) == 1 and re.search(message, errors[0]), lines
    assert not [f for f in os.listdir(demo_runs["tmp"]) if ".tmp" in f]
    assert not list(demo_runs["tmp"].glob(f"o_{name}*"))


def test_demo_flag_out_of_range_is_exit_2_and_old_outputs_survive_a_full_disk(demo_runs):
    assert demo_runs["results"]["max_side_0"][0] == 2
    for suffix in ("mask", "overlay"):
        assert (demo_runs["tmp"] / f"old_{suffix}.png").read_bytes() == b"the previous result"


def test_demo_reads_16_bit_images_correctly(tmp_path):
    import demo

    write_gray16(tmp_path / "g.png")
    write_gray16(tmp_path / "g.tif", "TIFF")
    expected = np.repeat((GRAY16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    for name in ("g.png", "g.tif"):
        assert np.array_equal(demo.read_image(str(tmp_path / name), 1024), expected)


def test_demo_decodes_a_10000_pixel_photo_at_reduced_size(demo_runs):
    rc, lines = demo_runs["results"]["huge"]
    assert rc == 0, lines
    assert any(line.endswith("decoded at 1250×1250 (--max-side 1024); the mask and overlay have that size")
               for line in lines), lines
    assert any("over Pillow's decompression-bomb warning limit" in line for line in lines)
    assert Image.open(demo_runs["tmp"] / "o_huge_mask.png").size == (1250, 1250)
    assert Image.open(demo_runs["tmp"] / "o_huge_overlay.png").size[0] == 1250

    # Memory, in a fresh process that only decodes: the peak above the resident set after the imports. Within the
    # driver's process a case's peak also holds the model each case restores and whatever the previous cases left
    # for the allocator to reuse (it varied 270–600 MB between runs), so it cannot bound the image's share.
    code = f"""import sys
sys.path.insert(0, {str(REPO)!r})
import demo
status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) // 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the resident set now
before = status("VmRSS")
image = demo.read_image({str(demo_runs["tmp"] / "huge.jpg")!r}, 1024)
print(image.shape, status("VmHWM") - before)"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    shape, growth_mb = out.stdout.strip().rsplit(")", 1)
    # 16 MB measured; the same decode at full size (--max-side 20000) 954 MB here (17 GB before the reduced decoding)
    assert shape == "(1250, 1250, 3" and int(growth_mb) < 100, out.stdout


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_stops_with_one_line_and_a_rerun_completes(tmp_path, jobs):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while samples are being written."""
    import signal
    import time

    n = 120
    referit_root(tmp_path / "root", {f"{i}_1": ["the man"] for i in range(n)})
    argv = ["-d", "referit", "-t", "test", "--data-root", str(tmp_path / "root"), "--output-dir", str(tmp_path), "-j",
            jobs]
    folder = tmp_path / "referit" / "test_batch"
    proc = subprocess.Popen([sys.executable, str(REPO / "build_batches.py"), *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            not (folder.exists() and len([f for f in os.listdir(folder) if f.endswith(".npz")]) >= 8):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if ": ERROR: " in line] == [
        "build_batches: ERROR: interrupted: every .npz written so far is complete; run the same command again to "
        "continue"]
    done = os.listdir(folder)
    assert 8 <= len(done) < n and all(f.endswith(".npz") for f in done), done
    for f in done:
        np.load(folder / f)["im_batch"]
    assert build_batches.main(argv[:-2]) == 0 and len(os.listdir(folder)) == n


def test_visualization_pngs_are_whole_or_absent(tmp_path, monkeypatch):
    """``-v``: a PNG write that fails part-way (disk full) leaves no partial or temporary file, and an earlier
    complete visualisation of the same index stays as it was."""
    from util import evaluate

    rng = np.random.default_rng(0)
    sample = {"im_batch": rng.integers(0, 256, (8, 10, 3), dtype=np.uint8),
              "mask_batch": np.eye(8, 10, dtype=np.uint8), "sent_batch": np.array(["the man"])}
    folder = str(tmp_path / "vis")
    evaluate.save_visualization(folder, 0, sample, np.ones((8, 10)))
    before = {name: (tmp_path / "vis" / name).read_bytes() for name in os.listdir(folder)}
    assert sorted(before) == ["000000_gt.png", "000000_im.png", "000000_pred.png", "000000_sent.txt"]

    real_save = Image.Image.save

    def full_disk_on_pred(self, fp, *args, **kwargs):
        if "_pred" in str(fp):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_on_pred)
    with pytest.raises(OSError):
        evaluate.save_visualization(folder, 0, sample, np.zeros((8, 10)))
    after = sorted(os.listdir(folder))
    assert after == sorted(before), after
    assert (tmp_path / "vis" / "000000_pred.png").read_bytes() == before["000000_pred.png"]
