"""BERT encoder with Hugging Face semantics and parameter names, as small ``tf.Module``s (no Keras).

What SaG runs: ``transformers.BertModel`` (4.33, eager attention; ``bert-base-uncased`` config: 12 layers, 768 wide,
12 heads, 3072 FF, 512 positions, 2 token types, GELU, LayerNorm eps 1e-12, absolute positions, pad id 0) called as
``bert(input_ids, attention_mask)`` — token types all 0, positions 0 … L−1.

Per layer (``BertLayer``), h [B, L, H], heads contiguous chunks of H/heads:
  scores = (q·kᵀ) / √(H/heads) + (1 − mask)·float32.min     (the additive mask of ``get_extended_attention_mask``)
  a = LN_attn(dense(softmax(scores)·v) + h);  out = LN_out(dense2(GELU(dense1(a))) + a)      (exact erf GELU)
Embeddings: LN(word[ids] + token_type[0] + position[0 … L−1]). Pooler: tanh(dense(h[:, 0])) (SaG never uses it).
Dropout (hidden and attention probabilities, 0.1 in bert-base) runs in training only, from a seeded generator.

Every parameter is a ``tf.Variable`` named by its state_dict key (``<prefix>encoder.layer.0.attention.self.query.
weight``) in PyTorch layout (Linear [out, in]); ``word_embeddings`` row 0 (``padding_idx`` = pad id 0) receives no
gradient. Initial values as ``BertPreTrainedModel._init_weights``: N(0, 0.02) weights and embeddings (pad row 0),
zero biases, LayerNorm 1/0.
"""
import numpy as np
import tensorflow as tf

from models import vit

LAYER_NORM_EPS = 1e-12
INITIALIZER_RANGE = 0.02
FLOAT32_MIN = float(np.finfo(np.float32).min)


def dropout(x, rate, training, generator):
    """``nn.Dropout(rate)``: in training each element is zeroed with probability ``rate`` and the rest scaled by
    1/(1 − rate); identity in eval or at rate 0."""
    if not training or rate == 0.0:
        return x
    keep = tf.cast(generator.uniform(tf.shape(x)) >= rate, x.dtype)
    return x * keep / (1.0 - rate)


class BertEmbeddings(vit.TorchModule):
    """``BertEmbeddings``: ids [B, L] → LN(word + token_type[0] + position) [B, L, H] (then dropout)."""

    def __init__(self, prefix, vocab_size, hidden, max_positions, type_vocab_size, rng, pad_id=0):
        super().__init__(prefix)
        words = rng.normal(0.0, INITIALIZER_RANGE, (vocab_size, hidden)).astype(np.float32)
        words[pad_id] = 0.0
        self.pad_id = pad_id
        self.word_embeddings = self.add_parameter("word_embeddings.weight", words)
        self.position_embeddings = self.add_parameter(
            "position_embeddings.weight", rng.normal(0.0, INITIALIZER_RANGE, (max_positions, hidden)))
        self.token_type_embeddings = self.add_parameter(
            "token_type_embeddings.weight", rng.normal(0.0, INITIALIZER_RANGE, (type_vocab_size, hidden)))
        self.layer_norm = self.add_module(vit.LayerNorm(prefix + "LayerNorm.", hidden, LAYER_NORM_EPS))

    def __call__(self, ids):
        rows = tf.gather(self.word_embeddings, ids)
        words = tf.where(tf.equal(ids, self.pad_id)[..., None], tf.stop_gradient(rows), rows)
        length = tf.shape(ids)[1]
        x = words + self.token_type_embeddings[0] + self.position_embeddings[:length]
        return self.layer_norm(x)


class BertLayer(vit.TorchModule):
    """``BertLayer`` (post-norm): self-attention (``attention.self.{query,key,value}``, ``attention.output.dense``,
    ``attention.output.LayerNorm``), ``intermediate.dense`` + GELU, ``output.dense``, ``output.LayerNorm``.
    [B, L, H] with the additive mask [B, 1, 1, L] → [B, L, H]."""

    def __init__(self, prefix, hidden, heads, intermediate, rng, dropout_rate=0.0, generator=None):
        super().__init__(prefix)
        self.heads, self.head_dim = heads, hidden // heads
        self.query = self.add_module(vit.Linear(prefix + "attention.self.query.", hidden, hidden, rng))
        self.key = self.add_module(vit.Linear(prefix + "attention.self.key.", hidden, hidden, rng))
        self.value = self.add_module(vit.Linear(prefix + "attention.self.value.", hidden, hidden, rng))
        self.attn_dense = self.add_module(vit.Linear(prefix + "attention.output.dense.", hidden, hidden, rng))
        self.attn_norm = self.add_module(vit.LayerNorm(prefix + "attention.output.LayerNorm.", hidden,
                                                       LAYER_NORM_EPS))
        self.intermediate = self.add_module(vit.Linear(prefix + "intermediate.dense.", hidden, intermediate, rng))
        self.output = self.add_module(vit.Linear(prefix + "output.dense.", intermediate, hidden, rng))
        self.output_norm = self.add_module(vit.LayerNorm(prefix + "output.LayerNorm.", hidden, LAYER_NORM_EPS))
        self.dropout_rate, self.generator = dropout_rate, generator

    def _heads(self, x):
        batch, length = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, [batch, length, self.heads, self.head_dim]), [0, 2, 1, 3])

    def __call__(self, h, additive_mask, training=False):
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        scores = tf.matmul(q, k, transpose_b=True) / float(np.sqrt(self.head_dim)) + additive_mask
        probs = dropout(tf.nn.softmax(scores, axis=-1), self.dropout_rate, training, self.generator)
        context = tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3])
        context = tf.reshape(context, tf.shape(h))
        attn = dropout(self.attn_dense(context), self.dropout_rate, training, self.generator)
        a = self.attn_norm(attn + h)
        ff = self.output(tf.nn.gelu(self.intermediate(a), approximate=False))
        return self.output_norm(dropout(ff, self.dropout_rate, training, self.generator) + a)


class BertModel(vit.TorchModule):
    """``transformers.BertModel`` (with pooler), prefix e.g. ``encoders.txt_enc.bert.``.

    ``__call__(ids [B, L] int, attention_mask [B, L] 0/1)`` → {``last_hidden_state`` [B, L, H], ``pooler_output``
    [B, H]}; ``taps`` receives ``embeddings`` and ``layer{j}``.
    """

    def __init__(self, prefix, rng, vocab_size=30522, hidden=768, layers=12, heads=12, intermediate=3072,
                 max_positions=512, type_vocab_size=2, dropout_rate=0.1, generator=None, pad_id=0):
        super().__init__(prefix)
        self.embeddings = self.add_module(BertEmbeddings(prefix + "embeddings.", vocab_size, hidden, max_positions,
                                                         type_vocab_size, rng, pad_id))
        self.layers = [self.add_module(BertLayer(f"{prefix}encoder.layer.{j}.", hidden, heads, intermediate, rng,
                                                 dropout_rate, generator))
                       for j in range(layers)]
        self.pooler = self.add_module(vit.Linear(prefix + "pooler.dense.", hidden, hidden, rng))
        self.dropout_rate, self.generator = dropout_rate, generator

    def __call__(self, ids, attention_mask, training=False, taps=None):
        taps = {} if taps is None else taps
        mask = tf.cast(attention_mask, tf.float32)[:, None, None, :]
        additive = (1.0 - mask) * FLOAT32_MIN
        h = taps["embeddings"] = self.embeddings(ids)
        h = dropout(h, self.dropout_rate, training, self.generator)
        for j, layer in enumerate(self.layers):
            h = taps[f"layer{j}"] = layer(h, additive, training)
        return {"last_hidden_state": h, "pooler_output": tf.tanh(self.pooler(h[:, 0]))}
