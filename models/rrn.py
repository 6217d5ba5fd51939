"""Recurrent Refinement Network (RRN): Li, Liao, Xia, Jia, Qi, Shen, Jia, "Referring Image Segmentation via
Recurrent Refinement Networks", CVPR 2018; ``LSTM_model_convlstm_p543.py`` + ``util/cell.py`` of liruiyu/referseg_rrn.

A multimodal fusion map is refined by a convolutional LSTM that is fed, one step each, the fusion and then
lateral projections of the backbone pyramid (res5 → res4 → res3), so the mask picks up ever finer visual detail.

Data flow (full size; B samples, 40×40 features at output stride 8), all under TF1 scope ``text_objseg``:

  res5c_relu [B,40,40,2048] ─mlp0 (1×1, no act.)─▶ [B,40,40,1000] ─l2n─▶ visual
  words [B,20] ─embedding─▶ ─RNN/multi_rnn_cell/cell_0/basic_lstm_cell (pads skipped)─▶ h ─l2n─▶ lang (tiled)
  concat[visual, lang, spatial(8)] ─fusion (1×1) + ReLU─▶ x0 [B,40,40,500]
  res5c_relu ─c5_lateral─▶ x1; res4b22_relu (1024) ─c4_lateral─▶ x2; res3b3_relu (512) ─c3_lateral─▶ x3 (1×1 + ReLU)
  ConvLSTM ``rnn/conv_lstm_cell`` (1×1 kernel, peepholes, layer norm) over x0, x1, x2, x3 from a zero state → h_3
  h_3 ─score (3×3)─▶ pred [B,40,40,1] ─legacy bilinear─▶ up [B,320,320,1] ─σ─▶ sigm

Loss: per-sample SUM over all H×W pixels of sigmoid cross-entropy of ``up`` against ``target_fine`` (full resolution,
unlike RMI/LSTM), mean over the batch. The original runs the ConvLSTM on batch element 0 only and reads only
``words[0]`` for the pad skip; here every sample is processed on its own (per-sample pad masking and layer norm).
"""
import tensorflow as tf

from models import layers
from models.lstm_baseline import EMBEDDING_INIT_SCALE, LSTM_SCOPE, SCOPE, add_basic_lstm, sentence_feature
from util.image import generate_spatial_batch

C4_CHANNELS = 1024
C3_CHANNELS = 512
SCORE_KERNEL = 3


class RRNHead(layers.TF1Module):
    """RRN head (``LSTM_model_convlstm_p543.LSTM_model``, TF1 scope ``text_objseg``).

    Variables, in the original's creation order: ``mlp0/{DW [1,1,vf_dim,v_emb], biases}``, ``embedding`` [V, w_emb]
    U(−0.08, 0.08), ``RNN/multi_rnn_cell/cell_0/basic_lstm_cell/{kernel, bias}``, ``fusion`` (v_emb+rnn+8 → mlp),
    ``c5_lateral`` (vf_dim → mlp), ``c4_lateral`` (1024 → mlp), ``c3_lateral`` (512 → mlp), the ConvLSTM
    ``rnn/conv_lstm_cell/{kernel, W_ci, W_cf, LayerNorm…, W_co, LayerNorm_3, LayerNorm_4}`` and ``score/{DW [3,3,mlp,1],
    biases}``.
    """

    FEATURES = ("res3b3_relu", "res4b22_relu", "res5c_relu")
    STEP_NAME = f"{SCOPE}/Variable"
    LR_DECAY_STEPS = 800000
    OBJECTIVE = "cls_loss"

    def __init__(self, vocab_size, num_steps=20, vf_h=40, vf_w=40, H=320, W=320, vf_dim=2048, w_emb_dim=1000,
                 v_emb_dim=1000, mlp_dim=500, rnn_size=1000, seed=0, **unused_original_kwargs):
        super().__init__(seed=seed, name="rrn_head")
        self.num_steps, self.vf_h, self.vf_w, self.H, self.W = num_steps, vf_h, vf_w, H, W
        self.rnn_size = rnn_size
        self.add_conv(f"{SCOPE}/mlp0", 1, vf_dim, v_emb_dim)
        self.add_variable(f"{SCOPE}/embedding", self._rng.uniform(
            -EMBEDDING_INIT_SCALE, EMBEDDING_INIT_SCALE, size=(vocab_size, w_emb_dim)))
        add_basic_lstm(self, LSTM_SCOPE, w_emb_dim, rnn_size)
        self.add_conv(f"{SCOPE}/fusion", 1, v_emb_dim + rnn_size + 8, mlp_dim)
        self.add_conv(f"{SCOPE}/c5_lateral", 1, vf_dim, mlp_dim)
        self.add_conv(f"{SCOPE}/c4_lateral", 1, C4_CHANNELS, mlp_dim)
        self.add_conv(f"{SCOPE}/c3_lateral", 1, C3_CHANNELS, mlp_dim)
        self.convlstm = layers.ConvLSTMCell(self, (vf_h, vf_w), mlp_dim, kernel_size=(1, 1),
                                            scope=f"{SCOPE}/rnn/conv_lstm_cell")
        self.add_conv(f"{SCOPE}/score", SCORE_KERNEL, mlp_dim, 1)

    def multimodal_fusion(self, res5c, words):
        """t0 input: ReLU(``fusion``(concat[l2n(``mlp0``(res5c)), lang, spatial])) [B, vf_h, vf_w, mlp]."""
        visual = layers.l2_normalize(self.conv(f"{SCOPE}/mlp0", res5c), axis=3)
        lang = sentence_feature(self, words, visual.dtype)
        spatial = tf.constant(generate_spatial_batch(1, self.vf_h, self.vf_w), visual.dtype)
        spatial = tf.tile(spatial, [tf.shape(visual)[0], 1, 1, 1])
        return tf.nn.relu(self.conv(f"{SCOPE}/fusion", tf.concat([visual, lang, spatial], axis=3)))

    def laterals(self, features):
        """t1..t3 inputs: ReLU of the 1×1 ``c5_lateral``, ``c4_lateral``, ``c3_lateral`` on the raw backbone maps."""
        return [tf.nn.relu(self.conv(f"{SCOPE}/{scope}", features[name]))
                for scope, name in (("c5_lateral", "res5c_relu"), ("c4_lateral", "res4b22_relu"),
                                    ("c3_lateral", "res3b3_relu"))]

    def __call__(self, features, words):
        """features {res3b3_relu [B,vf_h,vf_w,512], res4b22_relu [..,1024], res5c_relu [..,vf_dim]},
        words int32 [B, num_steps] (0 = pad).

        Returns {pred [B,vf_h,vf_w,1] logits, up [B,H,W,1] legacy-upsampled logits, sigm [B,H,W,1]}.
        """
        fusion = self.multimodal_fusion(features["res5c_relu"], words)
        refined = self.convlstm.run([fusion] + self.laterals(features))
        pred = self.conv(f"{SCOPE}/score", refined)
        up = layers.resize_bilinear_legacy(pred, [self.H, self.W])
        return {"pred": pred, "up": up, "sigm": tf.sigmoid(up)}

    def losses(self, outputs, target_fine):
        """``cls_loss``: weighed_logistic_loss(up, target_fine) at full resolution, float32 scalar."""
        return {"cls_loss": layers.weighted_logistic_loss(outputs["up"], target_fine)}
