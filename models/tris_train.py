"""TRIS stage-1 training (``train_stage1.main`` / ``train_one_epoch``) for ``trainval_model.py -m train -n
TRIS_stage1``, reached through ``TRISSpec.train_loop`` (the generic loop's hook for models with their own recipe).

Data (``dataset/ReferDataset.py`` with ``eval_mode=False``, ``negative_samples=3``): the refer files are read
directly with our restricted readers (``util.refer.Refer``: ``<data-root>/external/refer/data/<refcoco|refcoco+|
refcocog>/refs(<unc|google>).p`` and ``instances.json``; images ``<data-root>/data/coco/images/train2014/<file_name>``,
build_batches.py's ``--data-root`` layout). One item per ref (ascending ref_id), each epoch a seeded shuffle, batches
of ``-bs`` without drop_last. Per item: the image stretched to S×S (PIL bilinear) and ImageNet-normalised, ONE
sentence drawn at random (CLIP BPE, cut to 20 ids), and 3 negative sentences: from the other refs of the same image
in the split (drawn with replacement; as coded, the image's ref list is read in file order only up to the first ref of
another split), else random sentences of the whole split that differ from the drawn one. The draws come from a
generator seeded by (``--seed``, epoch, iteration), so a resumed run sees the batches an uninterrupted one would.

Objective: ``models.tris.stage1_losses`` (w1·MaxLoss of the frozen CLIP ViT-B/32 on the masked foreground + w4·the
multilabel soft margin with the background channel, GAP+GMP and focal term + w5·the negatives' −log(1 − cos)). The
frozen ViT-B/32 comes from ``<--data-dir>/weights/ViT-B-32.pth``: CLIP's ViT-B/32 state_dict as ``torch.save``
writes it (OpenAI's ``ViT-B-32.pt`` is a TorchScript archive, which this reader does not open: save its
``state_dict()`` once). It runs in float32 (the original: float16 on a GPU, float32 on CPU).

Optimizer (``train_stage1.main``): ``util.adamw.AdamW`` with group 0 = every backbone parameter at lr·0.1 and group
1 = vis_project, lan_project, attn_fusion at lr, weight decay 0.01; ``TRIS.logit_scale`` in no group. LambdaLR factor
(1 − t/(len(loader)·epochs))^0.9 stepped every iteration, with len(loader)·epochs = ``-i`` (pass ``-i`` = epochs ×
ceil(train refs / batch) for the original's schedule). Initial weights: a TRIS stage-1 ``.pth`` (``--init-weights``;
the model takes its sizes from it). OpenAI's CLIP RN50 TorchScript archive, TRIS's starting point, is not read.
Loop and snapshots: ``util.loop.run_training`` (ours: atomic, model + optimizer state, resume from the newest complete
and finite one).
No per-epoch validation or best-mIoU/Hit checkpoints (evaluate a snapshot with ``-m test``).
"""
import logging
import math
import os

import numpy as np
import tensorflow as tf

log = logging.getLogger("train")

COCO_SOURCES = {"unc": ("refcoco", "unc"), "unc+": ("refcoco+", "unc"), "Gref": ("refcocog", "google")}
NEGATIVE_SAMPLES = 3     # scripts/train_stage1.sh --negative_samples
LR_MULTI = 0.1           # args.py --lr_multi
WEIGHT_DECAY = 0.01      # args.py --weight_decay
VIT_FILE = os.path.join("weights", "ViT-B-32.pth")


def refer_root(data_root):
    return os.path.join(data_root, "external", "refer", "data")


def image_root(data_root):
    return os.path.join(data_root, "data", "coco", "images", "train2014")


def vit_path(cfg):
    """The frozen CLIP ViT-B/32: ``<--data-dir>/weights/ViT-B-32.pth``."""
    return os.path.join(cfg.data_dir, VIT_FILE)


def train_input_problem(spec, cfg):
    """What makes a TRIS training command line unusable before any work starts (one line), else None: stage 2,
    ReferIt, the refer pickle, the image folder, the BPE merges file, the ViT-B/32 file or the initial weights
    missing."""
    if spec.stage != 1:
        return f"-m train is not available for -n {spec.name} yet (stage 2 needs IRNet pseudo masks)"
    if cfg.dataset not in COCO_SOURCES:
        return f"-m train -n {spec.name} reads RefCOCO-style refer files: -d unc, unc+ or Gref (not {cfg.dataset})"
    source, split_by = COCO_SOURCES[cfg.dataset]
    refs = os.path.join(refer_root(cfg.data_root), source, f"refs({split_by}).p")
    if not os.path.isfile(refs):
        return f"--data-root {cfg.data_root}: {refs} not found (the refer data; see data/README.md)"
    if not os.path.isdir(image_root(cfg.data_root)):
        return f"--data-root {cfg.data_root}: image folder {image_root(cfg.data_root)} not found"
    if not os.path.isfile(spec.bpe_path(cfg)):
        return f"{spec.bpe_path(cfg)}: no such file (CLIP's BPE merges; see data/README.md)"
    if not os.path.isfile(vit_path(cfg)):
        return (f"{vit_path(cfg)}: no such file (the frozen CLIP ViT-B/32 of the stage-1 loss: the state_dict of "
                f"OpenAI's ViT-B-32.pt saved with torch.save; see data/README.md)")
    if not (cfg.init_weights.endswith(".pth") and os.path.isfile(cfg.init_weights)):
        return (f"--init-weights {cfg.init_weights}: expected an existing TRIS stage-1 .pth (OpenAI's CLIP RN50 "
                f"TorchScript archive is not read; the CLIP weights cannot start from zero)")
    return None


class ReferTrainSet:
    """``ReferDataset(split, eval_mode=False, negative_samples=3)`` over our restricted refer reader.

    ``ids[i]`` int32 [k_i, 20] (every sentence of ref i, ``clip.tokenize(s)[:20]``), ``sentences[i]`` the raw
    strings, ``image_paths[i]``, ``neg_pool[i]`` the indices its negatives are drawn from (empty: whole split)."""

    def __init__(self, data_root, dataset, split, tokenizer, size, negatives=NEGATIVE_SAMPLES):
        from util import clip_bpe
        from util.refer import Refer, coco_image_name

        source, split_by = COCO_SOURCES[dataset]
        refer = Refer(refer_root(data_root), source, split_by)
        for problem in refer.problems:
            log.warning("left out: %s", problem)
        self.size, self.negatives = size, negatives
        ref_ids = [r for r in refer.ref_ids(split) if refer.refs[r]["sentences"]]
        if not ref_ids:
            raise ValueError(f"{refer_root(data_root)}/{source}: no {split} ref with a sentence")
        index_of = {r: i for i, r in enumerate(ref_ids)}
        self.sentences = [[s["sent"] for s in refer.refs[r]["sentences"]] for r in ref_ids]
        self.ids = [np.array([clip_bpe.tris_ids(tokenizer.tokenize(s)) for s in sents], np.int32)
                    for sents in self.sentences]
        self.image_paths = []
        for r in ref_ids:
            image_id = refer.refs[r]["image_id"]
            name = refer.imgs.get(image_id, {}).get("file_name") or coco_image_name(image_id)
            self.image_paths.append(os.path.join(image_root(data_root), name))
        image_refs = {}
        for ref in refer.refs.values():                       # REFER.imgToRefs: the refs file's order
            image_refs.setdefault(ref["image_id"], []).append(ref["ref_id"])
        self.neg_pool = []
        for r in ref_ids:
            pool = []
            for other in image_refs[refer.refs[r]["image_id"]]:
                if other not in index_of:                     # the original's KeyError → break
                    break
                if other != r:
                    pool.append(index_of[other])
            self.neg_pool.append(pool)
        if len({s for sents in self.sentences for s in sents}) < 2:
            raise ValueError(f"{refer_root(data_root)}/{source}: the {split} split has fewer than two distinct "
                             f"sentences (no negatives)")

    def __len__(self):
        return len(self.ids)

    def image(self, index):
        """float32 [S, S, 3]: ``get_transform(size, train=True)`` of the RGB image (PIL bilinear stretch, /255,
        ImageNet mean/std)."""
        from PIL import Image

        from models import tris
        from models.tris_spec import stretch_rgb

        with Image.open(self.image_paths[index]) as img:
            rgb = np.asarray(img.convert("RGB"))
        return tris.preprocess(stretch_rgb(rgb, self.size)).numpy()

    def item(self, index, rng):
        """(image [S, S, 3], ids [20], neg_ids [K, 20]) with ``__getitem__``'s draws from ``rng``."""
        choice = rng.choice(len(self.ids[index]))
        ids, sentence = self.ids[index][choice], self.sentences[index][choice]
        neg = []
        pool = self.neg_pool[index]
        while len(neg) < self.negatives:
            if pool:
                n_index = pool[rng.choice(len(pool))]
                neg.append(self.ids[n_index][rng.choice(len(self.ids[n_index]))])
            else:
                n_index = rng.choice(len(self.ids))
                k = rng.choice(len(self.ids[n_index]))
                if self.sentences[n_index][k] != sentence:
                    neg.append(self.ids[n_index][k])
        return self.image(index), ids, np.stack(neg)

    def iterations_per_epoch(self, batch_size):
        return math.ceil(len(self) / batch_size)

    def batch(self, iteration, batch_size, seed):
        """Batch number ``iteration`` (0-based, over all epochs): images [B, S, S, 3], ids [B, 20], neg_ids
        [B, K, 20]; the last batch of an epoch may be smaller (no drop_last)."""
        epoch, position = divmod(iteration, self.iterations_per_epoch(batch_size))
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        rng = np.random.default_rng([seed, epoch, position])
        items = [self.item(i, rng) for i in order[position * batch_size:(position + 1) * batch_size]]
        return tuple(np.stack(parts) for parts in zip(*items))


def load_frozen_vit(path):
    """The frozen CLIP ViT-B/32 (``models.clip.CLIP``, sizes from the state_dict, causal mask of 20) from a
    ``.pth`` state_dict; float16 tensors (OpenAI's) are widened to float32."""
    from models import clip, tris
    from util.pth import load_pth

    state = tris.model_state_dict(load_pth(path), path)
    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.proj" not in state:
        raise ValueError(f"{path}: not a CLIP ViT state_dict (no visual.proj)")
    model = clip.CLIP("", **tris.clip_config_from_state_dict(state, prefix="", source=path))
    tris.load_state_dict_strict(model, state, path, "CLIP ViT")
    return model


def param_groups(model):
    """``TRIS.trainable_parameters()``: (backbone parameters, head parameters), ``logit_scale`` in neither."""
    params = {k: v for k, v in model.state_dict_variables().items() if v.trainable}
    backbone = {k: v for k, v in params.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in params.items() if not k.startswith("backbone.") and k != "logit_scale"}
    return backbone, heads


def make_optimizer(model, lr, max_iter):
    """AdamW over ``param_groups`` (lr·0.1, lr; wd 0.01) with the LambdaLR table of ``max_iter`` iterations."""
    from models import tris
    from util import adamw

    backbone, heads = param_groups(model)
    table = adamw.schedule_table(lambda t: lr * tris.lr_factor(t, max_iter, 1), max_iter)
    return adamw.AdamW([(backbone, LR_MULTI), (heads, 1.0)], table, WEIGHT_DECAY)


def make_step(model, vit, optimizer):
    """One ``train_one_epoch`` iteration: forward (BatchNorms on batch statistics), ``stage1_losses``, gradients of
    the optimizer's parameters, AdamW update. → (losses dict, group-0 learning rate used)."""
    from models import tris

    names = [n for group, _ in optimizer.groups for n in group]
    var_list = [v for group, _ in optimizer.groups for v in group.values()]

    def step(images, ids, neg_ids):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(var_list)
            losses = tris.stage1_losses(model(images, ids, training=True), images, ids, neg_ids, vit)
        grads = dict(zip(names, tape.gradient(losses["loss"], var_list)))
        lr = optimizer.apply_gradients(grads)
        return {k: losses[k] for k in ("loss", "fg_loss_l1", "cls_loss_l4", "cbs_loss_l5")}, lr

    return tf.function(step, reduce_retracing=True)


def train_stage1(spec, cfg):
    """``train_stage1.main`` without validation, through the shared own-recipe loop (``util.loop.run_training``:
    ``cfg.max_iter`` iterations, stop at ``cfg.stop_iter``, a snapshot every ``cfg.snapshot`` and at the end, resume
    from the newest good snapshot in ``-f`` else ``--resume-from``, ``TrainingDiverged`` on a non-finite loss or
    weights). Logged terms: ``loss`` and l1, l4, l5 of ``stage1_losses``; ``lr`` is group 0's (the backbone's)."""
    from models import tris
    from util.loop import run_training
    from util.pth import load_pth

    problem = train_input_problem(spec, cfg)
    if problem:
        raise ValueError(problem)
    tokenizer = spec.tokenizer(spec.bpe_path(cfg))
    data = ReferTrainSet(cfg.data_root, cfg.dataset, cfg.split, tokenizer, cfg.image_size)
    log.info("%s: %d %s refs, %d iterations per epoch at batch %d", spec.name, len(data), cfg.split,
             data.iterations_per_epoch(cfg.batch_size), cfg.batch_size)
    vit = load_frozen_vit(vit_path(cfg))
    log.info("Loading the initial weights from %s", cfg.init_weights)
    model = tris.TRISStage1.from_state_dict(tris.model_state_dict(load_pth(cfg.init_weights), cfg.init_weights),
                                            cfg.init_weights)
    model.model_name = spec.name
    optimizer = make_optimizer(model, cfg.lr, cfg.max_iter)
    step_fn = make_step(model, vit, optimizer)

    def step(n_iter):
        images, ids, neg_ids = data.batch(n_iter, cfg.batch_size, cfg.seed)
        losses, lr = step_fn(tf.constant(images), tf.constant(ids), tf.constant(neg_ids))
        return {"loss": float(losses["loss"]), "lr": float(lr), "l1": float(losses["fg_loss_l1"]),
                "l4": float(losses["cls_loss_l4"]), "l5": float(losses["cbs_loss_l5"])}

    run_training(cfg, model, optimizer, step, lambda path: spec.restore(model, path, optimizer))
