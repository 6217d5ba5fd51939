"""Training: one ``tf.function`` step with the originals' objective, and the training loop."""
import tensorflow as tf

from util.optim import WEIGHT_DECAY, gradient_multiplier, l2_regularization


def make_train_step(forward, losses_fn, objective, train_vars, optimizer, weight_decay=WEIGHT_DECAY,
                    jit_compile=False):
    """Build the step of the originals' ``train_op``.

    cost = losses[objective] + weight_decay · Σ ½‖W‖² (over the ``DW``/``weights`` kernels of ``train_vars``);
    gradients of cost w.r.t. ``train_vars`` times ``gradient_multiplier`` (×2 on ``biases``); one TF1 Adam update.

    Args:
      forward: fn(inputs) -> outputs dict (the model's forward pass).
      losses_fn: fn(outputs, target_fine) -> dict of classification losses (float32 scalars).
      objective: key of the loss that is optimised (``cls_loss``; CMPC ``cls_loss_all``).
      train_vars: {TF1 name: tf.Variable} that are updated (the original's ``tvars``).
      optimizer: ``util.optim.TF1Adam`` over the same variables.
    Returns:
      step(inputs, target_fine) -> (losses, outputs): losses before the update plus ``reg_loss``, ``cost`` and the
      ``learning_rate`` used by this update.
    """
    names = sorted(train_vars)
    var_list = [train_vars[n] for n in names]

    def step(inputs, target_fine):
        with tf.GradientTape() as tape:
            outputs = forward(inputs)
            losses = dict(losses_fn(outputs, target_fine))
            losses["reg_loss"] = l2_regularization(train_vars, weight_decay)
            losses["cost"] = losses[objective] + losses["reg_loss"]
        grads = tape.gradient(losses["cost"], var_list)
        scaled = {}
        for name, grad in zip(names, grads):
            if grad is None:
                continue
            mult = gradient_multiplier(name)
            scaled[name] = tf.multiply(mult, tf.convert_to_tensor(grad)) if mult != 1.0 else grad
        losses["learning_rate"] = optimizer.apply_gradients(scaled)
        return losses, outputs

    return tf.function(step, jit_compile=jit_compile)
