"""CMPC: Huang et al., "Referring Image Segmentation via Cross-Modal Progressive Comprehension" (CVPR 2020,
arXiv 2010.00514), as built by ``CMPC_model.py`` of spyflying/CMPC-Refseg (class ``LSTM_model``, mode 'eval'/'train').

Data flow (full size: C = v_emb_dim = rnn_size = 1000, M = mlp_dim = 500, h×w = 40×40, N = h·w, T = 20 tokens);
every variable lives under TF1 scope ``text_objseg/``:

  words ─``Variable`` (GloVe, trainable)─▶ ``RNN/multi_rnn_cell/cell_0/basic_lstm_cell`` ─l2n─▶ words_feat [B,T,C]
  words_feat ─``words_parse_1/2``─▶ P [B,1,T,4] (entity, attribute, relation, unnecessary)
  q_EA = l2n(Σ_t (p_E + p_A)·w_t), q_EAR = l2n(Σ_t (Σp − p_U)·w_t)                        [B,1,1,C]
  res5c/res4b22/res3b3 ─``c5/c4/c3_lateral``─▶ V_L, per level L (built c5, c4, c3):
     MUTAN ``vis_trans_L_head{k}``/``lang_trans_L_head{k}`` (k = 1..5) ─▶ X_L [B,h,w,C]
     spatial graph ``words_trans_L``, ``spa_graph_trans2_L``, ``gconv_*_spa_graph_L`` ─▶ R_L [B,h,w,C]
     ``fusion_L`` (concat[X_L, R_L, q_EA, spatial]) ─▶ F_L [B,h,w,M];  ``score_L`` ─▶ up_L [B,H,W,1]
  TGFE (two rounds, ``spa_graph_key_*gv_f1``, ``lang_query_*``, ``gv_lang_*``, ``lang_feat_*``, ``trans_feat_*``)
     guided by q_EAR ─▶ E_c3, E_c4, E_c5 ─``rnn/conv_lstm_cell`` (c3 → c4 → c5)─▶ ``score`` ─▶ pred, up, sigm

Batches: the original hard-wires batch 1 (``words[0, n]``, ``valid_idx[0, 0]``, ``feat_exg*[0]``, a whole-tensor
``l2_normalize``). Here every sample gets exactly what batch 1 gives: the first non-pad position is derived from
``words`` per sample, the words before it are masked (excluded from the softmaxes over words, zero weight in the
P-weighted sums and the graph messages), the TGFE global vector is normalised per sample and the ConvLSTM runs
over the batch dimension.

Two re-associations, equal up to float rounding: the five MUTAN heads of a level run as one convolution, and the
graph message A·X with A = S_w·S_vᵀ is computed as S_w·(S_vᵀ·X), which never builds the [N, N] adjacency.
"""
import logging

import numpy as np
import tensorflow as tf

from models import layers
from util.image import generate_spatial_batch

SCOPE = "text_objseg"
LSTM_SCOPE = f"{SCOPE}/RNN/multi_rnn_cell/cell_0/basic_lstm_cell"
LEVELS = ("c5", "c4", "c3")                  # build order of the per-level CMPC modules
LATERAL_SOURCES = {"c5": "res5c_relu", "c4": "res4b22_relu", "c3": "res3b3_relu"}
EXCHANGE_ORDER = ("c3", "c4", "c5")          # TGFE order, also the ConvLSTM's time order
EXCHANGE_ROUNDS = ("", "_2")                 # scope suffixes of the two TGFE rounds
MUTAN_RANK = 5
PARSER_DIM = 500                             # words_parse_1 width, hard-coded in the original
WORD_TYPES = ("entity", "attribute", "relation", "unnecessary")

log = logging.getLogger(__name__)


def first_word_mask(words):
    """[B, T] bool: True from each sample's first non-pad token on (the original's ``valid_idx``).

    ``trainval_model.py`` feeds ``valid_idx`` = index of the first token ≠ 0, or 0 for an all-pad sentence; the
    positions before it are the left pads that ``tf.slice`` drops.
    """
    is_word = tf.not_equal(words, 0)
    started = tf.cumsum(tf.cast(is_word, tf.int32), axis=1) > 0
    all_pad = tf.logical_not(tf.reduce_any(is_word, axis=1, keepdims=True))
    return tf.logical_or(started, all_pad)


def masked_softmax(logits, mask, axis):
    """``tf.nn.softmax(logits, axis)`` over the entries where ``mask`` (broadcastable) is True; zeros elsewhere.

    Masked entries get the dtype's lowest value before the softmax (exp → 0) and are zeroed after, so a slice with
    no valid entry gives zeros, never NaN.
    """
    mask = tf.broadcast_to(mask, tf.shape(logits))
    lowest = tf.fill(tf.shape(logits), tf.constant(logits.dtype.min, logits.dtype))
    probs = tf.nn.softmax(tf.where(mask, logits, lowest), axis=axis)
    return probs * tf.cast(mask, probs.dtype)


def _scoped(name):
    return f"{SCOPE}/{name}"


class CMPCHead(layers.TF1Module):
    """The CMPC head over backbone maps (``CMPC_model.LSTM_model.build_graph`` without the backbone).

    Variables (215, all trainable) in the original's creation order: ``Variable`` (GloVe [V, 300]), the word LSTM,
    ``c5/c4/c3_lateral``, ``words_parse_1/2``, per level c5, c4, c3 (MUTAN heads, spatial graph, ``fusion_L``),
    ``score_c5/c4/c3``, TGFE (c3, c4, c5, c3_2, c4_2, c5_2), ``rnn/conv_lstm_cell``, ``score``.
    """

    FEATURES = ("res3b3_relu", "res4b22_relu", "res5c_relu")
    STEP_NAME = f"{SCOPE}/Variable_1"
    LR_DECAY_STEPS = 800000
    OBJECTIVE = "cls_loss_all"

    def __init__(self, embedding, num_steps=20, vf_h=40, vf_w=40, H=320, W=320, vf_dim=2048, v_emb_dim=1000,
                 rnn_size=1000, mlp_dim=500, seed=0, **unused_original_kwargs):
        super().__init__(seed=seed, name="cmpc_head")
        if unused_original_kwargs:
            log.debug("CMPCHead ignores %s (unused by the original graph)", sorted(unused_original_kwargs))
        embedding = np.asarray(embedding, np.float32)
        self.num_steps, self.vf_h, self.vf_w, self.H, self.W = num_steps, vf_h, vf_w, H, W
        self.v_emb_dim, self.rnn_size, self.mlp_dim = v_emb_dim, rnn_size, mlp_dim
        self.lateral_dims = {"c5": vf_dim, "c4": 1024, "c3": 512}
        self._spatial = generate_spatial_batch(1, vf_h, vf_w)

        self.add_variable(_scoped("Variable"), embedding)
        self.add_variable(f"{LSTM_SCOPE}/kernel",
                          layers.glorot_uniform((embedding.shape[1] + rnn_size, 4 * rnn_size), self._rng))
        self.add_variable(f"{LSTM_SCOPE}/bias", np.zeros(4 * rnn_size, np.float32))
        for level in LEVELS:
            self.add_conv(_scoped(f"{level}_lateral"), 1, self.lateral_dims[level], v_emb_dim)
        self.add_conv(_scoped("words_parse_1"), 1, rnn_size, PARSER_DIM)
        self.add_conv(_scoped("words_parse_2"), 1, PARSER_DIM, len(WORD_TYPES))
        for level in LEVELS:
            self._add_level(level)
        for level in LEVELS:
            self.add_conv(_scoped(f"score_{level}"), 3, mlp_dim, 1)
        for suffix in EXCHANGE_ROUNDS:
            for level in EXCHANGE_ORDER:
                self._add_exchange(level + suffix)
        self.convlstm = layers.ConvLSTMCell(self, (vf_h, vf_w), mlp_dim, scope=_scoped("rnn/conv_lstm_cell"))
        self.add_conv(_scoped("score"), 3, mlp_dim, 1)

    # ----------------------------------------------------------------------------------------- variables
    def _add_level(self, level):
        """Variables of ``build_lang2vis(level)``: MUTAN heads, spatial graph, ``fusion_{level}``."""
        c = self.v_emb_dim
        for k in range(1, MUTAN_RANK + 1):
            self.add_conv(_scoped(f"vis_trans_{level}_head{k}"), 1, c + 8, c)
            self.add_conv(_scoped(f"lang_trans_{level}_head{k}"), 1, self.rnn_size, c)
        self.add_conv(_scoped(f"words_trans_{level}"), 1, self.rnn_size, self.rnn_size)
        self.add_conv(_scoped(f"spa_graph_trans2_{level}"), 1, c, c)
        self.add_layer_norm(_scoped(f"gconv_feat_ln_spa_graph_{level}"), c)
        self.add_conv(_scoped(f"gconv_update_spa_graph_{level}"), 1, c, c)
        self.add_layer_norm(_scoped(f"gconv_update_ln_spa_graph_{level}"), c)
        self.add_conv(_scoped(f"fusion_{level}"), 1, 2 * c + self.rnn_size + 8, self.mlp_dim)

    def _add_exchange(self, tag):
        """Variables of ``gated_exchange_module(tag)``: global vector, then the two ``lang_se`` gates."""
        m = self.mlp_dim
        self.add_conv(_scoped(f"spa_graph_key_{tag}gv_f1"), 1, m, m)
        self.add_conv(_scoped(f"lang_query_{tag}gv_f1"), 1, self.rnn_size, m)
        self.add_conv(_scoped(f"gv_lang_{tag}gv_f1"), 1, m + self.rnn_size, m)
        for f in ("f1", "f2"):
            self.add_conv(_scoped(f"lang_feat_{tag}_{f}"), 1, m, m)
            self.add_conv(_scoped(f"trans_feat_{tag}_{f}"), 1, m, m)

    # ----------------------------------------------------------------------------------------- forward
    def __call__(self, features, words):
        """features {name: [B, vf_h, vf_w, C_name]}, words int32 [B, num_steps] (0 = pad, left padded) →
        {pred [B,vf_h,vf_w,1] logits, up, sigm, up_c3, up_c4, up_c5 [B,H,W,1]}."""
        words = tf.convert_to_tensor(words, tf.int32)
        maps = {name: tf.convert_to_tensor(features[name]) for name in self.FEATURES}
        dtype = maps[LATERAL_SOURCES["c5"]].dtype
        mask = first_word_mask(words)
        words_feat = self.word_encoder(words, dtype)
        word_types = self.lang_parser(words_feat)
        q_ea = self.sentence_vector(words_feat, word_types[..., 0] + word_types[..., 1], mask)
        spatial = self.spatial_map(tf.shape(words)[0], dtype)
        visual = self.laterals(maps)
        fused = {level: self.lang2vis(level, visual[level], words_feat, word_types, q_ea, spatial, mask)
                 for level in LEVELS}
        outputs = {f"up_{level}": self.upsample(self.conv(_scoped(f"score_{level}"), fused[level]))
                   for level in LEVELS}
        q_ear = self.sentence_vector(words_feat, tf.reduce_sum(word_types, 3) - word_types[..., 3], mask)
        exchanged = self.gated_exchange(fused, q_ear)
        outputs["pred"] = self.scores(self.convlstm_fusion(exchanged))
        outputs["up"] = self.upsample(outputs["pred"])
        outputs["sigm"] = tf.sigmoid(outputs["up"])
        return outputs

    def word_encoder(self, words, dtype):
        """GloVe lookup (``text_objseg/Variable``) + word LSTM (``text_objseg/RNN``), pads skipped per sample.

        words [B, T] → l2-normalised per-word hidden states [B, T, rnn_size] (zeros at pads).
        """
        embedded = tf.cast(tf.nn.embedding_lookup(self.tf1[_scoped("Variable")], words), dtype)
        outputs, _, _ = layers.word_lstm(embedded, words, self.tf1[f"{LSTM_SCOPE}/kernel"],
                                         self.tf1[f"{LSTM_SCOPE}/bias"], self.rnn_size)
        return layers.l2_normalize(outputs, axis=2)

    def lang_parser(self, words_feat):
        """``build_lang_parser``: soft word types [B, 1, T, 4] (entity, attribute, relation, unnecessary).

        ``words_parse_1`` (1×1 conv rnn_size → 500, ReLU), ``words_parse_2`` (500 → 4), softmax over the types.
        """
        hidden = tf.nn.relu(self.conv(_scoped("words_parse_1"), words_feat[:, None]))
        return tf.nn.softmax(self.conv(_scoped("words_parse_2"), hidden), axis=3)

    @staticmethod
    def sentence_vector(words_feat, weights, mask):
        """``valid_lang`` / ``nec_lang``: l2n(Σ_t weight_t · w_t) over the sample's words → [B, 1, 1, rnn_size].

        words_feat [B, T, C]; weights [B, 1, T] (p_E + p_A for q_EA, Σp − p_U for q_EAR); pads get weight 0.
        """
        weights = weights * tf.cast(mask[:, None, :], weights.dtype)
        return layers.l2_normalize(tf.matmul(weights, words_feat), axis=2)[:, None]

    def spatial_map(self, batch, dtype):
        """``generate_spatial_batch``: the 8 coordinate channels [B, vf_h, vf_w, 8]."""
        return tf.tile(tf.cast(tf.constant(self._spatial), dtype), [batch, 1, 1, 1])

    def laterals(self, maps):
        """``c5/c4/c3_lateral``: 1×1 conv to v_emb_dim, then l2n over channels → {level: [B, vf_h, vf_w, C]}."""
        return {level: layers.l2_normalize(self.conv(_scoped(f"{level}_lateral"), maps[LATERAL_SOURCES[level]]),
                                           axis=3)
                for level in LEVELS}

    def lang2vis(self, level, visual, words_feat, word_types, q_ea, spatial, mask):
        """``build_lang2vis``: MUTAN fusion, spatial graph, ``fusion_{level}`` (1×1 conv + ReLU) → F_L [B,h,w,M]."""
        multimodal = self.mutan_fusion(level, q_ea, spatial, visual)
        graph = self.spatial_graph(level, multimodal, words_feat, word_types, mask)
        sentence = tf.tile(q_ea, [1, self.vf_h, self.vf_w, 1])
        feat_all = tf.concat([multimodal, graph, sentence, spatial], axis=3)
        return tf.nn.relu(self.conv(_scoped(f"fusion_{level}"), feat_all))

    def mutan_fusion(self, level, sentence, spatial, visual):
        """``mutan_fusion`` (rank 5): X_L = l2n(tanh(Σ_k tanh(vis_k(concat[V, spatial])) ⊙ tanh(lang_k(q_EA)))).

        visual [B,h,w,C], spatial [B,h,w,8], sentence [B,1,1,C] → [B,h,w,C]. Scopes ``vis_trans_{L}_head{k}``,
        ``lang_trans_{L}_head{k}``; the five heads run as one convolution with 5·C outputs.
        """
        vis = self._stacked_conv([f"vis_trans_{level}_head{k}" for k in range(1, MUTAN_RANK + 1)],
                                 tf.concat([visual, spatial], axis=3))
        lang = self._stacked_conv([f"lang_trans_{level}_head{k}" for k in range(1, MUTAN_RANK + 1)], sentence)
        heads = tf.tanh(vis) * tf.tanh(lang)
        heads = tf.reshape(heads, [-1, self.vf_h, self.vf_w, MUTAN_RANK, self.v_emb_dim])
        return layers.l2_normalize(tf.tanh(tf.reduce_sum(heads, axis=3)), axis=3)

    def _stacked_conv(self, scopes, x):
        """The 1×1 convolutions ``scopes`` applied to the same input as one conv; outputs concatenated on channels."""
        kernel = tf.concat([self.tf1[_scoped(f"{s}/DW")] for s in scopes], axis=3)
        biases = tf.concat([self.tf1[_scoped(f"{s}/biases")] for s in scopes], axis=0)
        return layers.conv2d(x, kernel, biases)

    def spatial_graph(self, level, multimodal, words_feat, word_types, mask):
        """``build_spa_graph``: relation-gated pixel–word affinity, one graph convolution → R_L [B,h,w,C].

        Â = p_R ⊙ (``spa_graph_trans2_L``(X) · ``words_trans_L``(w)ᵀ) / √v_emb_dim  [B, N, T];
        S_w = softmax over the sample's words, S_v = softmax over pixels (pad columns zero), A = S_w·S_vᵀ.
        """
        n, c = self.vf_h * self.vf_w, self.v_emb_dim
        words = tf.reshape(self.conv(_scoped(f"words_trans_{level}"), words_feat[:, None]), [-1, self.num_steps, c])
        nodes = tf.reshape(self.conv(_scoped(f"spa_graph_trans2_{level}"), multimodal), [-1, n, c])
        affinity = tf.matmul(nodes, words, transpose_b=True) / (c ** 0.5)
        affinity = word_types[..., WORD_TYPES.index("relation")] * affinity
        word_mask = mask[:, None, :]
        over_words = masked_softmax(affinity, word_mask, axis=2)
        over_pixels = masked_softmax(affinity, word_mask, axis=1)
        graph = self.graph_conv(level, tf.reshape(multimodal, [-1, 1, n, c]), over_words, over_pixels)
        return layers.l2_normalize(tf.reshape(graph, [-1, self.vf_h, self.vf_w, c]), axis=3)

    def graph_conv(self, level, nodes, over_words, over_pixels):
        """``graph_conv`` (graph ``spa_graph``): one step of message passing on nodes [B, 1, N, C].

        message = LN(A·X) (``gconv_feat_ln_spa_graph_L``), X' = ReLU(X + message),
        out = ReLU(LN(``gconv_update_spa_graph_L``(X'))) (``gconv_update_ln_spa_graph_L``) → [B, 1, N, C].
        A·X is evaluated as S_w·(S_vᵀ·X).
        """
        flat = nodes[:, 0]
        message = tf.matmul(over_words, tf.matmul(over_pixels, flat, transpose_a=True))[:, None]
        message = self.layer_norm(_scoped(f"gconv_feat_ln_spa_graph_{level}"), message)
        updated = tf.nn.relu(nodes + message)
        updated = self.conv(_scoped(f"gconv_update_spa_graph_{level}"), updated)
        return tf.nn.relu(self.layer_norm(_scoped(f"gconv_update_ln_spa_graph_{level}"), updated))

    def gated_exchange(self, fused, sentence):
        """``gated_exchange_fusion_lstm_2times`` without the ConvLSTM: two TGFE rounds (scopes c3, c4, c5 then
        c3_2, c4_2, c5_2), each output l2n over channels. fused {level: [B,h,w,M]}, sentence q_EAR [B,1,1,C]."""
        feats = fused
        for suffix in EXCHANGE_ROUNDS:
            feats = {level: layers.l2_normalize(self.exchange_module(
                level + suffix, feats[level], *[feats[o] for o in EXCHANGE_ORDER if o != level], sentence), axis=3)
                for level in EXCHANGE_ORDER}
        return feats

    def exchange_module(self, tag, feat, feat1, feat2, sentence):
        """``gated_exchange_module``: F + gate_f1(F1) + gate_f2(F2), gates from the global vector of F → [B,h,w,M]."""
        gv = self.global_vector(tag + "gv_f1", feat, sentence)
        return feat + self.lang_se(f"{tag}_f1", feat1, gv) + self.lang_se(f"{tag}_f2", feat2, gv)

    def global_vector(self, tag, feat, sentence):
        """``global_vec``: sentence-guided attention pooling of F, fused with the sentence → gv [B, 1, 1, M].

        a = softmax_pixels(``spa_graph_key_{tag}``(F) · ``lang_query_{tag}``(q)ᵀ / √mlp_dim) [B, N, 1];
        gv = l2n(``gv_lang_{tag}``(concat[aᵀ·F, q])) — the original normalises the whole tensor, i.e. per sample.
        """
        n, m = self.vf_h * self.vf_w, self.mlp_dim
        keys = tf.reshape(self.conv(_scoped(f"spa_graph_key_{tag}"), feat), [-1, n, m])
        query = tf.reshape(self.conv(_scoped(f"lang_query_{tag}"), sentence), [-1, 1, m])
        attention = tf.nn.softmax(tf.matmul(keys, query, transpose_b=True) / (m ** 0.5), axis=1)
        pooled = tf.reshape(tf.matmul(attention, tf.reshape(feat, [-1, n, m]), transpose_a=True), [-1, 1, 1, m])
        gv = self.conv(_scoped(f"gv_lang_{tag}"), tf.concat([pooled, sentence], axis=3))
        return layers.l2_normalize(gv, axis=[1, 2, 3])

    def lang_se(self, tag, feat, gv):
        """``lang_se``: ReLU(``trans_feat_{tag}``(F)) ⊙ σ(``lang_feat_{tag}``(gv)) — a channel gate → [B,h,w,M]."""
        gate = tf.sigmoid(self.conv(_scoped(f"lang_feat_{tag}"), gv))
        return tf.nn.relu(self.conv(_scoped(f"trans_feat_{tag}"), feat)) * gate

    def convlstm_fusion(self, exchanged):
        """``tf.nn.dynamic_rnn(ConvLSTMCell)`` (scope ``rnn/conv_lstm_cell``) over E_c3 → E_c4 → E_c5 per sample;
        returns the last h [B, h, w, M]."""
        return self.convlstm.run([exchanged[level] for level in EXCHANGE_ORDER])

    def scores(self, fused):
        """``score``: 3×3 conv M → 1 → pred logits [B, vf_h, vf_w, 1]."""
        return self.conv(_scoped("score"), fused)

    def upsample(self, score):
        """TF1 ``tf.image.resize_bilinear(score, [H, W])`` (legacy) → [B, H, W, 1]."""
        return layers.resize_bilinear_legacy(score, [self.H, self.W])

    # ----------------------------------------------------------------------------------------- training
    def losses(self, outputs, target_fine):
        """``train_op`` losses (float32): per-sample SUM of sigmoid cross-entropy of each full-resolution map
        against target_fine [B,H,W,1], batch mean; cls_loss_all = 0.7·cls + 0.1·(c5 + c4 + c3)."""
        out = {"cls_loss": layers.weighted_logistic_loss(outputs["up"], target_fine)}
        for level in LEVELS:
            out[f"cls_loss_{level}"] = layers.weighted_logistic_loss(outputs[f"up_{level}"], target_fine)
        out["cls_loss_all"] = (0.7 * out["cls_loss"] + 0.1 * out["cls_loss_c5"]
                               + 0.1 * out["cls_loss_c4"] + 0.1 * out["cls_loss_c3"])
        return out
