"""phinano.kernels: every hot op twice, with the same signature.

- `reference` : plain NumPy, for reading and checking.
- `fast`      : Numba-JIT, for speed (falls back to nothing: it needs numba).

`backend(name)` returns the module for "numpy" or "numba"; the model calls ops only through it.
"""

from __future__ import annotations

from types import ModuleType

BACKENDS = ("numba", "numpy")


def backend(name: str = "numba") -> ModuleType:
    """The kernel module for a backend name: "numpy" (reference) or "numba" (fast)."""
    if name == "numpy":
        from . import reference

        return reference
    if name == "numba":
        try:
            from . import fast
        except ImportError:  # the fast kernels are not there yet or numba is missing: use the reference
            from . import reference as fast
        return fast
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
