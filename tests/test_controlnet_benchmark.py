"""The ControlNet miniature's measuring tools: edges, control fidelity, convergence."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark import controlnet_benchmark as cb


def square(size: int = 32, lo: int = 8, hi: int = 24) -> np.ndarray:
    """A uint8 RGB image: a black square on white."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    image[lo:hi, lo:hi] = 0
    return image


def test_sobel_edges_trace_the_outline_only() -> None:
    edges = cb.sobel_edges(square()[None])[0]
    assert edges[8, 8:24].all() and edges[23, 8:24].all()  # the square's border rows
    assert not edges[14:18, 14:18].any() and not edges[:5].any()  # flat inside and outside
    assert not cb.sobel_edges(np.full((1, 32, 32, 3), 128, np.uint8)).any()


def test_edge_f1_values() -> None:
    a = cb.sobel_edges(square()[None])
    assert cb.edge_f1(a, a)[0] == pytest.approx(1.0)
    shifted = cb.sobel_edges(np.roll(square(), 1, axis=1)[None])  # one pixel off: within the tolerance
    assert cb.edge_f1(shifted, a)[0] == pytest.approx(1.0)
    far = cb.sobel_edges(square(lo=2, hi=10)[None])
    assert cb.edge_f1(far, a)[0] < 0.3
    empty = np.zeros_like(a)
    assert cb.edge_f1(empty, a)[0] == 0 and cb.edge_f1(a, empty)[0] == 0
    half = a.copy()
    half[:, :, 16:] = False  # finds half the outline, all of it right: precision 1, recall ~ 1/2
    assert 0.55 < cb.edge_f1(half, a)[0] < 0.75


def test_steps_to_convergence_needs_to_stay_above() -> None:
    steps = [100, 200, 300, 400, 500]
    assert cb.steps_to_convergence(steps, [0.1, 0.6, 0.2, 0.7, 0.8], 0.5) == 400  # the dip at 300 resets it
    assert cb.steps_to_convergence(steps, [0.6, 0.6, 0.6, 0.6, 0.6], 0.5) == 100
    assert cb.steps_to_convergence(steps, [0.1, 0.6, 0.7, 0.8, 0.4], 0.5) is None  # fell back at the end
