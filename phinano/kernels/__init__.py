"""phinano.kernels: every hot op twice, with the same signature.

- `reference` : plain NumPy, for reading and checking.
- `fast`      : Numba-JIT, for speed. It needs numba: without it, asking for "numba" raises ImportError
                (never a silent fallback to the slow reference).

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
        from . import fast  # raises ImportError naming the missing numba package

        return fast
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
