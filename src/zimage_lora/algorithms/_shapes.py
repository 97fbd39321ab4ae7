"""Shape helpers shared by the algorithm modules."""

from __future__ import annotations


def matrix(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, int]:
    """The (rows, cols) of a 2-D factor; 4-D factors with 1x1 kernels (conv-style saves) count as 2-D."""
    shape = tuple(shapes[name])
    if len(shape) == 4 and shape[2:] == (1, 1):
        shape = shape[:2]
    if len(shape) != 2:
        raise ValueError(f"'{name}' must be a 2-D matrix, found shape {list(shape)}")
    return shape[0], shape[1]


def as_matrix(t):
    """Drop trailing 1x1 kernel dims so conv-style saves of Linear factors work as matrices."""
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[0], t.shape[1])
    return t
