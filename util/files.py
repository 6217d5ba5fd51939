"""Writing outputs without ever leaving a partial file: write to a temporary name beside the target, then rename."""
import contextlib
import os


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path`` (``<path>.<pid>.tmp``) to write to; on normal exit it is renamed over
    ``path`` (``os.replace``: atomic on one file system, so readers see the old file or the new one, never a
    partial one); on any exception, including ``KeyboardInterrupt``, it is removed and ``path`` is left as it was."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
