"""The LSTM baseline of Liu et al., "Recurrent Multimodal Interaction for Referring Image Segmentation" (ICCV 2017,
arXiv 1703.07939), as built by ``LSTM_model.py`` of chenxi116/TF-phrasecut-public (itself Hu et al.'s
"Segmentation from Natural Language Expressions" design): the whole sentence is read by a word LSTM, its last
hidden state is tiled over the feature map and fused with the visual feature by two 1×1 convolutions.

Data flow (full size; B samples, T = 20 tokens, 40×40 features), all under TF1 scope ``text_objseg``:

  res5c_relu [B,40,40,2048] ─conv0 (deeplab only)─▶ [B,40,40,1000] ─l2n─▶ visual
  words [B,20] ─embedding─▶ [B,20,1000] ─RNN/multi_rnn_cell/cell_0/basic_lstm_cell (pads skipped)─▶ h [B,1000]
  h ─l2n─▶ lang, tiled to [B,40,40,1000]
  concat[visual, lang, spatial(8)] [B,40,40,2008] ─conv1─▶ ReLU [B,40,40,500] ─conv2─▶ pred [B,40,40,1]
  pred ─legacy bilinear─▶ up [B,320,320,1] ─σ─▶ sigm

With ``weights='resnet'`` the backbone's ``ResNet/fc1000`` output (1000 channels, no ReLU) is the visual input and
the head has no ``conv0``. Loss: per-sample SUM over the 40×40 cells of sigmoid cross-entropy of ``pred`` against the
label sampled at pixel (8i, 8j) (legacy bilinear downsampling), mean over the batch.
"""
import numpy as np
import tensorflow as tf

from models import layers
from util.image import generate_spatial_batch

SCOPE = "text_objseg"
LSTM_SCOPE = f"{SCOPE}/RNN/multi_rnn_cell/cell_0/basic_lstm_cell"
EMBEDDING_INIT_SCALE = 0.08
VISUAL_FEATURES = {"deeplab": ("res5c_relu",), "resnet": ("fc1000",)}


class LSTMHead(layers.TF1Module):
    """LSTM baseline head (``LSTM_model.LSTM_model``, TF1 scope ``text_objseg``).

    Variables, in the original's creation order: ``conv0/{DW,biases}`` (deeplab only), ``embedding`` [V, w_emb]
    U(−0.08, 0.08), ``RNN/multi_rnn_cell/cell_0/basic_lstm_cell/{kernel [w_emb+rnn, 4·rnn], bias}``,
    ``conv1/{DW [1,1,v_emb+rnn+8,mlp], biases}``, ``conv2/{DW [1,1,mlp,1], biases}``.
    ``FEATURES`` names the backbone map consumed (``fc1000`` on an instance built with ``weights='resnet'``).
    """

    FEATURES = VISUAL_FEATURES["deeplab"]
    STEP_NAME = f"{SCOPE}/Variable"
    LR_DECAY_STEPS = 750000
    OBJECTIVE = "cls_loss"

    def __init__(self, vocab_size, num_steps=20, vf_h=40, vf_w=40, H=320, W=320, vf_dim=2048, w_emb_dim=1000,
                 v_emb_dim=1000, mlp_dim=500, rnn_size=1000, weights="deeplab", seed=0, **unused_original_kwargs):
        super().__init__(seed=seed, name="lstm_head")
        if weights not in VISUAL_FEATURES:
            raise ValueError(f"weights must be one of {sorted(VISUAL_FEATURES)}, got {weights!r}")
        self.FEATURES = VISUAL_FEATURES[weights]
        self.weights = weights
        self.num_steps, self.vf_h, self.vf_w, self.H, self.W = num_steps, vf_h, vf_w, H, W
        self.rnn_size = rnn_size
        if weights == "deeplab":
            self.add_conv(f"{SCOPE}/conv0", 1, vf_dim, v_emb_dim)
        self.add_variable(f"{SCOPE}/embedding", self._rng.uniform(
            -EMBEDDING_INIT_SCALE, EMBEDDING_INIT_SCALE, size=(vocab_size, w_emb_dim)))
        add_basic_lstm(self, LSTM_SCOPE, w_emb_dim, rnn_size)
        self.add_conv(f"{SCOPE}/conv1", 1, v_emb_dim + rnn_size + 8, mlp_dim)
        self.add_conv(f"{SCOPE}/conv2", 1, mlp_dim, 1)

    def visual_feature(self, features):
        """``conv0`` (deeplab) or the fc1000 map (resnet), then ``l2_normalize(·, 3)``: [B, vf_h, vf_w, v_emb]."""
        visual = features[self.FEATURES[0]]
        if self.weights == "deeplab":
            visual = self.conv(f"{SCOPE}/conv0", visual)
        return layers.l2_normalize(visual, axis=3)

    def spatial_feature(self, batch, dtype):
        """The 8 coordinate channels ``generate_spatial_batch`` [B, vf_h, vf_w, 8]."""
        spatial = tf.constant(generate_spatial_batch(1, self.vf_h, self.vf_w), dtype)
        return tf.tile(spatial, [batch, 1, 1, 1])

    def __call__(self, features, words):
        """features {FEATURES[0]: [B, vf_h, vf_w, C]}, words int32 [B, num_steps] (0 = pad).

        Returns {pred [B,vf_h,vf_w,1] logits, up [B,H,W,1] legacy-upsampled logits, sigm [B,H,W,1]}.
        """
        visual = self.visual_feature(features)
        lang = sentence_feature(self, words, visual.dtype)
        spatial = self.spatial_feature(tf.shape(visual)[0], visual.dtype)
        feat_all = tf.concat([visual, lang, spatial], axis=3)
        mlp = tf.nn.relu(self.conv(f"{SCOPE}/conv1", feat_all))
        pred = self.conv(f"{SCOPE}/conv2", mlp)
        up = layers.resize_bilinear_legacy(pred, [self.H, self.W])
        return {"pred": pred, "up": up, "sigm": tf.sigmoid(up)}

    def losses(self, outputs, target_fine):
        """``cls_loss``: weighed_logistic_loss(pred, resize_bilinear(target_fine, [vf_h, vf_w])) in float32."""
        return {"cls_loss": downsampled_logistic_loss(outputs["pred"], target_fine, self.vf_h, self.vf_w)}


def add_basic_lstm(module, scope, input_dim, units):
    """``BasicLSTMCell`` variables under ``scope``: kernel [input+units, 4·units] (Glorot uniform), bias (0)."""
    module.add_variable(f"{scope}/kernel", layers.glorot_uniform((input_dim + units, 4 * units), module._rng))
    module.add_variable(f"{scope}/bias", np.zeros(4 * units))


def sentence_feature(head, words, dtype):
    """``embedding`` lookup and the word LSTM (scope ``RNN``) over the pad-skipped tokens; its last h,
    l2-normalised, tiled to [B, vf_h, vf_w, rnn_size] (LSTM baseline and RRN)."""
    embedded = tf.cast(tf.gather(head.tf1[f"{SCOPE}/embedding"], words), dtype)
    _, _, h = layers.word_lstm(embedded, words, head.tf1[f"{LSTM_SCOPE}/kernel"], head.tf1[f"{LSTM_SCOPE}/bias"],
                               head.rnn_size)
    lang = layers.l2_normalize(h[:, None, None, :], axis=3)
    return tf.tile(lang, [1, head.vf_h, head.vf_w, 1])


def downsampled_logistic_loss(pred, target_fine, vf_h, vf_w):
    """RMI/LSTM loss: the label is legacy-resized to the feature grid (pixel (8i, 8j) for 320 → 40), then the
    per-sample sum of sigmoid cross-entropy over the cells, mean over the batch (float32 scalar)."""
    target = layers.resize_bilinear_legacy(tf.cast(target_fine, tf.float32), [vf_h, vf_w])
    return layers.weighted_logistic_loss(pred, target)
