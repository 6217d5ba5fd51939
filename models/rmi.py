"""Recurrent Multimodal Interaction (RMI): Liu, Lin, Shen, Lu, Yuille, "Recurrent Multimodal Interaction for
Referring Image Segmentation", ICCV 2017 (arXiv 1703.07939); ``RMI_model.py`` of chenxi116/TF-phrasecut-public.

Instead of reading the whole sentence first, RMI feeds every word to a multimodal LSTM that runs at every spatial
position (a 1×1 convolutional LSTM, weights shared over positions), so the segmentation evolves word by word.

Per token n (pads, id 0 at any position, leave ALL recurrent states unchanged), under TF1 scope ``text_objseg/RNN``:

  e = embedding[words[:, n]] [B, w_emb]
  WLSTM  (``RNN/WLSTM/multi_rnn_cell/cell_0/basic_lstm_cell``, rnn_size units): h_w = LSTM(e, state_w)
  x = concat[visual (l2n, once), tile(e) (raw), tile(l2n(h_w)), spatial(8)]  [B·vf_h·vf_w, v_emb+w_emb+rnn+8]
  ALSTM  (``RNN/ALSTM/multi_rnn_cell/cell_0/basic_lstm_cell``, mlp_dim units, at every position): h_a = LSTM(x, state_a)

Then z = ½(ln(1.001 + h_a) − ln(1.001 − h_a)) (an ε-regularised atanh undoing the LSTM's output tanh),
``mult_state`` = channel mean of the legacy-upsampled z [B, H, W] (diagnostic only),
pred = ``conv2``(ReLU(z)) [B,vf_h,vf_w,1], up = legacy bilinear upsampling to [H, W], sigm = σ(up).
No ``conv1`` in RMI. Loss as the LSTM baseline.

The original hard-wires batch 1 (``tf.cond(words[0, n] == 0, …)``); here the pad skip is a per-sample ``tf.where``
on state_w, state_a and h_a, so each sample of a batch gets exactly what batch 1 gives, and the steps run in
``layers.loop_over_words``, which starts after the leading pads the batch shares, so that those cost nothing, as
in the original (each ALSTM step is a [B·vf_h·vf_w, 3508] × [3508, 2000] matmul: 22 GFLOP per image at 40×40).
"""
import tensorflow as tf

from models import layers
from models.lstm_baseline import (EMBEDDING_INIT_SCALE, SCOPE, VISUAL_FEATURES, add_basic_lstm,
                                  downsampled_logistic_loss)
from util.image import generate_spatial_batch

WLSTM_SCOPE = f"{SCOPE}/RNN/WLSTM/multi_rnn_cell/cell_0/basic_lstm_cell"
ALSTM_SCOPE = f"{SCOPE}/RNN/ALSTM/multi_rnn_cell/cell_0/basic_lstm_cell"
ATANH_EPSILON_ONE = 1.0 + 1e-3


def regularized_atanh(x):
    """``0.5 · (log(1.001 + x) − log(1.001 − x))`` with the constant folded to float32 1.001, as the original.

    Computed in float32 (in bfloat16 1.001 rounds to 1 and tanh outputs of ±1 would give ±inf); returns x's dtype.
    """
    x32 = tf.cast(x, tf.float32)
    one = tf.constant(ATANH_EPSILON_ONE, tf.float32)
    return tf.cast(0.5 * (tf.math.log(one + x32) - tf.math.log(one - x32)), x.dtype)


def mult_state(z, size):
    """The original's diagnostic ``reduce_mean(resize_bilinear(z, size), axis=3)`` [B, H, W].

    Bilinear resizing is linear with the same weights for every channel, so the channel mean is taken first
    (mathematically equal, ~1e-7 rounding apart, and mlp_dim times less work than upsampling all channels).
    """
    return layers.resize_bilinear_legacy(tf.reduce_mean(z, axis=3, keepdims=True), size)[..., 0]


class RMIHead(layers.TF1Module):
    """RMI head (``RMI_model.RMI_model``, TF1 scope ``text_objseg``).

    Variables, in the original's creation order: ``conv0/{DW,biases}`` (deeplab only), ``embedding`` [V, w_emb]
    U(−0.08, 0.08), ``RNN/WLSTM/…/{kernel [w_emb+rnn, 4·rnn], bias}``,
    ``RNN/ALSTM/…/{kernel [v_emb+w_emb+rnn+8+mlp, 4·mlp], bias}``, ``conv2/{DW [1,1,mlp,1], biases}``.
    ALSTM kernel rows: visual, word embedding, normalised h_w, spatial, previous h_a.
    """

    FEATURES = VISUAL_FEATURES["deeplab"]
    STEP_NAME = f"{SCOPE}/Variable"
    LR_DECAY_STEPS = 750000
    OBJECTIVE = "cls_loss"

    def __init__(self, vocab_size, num_steps=20, vf_h=40, vf_w=40, H=320, W=320, vf_dim=2048, w_emb_dim=1000,
                 v_emb_dim=1000, mlp_dim=500, rnn_size=1000, weights="deeplab", seed=0, **unused_original_kwargs):
        super().__init__(seed=seed, name="rmi_head")
        if weights not in VISUAL_FEATURES:
            raise ValueError(f"weights must be one of {sorted(VISUAL_FEATURES)}, got {weights!r}")
        self.FEATURES = VISUAL_FEATURES[weights]
        self.weights = weights
        self.num_steps, self.vf_h, self.vf_w, self.H, self.W = num_steps, vf_h, vf_w, H, W
        self.rnn_size, self.mlp_dim = rnn_size, mlp_dim
        if weights == "deeplab":
            self.add_conv(f"{SCOPE}/conv0", 1, vf_dim, v_emb_dim)
        self.add_variable(f"{SCOPE}/embedding", self._rng.uniform(
            -EMBEDDING_INIT_SCALE, EMBEDDING_INIT_SCALE, size=(vocab_size, w_emb_dim)))
        add_basic_lstm(self, WLSTM_SCOPE, w_emb_dim, rnn_size)
        add_basic_lstm(self, ALSTM_SCOPE, v_emb_dim + w_emb_dim + rnn_size + 8, mlp_dim)
        self.add_conv(f"{SCOPE}/conv2", 1, mlp_dim, 1)

    def _lstm_step(self, scope, x, c, h):
        return layers.basic_lstm_cell(x, c, h, self.tf1[f"{scope}/kernel"], self.tf1[f"{scope}/bias"])

    def visual_feature(self, features):
        """``conv0`` (deeplab) or the fc1000 map (resnet), ``l2_normalize(·, 3)`` once: [B, vf_h, vf_w, v_emb]."""
        visual = features[self.FEATURES[0]]
        if self.weights == "deeplab":
            visual = self.conv(f"{SCOPE}/conv0", visual)
        return layers.l2_normalize(visual, axis=3)

    def _tile(self, v):
        """[B, D] → [B, vf_h, vf_w, D]."""
        return tf.tile(v[:, None, None, :], [1, self.vf_h, self.vf_w, 1])

    def multimodal_input(self, visual, spatial, w_emb, h_w):
        """ALSTM input at every position: concat[visual, tile(e), tile(l2n(h_w)), spatial] → [B·vf_h·vf_w, D]."""
        lang = layers.l2_normalize(h_w, axis=1)
        feat_all = tf.concat([visual, self._tile(w_emb), self._tile(lang), spatial], axis=3)
        return tf.reshape(feat_all, [-1, feat_all.shape[3]])

    def recurrent_interaction(self, visual, words):
        """The word loop of scope ``RNN``: WLSTM then ALSTM per token, all three states kept on pads.

        Args: visual [B, vf_h, vf_w, v_emb] (normalised), words [B, T].
        Returns: h_a [B, vf_h, vf_w, mlp_dim] after the last token (zeros for a sentence of pads only).
        """
        dtype = visual.dtype
        batch = tf.shape(visual)[0]
        positions = self.vf_h * self.vf_w
        embedded = tf.cast(tf.gather(self.tf1[f"{SCOPE}/embedding"], words), dtype)
        spatial = tf.tile(tf.constant(generate_spatial_batch(1, self.vf_h, self.vf_w), dtype), [batch, 1, 1, 1])
        time_major = tf.transpose(embedded, [1, 0, 2])

        def step(n, keep, state):
            c_w, h_w, c_a, h_a = state
            keep_at = tf.repeat(keep, positions, axis=0)
            w_emb = time_major[n]
            new_c_w, new_h_w = self._lstm_step(WLSTM_SCOPE, w_emb, c_w, h_w)
            x = self.multimodal_input(visual, spatial, w_emb, new_h_w)
            new_c_a, new_h_a = self._lstm_step(ALSTM_SCOPE, x, c_a, h_a)
            return (tf.where(keep, new_c_w, c_w), tf.where(keep, new_h_w, h_w),
                    tf.where(keep_at, new_c_a, c_a), tf.where(keep_at, new_h_a, h_a))

        c_w = h_w = tf.zeros([batch, self.rnn_size], dtype)
        c_a = h_a = tf.zeros([batch * positions, self.mlp_dim], dtype)
        _, _, _, h_a = layers.loop_over_words(tf.not_equal(words, 0), step, (c_w, h_w, c_a, h_a))
        return tf.reshape(h_a, [batch, self.vf_h, self.vf_w, self.mlp_dim])

    def __call__(self, features, words):
        """features {FEATURES[0]: [B, vf_h, vf_w, C]}, words int32 [B, num_steps] (0 = pad).

        Returns {pred [B,vf_h,vf_w,1] logits, up [B,H,W,1], sigm [B,H,W,1], mult_state [B,H,W]}.
        """
        visual = self.visual_feature(features)
        lstm_output = regularized_atanh(self.recurrent_interaction(visual, words))
        pred = self.conv(f"{SCOPE}/conv2", tf.nn.relu(lstm_output))
        up = layers.resize_bilinear_legacy(pred, [self.H, self.W])
        return {"pred": pred, "up": up, "sigm": tf.sigmoid(up), "mult_state": mult_state(lstm_output, [self.H, self.W])}

    def losses(self, outputs, target_fine):
        """``cls_loss``: weighed_logistic_loss(pred, resize_bilinear(target_fine, [vf_h, vf_w])) in float32."""
        return {"cls_loss": downsampled_logistic_loss(outputs["pred"], target_fine, self.vf_h, self.vf_w)}
