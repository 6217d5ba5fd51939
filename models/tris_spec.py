"""Registry entry for TRIS (``models.tris``): ``-n TRIS_stage1`` / ``-n TRIS_stage2`` for ``-m test`` (and the demo /
export paths that go through a spec) straight from a TRIS ``.pth`` or from our converted TF2 checkpoint.

The interface is ``models.ReSTRSpec``'s. Evaluation follows ``validate.validate`` per sample of our eval ``.npz``
files: the original-size RGB image is stretched to S×S with PIL bilinear (what torchvision's ``F.resize`` does to a
PIL image; antialiased when shrinking; ImageNet normalisation), the raw sentence (``sent_batch``) is tokenized with
CLIP's BPE (``util.clip_bpe``, the merges file ``bpe_file``) and cut to 20 ids, the map goes back to the original
size with bilinear align_corners True, / (max + 1e-5), mask = > 1e-9 (stage 1: any positive response; stage 2:
logits > 0 and, as coded, a map whose maximum is negative flips sign). The predictor also keeps TRIS's own
per-sentence results (I, U, Hit, PointM) in ``predict.tris_results`` / ``spec.last_results`` for ``tris.summarize``.
With ``--data-root`` the samples come from the refer files instead (``test_source``: ``validate.validate``'s data,
gt box included; ReferIt: TRIS's annotation pickle, ``models.tris_referit``); the ``.npz`` samples carry no box, so
Hit is then left out.

Training has its own recipe (``train_loop``, the generic loop's hook; ``train_input_problem`` checks the command
line): stage 1 in ``models.tris_train`` (the refer files read directly, in-batch texts, negatives, the frozen CLIP
ViT-B/32); stage 2 there too (IRNet's pseudo masks from ``<--data-root>/output/<dataset>_<splitBy>/ins_seg``,
``tris.stage2_losses``).
"""
import logging
import os

import numpy as np
import tensorflow as tf

from models import ModelSpec

log = logging.getLogger("models")
RANDOM_INIT = "random"
BPE_FILE_ENV = "REFSEG_CLIP_BPE"
DEFAULT_BPE_FILE = "./data/bpe_simple_vocab_16e6.txt.gz"
RELEASE_NAMES = {"unc": "refcoco", "unc+": "refcoco+", "Gref": "refcocog_google", "referit": "referit"}


def stretch_rgb(rgb_uint8, size):
    """``dataset/transform.py``'s ``F.resize(PIL image, (size, size))``: PIL bilinear stretch (aspect not kept,
    antialiased when shrinking, uint8 result) of one RGB image [H, W, 3] → [size, size, 3] uint8."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(rgb_uint8, np.uint8)).resize((size, size), Image.BILINEAR))


class TRISSpec(ModelSpec):
    """TRIS stage 1 or stage 2 (``models.tris``): the original's evaluation (``validate.validate``), its
    ``.pth`` checkpoints and our TF2 snapshots. ``defaults``: a ``models.Defaults`` (TRIS: 15 epochs, lr 5e-5,
    batch 48, size 320)."""
    reads_sentences = True         # the predictor tokenizes ``sent_batch`` itself (CLIP BPE), not ``text_batch``
    batch_family = "tf1"           # evaluation .npz files (training reads the refer files directly)

    def __init__(self, name, defaults, stage, bpe_file=None):
        self.name, self.defaults, self.stage = name, defaults, stage
        self.bpe_file = bpe_file or os.environ.get(BPE_FILE_ENV, DEFAULT_BPE_FILE)
        self.score_key = self.probability_key = "output"

    def bpe_path(self, cfg):
        """The merges file: ``$REFSEG_CLIP_BPE`` if set, else ``<--data-dir>/bpe_simple_vocab_16e6.txt.gz``."""
        data_dir = getattr(cfg, "data_dir", None)
        if os.environ.get(BPE_FILE_ENV) or not data_dir:
            return self.bpe_file
        return os.path.join(data_dir, os.path.basename(DEFAULT_BPE_FILE))

    def _model_class(self):
        from models import tris

        return tris.TRISStage1 if self.stage == 1 else tris.TRISStage2

    def default_init_weights(self, weights):
        return RANDOM_INIT

    def snapshot_candidates(self, folder, dataset, weights, iteration):
        """Our ``<dataset>_iter_<N>``, then TRIS's released name ``stage<k>_<name>.pth`` (``unc`` → refcoco,
        ``unc+`` → refcoco+, ``Gref`` → refcocog_google, ``referit``; refcocog_umd has no dataset here)."""
        return [os.path.join(folder, f"{dataset}_iter_{iteration}"),
                os.path.join(folder, f"stage{self.stage}_{RELEASE_NAMES.get(dataset, dataset)}.pth")]

    def build(self, vocab_size=None, embedding=None, image_size=320, weights=None, seed=0):
        """The full-size model (CLIP RN50, h 1024); CLIP weights zero until loaded, heads with torch's default
        initialisers from ``seed``."""
        model = self._model_class()(rng=np.random.default_rng(seed))
        model.model_name = self.name
        return model

    def initialize(self, model, path, seed):
        """``random``: keep the built values; else a ``.pth`` TRIS checkpoint of this stage (all weights, strict)."""
        if path == RANDOM_INIT:
            log.info("Keeping the initial TRIS weights (seed %d): no pretrained weights", seed)
            return
        self.restore(model, path)

    def _state_dict(self, path):
        from models import tris
        from util.pth import load_pth

        return tris.model_state_dict(load_pth(path), path)

    def restore(self, model, path, optimizer=None):
        """Our TF2 snapshot (with the optimizer), or a TRIS ``.pth`` (weights only, strict)."""
        from util.snapshots import restore_model

        if path.endswith(".pth"):
            model.load_state_dict(self._state_dict(path), path)
            return {"format": "pth"}
        return restore_model(model, path, optimizer)

    def load_trained(self, path, cfg):
        """A ``.pth`` builds the model its tensors describe (strict; a checkpoint of the other stage is refused in
        one line naming its keys); our snapshot needs the full-size model of this entry."""
        if path.endswith(".pth"):
            model = self._model_class().from_state_dict(self._state_dict(path), path)
        else:
            model = self.build(seed=getattr(cfg, "seed", 0))
            self.restore(model, path)
        model.model_name = self.name
        model.bpe_file = self.bpe_path(cfg)
        return model

    def test_source(self, cfg):
        """``-m test``'s samples (``util.evaluate.test``'s hook): None without ``--data-root`` (the ``.npz``
        batches); with it, ``validate.validate``'s data read from the refer files (``models.tris_train.
        ReferEvalSet``: every sentence of every ``-t`` ref, the gt mask and box as ``ReferDataset`` builds them), or
        for ``-d referit`` ``validate_referit.validate``'s from TRIS's annotation pickle (``models.tris_referit.
        ReferItEvalSet``: the annotations whose box exceeds 5 % of the image), as (names, load(name) → sample, the
        file read). A problem with ``-d`` or the files is a one-line ValueError."""
        if cfg.data_root is None:
            return None
        command = f"-m test -n {self.name} --data-root"
        if cfg.dataset == "referit":
            return self._referit_source(command, cfg)
        from models import tris_train

        problem = tris_train.refer_input_problem(command, self, cfg, cfg.data_root)
        if problem:
            raise ValueError(problem)
        refs = tris_train.ReferEvalSet(cfg.data_root, cfg.dataset, cfg.split, self.tokenizer(self.bpe_path(cfg)))
        names = [f"{refs.refs_path} ref_id {refs.ref_ids[i]} sentence {j}" for i, j in refs.keys]
        where = dict(zip(names, refs.keys))
        log.info("%s: %d sentences of %d %s refs from %s", self.name, len(names), len(refs), cfg.split,
                 refs.refs_path)
        return names, lambda name: refs.sample(*where[name]), refs.refs_path

    def _referit_source(self, command, cfg):
        """``test_source`` for ``-d referit``: ``models.tris_referit.ReferItEvalSet`` of ``-t``."""
        from models import tris_referit

        problem = tris_referit.referit_input_problem(command, self, cfg, cfg.data_root)
        if problem:
            raise ValueError(problem)
        images = tris_referit.ReferItEvalSet(cfg.data_root, cfg.split)
        names = [images.name(i, a) for i, a in images.keys]
        where = dict(zip(names, images.keys))
        log.info("%s: %d sentences of %d ReferIt %s images from %s (%d annotations with a box of at most %g of "
                 "the image left out, as the original)", self.name, len(names), len(images.image_keys), cfg.split,
                 images.path, images.left_out, tris_referit.MIN_BOX_FRACTION)
        return names, lambda name: images.sample(*where[name]), images.path

    def input_numpy(self, rgb_uint8):
        """ImageNet normalisation of uint8 RGB (already at the network size), float32."""
        from models import tris

        return tris.preprocess(np.asarray(rgb_uint8)).numpy()

    def display_rgb(self, network_input):
        from models import tris

        return np.clip((np.asarray(network_input, np.float64) * tris.IMAGENET_STD + tris.IMAGENET_MEAN) * 255, 0, 255)

    def forward(self, model, images, words, training=False):
        """{"output": the response map (stage 1) or logits (stage 2) [B, S', S', 1]} (``score_key``)."""
        return {"output": model(images, words, training=training)}

    def backbone(self, model, images):
        """c4 of the CLIP RN50 (the attention pool is skipped)."""
        return model.backbone.encode_image(images, attnpool=False)[3]

    def losses(self, model):
        raise NotImplementedError(f"{self.name}: TRIS trains through train_loop, not the generic .npz step")

    def train_input_problem(self, cfg):
        """Why ``-m train`` cannot start (one line, at parse time), else None (``tris_train.train_input_problem``)."""
        from models import tris_train

        return tris_train.train_input_problem(self, cfg)

    def train_loop(self, cfg):
        """``-m train``: stage 1 as ``train_stage1.py`` trains it (``models.tris_train.train_stage1``), stage 2 as
        ``train_stage2.py`` on IRNet's pseudo masks (``models.tris_train.train_stage2``)."""
        from models import tris_train

        (tris_train.train_stage1 if self.stage == 1 else tris_train.train_stage2)(self, cfg)

    def tokenizer(self, path=None):
        """CLIP's BPE over the merges file ``path`` (default: this entry's)."""
        from util import clip_bpe

        return clip_bpe.ClipTokenizer(path or self.bpe_file)

    def original_metrics(self):
        """``validate.validate``'s figures (×100) over the predictor's last run (``tris.summarize``): mIoU (what the
        paper reports), oIoU, Hit (argmax pixel inside the gt box) and PointM (the original's HitM: gt mask at that
        pixel). Hit only when every sample carried its box (``test_source``); otherwise it is left out and one log
        line says why (the ``.npz`` samples have no box)."""
        from models import tris

        results = getattr(self, "last_results", None)
        if not results:
            return None
        summary = tris.summarize(results)
        metrics = {"title": "TRIS validate()", "mIoU": summary["mIoU"], "oIoU": summary["oIoU"]}
        if self.boxless:
            log.info("TRIS Hit not available: %d of %d samples have no ground-truth box (the .npz batches carry "
                     "none; -m test --data-root DIR evaluates from the refer files with boxes)", self.boxless,
                     len(results))
        else:
            metrics["Hit"] = summary["hit"]
        metrics["PointM"] = summary["hitm"]
        return metrics

    def serving_tokenizer(self, cfg):
        """The SavedModel's tokenizer: CLIP's BPE over ``bpe_path(cfg)`` cut to 20 ids, in graph ops with its
        tables saved in the SavedModel (``util.clip_bpe_graph``)."""
        from util.clip_bpe_graph import ClipBPETokenizer

        return ClipBPETokenizer(self.bpe_path(cfg))

    def serving_input(self, image, image_size):
        """One uint8 RGB image [H, W, 3] → (network input [1, S, S, 3], the stretched image as uint8 [S, S, 3]):
        ``stretch_rgb`` (Pillow's bilinear, exactly: ``util.pil_resize``) and ``tris.preprocess`` as a 256-level
        per-channel table of its float32 values (grappler would rewrite x / 255 inside a graph, 1 ulp off), so the
        input equals the test loop's."""
        from models import tris
        from util.pil_resize import pil_resize_bilinear

        display = tf.ensure_shape(pil_resize_bilinear(image, image_size, image_size), [image_size, image_size, 3])
        levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
        table = (levels - np.float32(tris.IMAGENET_MEAN)) / np.float32(tris.IMAGENET_STD)
        channels = tf.range(3)[None, None, :] + 3 * tf.cast(display, tf.int32)
        network_input = tf.gather(tf.reshape(tf.constant(table), [-1]), channels)
        return network_input[None], display

    def serving_output(self, outputs, height, width):
        """The evaluation's mask at height × width (uint8) and the max-normalised map at S×S, from ``forward``'s
        outputs."""
        from util.torch_image import resize_bilinear_align_corners
        from models import tris

        outputs = outputs["output"]
        pred = resize_bilinear_align_corners(outputs, (height, width))[0, :, :, 0]
        pred = pred / (tf.reduce_max(pred) + 1e-5)
        return tf.cast(pred > tris.EVAL_THRESHOLD, tf.uint8), (outputs / (tf.reduce_max(outputs) + 1e-5))[0, :, :, 0]

    def predictor(self, model, image_size, dcrf):
        """fn(samples) → [(mask, None)]: ``validate.validate`` per sample (see the module docstring). A sample with
        ``boxes`` ([K, 4] x1, y1, x2, y2: the refer-file samples of ``test_source``) gets Hit; one without (an
        ``.npz`` sample) is counted in ``self.boxless`` and its hit is 0 and not reported. The gt is the sample's
        ``target`` when it has one (ReferIt's summed RLEs: a pixel of value 2 is no PointM hit), else
        ``mask_batch`` > 0. TRIS's per-sentence
        figures (``tris.evaluate_sentence``'s ``I``, ``U``, ``hit``, ``hitm``, ``max_loc``; the maps are not kept)
        accumulate in ``predict.tris_results``, also reachable as ``self.last_results`` (for ``original_metrics``
        after ``util.evaluate.evaluate``, which builds the predictor itself)."""
        from models import tris
        from util import clip_bpe, data

        tokenizer = self.tokenizer(getattr(model, "bpe_file", None))
        forward = tf.function(lambda images, ids: model(images, ids), autograph=False)

        def predict(samples):
            out = []
            for s in samples:
                images = tris.preprocess(stretch_rgb(s["im_batch"], image_size)[None])
                ids = clip_bpe.tris_ids(tokenizer.tokenize(data.sentence_of(s)))
                output = forward(images, tf.constant([ids], tf.int32)).numpy()[0, :, :, 0]
                boxes = s.get("boxes")
                self.boxless += boxes is None
                target = s["target"] if "target" in s else s["mask_batch"] > 0
                result = tris.evaluate_sentence(output, target, np.zeros((0, 4)) if boxes is None else boxes)
                predict.tris_results.append({k: result[k] for k in ("I", "U", "hit", "hitm", "max_loc")})
                out.append((result["hard_pred"].astype(bool), None))
            return out
        predict.tris_results = self.last_results = []
        self.boxless = 0
        return predict
