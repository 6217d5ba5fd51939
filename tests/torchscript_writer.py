"""Write TorchScript archives without torch, in the layout torch 2.13's ``torch.jit.save`` writes (checked against
it on traced and scripted CLIP-like modules): a zip with one top folder ``<name>/`` holding, in this order,
``data/<n>`` (raw little-endian storages, stored), ``data.pkl`` (stored), ``code/__torch__/<module path>.py``
(deflated; per class ``class <Class>(Module):`` then ``__parameters__ = ["a", "b", ]``, ``__buffers__ = [...]``,
attribute annotations and a ``forward``), ``constants.pkl`` (an empty tuple), ``version`` (``4``), ``byteorder``
(``little``) and ``.data/serialization_id``.

``data.pkl`` is pickle protocol 2 written opcode by opcode as torch does: each module is GLOBAL
``__torch__.<module path> <Class>``, EMPTY_TUPLE, NEWOBJ, then its attribute dict (EMPTY_DICT MARK … SETITEMS, in
slot order: the entries given, then ``training`` and ``_is_full_backward_hook``) and BUILD; each tensor is
GLOBAL ``torch._utils _rebuild_tensor_v2`` applied to (persistent id ``('storage', torch.<Type>Storage, '<n>',
'cpu', numel)`` via BINPERSID, offset, size, stride, requires_grad, ``collections.OrderedDict()``); strings and
globals are memoised (BINPUT, BINGET on repeats) as torch's pickler does. The debug files (``*.debug_pkl``) and
traced inputs torch also writes are left out: the reader does not use them.
"""
import struct
import zipfile

import numpy as np

_STORAGES = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
             np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
             np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}


class Module:
    """One module: ``qualname`` ``__torch__.<module path>.<Class>``; ``entries`` [(name, value, kind)] in slot
    order, kind 'parameter', 'buffer' or 'attribute' (a Module value is a submodule, a tensor value of kind
    'attribute' a plain tensor attribute, None an unset optional)."""

    def __init__(self, qualname, entries):
        self.qualname, self.entries = qualname, list(entries)


def slots(module):
    """``module.entries`` with ``training`` (False: saved in eval mode) and ``_is_full_backward_hook`` (None)
    before the first submodule, torch's slot order."""
    first = next((i for i, (_, x, _) in enumerate(module.entries) if isinstance(x, Module)), len(module.entries))
    extra = [("training", False, "attribute"), ("_is_full_backward_hook", None, "attribute")]
    return module.entries[:first] + extra + module.entries[first:]


class Call:
    """A GLOBAL ``module name`` applied to ``args`` (REDUCE): e.g. ``torch.jit._pickle build_intlist``."""

    def __init__(self, module, name, *args):
        self.module, self.name, self.args = module, name, args


class _Pickle:
    """The opcode writer for ``data.pkl`` (module docstring)."""

    def __init__(self):
        self.out, self.memo, self.storages = bytearray(b"\x80\x02"), {}, {}

    def _put(self, key):
        self.memo[key] = len(self.memo)
        index = self.memo[key]
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _memoised(self, key):
        if key not in self.memo:
            return False
        index = self.memo[key]
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    def glob(self, module, name):
        if not self._memoised(("global", module, name)):
            self.out += b"c" + f"{module}\n{name}\n".encode()
            self._put(("global", module, name))

    def value(self, v):
        if isinstance(v, Module):
            self.glob(*v.qualname.rsplit(".", 1))
            self.out += b")\x81"
            self.out += b"}("
            for n, x, kind in slots(v):
                self.value(n)
                if isinstance(x, np.ndarray):
                    self.tensor(x, kind == "parameter")
                else:
                    self.value(x)
            self.out += b"ub"
        elif isinstance(v, Call):
            self.glob(v.module, v.name)
            self.value(tuple(v.args))
            self.out += b"R"
        elif isinstance(v, np.ndarray):
            self.tensor(v, False)
        elif isinstance(v, dict):
            self.out += b"}"
            if v:
                self.out += b"("
                for key, x in v.items():
                    self.value(key)
                    self.value(x)
                self.out += b"u"
        elif isinstance(v, (tuple, list)):
            self.out += b"]" if isinstance(v, list) else b""
            self.out += b"("
            for x in v:
                self.value(x)
            self.out += b"e" if isinstance(v, list) else b"t"
        elif v is None:
            self.out += b"N"
        elif isinstance(v, bool):
            self.out += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.out += b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)
        elif isinstance(v, float):
            self.out += b"G" + struct.pack(">d", v)
        elif isinstance(v, str):
            if not self._memoised(("str", v)):
                data = v.encode()
                self.out += b"X" + struct.pack("<I", len(data)) + data
                self._put(("str", v))
        else:
            raise TypeError(f"cannot write {type(v).__name__}")

    def tensor(self, array, requires_grad):
        """``_rebuild_tensor_v2(storage pid, 0, size, stride, requires_grad, OrderedDict())``; a new storage
        ``data/<n>`` per tensor (contiguous, little-endian)."""
        key = str(len(self.storages))
        array = np.array(array, order="C")          # (ascontiguousarray makes 0-d arrays 1-d)
        self.storages[key] = array.astype(array.dtype.newbyteorder("<")).tobytes()
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("
        self.value("storage")
        self.glob("torch", _STORAGES[array.dtype])
        self.value(key)
        self.value("cpu")
        self.value(int(array.size))
        self.out += b"tQ"
        self.value(0)
        self.value(tuple(int(s) for s in array.shape))
        self.value(tuple(int(np.prod(array.shape[k + 1:])) for k in range(array.ndim)))
        self.value(requires_grad)
        self.glob("collections", "OrderedDict")
        self.out += b")RtR"

    def finish(self):
        return bytes(self.out + b".")


def _classes(module, out):
    """{module path: {Class: source}} for ``module`` and its submodules (``class_source`` of each)."""
    path, name = module.qualname.rsplit(".", 1)
    out.setdefault(path, {})[name] = class_source(module)
    for _, value, _ in module.entries:
        if isinstance(value, Module):
            _classes(value, out)
    return out


def class_source(module):
    """The TorchScript source of ``module``'s class as torch 2.13 writes it (header, ``__parameters__``,
    ``__buffers__``, annotations, a ``forward``)."""
    name = module.qualname.rsplit(".", 1)[1]
    params = [n for n, _, kind in module.entries if kind == "parameter"]
    buffers = [n for n, _, kind in module.entries if kind == "buffer"]
    lines = [f"class {name}(Module):",
             "  __parameters__ = [" + "".join(f'"{n}", ' for n in params) + "]",
             "  __buffers__ = [" + "".join(f'"{n}", ' for n in buffers) + "]"]
    for n, value, _ in slots(module):
        kind = (value.qualname if isinstance(value, Module) else "Tensor" if isinstance(value, np.ndarray)
                else "bool" if isinstance(value, bool) else "Optional[bool]")
        lines.append(f"  {n} : {kind}" if n.isidentifier() else f'  __annotations__["{n}"] = {kind}')
    lines += [f"  def forward(self: {module.qualname},", "    x: Tensor) -> Tensor:", "    return x", ""]
    return "\n".join(lines)


def write_archive(path, root, name=None, data_pkl=None):
    """Write ``root`` (a Module) as a TorchScript archive at ``path``; ``name`` is the top folder (default the
    file's stem, as torch); ``data_pkl`` replaces the pickled module tree (for damaged-archive tests)."""
    name = name or str(path).rsplit("/", 1)[-1].rsplit(".", 1)[0]
    p = _Pickle()
    p.value(root)
    pickled = p.finish() if data_pkl is None else data_pkl
    with zipfile.ZipFile(path, "w") as zf:
        for key, raw in p.storages.items():
            zf.writestr(f"{name}/data/{key}", raw, zipfile.ZIP_STORED)
        zf.writestr(f"{name}/data.pkl", pickled, zipfile.ZIP_STORED)
        for module_path, classes in _classes(root, {}).items():
            code = module_path.replace(".", "/") + ".py"
            zf.writestr(f"{name}/code/{code}", "\n".join(classes.values()), zipfile.ZIP_DEFLATED)
        zf.writestr(f"{name}/constants.pkl", b"\x80\x02).", zipfile.ZIP_STORED)
        zf.writestr(f"{name}/version", "4\n", zipfile.ZIP_STORED)
        zf.writestr(f"{name}/byteorder", "little", zipfile.ZIP_STORED)
        zf.writestr(f"{name}/.data/serialization_id", "0" * 40, zipfile.ZIP_STORED)


BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked", "input_resolution", "context_length",
                "vocab_size")


def module_tree(state_dict, qualname="__torch__.model.Model", buffers=BUFFER_NAMES):
    """A Module tree holding ``state_dict`` (dotted keys, in order): a leaf is a buffer when its name is in
    ``buffers``, else a parameter; each submodule gets its own class ``__torch__.model.___torch_mangle_<n>.M<n>``
    (as torch mangles classes of equal name and different shapes)."""
    counter = [0]

    def build(items, qual):
        entries, children = [], {}
        for key, value in items:
            head, _, rest = key.partition(".")
            if rest:
                if head not in children:
                    children[head] = []
                    entries.append((head, children[head], "attribute"))
                children[head].append((rest, value))
            else:
                entries.append((head, value, "buffer" if head in buffers else "parameter"))
        out = []
        for n, value, kind in entries:
            if isinstance(value, list):
                counter[0] += 1
                value = build(value, f"__torch__.model.___torch_mangle_{counter[0]}.M{counter[0]}")
            out.append((n, value, kind))
        return Module(qual, out)

    return build(list(state_dict.items()), qualname)
