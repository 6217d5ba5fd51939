"""Read the parameters and buffers of a TorchScript archive (``torch.jit.save``; OpenAI's CLIP ``RN50.pt``,
``ViT-B-32.pt``) without torch: a restricted unpickler (``util.pth``'s) plus a reading of the class headers.

Format read (checked against what torch 2.13's ``torch.jit.save`` writes for traced and scripted modules): a zip
archive whose entries sit under one top folder ``<name>/``:

- ``<name>/data.pkl`` — the module tree, pickle protocol 2: every TorchScript object is the GLOBAL
  ``__torch__.<module path> <Class>`` (``___torch_mangle_<n>`` parts included), NEWOBJ with no arguments, then BUILD
  with its attribute dict in slot order (parameters, buffers, other attributes such as ``training``, tensors that are
  plain attributes, and submodules, all as the class declares them); tensors are
  ``torch._utils._rebuild_tensor_v2`` with persistent storage ids exactly as in a ``torch.save`` file (decoded by
  ``util.pth``), scripted modules' int/float/bool lists ``torch.jit._pickle.build_intlist`` etc.;
- ``<name>/code/__torch__/<module path>.py`` (``code/__torch__.py`` for classes defined at top level) — the classes'
  TorchScript source; each class header ``class <Class>(Module):`` is followed by the lines
  ``__parameters__ = ["weight", "bias", ]`` and ``__buffers__ = [...]`` naming which attributes are registered
  parameters and buffers. Only those lines are read (with ``ast``, as literals); nothing is executed;
- ``<name>/data/<key>`` raw storages, ``<name>/byteorder`` (absent before torch 1.10: little), ``<name>/version``,
  ``constants.pkl`` and ``constants/<n>`` (the code's constant tensors, e.g. a traced CLIP's causal mask),
  ``traced_inputs.pkl``, ``.debug_pkl`` files, ``.data/serialization_id`` — not needed.

``load_torchscript_state_dict`` returns what ``torch.jit.load(path).state_dict()`` returns after ``.float()``
(``clip.load(..., jit=False)`` followed by ``.float()``, as TRIS does): per module, its parameters then its buffers
in slot order, then its submodules in slot order, recursively, keys dotted (``visual.layer1.0.conv1.weight``);
entries that are None (``bias=False``, MultiheadAttention's unused ``q_proj_weight``) are left out as
``state_dict()`` leaves them out; tensors that are plain attributes (a scripted CLIP's ``attn_mask``) are not in it.
Floating values become float32 as ``.float()`` makes them (float16 and bfloat16 exactly: OpenAI's files store
float16; float64 rounded to nearest); integer and bool tensors keep their dtype (BatchNorm's
``num_batches_tracked`` int64, OpenAI's ``input_resolution``/``context_length``/``vocab_size``). Shapes are
PyTorch's.

Unpickling resolves ``__torch__.*`` classes to inert records (no code is run), the ``torch.jit._pickle`` list
builders (``build_intlist``, ``build_doublelist``, ``build_boollist``, ``build_tensorlist``, ``restore_type_tag``) to
their plain values, and otherwise exactly ``util.pth``'s allow-list; any other global (``os.system``, …) is refused
with a one-line ``TorchScriptError`` naming the file and the global. Also one line naming the file: a missing or
truncated storage, an object whose class has no code entry, an archive of torch < 1.4 (``model.json`` format), a
file that is not a zip. A ``torch.save`` file (a zip with ``data.pkl`` and no ``code/`` folder) is not TorchScript:
``load_torchscript_state_dict`` refuses it in one line; ``load_weights`` reads either kind.
"""
import ast
import zipfile

import numpy as np

from util import pth


class TorchScriptError(pth.PthError):
    """A TorchScript archive cannot be read safely or is damaged (the message is one line naming the file)."""


class _Record:
    """An inert TorchScript object: ``qualname`` (``__torch__.<module path>.<Class>``) and its attribute dict."""

    qualname = None

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pth._Refused(f"{self.qualname}: object state is a {type(state).__name__}, not an attribute dict")
        self.attrs = state


def _identity(value, *_):
    """``torch.jit._pickle.build_*list(data)`` and ``restore_type_tag(value, type_str)``: the plain value."""
    return value


_JIT_PICKLE = {name: _identity for name in ("build_intlist", "build_doublelist", "build_boollist",
                                            "build_tensorlist", "restore_type_tag")}


class TorchScriptUnpickler(pth.PthUnpickler):
    """``util.pth.PthUnpickler`` plus ``__torch__.*`` classes as ``_Record`` subclasses (one per qualified name)
    and the ``torch.jit._pickle`` list builders."""

    def __init__(self, file, zip_file, prefix, byteorder):
        super().__init__(file, zip_file, prefix, byteorder)
        self._records = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._records:
                self._records[qualname] = type(name, (_Record,), {"qualname": qualname})
            return self._records[qualname]
        if module == "torch.jit._pickle" and name in _JIT_PICKLE:
            return _JIT_PICKLE[name]
        return super().find_class(module, name)


def _name_list(line, code_name):
    """``__parameters__ = ["a", "b", ]`` → ["a", "b"], read as a literal with ``ast`` (never evaluated)."""
    try:
        node = ast.parse(line.strip(), mode="exec").body[0]
    except SyntaxError:
        node = None
    if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.value.elts)):
        raise pth._Refused(f"{code_name}: unreadable line {line.strip()[:80]!r}")
    return [e.value for e in node.value.elts]


def class_table(source, code_name, module_path):
    """One code file's classes → {``<module_path>.<Class>``: (is a Module, parameter names, buffer names)}.

    Reads the class headers at column 0 (``class Name(Base):``) and the ``__parameters__`` / ``__buffers__``
    lines of each class; a class without those lines has none."""
    table, current = {}, None
    for line in source.splitlines():
        if line.startswith("class ") and line.rstrip().endswith(":"):
            name, _, base = line[len("class "):].rstrip()[:-1].partition("(")
            current = f"{module_path}.{name.strip()}"
            table[current] = (base.rstrip(")").strip() == "Module", [], [])
        elif current and line.strip().startswith(("__parameters__ ", "__parameters__=")):
            table[current][1].extend(_name_list(line, code_name))
        elif current and line.strip().startswith(("__buffers__ ", "__buffers__=")):
            table[current][2].extend(_name_list(line, code_name))
    return table


def _classes(zf, prefix):
    """{qualified class name: (is a Module, parameters, buffers)} over every ``code/__torch__…py`` entry."""
    table = {}
    code = prefix + "code/"
    for entry in zf.namelist():
        if entry.startswith(code + "__torch__") and entry.endswith(".py"):
            module_path = entry[len(code):-len(".py")].replace("/", ".")
            table.update(class_table(zf.read(entry).decode("utf-8"), entry[len(prefix):], module_path))
    return table


def _float(array):
    """``Tensor.float()`` on a module's tensors: floating → float32 (float16 exactly), others unchanged."""
    return array.astype(np.float32) if array.dtype.kind == "f" and array.dtype != np.float32 else array


def _class_info(record, classes):
    """(is a Module, parameters, buffers) of a record's class; a class without code is refused."""
    info = classes.get(record.qualname)
    if info is None:
        raise pth._Refused(f"class {record.qualname} has no code entry (no __parameters__ / __buffers__ to read)")
    return info


def module_state_dict(record, classes, prefix=""):
    """``Module.state_dict()`` of an unpickled module record: its parameters then buffers (slot order, None
    skipped), then each submodule's, keys ``prefix + name`` — floating values as float32 (``.float()``)."""
    _, params, buffers = _class_info(record, classes)
    attrs = getattr(record, "attrs", {})
    out = {}
    for kind, names in (("parameter", params), ("buffer", buffers)):
        chosen = set(names)
        for name, value in attrs.items():
            if name not in chosen or value is None:
                continue
            if not isinstance(value, np.ndarray):
                raise pth._Refused(f"{record.qualname}.{name}: a {kind} that is a {type(value).__name__}, not a tensor")
            out[prefix + name] = _float(value)
    for name, value in attrs.items():
        if isinstance(value, _Record) and _class_info(value, classes)[0]:
            out.update(module_state_dict(value, classes, f"{prefix}{name}."))
    return out


def _archive_prefix(zf, path):
    """The ``<name>/`` folder of a TorchScript archive; one line for a ``torch.save`` file or an old archive."""
    names = zf.namelist()
    tops = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(tops) != 1:
        if any(n.count("/") == 1 and n.endswith("/model.json") for n in names):
            raise TorchScriptError(f"{path}: a TorchScript archive of torch < 1.4 (model.json format), not read: "
                                   "re-save it with torch.jit.save in a newer torch")
        raise TorchScriptError(f"{path}: a zip archive but not a TorchScript archive (expected one <name>/data.pkl, "
                               f"found {len(tops)})")
    prefix = tops[0][:-len("data.pkl")]
    if not any(n.startswith(prefix + "code/") for n in names):
        raise TorchScriptError(f"{path}: a torch.save file, not a TorchScript archive (no {prefix}code/ folder; "
                               "read it with util.pth.load_pth)")
    return prefix


def is_torchscript(path):
    """Whether ``path`` is a zip whose one ``<name>/`` folder holds ``data.pkl`` and a ``code/`` folder (False for
    a ``torch.save`` file, a non-zip file, a missing file)."""
    try:
        with zipfile.ZipFile(str(path)) as zf:
            _archive_prefix(zf, path)
        return True
    except (OSError, zipfile.BadZipFile, TorchScriptError):
        return False


def load_torchscript_state_dict(path, get_from=None):
    """``torch.jit.load(path).state_dict()`` followed by ``.float()``, without torch (see the module docstring).

    Args:
      path: the archive (e.g. OpenAI's ``RN50.pt``).
      get_from: where users get the file, appended to the missing-file message.
    Returns:
      {dotted key: numpy array} in state_dict order; floating values float32.
    Raises:
      FileNotFoundError (one line, naming the file and ``get_from``); TorchScriptError (a ``util.pth.PthError``;
      one line naming the file) for anything unreadable or refused.
    """
    def read(zf):
        prefix = _archive_prefix(zf, path)
        root = pth.unpickle_data(zf, prefix, TorchScriptUnpickler)
        if not isinstance(root, _Record):
            raise TorchScriptError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
        return module_state_dict(root, _classes(zf, prefix))

    return pth.read_archive(path, get_from, read, error=TorchScriptError, noun="a TorchScript archive",
                            bad_zip="not a TorchScript archive or damaged ({})", damaged="archive")


def load_weights(path, get_from=None):
    """A weights file of either kind: a TorchScript archive → ``load_torchscript_state_dict`` (float32); anything
    else → ``util.pth.load_pth`` (a ``torch.save`` file as saved: a state_dict or a checkpoint dict)."""
    if is_torchscript(path):
        return load_torchscript_state_dict(path, get_from)
    return pth.load_pth(path, get_from)
