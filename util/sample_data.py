"""Deterministic miniature of the real datasets, written in the real file formats (for tests and smoke runs).

``make_sample(root)`` writes, under ``root`` (layout = the originals' default relative paths, so that
``build_batches.py --data-root root`` finds everything):

- ``data/coco/images/train2014/COCO_train2014_<id:012d>.jpg`` and, for refcoco, refcoco+ and refcocog,
  ``external/refer/data/<dataset>/instances.json`` (COCO polygons) + ``refs(unc).p`` / ``refs(google).p`` /
  ``refs(umd).p`` (pickle protocol 2, list of ref dicts with ref_id, ann_id, image_id, category_id, split,
  sentences[{sent, sent_id, tokens, raw}]). Splits: unc train/val/testA/testB, google train/val, umd train/val/test.
- ``data/referit/images/<imgid>.jpg``, ``data/referit/mask/<imgid>_<region>.mat`` (``segimg_t``, 0 = object) and
  ``data/referit_query_{trainval,test}.json``; the same images and queries as TRIS's pickled annotations
  ``data/referit/annotations/{train,test}.pickle`` (``_referit_entry``: hassanhub/MultiGrounding's format, one RLE
  per polygon, boxes x1, y1, x2, y2; train = the trainval images). The tiny objects' boxes are under TRIS's 5 %
  filter.
- ``data/vocabulary_Gref.txt`` / ``data/vocabulary_referit.txt`` (``<pad>``, ``<go>``, ``<eos>``, ``<unk>``, then
  every token of the sample sentences, sorted) and ``data/Gref_emb.npy`` / ``data/referit_emb.npy`` (float32
  [vocabulary lines, 300]; ``<pad>`` row zero, the others normal with std 0.3).
- ``data/bpe_simple_vocab_16e6.txt.gz``: a CLIP BPE merges file in the real format (``_write_clip_bpe``; TRIS).
- ``data/weights/bert-base-uncased/vocab.txt``: a BERT WordPiece vocabulary in the real format (``_write_bert_vocab``;
  SaG).

Scenes: 1–3 coloured shapes (circle, square, triangle) side by side on a striped, noisy background, JPEG sides of
64–160 px in portrait and landscape. Expressions name colour, shape, horizontal position and relative size ("red
circle on the left", "the bigger blue square"). Included on purpose: grayscale JPEGs, objects made of two polygons
("the two red squares"), tiny objects (3–4 px), RefCOCOg sentences longer than 20 tokens, and a ReferIt query
"." (tokenizes to 20 pads). Everything is a pure function of ``seed``.
"""
import json
import os
import pickle

import numpy as np
from PIL import Image, ImageDraw

from util.text import tokenize

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20),
          "purple": (150, 40, 170)}
GRAY_COLORS = {"white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
SPECIAL_TOKENS = ("<pad>", "<go>", "<eos>", "<unk>")
EMB_DIM = 300
EMB_STD = 0.3
N_COCO_IMAGES = 36
N_REFERIT_IMAGES = 14


def _shape_polygon(shape, cx, cy, r):
    """Flat [x1, y1, x2, y2, ...] polygon (floats, 2 decimals) of a shape centred at (cx, cy) with radius r."""
    if shape == "circle":
        t = np.arange(16) * (2 * np.pi / 16)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    else:
        pts = np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    return [round(float(v), 2) for v in pts.ravel()]


def _background(rng, h, w):
    """uint8 [h, w, 3] texture: a random base colour, diagonal stripes and Gaussian noise."""
    base = rng.integers(90, 170, size=3)
    yy, xx = np.mgrid[:h, :w]
    period = int(rng.integers(5, 12))
    stripes = ((xx + yy) // period) % 2 * 25
    noise = rng.normal(0, 12, size=(h, w, 3))
    return np.clip(base + stripes[..., None] + noise, 0, 255).astype(np.uint8)


def _make_scene(rng, idx):
    """One scene: dict(h, w, gray, objects=[dict(shape, color, polygons, area, cx)]) and its uint8 image.

    Objects sit in equal horizontal slots (so left/middle/right are true). Scene kinds cycle with ``idx``:
    every 5th is grayscale, every 7th has a tiny object, every 6th has a two-polygon object.
    """
    landscape = idx % 3 != 1
    long_side, short_side = int(rng.integers(100, 161)), int(rng.integers(64, 100))
    h, w = (short_side, long_side) if landscape else (long_side, short_side)
    gray = idx % 5 == 4
    palette = GRAY_COLORS if gray else COLORS
    n_obj = int(rng.integers(1, 4))
    colors = rng.choice(sorted(palette), size=n_obj, replace=n_obj > len(palette))
    img = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    slot_w = w / n_obj
    objects = []
    for k in range(n_obj):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = str(colors[k])
        cx = slot_w * (k + 0.5)
        max_r = min(slot_w, h) * 0.45
        if k == 0 and idx % 7 == 3:
            r = 1.5 + rng.random()
        else:
            r = max_r * (0.45 + 0.55 * rng.random())
        if k == 0 and idx % 6 == 2:
            shape = "square"
            r = min(r, h / 4 - 2)
            polys = [_shape_polygon(shape, cx, h * 0.25, r), _shape_polygon(shape, cx, h * 0.75, r)]
        else:
            polys = [_shape_polygon(shape, cx, h * (0.3 + 0.4 * rng.random()), r)]
        for p in polys:
            draw.polygon(p, fill=palette[color])
        objects.append({"shape": shape, "color": color, "polygons": polys, "area": len(polys) * r * r,
                        "cx": cx, "tiny": r < 3})
    im = np.asarray(img)
    if gray:
        im = np.asarray(img.convert("L"))
    return {"h": h, "w": w, "gray": gray, "objects": objects}, im


def _position(obj, scene):
    """'left', 'middle' or 'right' of the object's slot."""
    n = len(scene["objects"])
    k = scene["objects"].index(obj)
    if n == 1:
        return "middle"
    return "left" if k == 0 else "right" if k == n - 1 else "middle"


def _size_word(obj, scene):
    """'bigger' / 'smaller' relative to the mean area of the scene ('' for a single object)."""
    if len(scene["objects"]) == 1:
        return ""
    mean = np.mean([o["area"] for o in scene["objects"]])
    return "bigger" if obj["area"] >= mean else "smaller"


def _noun(obj):
    """'red circle', 'tiny green square' or 'two red squares'."""
    if len(obj["polygons"]) > 1:
        return f"two {obj['color']} {obj['shape']}s"
    return f"{'tiny ' if obj['tiny'] else ''}{obj['color']} {obj['shape']}"


def _expressions(obj, scene, style):
    """Referring expressions for one object; style 'unc' (with location), 'unc+' (no location words) or 'gref'
    (one long sentence of more than 20 tokens)."""
    pos, size, noun = _position(obj, scene), _size_word(obj, scene), _noun(obj)
    the_size = f"the {size} {noun}" if size else f"the {noun}"
    if style == "unc":
        return [f"{noun} on the {pos}", the_size]
    if style == "unc+":
        return [noun, the_size] if size else [noun]
    where = {"left": "on the left side", "right": "on the right side", "middle": "in the middle"}[pos]
    return [f"{the_size} which is {where} of the picture , drawn on a striped and noisy background "
            f"that has no other {obj['color']} {obj['shape']} anywhere in it"]


def _sentence_dict(sent, sent_id):
    """REFER sentence record: cleaned ``sent``, its ``tokens``, ``raw`` (capitalised, with a final period)."""
    return {"sent": sent, "sent_id": sent_id, "tokens": sent.split(), "raw": sent[:1].upper() + sent[1:] + "."}


def _coco_split(dataset_split_by, idx):
    """Split of image ``idx`` for a (dataset, splitBy) pair; deterministic and every split non-empty."""
    if dataset_split_by == "unc":
        return ("train", "train", "train", "val", "testA", "testB")[idx % 6]
    if dataset_split_by == "google":
        return ("train", "train", "train", "val")[idx % 4]
    return ("train", "train", "train", "val", "test")[idx % 5]


def _write_vocab(path, sentences):
    """Vocabulary file covering every token of ``sentences``; returns its lines."""
    words = sorted({w.strip() for s in sentences for w in tokenize(s)} - {""} - set(SPECIAL_TOKENS))
    lines = list(SPECIAL_TOKENS) + words
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def _write_clip_bpe(path, sentences):
    """A CLIP BPE merges file in the real format (gzip UTF-8 text: a version line, then ``clip_bpe.N_MERGES``
    merges "a b" in rank order; gzip header without a time stamp, so the bytes are a function of ``sentences``):
    first the merges that spell each word of the sentences (CLIP's cleanup and split) left to right, then pairs of
    single byte symbols up to CLIP's count. Ids therefore span CLIP's range (up to 49407) as real ones do; a model
    run on them needs CLIP's 49408-row token embedding."""
    import gzip

    from util import clip_bpe

    encoder = clip_bpe.bytes_to_unicode()
    merges, seen = [], set()

    def add(pair):
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)
    words = sorted({w for s in sentences for w in clip_bpe.split_words(clip_bpe.clean_text(s))})
    for word in words:
        symbols = [encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        merged = symbols[0]
        for symbol in symbols[1:]:
            add((merged, symbol))
            merged += symbol
    singles = list(encoder.values())
    for a in singles:
        for b in singles:
            if len(merges) == clip_bpe.N_MERGES:
                break
            add((a, b))
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges[:clip_bpe.N_MERGES])
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.encode("utf-8"))


def _write_bert_vocab(path, sentences):
    """A WordPiece ``vocab.txt`` laid out as bert-base-uncased's: [PAD] 0, [unused0…98] 1–99, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103, then the sorted basic tokens of ``sentences`` (lower-cased, accents stripped, punctuation
    split) and the pieces "##s", "##er", "##est"; one token per line."""
    from util.wordpiece import basic_tokens

    words = sorted({t for s in sentences for t in basic_tokens(s)})
    lines = (["[PAD]"] + [f"[unused{k}]" for k in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
             + ["##s", "##er", "##est"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _write_emb(path, n_rows, rng):
    """float32 [n_rows, 300] normal(0, EMB_STD) with a zero ``<pad>`` row 0."""
    emb = (rng.standard_normal((n_rows, EMB_DIM)) * EMB_STD).astype(np.float32)
    emb[0] = 0
    np.save(path, emb)


def _make_coco(root, rng):
    """COCO images, instances.json and refs pickles for refcoco / refcoco+ / refcocog; returns all sentences."""
    img_dir = os.path.join(root, "data", "coco", "images", "train2014")
    os.makedirs(img_dir, exist_ok=True)
    images, anns, scenes = [], [], []
    for i in range(N_COCO_IMAGES):
        scene, im = _make_scene(rng, i)
        image_id = 1000 + 37 * i
        Image.fromarray(im).save(os.path.join(img_dir, f"COCO_train2014_{image_id:012d}.jpg"), quality=90)
        images.append({"id": image_id, "height": scene["h"], "width": scene["w"],
                       "file_name": f"COCO_train2014_{image_id:012d}.jpg"})
        for obj in scene["objects"]:
            obj["ann_id"] = 50000 + len(anns)
            xs = [v for p in obj["polygons"] for v in p[0::2]]
            ys = [v for p in obj["polygons"] for v in p[1::2]]
            anns.append({"id": obj["ann_id"], "image_id": image_id, "category_id": SHAPES.index(obj["shape"]) + 1,
                         "segmentation": obj["polygons"], "area": float(obj["area"]), "iscrowd": 0,
                         "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
        scenes.append((image_id, scene))
    instances = {"images": images, "annotations": anns, "categories": CATEGORIES}
    all_sents = []
    for dataset, split_bys, style in (("refcoco", ("unc",), "unc"), ("refcoco+", ("unc",), "unc+"),
                                      ("refcocog", ("google", "umd"), "gref")):
        folder = os.path.join(root, "external", "refer", "data", dataset)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "instances.json"), "w") as f:
            json.dump(instances, f)
        for split_by in split_bys:
            refs, sent_id = [], 0
            for idx, (image_id, scene) in enumerate(scenes):
                for obj in scene["objects"]:
                    sents = []
                    for s in _expressions(obj, scene, style):
                        sents.append(_sentence_dict(s, sent_id))
                        sent_id += 1
                    all_sents += [d["sent"] for d in sents]
                    refs.append({"ref_id": 900 - len(refs) if dataset == "refcoco" else len(refs),
                                 "ann_id": obj["ann_id"], "image_id": image_id,
                                 "category_id": SHAPES.index(obj["shape"]) + 1,
                                 "split": _coco_split(split_by, idx), "sentences": sents,
                                 "sent_ids": [d["sent_id"] for d in sents], "file_name": ""})
            with open(os.path.join(folder, f"refs({split_by}).p"), "wb") as f:
                pickle.dump(refs, f, protocol=2)
    return all_sents


def _save_mat(path, segimg_t):
    """MATLAB 5 file with variable ``segimg_t``; the 116-byte text header (which scipy stamps with the current
    time) is replaced by a fixed one so that the file is reproducible."""
    import io
    import scipy.io
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"segimg_t": segimg_t})
    data = buf.getvalue()
    header = b"MATLAB 5.0 MAT-file, written by util/sample_data.py".ljust(116)
    with open(path, "wb") as f:
        f.write(header + data[116:])


def _polygon_rle(polygon, h, w):
    """The COCO RLE of one polygon drawn as the .mat masks draw it: {'size': [h, w], 'counts': str}."""
    from pycocotools import mask as cocomask

    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    rle = cocomask.encode(np.asfortranarray(np.asarray(canvas, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _referit_entry(img_id, scene, object_queries, first_ref_id):
    """One image of TRIS's ReferIt pickle as MultiGrounding's ``Data._get_dict_refer`` writes it: {'image_id',
    'size', 'queries', 'annotations', 'captions'}, one annotation per unique query of each object with 'bbox'
    [[int(x), int(y), int(x + w), int(y + h)]] of the object's COCO box and 'segmentation' one RLE per polygon."""
    h, w = scene["h"], scene["w"]
    annotations = []
    for k, (obj, qs) in enumerate(zip(scene["objects"], object_queries)):
        segmentation = [_polygon_rle(p, h, w) for p in obj["polygons"]]
        canvas = Image.new("L", (w, h), 0)
        for p in obj["polygons"]:
            ImageDraw.Draw(canvas).polygon(p, fill=1)
        ys, xs = np.nonzero(np.asarray(canvas))
        x, y, bw, bh = float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
        for query in dict.fromkeys(qs):
            annotations.append({"ref_id": first_ref_id + k, "image_id": img_id, "query": query,
                                "category": {SHAPES.index(obj["shape"]) + 1},
                                "bbox": [[int(x), int(y), int(x + bw), int(y + bh)]],
                                "bbox_norm": [[x / w, y / h, (x + bw) / w, (y + bh) / h]],
                                "segmentation": segmentation, "idx": list(range(len(query.split()))),
                                "image_size": (h, w, 3)})
    return {"image_id": img_id, "size": (h, w, 3), "queries": [a["query"] for a in annotations],
            "annotations": annotations, "captions": []}


def _make_referit(root, rng):
    """ReferIt images, .mat masks, the trainval/test query files and TRIS's train/test annotation pickles; returns
    all queries."""
    img_dir = os.path.join(root, "data", "referit", "images")
    mask_dir = os.path.join(root, "data", "referit", "mask")
    annotation_dir = os.path.join(root, "data", "referit", "annotations")
    for folder in (img_dir, mask_dir, annotation_dir):
        os.makedirs(folder, exist_ok=True)
    queries = {"trainval": {}, "test": {}}
    tris_annotations = {"train": {}, "test": {}}
    n_refs = 0
    for i in range(N_REFERIT_IMAGES):
        scene, im = _make_scene(rng, 100 + i)
        img_id = 2000 + 13 * i
        Image.fromarray(im).save(os.path.join(img_dir, f"{img_id}.jpg"), quality=90)
        split = "test" if i % 3 == 2 else "trainval"
        object_queries = []
        for k, obj in enumerate(scene["objects"]):
            key = f"{img_id}_{k + 1}"
            canvas = Image.new("L", (scene["w"], scene["h"]), 1)
            draw = ImageDraw.Draw(canvas)
            for p in obj["polygons"]:
                draw.polygon(p, fill=0)
            _save_mat(os.path.join(mask_dir, key + ".mat"), np.asarray(canvas, np.uint8))
            qs = [_noun(obj), f"{obj['shape']} on the {_position(obj, scene)}"]
            if i == 2 and k == 0:
                qs.append(".")
            queries[split][key] = qs
            object_queries.append(qs)
        tris_split = "test" if split == "test" else "train"
        tris_annotations[tris_split][str(img_id)] = _referit_entry(img_id, scene, object_queries, 3000 + n_refs)
        n_refs += len(object_queries)
    for split, content in tris_annotations.items():
        with open(os.path.join(annotation_dir, f"{split}.pickle"), "wb") as f:
            pickle.dump(content, f, protocol=4)
    all_q = []
    for split, qd in queries.items():
        with open(os.path.join(root, "data", f"referit_query_{split}.json"), "w") as f:
            json.dump(qd, f)
        all_q += [q for qs in qd.values() for q in qs]
    return all_q


def make_sample(root, seed=0):
    """Write the whole sample dataset under ``root`` (created if needed); returns ``root``. Deterministic in
    ``seed``: the same seed gives byte-identical files."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    coco_sents = _make_coco(root, rng)
    referit_q = _make_referit(root, rng)
    for name, sents in (("Gref", coco_sents), ("referit", referit_q)):
        lines = _write_vocab(os.path.join(root, "data", f"vocabulary_{name}.txt"), sents)
        _write_emb(os.path.join(root, "data", f"{name}_emb.npy"), len(lines), rng)
    _write_clip_bpe(os.path.join(root, "data", "bpe_simple_vocab_16e6.txt.gz"), coco_sents + referit_q)
    _write_bert_vocab(os.path.join(root, "data", "weights", "bert-base-uncased", "vocab.txt"), coco_sents + referit_q)
    return root
