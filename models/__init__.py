"""The model registry behind ``-n`` and the full model (DeepLab-ResNet-101 backbone + a head).

| ``-n`` | head | paper |
|---|---|---|
| ``CMPC_model`` | ``models.cmpc.CMPCHead`` | Huang et al., CVPR 2020 |
| ``RRN_model`` | ``models.rrn.RRNHead`` | Li et al., CVPR 2018 |
| ``RMI_model`` (``RMI``) | ``models.rmi.RMIHead`` | Liu et al., ICCV 2017 |
| ``LSTM_model`` (``LSTM``) | ``models.lstm_baseline.LSTMHead`` | Liu et al., ICCV 2017 (baseline) |
"""
import importlib
import math

import tensorflow as tf

_HEADS = {
    "CMPC_model": ("models.cmpc", "CMPCHead"),
    "RRN_model": ("models.rrn", "RRNHead"),
    "RMI_model": ("models.rmi", "RMIHead"),
    "LSTM_model": ("models.lstm_baseline", "LSTMHead"),
}
_ALIASES = {"RMI": "RMI_model", "LSTM": "LSTM_model"}
MODEL_NAMES = tuple(_HEADS) + tuple(_ALIASES)


def canonical_name(name):
    """``RMI`` → ``RMI_model`` etc.; raises ValueError naming the valid choices."""
    name = _ALIASES.get(name, name)
    if name not in _HEADS:
        raise ValueError(f"unknown model -n {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return name


def head_class(name):
    module, cls = _HEADS[canonical_name(name)]
    return getattr(importlib.import_module(module), cls)


def feature_size(image_size):
    """Spatial size of the output-stride-8 feature maps for a square input (TF 'SAME': ceil at each stride 2)."""
    size = image_size
    for _ in range(3):
        size = math.ceil(size / 2)
    return size


class Segmenter(tf.Module):
    """Backbone + head: ``(images [B,H,W,3] BGR − mean, words [B,T]) → head outputs``."""

    def __init__(self, backbone, head, name):
        super().__init__(name=name.replace("+", "_"))
        self.backbone = backbone
        self.head = head
        self.model_name = name

    def __call__(self, images, words):
        features = self.backbone(images)
        return self.head({k: features[k] for k in self.head.FEATURES}, words)

    def tf1_variables(self):
        """{TF1 name: tf.Variable}: backbone (DrSleep names) and head."""
        out = dict(self.backbone.tf1_variables())
        out.update(self.head.tf1_variables())
        return out

    def train_variables(self, conv5=False):
        """The original's ``tvars``: every head variable (+ RMI's ``ResNet/fc1000``), + res3–res5 kernels with -conv5."""
        out = dict(self.head.tf1_variables())
        out.update({n: v for n, v in self.backbone.tf1_variables().items() if n.startswith("ResNet/fc1000")})
        if conv5:
            out.update({v.name.split(":")[0]: v for v in self.backbone.conv5_variables()})
        return out


def build_model(name, vocab_size=12112, embedding=None, image_size=320, weights="deeplab", seed=0):
    """Build ``-n name`` at ``image_size`` (320 in the originals).

    ``embedding`` (CMPC only): the GloVe matrix [V, 300]. ``weights`` (RMI/LSTM only): ``deeplab`` (res5c + conv0)
    or ``resnet`` (the backbone's fc1000).
    """
    from models.backbone import Backbone

    name = canonical_name(name)
    cls = head_class(name)
    vf = feature_size(image_size)
    kwargs = dict(vf_h=vf, vf_w=vf, H=image_size, W=image_size, seed=seed)
    if name == "CMPC_model":
        if embedding is None:
            raise ValueError("CMPC_model needs the GloVe embedding matrix (data/Gref_emb.npy or data/referit_emb.npy)")
        kwargs["embedding"] = embedding
    else:
        kwargs["vocab_size"] = vocab_size
    if name in ("RMI_model", "LSTM_model"):
        kwargs["weights"] = weights
    head = cls(**kwargs)
    backbone = Backbone(fc1000="fc1000" in head.FEATURES)
    return Segmenter(backbone, head, name)
