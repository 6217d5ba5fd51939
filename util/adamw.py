"""PyTorch's AdamW with parameter groups, and ReSTR's learning-rate schedules (``utils/loss.py``).

``AdamW`` computes what ``torch.optim.AdamW`` (torch 2.x, single-tensor CPU path, amsgrad off, maximize off)
computes, operation by operation in float32, with the scalars (learning rate, bias corrections) in float64 as
torch's Python floats. Per parameter p with gradient g, at step t (1, 2, …) and its group's learning rate lr:

    p ← p · (1 − lr·wd)                                  decoupled weight decay, EVERY parameter with a gradient
    m ← m + (1 − β1)·(g − m)                             torch ``lerp_`` (weight < 0.5 form)
    v ← v·β2 + ((1 − β2)·g)·g                            ``mul_`` then ``addcmul_``
    p ← p + ((−lr / (1 − β1^t))·m) / (√v / √(1 − β2^t) + ε)    ``addcdiv_``

A parameter without a gradient is skipped entirely (no decay, no moment update), as torch skips ``p.grad is None``.
torch keeps a step count per parameter; here one counter ``step`` serves all, which is the same while every
parameter of the optimizer gets a gradient at every step (true for ReSTR once its unused ViT ``head`` is left out).

Schedules (ReSTR ``adjust_learning_rate(optimizer, i_iter − 1, …)``): the learning rate of update number
t = i_iter − 1 = ``step`` before the update, so the FIRST update runs at lr 0 (warm-up coefficient 0/warm) and only
fills the moments. Group k gets ``lr · multiplier_k`` (ReSTR: 1 and 0.1), computed in float64.
"""
import math

import numpy as np
import tensorflow as tf

BETAS = (0.9, 0.999)
EPSILON = 1e-8


def lr_poly(base_lr, end_lr, t, max_iter, power, warm):
    """ReSTR ``utils/loss.lr_poly`` in Python floats, as the original: (base − end)·c + end with c = t/warm while
    t < warm, else (1 − (t − warm)/(max_iter − warm))^power."""
    if t < warm:
        coef = t / warm
    else:
        coef = (1 - (t - warm) / (max_iter - warm)) ** power
    return (base_lr - end_lr) * coef + end_lr


def lr_cos(base_lr, end_lr, t, max_iter, warm):
    """ReSTR ``utils/loss.lr_cos`` (``--is_cos``) with its operator-precedence bug kept: during warm-up the
    coefficient is ``t + 1/warm`` (not (t + 1)/warm) and lr = base·coefficient (≈ 0.01 at t = 1000 for base 1e-5);
    after it, a half cosine from base to end: (base − end)·½(1 + cos(π·(t − warm)/(max_iter − warm))) + end."""
    if t < warm:
        return base_lr * (t + 1 / warm)
    coef = 0.5 * (1 + math.cos((t - warm) / (max_iter - warm) * math.pi))
    return (base_lr - end_lr) * coef + end_lr


def schedule_table(schedule, num_steps):
    """float64 [num_steps]: ``schedule(t)`` for t = 0 … num_steps − 1, computed once in Python so that the values
    are bit-identical to the original's (TF's float64 ``pow`` differs from Python's by an ulp)."""
    return np.array([schedule(t) for t in range(num_steps)], np.float64)


def _f32(x):
    return tf.cast(x, tf.float32)


class AdamW(tf.Module):
    """``torch.optim.AdamW(groups, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)`` with a schedule.

    Args:
      groups: list of ({name: tf.Variable}, lr multiplier) — torch's param groups, in order.
      lr_table: float64 [num_steps]: the base learning rate of update number t = 0, 1, … (``schedule_table``);
        updates past its end keep its last value.
      weight_decay: applied to every parameter of every group (decoupled).

    State (``state_variables()``): ``step`` (int64, updates done) and ``<name>/exp_avg``, ``<name>/exp_avg_sq``
    per parameter, zero until its first gradient.
    """

    def __init__(self, groups, lr_table, weight_decay, betas=BETAS, eps=EPSILON):
        super().__init__(name="adamw")
        self.groups = [(dict(variables), float(mult)) for variables, mult in groups]
        names = [n for variables, _ in self.groups for n in variables]
        if len(names) != len(set(names)):
            raise ValueError("AdamW: a parameter is in two groups")
        self.lr_table = tf.constant(np.asarray(lr_table, np.float64))
        self.weight_decay = float(weight_decay)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.exp_avg, self.exp_avg_sq = {}, {}
        for variables, _ in self.groups:
            for name, var in variables.items():
                self.exp_avg[name] = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                                                 name=f"{name}/exp_avg")
                self.exp_avg_sq[name] = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                                                    name=f"{name}/exp_avg_sq")

    def state_variables(self):
        """{name: tf.Variable}: ``step``, then ``<param>/exp_avg`` and ``<param>/exp_avg_sq``."""
        out = {"step": self.step}
        for name in self.exp_avg:
            out[f"{name}/exp_avg"] = self.exp_avg[name]
            out[f"{name}/exp_avg_sq"] = self.exp_avg_sq[name]
        return out

    def group_learning_rates(self, t=None):
        """float64 [n_groups]: each group's learning rate for update number ``t`` (default: the next update)."""
        t = self.step if t is None else t
        base = tf.gather(self.lr_table, tf.minimum(tf.cast(t, tf.int64), self.lr_table.shape[0] - 1))
        return tf.stack([base * mult for _, mult in self.groups])

    def learning_rate(self):
        """float32: group 0's learning rate for the next update."""
        return _f32(self.group_learning_rates()[0])

    def apply_gradients(self, grads):
        """One update from {name: gradient or None}; returns group 0's learning rate used (float32)."""
        lrs = self.group_learning_rates()
        self.step.assign_add(1)
        t = tf.cast(self.step, tf.float64)
        bias_correction1 = 1.0 - tf.pow(tf.constant(self.beta1, tf.float64), t)
        bias_correction2_sqrt = tf.sqrt(1.0 - tf.pow(tf.constant(self.beta2, tf.float64), t))
        for k, (variables, _) in enumerate(self.groups):
            decay = _f32(1.0 - lrs[k] * self.weight_decay)
            neg_step_size = _f32(-(lrs[k] / bias_correction1))
            for name, var in variables.items():
                grad = grads.get(name)
                if grad is None:
                    continue
                grad = tf.convert_to_tensor(grad)
                m, v = self.exp_avg[name], self.exp_avg_sq[name]
                var.assign(var * decay)
                m.assign(m + (1.0 - self.beta1) * (grad - m))
                v.assign(v * self.beta2 + ((1.0 - self.beta2) * grad) * grad)
                denom = tf.sqrt(v) / _f32(bias_correction2_sqrt) + self.eps
                var.assign(var + (neg_step_size * m) / denom)
        return _f32(lrs[0])
