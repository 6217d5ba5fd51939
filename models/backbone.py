"""DeepLab-ResNet-101: the frozen visual backbone shared by RMI, RRN and CMPC.

One ResNet-101 v1 in the Caffe style of the originals (DrSleep's ``deeplab_resnet/model.py`` as vendored by CMPC and
RRN; chenxi116's ``deeplab_model.DeepLab`` / ``resnet_model.ResNet(atrous=True)`` for RMI — the same graph):

- stride in the first 1×1 conv of a bottleneck (``res3a_branch2a`` and ``res3a_branch1``), no conv biases;
- output stride 8: stage 4 uses dilation 2 and stage 5 dilation 4 in their 3×3 convs, no stride;
- frozen batch norm, always in inference mode: ``y = (x − mean)·gamma·rsqrt(var + 0.001) + beta`` as one
  ``FusedBatchNormV3`` op (slim's / TF-deeplab's epsilon 0.001, not Caffe's 1e-5);
- TensorFlow ``SAME`` padding, asymmetric for even inputs (conv1 pads 2/3 on 320, pool1 0/1 on 160), reproduced by
  calling ``tf.nn.conv2d`` / ``tf.nn.max_pool2d`` with ``'SAME'`` — not Caffe's symmetric padding;
- NHWC input: BGR, 0–255, minus the per-channel mean (104.00698793, 116.66876762, 122.67891434).

Variables live in ``Backbone.vars``, keyed by their DrSleep TF1 name (``conv1/weights``, ``bn_conv1/moving_mean``,
``res4b22_branch2c/weights``, …), which is also each variable's TF name. The other two naming schemes (TF-deeplab,
TF-resnet) and the Caffe-derived ``.npy`` files are translated in ``util/checkpoints.py``, never here.
"""
import numpy as np
import tensorflow as tf

BN_EPSILON = 1e-3

# (stage, residual units, bottleneck width, stride of unit a, dilation of the 3×3 convs); output width = 4 × bottleneck.
STAGES = ((2, 3, 64, 1, 1), (3, 4, 128, 2, 1), (4, 23, 256, 1, 2), (5, 3, 512, 1, 4))
FC1000 = ("ResNet/fc1000/DW", "ResNet/fc1000/biases")
FEATURES = ("conv1", "bn_conv1", "pool1", "res2c_relu", "res3b3_relu", "res4b22_relu", "res5c_relu")


def unit_names(stage, units):
    """Caffe names of a stage's residual units: ``res2a, res2b, res2c`` but ``res4a, res4b1 … res4b22``."""
    if units <= 3:
        return [f"res{stage}{letter}" for letter in "abc"[:units]]
    return [f"res{stage}a"] + [f"res{stage}b{i}" for i in range(1, units)]


def bn_name(conv):
    """The batch-norm scope following conv scope ``conv``: ``conv1`` → ``bn_conv1``, ``res3a_branch1`` → ``bn3a_branch1``."""
    return "bn_conv1" if conv == "conv1" else "bn" + conv[len("res"):]


def variable_shapes(fc1000=False):
    """{canonical TF1 name: shape} of every backbone variable, in graph order.

    520 entries (104 HWIO kernels ``<conv>/weights`` and 104 × ``<bn>/{beta,gamma,moving_mean,moving_variance}``),
    plus ``ResNet/fc1000/DW`` [1,1,2048,1000] and ``ResNet/fc1000/biases`` [1000] with ``fc1000=True``.
    """
    shapes = {}

    def conv(name, k, cin, cout):
        shapes[f"{name}/weights"] = (k, k, cin, cout)
        for param in ("beta", "gamma", "moving_mean", "moving_variance"):
            shapes[f"{bn_name(name)}/{param}"] = (cout,)

    conv("conv1", 7, 3, 64)
    cin = 64
    for stage, units, width, _, _ in STAGES:
        for i, unit in enumerate(unit_names(stage, units)):
            if i == 0:
                conv(f"{unit}_branch1", 1, cin, 4 * width)
            conv(f"{unit}_branch2a", 1, cin, width)
            conv(f"{unit}_branch2b", 3, width, width)
            conv(f"{unit}_branch2c", 1, width, 4 * width)
            cin = 4 * width
    if fc1000:
        shapes[FC1000[0]] = (1, 1, 2048, 1000)
        shapes[FC1000[1]] = (1000,)
    return shapes


def seeded_weights(seed=0, fc1000=False):
    """Deterministic stand-in weights: the rule of ``golden/deeplab_backbone/README.md``.

    One ``np.random.RandomState(seed)`` draws, in sorted name order and float64: kernels N(0,1)·sqrt(2 / fan_in),
    moving_mean N(0,1)·0.1, moving_variance U(0.5, 1.5), gamma U(0.1, 0.3) for ``*branch2c`` scopes (keeps the
    residual sums bounded) else U(0.8, 1.2), beta N(0,1)·0.1; cast to float32. With ``fc1000``: its kernel the same
    way, its biases 0. Used by the golden tests (seed 0) and for training without pretrained weights
    (``--init-weights random``).
    """
    rs = np.random.RandomState(seed)
    out = {}
    for name, shape in sorted(variable_shapes(fc1000).items()):
        scope, param = name.rsplit("/", 1)
        if param in ("weights", "DW"):
            value = rs.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))
        elif param == "moving_mean":
            value = rs.standard_normal(shape) * 0.1
        elif param == "moving_variance":
            value = rs.uniform(0.5, 1.5, shape)
        elif param == "gamma":
            value = rs.uniform(0.1, 0.3, shape) if scope.endswith("branch2c") else rs.uniform(0.8, 1.2, shape)
        elif param == "beta":
            value = rs.standard_normal(shape) * 0.1
        else:
            value = np.zeros(shape)
        out[name] = value.astype(np.float32)
    return out


class Backbone(tf.Module):
    """ResNet-101 DeepLab backbone; ``Backbone()(images)`` → dict of NHWC feature maps.

    Args:
      fc1000: also build TF-resnet's ``ResNet/fc1000`` head (RMI ``-w resnet``): a 1×1 conv 2048→1000 with bias and no
        ReLU on ``res5c_relu``, returned as feature ``fc1000``.
      dtype: storage dtype of the variables; the forward computes in the dtype of its input (weights are cast).

    Variables are zero-initialised (they are always loaded from a checkpoint) and not trainable: the backbone is frozen
    and batch norm never leaves inference mode. The exceptions are the fc1000 variables, which RMI fine-tunes, and the
    kernels of ``conv5_variables()``, which a training loop given ``-conv5`` adds (and watches) explicitly.
    """

    def __init__(self, fc1000=False, dtype=tf.float32, name="backbone"):
        super().__init__(name=name)
        self.fc1000 = fc1000
        self.vars = {n: tf.Variable(tf.zeros(shape, dtype), trainable=n in FC1000, name=n)
                     for n, shape in variable_shapes(fc1000).items()}

    def tf1_variables(self):
        """{canonical TF1 name: tf.Variable} (the DrSleep names, plus ``ResNet/fc1000/*`` when built with fc1000)."""
        return dict(self.vars)

    def conv5_variables(self):
        """The 93 kernels CMPC's / RRN's ``-conv5`` fine-tunes: every ``res3*``, ``res4*``, ``res5*`` ``…/weights``.

        Never conv1, stage 2 or any batch-norm parameter (the originals select trainable names starting with res3/res4/
        res5, and batch norm lives under ``bn*``).
        """
        return [v for n, v in self.vars.items() if n.startswith(("res3", "res4", "res5")) and n.endswith("/weights")]

    def _conv(self, x, name, stride=1, dilation=1):
        """``tf.nn.conv2d`` with kernel ``<name>/weights`` (HWIO), TF ``SAME`` padding, no bias.

        A dilated kernel runs as the originals' ``tf.nn.atrous_conv2d``: ``tf.nn.convolution`` with the dilation,
        i.e. space-to-batch, an undilated conv, batch-to-space. Its gradient exists on CPU, where ``Conv2D``'s own
        ``dilations`` has none (``-conv5`` fine-tunes the dilated res4/res5 kernels).
        """
        w = tf.cast(self.vars[f"{name}/weights"], x.dtype)
        if dilation > 1:
            return tf.nn.convolution(x, w, padding="SAME", dilations=dilation)
        return tf.nn.conv2d(x, w, strides=stride, padding="SAME")

    def _bn(self, x, conv, relu):
        """Inference batch norm of scope ``bn_name(conv)`` with the moving statistics, epsilon 0.001, optional ReLU.

        One ``FusedBatchNormV3`` op in inference mode (``is_training=False``), as the originals' graph runs it
        (``tf.contrib.layers.batch_norm(fused=True)`` / ``tf.nn.fused_batch_norm``): TF's graph optimizer fuses
        it with the preceding ``Conv2D`` and the ``Relu`` into one kernel. Statistics and scale stay float32 for a
        bfloat16/float16 ``x``.
        """
        p = {k: self.vars[f"{bn_name(conv)}/{k}"] for k in ("beta", "gamma", "moving_mean", "moving_variance")}
        y = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=p["gamma"], offset=p["beta"], mean=p["moving_mean"], variance=p["moving_variance"],
            epsilon=BN_EPSILON, is_training=False)[0]
        return tf.nn.relu(y) if relu else y

    def _unit(self, x, unit, stride, dilation, project):
        """Bottleneck unit ``unit`` (e.g. ``res4b7``): [N,H,W,Cin] → [N,H/stride,W/stride,4·width].

        branch2a 1×1 (stride) → BN+ReLU → branch2b 3×3 (dilation) → BN+ReLU → branch2c 1×1 → BN; shortcut = branch1
        1×1 (stride) → BN in the first unit of a stage (``project``), identity otherwise; ``<unit>_relu`` = ReLU(sum).
        """
        shortcut = self._bn(self._conv(x, f"{unit}_branch1", stride), f"{unit}_branch1", False) if project else x
        y = self._bn(self._conv(x, f"{unit}_branch2a", stride), f"{unit}_branch2a", True)
        y = self._bn(self._conv(y, f"{unit}_branch2b", 1, dilation), f"{unit}_branch2b", True)
        y = self._bn(self._conv(y, f"{unit}_branch2c"), f"{unit}_branch2c", False)
        return tf.nn.relu(shortcut + y)

    def _stage(self, x, stage, units, stride, dilation):
        """Stage ``res<stage>``: its units in order; only unit a projects the shortcut and strides."""
        for i, unit in enumerate(unit_names(stage, units)):
            x = self._unit(x, unit, stride if i == 0 else 1, dilation, project=i == 0)
        return x, f"{unit}_relu"

    def __call__(self, images):
        """Forward pass.

        Args:
          images: [N,H,W,3] BGR, mean-subtracted, 0–255 scale; any float dtype (the computation uses it).
        Returns:
          dict of NHWC maps, named after the DrSleep layers (H8 = ceil(H/8), W8 likewise):
            ``conv1`` [N,⌈H/2⌉,⌈W/2⌉,64] (before BN), ``bn_conv1`` (BN + ReLU, same shape),
            ``pool1`` [N,⌈H/4⌉,⌈W/4⌉,64], ``res2c_relu`` [N,⌈H/4⌉,⌈W/4⌉,256], ``res3b3_relu`` [N,H8,W8,512],
            ``res4b22_relu`` [N,H8,W8,1024], ``res5c_relu`` [N,H8,W8,2048] — the map RMI calls ``res5c``
            (TF-deeplab's ``group_last`` is a ReLU of the last unit, i.e. this one) — and with fc1000
            ``fc1000`` [N,H8,W8,1000] (TF-resnet's ``logits``, no ReLU).
        """
        feats = {}
        x = feats["conv1"] = self._conv(images, "conv1", stride=2)
        x = feats["bn_conv1"] = self._bn(x, "conv1", relu=True)
        x = feats["pool1"] = tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME")
        for stage, units, _, stride, dilation in STAGES:
            x, name = self._stage(x, stage, units, stride, dilation)
            feats[name] = x
        if self.fc1000:
            w, b = (tf.cast(self.vars[n], x.dtype) for n in FC1000)
            feats["fc1000"] = tf.nn.conv2d(x, w, strides=1, padding="SAME") + b
        return feats
