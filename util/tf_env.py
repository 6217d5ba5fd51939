"""Process-wide TensorFlow settings that its C++ runtime reads from the environment once, so they are made before
TensorFlow is imported (``trainval_model.py`` calls ``configure`` first thing when run as a script, not when
imported: an importer's environment, which its subprocesses inherit, stays its own). A variable the user has set
already is left as it is."""
import os

DEFAULT_BFC_LIMIT_MB = 1 << 16  # TensorFlow's own default limit for the CPU BFC allocator (64 GiB)


def machine_memory_mb():
    """Physical memory in MiB (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return 0


def configure():
    """``TF_CPP_MIN_LOG_LEVEL=2`` (no C++ info/warning lines) and TensorFlow's BFC allocator for host memory
    (``TF_CPU_ALLOCATOR_USE_BFC=true``; its limit ``TF_CPU_BFC_MEM_LIMIT_IN_MB`` the machine's memory where that is
    above TensorFlow's 64 GiB default).

    Why BFC: TensorFlow's default CPU allocator passes every tensor to malloc, and glibc serves blocks above its mmap
    threshold (32 MiB at most) with fresh mappings that it unmaps on free, so every step faults its large
    activations and gradients in again, page by page. The BFC allocator keeps freed blocks for reuse. Measured on
    the 2-core AMD EPYC (README, "Speed and scale"): CMPC's 320×320 train step at batch 8 43.1 → 34.8 s, kernel time
    62 → 13 s over four steps, peak RSS 8.36 → 7.84 GB; at batch 1 unchanged within the drift (4.4–4.7 s both);
    RMI's 64×64 step 0.75 → 0.55 s. ``demo.py`` (one forward, nothing for a pool to reuse) keeps TensorFlow's default.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    os.environ.setdefault("TF_CPU_BFC_MEM_LIMIT_IN_MB", str(max(DEFAULT_BFC_LIMIT_MB, machine_memory_mb())))
