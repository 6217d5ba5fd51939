"""The golden-comparison rules shared by the heads' tests (CMPC, RRN, RMI / LSTM): the per-tensor relative
tolerance, and the one-step rule of ``step_tolerances.json`` (``check_after_step``)."""
import logging

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TOL = 1e-5
ADAM_BETA1 = 0.9


def relative_diff(actual, ref):
    """max|actual − ref| / max|ref| in float64 (max|ref| floored at float32's smallest normal); shapes must agree."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    return float(np.abs(actual - ref).max() / max(np.abs(ref).max(), np.finfo(np.float32).tiny))


def assert_close(label, actual, ref, tol=DEFAULT_TOL):
    """Assert max|actual − ref| ≤ ``tol`` · max|ref|; logs the relative difference."""
    rel = relative_diff(actual, ref)
    log.info("%s: max rel diff %.3g", label, rel)
    assert rel <= tol, f"{label}: max|diff| = {rel:.3g} × max|ref| > {tol}"


def small_gradient_mask(m_ref, rule, beta1=ADAM_BETA1):
    """Entries whose reference gradient is small (``small_gradient_entries``): g = m_ref / (1 − beta1) from the
    reference Adam m slot after step 1, small where |g| < rule["rel_to_max"] · max|g| of the tensor."""
    g = np.abs(np.asarray(m_ref, np.float64) / (1.0 - beta1))
    return g < rule["rel_to_max"] * g.max()


def check_small_gradient_entries(label, ours, ref, m_ref, rule, start_lr, default_tol=DEFAULT_TOL):
    """``small_gradient_entries`` for one model variable after step 1: |ours − ref| ≤ ``start_lr`` on the
    small-gradient entries (``small_gradient_mask``), max|ours − ref| ≤ ``default_tol`` · max|ref| (the whole
    tensor's max|ref|) on all the others. Returns the relative difference over the others."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape == np.shape(m_ref), (ours.shape, ref.shape, np.shape(m_ref))
    small = small_gradient_mask(m_ref, rule)
    diff = np.abs(ours - ref)
    assert not small.any() or diff[small].max() <= start_lr, \
        f"{label}: a small-gradient entry moved {diff[small].max():.3g} from the reference (> lr {start_lr})"
    scale = max(np.abs(ref).max(), np.finfo(np.float32).tiny)
    rel = float(diff[~small].max() / scale) if (~small).any() else 0.0
    assert rel <= default_tol, \
        f"{label}: max|diff| = {rel:.3g} × max|ref| > {default_tol} off the small-gradient entries"
    return rel


def check_after_step(name, ours, ref, before, tol, start_lr, m_ref=None, variable=True):
    """The one-step rule of a ``step_tolerances.json`` document ``tol`` for one after-step tensor ``name``; returns
    its relative difference.

    ``zero_gradient`` variables: ours and ref each within ``start_lr`` of ``before``; their Adam slots: |m| ≤ 1e-7,
    0 ≤ v ≤ 1e-13. ``cancellation`` tensors: ``rel_tol``. Other model variables (``variable`` True, ``m_ref`` their
    reference Adam m slot after the step) with ``small_gradient_entries`` in ``tol``: that rule
    (``check_small_gradient_entries``). Everything else: ``default_rel_tol``. A ``tol`` of ``{}`` is the plain
    1e-5 rule."""
    zero_grad = tol.get("zero_gradient", {}).get("variables", [])
    default = tol.get("default_rel_tol", DEFAULT_TOL)
    diff = relative_diff(ours, ref)
    if name in zero_grad:
        for value in (ours, ref):
            assert np.max(np.abs(value - before)) <= start_lr, name
    elif any(name.endswith(f"/{v}/Adam") for v in zero_grad):
        assert np.max(np.abs(ours)) <= 1e-7 and np.max(np.abs(ref)) <= 1e-7, name
    elif any(name.endswith(f"/{v}/Adam_1") for v in zero_grad):
        for value in (ours, ref):
            assert 0.0 <= np.min(value) and np.max(value) <= 1e-13, name
    elif name in tol.get("cancellation", {}).get("tensors", []):
        assert diff <= tol["cancellation"]["rel_tol"], (name, diff)
    elif variable and m_ref is not None and "small_gradient_entries" in tol:
        return check_small_gradient_entries(name, ours, ref, m_ref, tol["small_gradient_entries"], start_lr, default)
    else:
        assert diff <= default, f"{name}: max|diff| = {diff:.3g} × max|ref| > {default}"
    return diff
