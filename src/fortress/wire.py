"""Uploads on the wire: an `Updates` as named numpy arrays, and the strict parse back.

A Flower SuperNode answers for its whole cohort with one reply holding these arrays. Whatever
arrives is untrusted: `from_arrays` checks names, dtypes and shapes and raises `BadUpload`
(the server then rejects every client of that reply, naming them) before `updates.check`
looks at the values client by client.
"""
from __future__ import annotations

import numpy as np
import torch

from fortress.objectives import TERMS
from fortress.updates import Updates

# name -> (kind, ndim): "float" means the model's dtype
FIELDS: dict[str, tuple[str, int]] = {
    "clients": ("int64", 1), "weight": ("float", 1), "dense": ("float", 2), "rows_client": ("int64", 1),
    "rows_item": ("int64", 1), "rows_delta": ("float", 2), "loss": ("float", 1),
}
# optional: the logged parts of the loss (objective=fortress), "term-rec", "term-seq", ..., each (n,) float
TERM_PREFIX = "term-"


class BadUpload(ValueError):
    """A reply that cannot be read as a cohort's uploads (missing arrays, wrong dtype or shape)."""


def to_arrays(u: Updates) -> dict[str, np.ndarray]:
    out = {name: getattr(u, name).detach().cpu().numpy() for name in FIELDS}
    out.update({TERM_PREFIX + k: t.detach().cpu().numpy() for k, t in u.terms.items()})
    return out


def from_arrays(arrays: dict[str, np.ndarray], dense_size: int, dim: int, dtype: torch.dtype) -> Updates:
    """Parse a reply into Updates, or raise BadUpload saying what is wrong with it."""
    terms = {k[len(TERM_PREFIX):]: a for k, a in arrays.items() if k.startswith(TERM_PREFIX)}
    arrays = {k: a for k, a in arrays.items() if not k.startswith(TERM_PREFIX)}
    missing = sorted(set(FIELDS) - set(arrays))
    extra = sorted(set(arrays) - set(FIELDS)) + sorted(TERM_PREFIX + k for k in set(terms) - set(TERMS))
    if missing or extra:
        raise BadUpload(f"arrays missing {missing} / unexpected {extra}")
    float_name = str(torch.empty(0, dtype=dtype).numpy().dtype)
    for name, (kind, ndim) in FIELDS.items():
        a = arrays[name]
        want = float_name if kind == "float" else kind
        if not isinstance(a, np.ndarray) or str(a.dtype) != want:
            raise BadUpload(f"{name} has dtype {getattr(a, 'dtype', type(a).__name__)}, expected {want}")
        if a.ndim != ndim:
            raise BadUpload(f"{name} has shape {a.shape}, expected {ndim} dimension(s)")
    n, m = len(arrays["clients"]), len(arrays["rows_item"])
    expect = {"weight": (n,), "dense": (n, dense_size), "loss": (n,), "rows_client": (m,), "rows_delta": (m, dim)}
    for name, shape in expect.items():
        if arrays[name].shape != shape:
            raise BadUpload(f"{name} has shape {arrays[name].shape}, expected {shape}")
    for name, a in terms.items():
        if not isinstance(a, np.ndarray) or str(a.dtype) != float_name or a.shape != (n,):
            raise BadUpload(f"{TERM_PREFIX}{name} has dtype {getattr(a, 'dtype', type(a).__name__)} and shape "
                            f"{getattr(a, 'shape', None)}, expected {float_name} ({n},)")
    if len(np.unique(arrays["clients"])) != n:
        raise BadUpload("a client appears twice")
    rc = arrays["rows_client"]
    if m and (rc.min() < 0 or rc.max() >= n):
        raise BadUpload(f"rows_client outside 0..{n - 1}")
    t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    return Updates(**t, terms={k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sorted(terms.items())})
