"""The coefficients of the erf that convitlab's compiled GELU uses (src/convitlab/ops/cpu_kernels.cc).

erf(z) = z P(z²) / Q(z²) on |z| <= 4 (erf(4) rounds to 1 in float32), P of degree 6, Q of degree 4
with Q(0) = 1: a weighted least-squares fit of the linearised problem P - (erf(z)/z) Q on Chebyshev
nodes, re-weighted by 1/Q of the previous fit (Sanathanan-Koerner) and then by the error (Lawson,
towards the minimax fit). Prints the coefficients and the largest error of the float32 evaluation,
Horner's scheme as the kernel does it, against math.erf on 200,001 points.

    .venv/bin/python experiments/perf/fit_erf.py
"""
import math

import numpy as np

NODES, BOUND, DEGREE_P, DEGREE_Q = 20000, 4.0, 6, 4


def fit():
    z = (np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES) + 1) / 2 * BOUND
    target = np.array([math.erf(v) / v for v in z])
    u = z * z
    columns = [u ** k for k in range(DEGREE_P + 1)] + [-target * u ** k for k in range(1, DEGREE_Q + 1)]
    system = np.stack(columns, axis=1)
    q_previous, lawson, best = np.ones_like(u), np.ones_like(u), None
    for iteration in range(90):
        weights = np.maximum(z / np.abs(q_previous) * lawson, 1e-3)
        solution, *_ = np.linalg.lstsq(system * weights[:, None], target * weights, rcond=None)
        p, q = solution[:DEGREE_P + 1], np.concatenate([[1.0], solution[DEGREE_P + 1:]])
        q_previous = np.polyval(q[::-1], u)
        error = z * (np.polyval(p[::-1], u) / q_previous - target)  # error of erf itself
        if best is None or np.abs(error).max() < best[0]:
            best = (np.abs(error).max(), p, q)
        if iteration >= 30:
            lawson = np.maximum(lawson * np.abs(error) / np.abs(error).mean(), 1e-12)
            lawson /= lawson.max()
    return best[1], best[2]


def float32_error(p, q):
    z = np.linspace(0, BOUND, 200001).astype(np.float32)
    u = z * z
    num, den = np.zeros_like(z), np.zeros_like(z)
    for c in p[::-1]:
        num = num * u + np.float32(c)
    for c in q[::-1]:
        den = den * u + np.float32(c)
    approx = np.minimum(z * num / den, np.float32(1)).astype(np.float64)
    return np.abs(approx - np.array([math.erf(float(v)) for v in z])).max()


if __name__ == "__main__":
    p, q = fit()
    print("P:", ", ".join(f"{c:.9e}f" for c in p))
    print("Q:", ", ".join(f"{c:.9e}f" for c in q))
    print(f"largest float32 error on [0, {BOUND}]: {float32_error(p, q):.2e}")
