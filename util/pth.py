"""Read PyTorch ``.pth`` files without torch: a restricted unpickler plus numpy.

Format read (``torch.save`` since torch 1.6, "zip serialization"): a zip archive (entries stored, not compressed)
whose entries sit under one top folder ``<name>/`` (the file's stem when it was written):
``<name>/data.pkl`` — the pickled object, in which every tensor is the call
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])``
and every storage a persistent id ``('storage', torch.<Type>Storage, key, location, numel)``;
``<name>/data/<key>`` — the raw bytes of storage ``key`` (``numel`` elements); ``<name>/byteorder`` — ``little`` or
``big`` (absent from files of torch < 1.10: little); ``<name>/version``, ``.format_version``, ``.storage_alignment``,
``.data/serialization_id`` — not needed to read the data. The pre-1.6 ("legacy", non-zip) format is refused.

``load_pth`` unpickles with ``PthUnpickler``, which resolves only these globals (anything else — a class, a function
such as ``os.system`` or ``builtins.eval`` — is refused with a one-line ``PthError`` naming the file and the global):

- ``collections.OrderedDict`` (state_dicts; their ``_metadata`` attribute is kept as an attribute);
- ``torch._utils._rebuild_tensor_v2`` → a numpy array (below); ``torch._utils._rebuild_parameter`` and
  ``_rebuild_parameter_with_state`` (an ``nn.Parameter``) → the same array (``requires_grad``, hooks and state dropped);
- ``torch.<Type>Storage`` (only as the storage type of a persistent id);
- what training checkpoints add around the tensors: ``argparse.Namespace`` (saved ``args``),
  ``numpy.dtype`` and ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` for numeric (bool, int,
  float, complex) numpy scalars only, ``_codecs.encode`` with the latin-1 codec only (how protocol 2 stores bytes),
  ``builtins.set`` / ``frozenset``.

Plain pickle values (dict, list, tuple, str, bytes, int, float, bool, None) need no global and load as themselves.

Tensors become numpy arrays with the tensor's shape, built from its storage with the stored offset and element
strides (any strides, including non-contiguous views and tensors sharing one storage); every array is a fresh
C-contiguous copy in native byte order. dtypes: Float → float32, Double → float64, Half → float16, BFloat16 →
float32 (exact: the 16 stored bits become the high half of a float32), Long → int64, Int → int32, Short → int16,
Char → int8, Byte → uint8, Bool → bool. A 0-dimensional tensor becomes a 0-d array.
"""
import argparse
import codecs
import collections
import pickle
import zipfile

import numpy as np


class PthError(ValueError):
    """A ``.pth`` file cannot be read safely or is damaged (the message is one line naming the file)."""


class _Refused(Exception):
    """Raised inside the unpickler; ``load_pth`` turns it into a PthError naming the file."""


# torch storage class name → numpy type code ("bfloat16": read as uint16); the byte order is the file's
_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bfloat16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType:
    """Stands for a ``torch.<Type>Storage`` class inside a persistent id."""

    def __init__(self, name):
        self.name = name


class _Storage:
    """One storage: a 1-D numpy array of its ``numel`` elements (native order; bfloat16 already widened)."""

    def __init__(self, array):
        self.array = array


def _decode_storage(raw, kind, numel, byteorder, key):
    """Raw storage bytes → 1-D native numpy array of ``numel`` elements (see the module docstring for dtypes)."""
    dtype = np.dtype("u2" if kind == "bfloat16" else kind).newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) < numel * dtype.itemsize:
        raise _Refused(f"truncated storage data/{key}: {len(raw)} bytes, {numel} elements of {dtype.itemsize} "
                       "bytes expected")
    values = np.frombuffer(raw, dtype, count=numel)
    if kind == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(dtype.newbyteorder("="), copy=False)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` → a C-contiguous numpy copy of the strided view of ``storage``."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor whose storage is not a persistent storage record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    base = storage.array
    if len(size) != len(stride) or min(size + stride + (storage_offset,), default=0) < 0:
        raise _Refused(f"invalid tensor layout: offset {storage_offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, base.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise _Refused(f"truncated storage: a tensor (offset {storage_offset}, size {size}, stride {stride}) needs "
                       f"element {last}, its storage has {base.size}")
    view = np.lib.stride_tricks.as_strided(base[storage_offset:], size, tuple(s * base.itemsize for s in stride),
                                           writeable=False)
    return np.array(view, order="C")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """``torch._utils._rebuild_parameter[_with_state]``: an ``nn.Parameter`` is its data array."""
    return data


_NUMERIC_KINDS = "biufc"


def _numpy_dtype(obj, align=False, copy=True):
    """``numpy.dtype`` restricted to numeric and bool dtypes (always a copy, as numpy's own pickles ask)."""
    dtype = np.dtype(obj) if isinstance(obj, str) else None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS:
        raise _Refused(f"refusing to unpickle numpy.dtype({obj!r}) (only numeric dtypes are allowed)")
    return np.dtype(obj, align=bool(align), copy=True)


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, bytes)`` for numeric dtypes only."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        raise _Refused("refusing to unpickle a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype)[0]


def _latin1_encode(obj, encoding="utf-8"):
    """``_codecs.encode(str, 'latin1')``: how pickle protocol 2 stores ``bytes``; other codecs are refused."""
    if not (isinstance(obj, str) and codecs.lookup(encoding).name == "iso8859-1"):
        raise _Refused(f"refusing to unpickle _codecs.encode with {encoding!r} (only latin-1 bytes are allowed)")
    return obj.encode("latin-1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): argparse.Namespace,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class PthUnpickler(pickle.Unpickler):
    """Unpickler for ``<name>/data.pkl`` of a zip ``.pth``: the globals listed in the module docstring only, storages
    read from ``zip_file`` (each once, however many tensors share it)."""

    def __init__(self, file, zip_file, prefix, byteorder):
        super().__init__(file, encoding="utf-8")
        self._zip, self._prefix, self._byteorder = zip_file, prefix, byteorder
        self._storages = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refusing to unpickle {module}.{name} (only tensors and containers are allowed)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise _Refused(f"refusing persistent id {str(pid)[:80]} (only tensor storages are allowed)")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            try:
                raw = self._zip.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise _Refused(f"storage data/{key} is missing from the archive") from None
            kind = _STORAGE_DTYPES[storage_type.name]
            self._storages[key] = _Storage(_decode_storage(raw, kind, numel, self._byteorder, key))
        return self._storages[key]


def unpickle_data(zip_file, prefix, unpickler=PthUnpickler):
    """Unpickle ``<prefix>data.pkl`` of an open archive with ``unpickler`` (``PthUnpickler`` or a subclass), its
    storages decoded in the archive's byte order (``<prefix>byteorder``; absent: little)."""
    names = set(zip_file.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = zip_file.read(prefix + "byteorder").decode().strip()
    if byteorder not in ("little", "big"):
        raise _Refused(f"unknown byteorder {byteorder!r}")
    with zip_file.open(prefix + "data.pkl") as f:
        return unpickler(f, zip_file, prefix, byteorder).load()


def read_archive(path, get_from, read, *, error=PthError, noun="a .pth file",
                 bad_zip="not a zip-format .pth or damaged ({})", damaged="data.pkl"):
    """``read(zip_file)`` of the zip archive ``path``, every failure turned into one line naming the file.

    Args:
      path: the file; get_from: where users get it, appended to the missing-file message.
      read: called with the open ``zipfile.ZipFile``; may raise ``error`` (passed on), ``_Refused`` (the file's name
        is prefixed) or the unpickling errors (reported as a damaged ``damaged``).
      error: the ``PthError`` class raised; noun: what a directory is not; bad_zip: the message for a non-zip file,
        ``{}`` standing for zipfile's reason.
    Raises:
      FileNotFoundError (naming the file and ``get_from``); ``error`` for anything else.
    """
    path = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return read(zf)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file" + (f"; {get_from}" if get_from else "")) from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not {noun}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    except zipfile.BadZipFile as e:
        raise error(f"{path}: " + bad_zip.format(e)) from None
    except _Refused as e:
        raise error(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
        if isinstance(e, PthError):
            raise
        raise error(f"{path}: damaged {damaged} ({type(e).__name__}: {e})") from None


def load_pth(path, get_from=None):
    """Load a zip-format ``.pth`` (``torch.save``) with tensors as numpy arrays, without torch.

    Args:
      path: the file.
      get_from: where users get the file, appended to the missing-file message (e.g. "written by training as …").
    Returns:
      the saved object (a state_dict is an OrderedDict {key: numpy array}; checkpoints keep their dicts, lists,
      numbers, strings).
    Raises:
      FileNotFoundError (one line, naming the file and ``get_from``); PthError (one line, naming the file) for a file
      that is not a zip ``.pth`` (legacy format included), a refused global, a missing or truncated storage.
    """
    def read(zf):
        tops = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(tops) != 1:
            raise PthError(f"{path}: a zip archive but not a torch.save file (expected one <name>/data.pkl, "
                           f"found {len(tops)})")
        return unpickle_data(zf, tops[0][:-len("data.pkl")])

    return read_archive(path, get_from, read,
                        bad_zip="not a zip-format .pth or damaged ({}); files of torch < 1.6 (legacy format) are "
                                "not read: re-save them with torch.save in a newer torch")


def load_state_dict(path, get_from=None):
    """``load_pth`` of a plain state_dict (what ``torch.save(model.state_dict())`` writes) → {key: numpy array}.

    Raises PthError (one line) if the file holds anything else, naming its top-level keys.
    """
    obj = load_pth(path, get_from)
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        return dict(obj)
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise PthError(f"{path}: not a plain state_dict of tensors (top level: {keys})")
