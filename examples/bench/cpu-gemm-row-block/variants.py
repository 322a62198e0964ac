"""Why the row-dot kernel stops at one weight row per pass: a register-blocked alternative, measured.

    OMP_NUM_THREADS=1 python examples/bench/cpu-gemm-row-block/variants.py

Row-dot (dspark_sglang/cpu_linear.py) reads, per k, one weight value and M activation values for M
FMAs: about one L1 load per FMA, which caps it near 35 % of the FMA peak once M rows make it compute-bound.
The textbook fix is register blocking: 4 weight rows x 2 activation rows per inner loop (6 loads per 8
FMAs). This times both on one (3072 x 576) projection, float32, best of 10:
- "resident": the same weight every call (it stays in cache): pure compute;
- "streamed": 40 different weights in turn (280 MB): the weights stream from memory, as in a model.
"""

import time

import numba
import numpy as np

from dspark_sglang.cpu_linear import row_block_kernel


@numba.njit(fastmath=True, nogil=True)
def tile_4x2(x, w, out):  # x [M even, K], w [N % 4 == 0, K]: 4 weight rows x 2 activation rows per pass
    rows, k_dim = x.shape
    for j in range(0, w.shape[0], 4):
        for m in range(0, rows, 2):
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for k in range(k_dim):
                x0, x1 = x[m, k], x[m + 1, k]
                w0, w1, w2, w3 = w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k]
                a0 += x0 * w0; a1 += x0 * w1; a2 += x0 * w2; a3 += x0 * w3
                b0 += x1 * w0; b1 += x1 * w1; b2 += x1 * w2; b3 += x1 * w3
            out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = a0, a1, a2, a3
            out[m + 1, j], out[m + 1, j + 1], out[m + 1, j + 2], out[m + 1, j + 3] = b0, b1, b2, b3


def row_dot(x, w, out):
    row_block_kernel(x.shape[0])(x, w, out)


def seconds(fn, x, weights, repeats=10):
    out = np.empty((x.shape[0], weights[0].shape[0]), np.float32)
    fn(x, weights[0], out)  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w, out)
        best = min(best, time.perf_counter() - t0)
    return best / len(weights)


def main():
    rng = np.random.default_rng(0)
    n, k = 3072, 576
    streamed = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(40)]
    print(f"(N, K) = ({n}, {k}), float32, one thread; GFLOP/s (microseconds per call)")
    print(f"{'rows':>4} | {'row-dot resident':>18} | {'4x2 tile resident':>18} | {'row-dot streamed':>18} | {'4x2 tile streamed':>18}")
    for rows in (2, 4):
        x = rng.standard_normal((rows, k), dtype=np.float32)
        cells = []
        for weights in (streamed[:1], streamed):
            for fn in (row_dot, tile_4x2):
                s = seconds(fn, x, weights)
                cells.append(f"{2 * rows * n * k / s / 1e9:5.1f} ({s * 1e6:6.0f} us)")
        print(f"{rows:>4} | " + " | ".join(f"{c:>18}" for c in (cells[0], cells[1], cells[2], cells[3])))


if __name__ == "__main__":
    main()
