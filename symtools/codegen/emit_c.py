"""C source of the monitor's per-tensor sums: every monomial of a tensor's slots, its row and column sums, in
one pass over the tensor.

The densities of the laws are polynomials in a slot's per-element variables (``MONOMIALS``,
:mod:`symtools.codegen.emit_facts`). The monitor needs, per group, the sum of each monomial over the group's
elements. A tensor seen as an ``(A, B)`` matrix in its own memory order has its groups either along its rows
(one group per row) or along its columns (a group is a set of columns); a conv weight is both at once (its
rows are the scale groups of its layer, its columns the rescale groups of the layer before). The function
emitted here reads each element once, widens it to double (exact for float and for the product of two floats),
evaluates the monomials, and adds each into its row's sum and into a per-thread copy of the column sums, which
are added up at the end. Threads (OpenMP, where the compiler has it) split the rows.

Monomials are ``(exponents over VARIABLES, absolute)``: exponents of value θ, gradient g, buffer b,
displacement d and update u, as in ``MONOMIALS``; ``absolute`` takes |monomial|. The displacement is not an
argument: it is ``theta − theta_prev``, formed in double inside the loop (exact for float weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: Per-element variables of a monomial's exponents (``emit_facts.VARIABLES``), as C argument names.
NAMES = ("theta", "g", "b", "d", "u")
#: C type of each supported element type.
C_TYPES = {"float32": "float", "float64": "double"}

_HEADER = r"""#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#define SYMTOOLS_TID omp_get_thread_num()
#else
#define SYMTOOLS_TID 0
#endif
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#define SYMTOOLS_FENCE() _mm_sfence()
#else
#define SYMTOOLS_FENCE() ((void)0)
#endif
"""

_COPY = r"""
/* Copy n elements of {ctype} with streaming stores where the processor has them: the copy is read only after
   the optimizer's step, so it need not pass through the cache (measured on VGG-16-BN: 5 ms of a 17 ms kernel
   with ordinary stores, 1 ms streamed). The caller fences once at the end. */
static void symtools_copy_{ctype}({ctype}* restrict dst, const {ctype}* restrict src, int64_t n)
{{
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(dst + i) & 63); i++) dst[i] = src[i];
    for (; i + {w512} <= n; i += {w512}) _mm512_stream_{s}(dst + i, _mm512_loadu_{s}(src + i));
#elif defined(__AVX__)
    for (; i < n && ((uintptr_t)(dst + i) & 31); i++) dst[i] = src[i];
    for (; i + {w256} <= n; i += {w256}) _mm256_stream_{s}(dst + i, _mm256_loadu_{s}(src + i));
#endif
    for (; i < n; i++) dst[i] = src[i];
}}
"""

#: The file's preamble: includes, the thread id, and a streaming copy per element type.
HEADER = (_HEADER + _COPY.format(ctype="float", s="ps", w512=16, w256=8)
          + _COPY.format(ctype="double", s="pd", w512=8, w256=4))


def kernel_arguments(monomials: Sequence[tuple[tuple[int, ...], bool]], copy: bool = False) -> tuple[str, ...]:
    """The tensor arguments a kernel for ``monomials`` reads, in order (``theta`` at least: for the shape, and
    for the copy of θ that a kernel with ``copy`` writes)."""
    used = [n for i, n in enumerate(NAMES) if any(e[i] for e, _ in monomials)] + (["theta"] if copy else [])
    if "u" in used:
        raise ValueError("the applied update u is not a source of the monitor's sums")
    if "d" in used:
        used = [n for n in used if n != "d"]
        used += [n for n in ("theta", "theta_prev") if n not in used]
    order = ("theta", "g", "b", "theta_prev")
    return tuple(n for n in order if n in used) or ("theta",)


def _product(exponents: Sequence[int], suffix: str) -> str:
    factors = [f"{n}{suffix}" for n, k in zip(NAMES, exponents) for _ in range(k)]
    return " * ".join(factors) if factors else "1.0"


#: Rows per block where column sums are kept: a block's rows are added together before they touch the column
#: sums (one load and store per monomial and block instead of per row), up to 4 rows of at most this many
#: row sums in all. Measured on VGG-16-BN's weights (6 monomials of θ, g, b; 2 cores, AVX-512): 4 rows per
#: block 11.5–13.1 ms, 2 rows 12.8–16.7 ms, against 10 ms to read the three tensors once.
ROW_BLOCK_REGISTERS = 24


def _rows_per_block(m: int, cols: bool) -> int:
    return max(1, min(4, ROW_BLOCK_REGISTERS // m)) if cols else 1


def _block(monomials, args, m: int, rb: int, rows: bool, cols: bool, copy: str | None, indent: str) -> str:
    """The loop over ``j`` for ``rb`` rows starting at row ``a0``, and the stores of their row sums."""
    accs = [f"r{k}_{r}" for r in range(rb) for k in range(m)]
    lines = [f"double {', '.join(a + ' = 0.0' for a in accs)};"] if rows else []
    lines.append(f"#pragma omp simd reduction(+:{', '.join(accs)})" if rows else "#pragma omp simd")
    lines.append("for (int64_t j = 0; j < B; j++) {")
    for r in range(rb):
        lines += [f"    const double {a}_{r} = (double){a}[(a0 + {r}) * B + j];" for a in args]
        if "theta_prev" in args:
            lines.append(f"    const double d_{r} = theta_{r} - theta_prev_{r};")
        for k, (exps, absolute) in enumerate(monomials):
            expr = _product(exps, f"_{r}")
            lines.append(f"    const double m{k}_{r} = {'fabs(' + expr + ')' if absolute else expr};")
            if rows:
                lines.append(f"    r{k}_{r} += m{k}_{r};")
    if cols:
        lines += [f"    c[{k} * B + j] += {' + '.join(f'm{k}_{r}' for r in range(rb))};" for k in range(m)]
    lines.append("}")
    if rows:
        lines += [f"rows[{k} * A + a0 + {r}] = r{k}_{r};" for r in range(rb) for k in range(m)]
    if copy:  # the block's rows of θ, still in the cache
        lines.append(f"symtools_copy_{copy}(copy + a0 * B, theta + a0 * B, {rb} * B);")
    return "".join(f"{indent}{line}\n" for line in lines)


def sums_kernel(name: str, monomials: Sequence[tuple[tuple[int, ...], bool]], dtypes: Mapping[str, str],
                rows: bool, cols: bool, copy: bool = False) -> str:
    """C function ``int name(sources…, copy, int64_t A, int64_t B, double* rows, double* cols, double* scratch,
    int nt)``.

    ``rows``: ``(M, A)`` row sums, ``cols``: ``(M, B)`` column sums (M = len(monomials)), each written whole
    (pass NULL for one that was not asked for); ``dtypes[arg]`` is "float32" or "float64" per argument of
    :func:`kernel_arguments`. With ``copy`` the kernel also writes θ into ``copy`` as it reads it (the monitor's
    θ before the step, for the displacement), otherwise ``copy`` is ignored. ``scratch``: ``nt·M·B`` doubles
    for the threads' column sums (the caller keeps it from call to call: no allocation per call). Returns 0, or
    1 without writing anything when column sums are asked for without scratch."""
    args = kernel_arguments(monomials, copy)
    m = len(monomials)
    rb = _rows_per_block(m, cols)
    params = ", ".join(f"const {C_TYPES[dtypes[a]]}* restrict {a}" for a in args)
    ctype = C_TYPES[dtypes["theta"]]
    target = f"{ctype}* restrict copy" if copy else "void* copy"
    body = _block(monomials, args, m, rb, rows, cols, ctype if copy else None, " " * 16)
    tail = _block(monomials, args, m, 1, rows, cols, ctype if copy else None, " " * 20)
    return f"""
int {name}({params}, {target}, int64_t A, int64_t B, double* restrict rows, double* restrict cols,
        double* restrict scratch, int nt)
{{
#ifndef _OPENMP
    nt = 1;
#endif
    const int64_t M = {m};
    double* part = {"scratch" if cols else "NULL"};
    (void)copy;
    if ({int(cols)} && !part) return 1;
    #pragma omp parallel num_threads(nt)
    {{
        double* c = part ? part + (size_t)SYMTOOLS_TID * M * B : NULL;
        if (c) for (int64_t i = 0; i < M * B; i++) c[i] = 0.0;
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < (A + {rb} - 1) / {rb}; blk++) {{
            if ((blk + 1) * {rb} <= A) {{
                const int64_t a0 = blk * {rb};
{body}            }} else {{
                for (int64_t a0 = blk * {rb}; a0 < A; a0++) {{
{tail}                }}
            }}
        }}
        SYMTOOLS_FENCE();
    }}
    if (part) {{
        for (int64_t i = 0; i < M * B; i++) {{
            double s = 0.0;
            for (int t = 0; t < nt; t++) s += part[(size_t)t * M * B + i];
            cols[i] = s;
        }}
    }}
    return 0;
}}
"""


def sums_source(kernels: Sequence[tuple[str, Sequence[tuple[tuple[int, ...], bool]], Mapping[str, str], bool,
                                        bool, bool]]) -> str:
    """One C file with every kernel of ``kernels``: (name, monomials, dtypes, rows, cols, copy)."""
    return HEADER + "".join(sums_kernel(*k) for k in kernels)
