"""The originals' optimisation recipe: TF1 Adam with TF1-named state, polynomial decay, L2 on ``DW``/``weights``
kernels, ×2 gradients on ``biases``.

All three codebases share it (RMI/LSTM: decay over 750000 steps; RRN/CMPC: 800000). State names follow TF1 so a
training snapshot of the originals resumes with its optimizer state: ``text_objseg/beta1_power``,
``text_objseg/<variable name>/Adam`` (m) and ``/Adam_1`` (v) — note the doubled prefix for head variables — and the
float32 step counter (``text_objseg/Variable`` for RMI/LSTM/RRN, ``text_objseg/Variable_1`` for CMPC).
"""
import numpy as np
import tensorflow as tf

END_LEARNING_RATE = 1e-5
DECAY_POWER = 0.9
WEIGHT_DECAY = 0.0005


def polynomial_decay(start_lr, step, decay_steps, end_lr=END_LEARNING_RATE, power=DECAY_POWER):
    """``tf.train.polynomial_decay`` with cycle=False, in float32 as TF1 computes it:
    (start − end) · (1 − min(step, decay) / decay)^power + end."""
    step = tf.minimum(tf.cast(step, tf.float32), float(decay_steps))
    return (start_lr - end_lr) * tf.pow(1.0 - step / float(decay_steps), power) + end_lr


def is_regularized(name):
    """L2 applies to ``…/DW`` (``op.name.find('DW') > 0``) and backbone ``…/weights`` (``name[-9:-2] == 'weights'``)."""
    return name.find("DW") > 0 or name.endswith("weights")


def gradient_multiplier(name):
    """×2 for variables whose name contains ``biases`` at index > 0 (``_conv`` biases), else ×1.

    LSTM ``bias`` and layer-norm ``beta`` are therefore not doubled."""
    return 2.0 if name.find("biases") > 0 else 1.0


def l2_regularization(variables, weight_decay=WEIGHT_DECAY):
    """``weight_decay · Σ tf.nn.l2_loss(v)`` = wd · Σ ½‖v‖² over the regularised variables of ``variables`` (a dict)."""
    terms = [tf.nn.l2_loss(v) for name, v in sorted(variables.items()) if is_regularized(name)]
    if not terms:
        return tf.constant(0.0)
    return weight_decay * tf.add_n(terms)


class TF1Adam(tf.Module):
    """``tf.train.AdamOptimizer`` (β1 0.9, β2 0.999, ε 1e-8) exactly as TF1's ``ApplyAdam`` kernel computes it:

        α = lr · sqrt(1 − β2^t) / (1 − β1^t);  m += (g − m)(1 − β1);  v += (g² − v)(1 − β2);  θ −= α · m / (sqrt(v) + ε)

    with ``beta1_power``/``beta2_power`` starting at β1/β2 and multiplied after each update. Sparse (embedding)
    gradients are densified first: TF1's sparse path (duplicate ids summed, m and v decayed densely) is the same
    arithmetic. The step counter is a float32 variable incremented by one per update, as ``apply_gradients(global_step=…)``.
    """

    def __init__(self, variables, start_lr, decay_steps, step_name, scope="text_objseg",
                 beta1=0.9, beta2=0.999, epsilon=1e-8):
        super().__init__(name="tf1_adam")
        self.params = dict(variables)
        self.start_lr, self.decay_steps = start_lr, decay_steps
        # TF1 holds β1, β2, ε as float32 tensors: 1 − β2 is 1 − 0.999f = 0.00099998713, not 0.001.
        self.beta1, self.beta2, self.epsilon = (float(np.float32(b)) for b in (beta1, beta2, epsilon))
        self.step_name, self.scope = step_name, scope
        self.step = tf.Variable(0.0, trainable=False, name=step_name)
        self.beta1_power = tf.Variable(beta1, trainable=False, name=f"{scope}/beta1_power")
        self.beta2_power = tf.Variable(beta2, trainable=False, name=f"{scope}/beta2_power")
        self.m = {n: tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"{scope}/{n}/Adam")
                  for n, v in self.params.items()}
        self.v = {n: tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"{scope}/{n}/Adam_1")
                  for n, v in self.params.items()}

    def tf1_variables(self):
        """{TF1 name: tf.Variable} of the optimizer state (step, beta powers, slots)."""
        out = {self.step_name: self.step,
               f"{self.scope}/beta1_power": self.beta1_power,
               f"{self.scope}/beta2_power": self.beta2_power}
        for n in self.params:
            out[f"{self.scope}/{n}/Adam"] = self.m[n]
            out[f"{self.scope}/{n}/Adam_1"] = self.v[n]
        return out

    def learning_rate(self):
        return polynomial_decay(self.start_lr, self.step, self.decay_steps)

    def apply_gradients(self, grads):
        """Apply {name: gradient} (multipliers already applied) with TF's own ``ApplyAdam`` kernel, one op per
        variable as TF1's ``minimize`` runs it (``ResourceApplyAdam``: the formula above, fused over the tensor).
        Mirrored variables (``tf.distribute``) are updated on every replica. Returns the learning rate used."""
        lr = self.learning_rate()
        beta1_power = tf.convert_to_tensor(self.beta1_power)
        beta2_power = tf.convert_to_tensor(self.beta2_power)

        def apply_adam(var, m, v, grad):
            return tf.raw_ops.ResourceApplyAdam(
                var=var.handle, m=m.handle, v=v.handle, beta1_power=beta1_power, beta2_power=beta2_power, lr=lr,
                beta1=self.beta1, beta2=self.beta2, epsilon=self.epsilon, grad=grad)

        for name, grad in grads.items():
            var = self.params[name]
            args = (self.m[name], self.v[name], tf.convert_to_tensor(grad))
            strategy = getattr(var, "distribute_strategy", None)
            if strategy is None:
                apply_adam(var, *args)
            else:
                strategy.extended.update(var, apply_adam, args=args, group=False)
        self.beta1_power.assign(self.beta1_power * self.beta1)
        self.beta2_power.assign(self.beta2_power * self.beta2)
        self.step.assign_add(1.0)
        return lr
