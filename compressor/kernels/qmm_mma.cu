// Fused dequantize-GEMM for 4-bit weights on the tensor cores, for small batches (decode): y = x @ dequant(W).
//
// Compiled at run time by NVRTC (compressor/kernels/nvrtc.py) with these macros:
//   BF16      0: float16 activations, scales and zeros; 1: bfloat16
//   MT        1: up to 8 activation rows per block; 2: up to 16 (two products per operand)
//   WARPS     warps per block; each takes every WARPS-th tile of the block's share of the input rows
//   GSLABS    rows per group / 32 (0: one group over the whole input)
//   HAS_PERM  1: packed row k reads activation column perm[k] (activation order)
//   PREFETCH  1: the next tile's weight words are requested before this tile is computed
//   PDL       1 (sm_90+): the weights of the first tile are requested before waiting for the previous kernel in the
//             stream (griddepcontrol.wait), which a programmatic dependent launch lets run on meanwhile; after the
//             wait the next kernel may launch (compressor/kernels/pdl.py)
//   SWIGLU    1: x is [gate | up] of twice the input width, and the activations are silu(gate) * up, rounded as the
//             SwiGLU kernel rounds them (silu in float32 rounded to 16 bits, times up rounded again): the SwiGLU of a
//             down projection costs no launch of its own
//   MINB      blocks per multiprocessor the compiler must leave registers for (1: as many registers as it likes;
//             4 with 4 warps: at most 128 per thread, 16 warps resident, which may spill)
// No header is included: the 16-bit floats live in 32-bit registers as pairs and all their arithmetic is PTX.
//
// Weight layout (layout.py): qweight is int32 [tiles * 32, N]; word (tile T, packed row r, column n) holds the codes
// of input rows T*256 + j*32 + r at bits 4j..4j+3, j = 0..7.
//
// The product is computed transposed, y^T = W^T x^T, so that the weights are the 16-row A operand of
// mma.m16n8k16 and the (few) activation rows its 8 columns: nothing is padded at batch <= 8. Per warp and step:
// lanes t = lane % 4 read packed rows 4*step + t of the tile and lanes g = lane / 4 four consecutive columns (one
// 16-byte load). One lop3 turns codes j and j + 4 of a word into a pair of 16-bit floats (MAGIC + q, exact), one fma
// gives q - z (exact), one more (q - z) * s rounded once, as the reference rounds it. The pair is exactly one
// register of the A operand (k = 2t, 2t + 1, or 2t + 8, 2t + 9), so no shuffle or shared-memory round trip sits
// between dequantization and the tensor cores: words 2h and 2h + 1 of the lane (rows g and g + 8 of the operand)
// make the A operands of two products. The activations, staged once per block in shared memory in the same pair
// order, are one 16-byte shared load per step (the B operands of both). Products accumulate in float32.
//
// Split-K: with gridDim.y > 1 the blocks of one column block add their sums into the float32 workspace `ws`; the last
// to finish (counted in `count`) writes the output and leaves `ws` and `count` zeroed for the next call.

#if BF16
#define PAIR_TYPE "bf16x2"
#define MMA_TYPE "bf16"
// 128.0: 128 + q. A high nibble cannot be taken in place: bits 4-7 reach past bfloat16's 7-bit mantissa, so the
// codes are shifted down first.
#define H2_MAGIC 0x43004300u
#define H2_ONE 0x3F803F80u
#define H2_NEG_ONE 0xBF80BF80u
#define H2_NEG_MAGIC 0xC300C300u    // -128
#else
#define PAIR_TYPE "f16x2"
#define MMA_TYPE "f16"
// 1024.0: 1024 + q in the low nibble, 1024 + 16 q in the high one (times 1/16: 64 + q)
#define H2_MAGIC 0x64006400u
#define H2_ONE 0x3C003C00u
#define H2_SIXTEENTH 0x2C002C00u
#define H2_NEG_ONE 0xBC00BC00u
#define H2_NEG_MAGIC 0xE400E400u    // -1024
#define H2_NEG_MAGIC16 0xD400D400u  // -64
#endif
#define H2_NEG_ZERO 0x80008000u
#define MROWS (8 * MT)
#define TILE_ROWS 256  // input rows per tile: 32 packed rows of 8 codes
#define RV (8 * MT)    // float sums per lane after the products: 4 per product

template <unsigned MASK>
__device__ __forceinline__ unsigned magic_pair(unsigned w) {
    unsigned d;  // (w & MASK) | MAGIC in one instruction
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(MASK), "n"(H2_MAGIC));
    return d;
}

__device__ __forceinline__ unsigned pair_fma(unsigned a, unsigned b, unsigned c) {
    unsigned d;
    asm("fma.rn." PAIR_TYPE " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float to_float(unsigned short h) {
#if BF16
    return __uint_as_float(((unsigned)h) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ unsigned short from_float(float f) {
    unsigned short h;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

// Whether slab j (32 rows) of a tile may start a new group: known at compile time unless groups straddle tiles
// unevenly (GSLABS neither divides 8 nor is a multiple of it), in which case every slab loads its own.
#define GS_DIV (GSLABS ? GSLABS : 1)  // a divisor that is never zero, for the expressions that check GSLABS first
__device__ __forceinline__ constexpr bool new_group(int j) {
    return j == 0 || (GSLABS != 0 && ((8 % GS_DIV == 0) ? (j % GS_DIV == 0) : (GSLABS % 8 != 0)));
}

// The weight words of `tile` for this lane: step s holds packed row tile*32 + 4s + t, columns col..col+3.
__device__ __forceinline__ void load_words(uint4 (&wb)[8], const unsigned* __restrict__ w, int tile, bool ok,
                                           int t, int col, int N) {
    const uint4* p = reinterpret_cast<const uint4*>(w + ((size_t)tile * 32 + t) * N + col);
    const size_t step = (size_t)N;  // 4 packed rows, in uint4
    if (!ok) return;  // past the block's tiles: never computed; past N: multiplied by zero scales
#pragma unroll
    for (int s = 0; s < 8; ++s) wb[s] = p[s * step];
}

// acc[h][b] += this tile's products: words st of `cur` against the staged activations from entry `base`.
__device__ __forceinline__ void tile_products(float (&acc)[2][MT][4], const uint4 (&cur)[8], const uint4* xs,
                                              int base, int mr, int g, int t, const unsigned (&sc)[4][4],
                                              const unsigned (&zc)[4][4]) {
#pragma unroll
    for (int st = 0; st < 8; ++st) {
        const int row = base + 4 * st + t;
        // Operand column g is activation row g (+ 8): lanes past the batch read its last row, whose products land
        // in outputs that are never written.
        uint4 b[MT];
#pragma unroll
        for (int bt = 0; bt < MT; ++bt) b[bt] = xs[row * mr + min(g + 8 * bt, mr - 1)];
        const unsigned words[4] = {cur[st].x, cur[st].y, cur[st].z, cur[st].w};
        unsigned a[4][4];  // per word: the pairs of codes (0, 4), (1, 5), (2, 6), (3, 7) as weights
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned wd = words[i], w8 = wd >> 8;
            a[i][0] = pair_fma(pair_fma(magic_pair<0x000F000Fu>(wd), H2_ONE, zc[i][0]), sc[i][0], H2_NEG_ZERO);
            a[i][2] = pair_fma(pair_fma(magic_pair<0x000F000Fu>(w8), H2_ONE, zc[i][2]), sc[i][2], H2_NEG_ZERO);
#if BF16
            a[i][1] = pair_fma(pair_fma(magic_pair<0x000F000Fu>(wd >> 4), H2_ONE, zc[i][1]), sc[i][1], H2_NEG_ZERO);
            a[i][3] = pair_fma(pair_fma(magic_pair<0x000F000Fu>(wd >> 12), H2_ONE, zc[i][3]), sc[i][3], H2_NEG_ZERO);
#else
            a[i][1] = pair_fma(pair_fma(magic_pair<0x00F000F0u>(wd), H2_SIXTEENTH, zc[i][1]), sc[i][1], H2_NEG_ZERO);
            a[i][3] = pair_fma(pair_fma(magic_pair<0x00F000F0u>(w8), H2_SIXTEENTH, zc[i][3]), sc[i][3], H2_NEG_ZERO);
#endif
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int bt = 0; bt < MT; ++bt) {
                // A rows g and g + 8 are words 2h and 2h + 1; k = 2t.. holds codes (0, 4), k = 2t + 8.. codes (1, 5)
                mma16816(acc[h][bt], a[2 * h][0], a[2 * h + 1][0], a[2 * h][1], a[2 * h + 1][1], b[bt].x, b[bt].y);
                mma16816(acc[h][bt], a[2 * h][2], a[2 * h + 1][2], a[2 * h][3], a[2 * h + 1][3], b[bt].z, b[bt].w);
            }
        }
    }
}

// The scales and zeros of `tile`'s slabs for the lane's 4 columns (fetched with the words, a tile ahead).
struct TileGroups {
    uint2 s[8], z[8];
};

__device__ __forceinline__ void load_groups(TileGroups& r, const unsigned short* __restrict__ s,
                                            const unsigned short* __restrict__ z, int tile, bool ok, int groups,
                                            int col, int N) {
    if (!ok) return;  // as load_words; lanes past N keep the zeros they started with
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (new_group(j)) {
            int gi = GSLABS ? (tile * 8 + j) / GS_DIV : 0;
            gi = min(gi, groups - 1);  // padded rows past K: any group (their activations are zero)
            const size_t off = (size_t)gi * N + col;
            r.s[j] = *reinterpret_cast<const uint2*>(s + off);
            r.z[j] = *reinterpret_cast<const uint2*>(z + off);
        } else {
            r.s[j] = r.s[j - 1];
            r.z[j] = r.z[j - 1];
        }
    }
}

// Per column i of the lane and pair p of slabs (p, p + 4): the scale pair, and the constant that takes MAGIC + q
// (even p) or MAGIC / 16 + q (odd p in float16: the high nibbles land as MAGIC + 16 q) to q - z.
__device__ __forceinline__ void tile_scales(unsigned (&sc)[4][4], unsigned (&zc)[4][4], const TileGroups& r) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const unsigned lo_s = (i < 2 ? r.s[p].x : r.s[p].y), hi_s = (i < 2 ? r.s[p + 4].x : r.s[p + 4].y);
            const unsigned lo_z = (i < 2 ? r.z[p].x : r.z[p].y), hi_z = (i < 2 ? r.z[p + 4].x : r.z[p + 4].y);
            const unsigned sel = (i & 1) ? 0x7632u : 0x5410u;  // half i of each: (slab p, slab p + 4)
            sc[i][p] = __byte_perm(lo_s, hi_s, sel);
#if BF16
            zc[i][p] = pair_fma(__byte_perm(lo_z, hi_z, sel), H2_NEG_ONE, H2_NEG_MAGIC);
#else
            zc[i][p] = pair_fma(__byte_perm(lo_z, hi_z, sel), H2_NEG_ONE, (p & 1) ? H2_NEG_MAGIC16 : H2_NEG_MAGIC);
#endif
        }
    }
}

#define STAGE 4  // staging units in flight per thread

// Staging unit u of the block's activations (8 consecutive input rows k.. of activation row m, zero past K), the 8
// 16-bit values packed in order.
__device__ __forceinline__ uint4 stage_load(const unsigned short* __restrict__ x, const int* __restrict__ perm, int u,
                                            int nt, int t0, int m0, int K, int stride_xm, int xvec) {
    const int chunk = u & 3, j = (u >> 2) & 7, rest = u >> 5;
    const int tl = rest % nt, m = rest / nt;
    const int k = (t0 + tl) * TILE_ROWS + j * 32 + chunk * 8;
    const unsigned short* xrow = x + (size_t)(m0 + m) * stride_xm;
#if SWIGLU
    unsigned short g[8], up[8];
    if (!HAS_PERM && xvec && k < K) {  // K % 8 == 0, aligned rows
        const uint4 gv = *reinterpret_cast<const uint4*>(xrow + k), uv = *reinterpret_cast<const uint4*>(xrow + K + k);
        const unsigned gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            g[e] = (unsigned short)(gw[e >> 1] >> (16 * (e & 1)));
            up[e] = (unsigned short)(uw[e >> 1] >> (16 * (e & 1)));
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int kk = k + e, src = kk < K ? (HAS_PERM ? perm[kk] : kk) : 0;
            g[e] = kk < K ? xrow[src] : (unsigned short)0;
            up[e] = kk < K ? xrow[K + src] : (unsigned short)0;
        }
    }
    unsigned v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float gf = to_float(g[e]);
        const unsigned short a = from_float(gf / (1.f + __expf(-gf)));
        v[e >> 1] |= (unsigned)from_float(to_float(a) * to_float(up[e])) << (16 * (e & 1));
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
#else
    if (!HAS_PERM && xvec && k < K) return *reinterpret_cast<const uint4*>(xrow + k);  // K % 8 == 0, aligned rows
    unsigned v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int kk = k + e;
        const unsigned h = kk < K ? xrow[HAS_PERM ? perm[kk] : kk] : 0u;
        v[e >> 1] |= h << (16 * (e & 1));
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
qmm_mma(const unsigned short* __restrict__ x, const unsigned* __restrict__ w, const unsigned short* __restrict__ s,
        const unsigned short* __restrict__ z, const int* __restrict__ perm, const unsigned short* __restrict__ bias,
        unsigned short* __restrict__ out, float* __restrict__ ws, int* __restrict__ count, int M, int N, int K,
        int groups, int tiles_per_split, int stride_xm, int stride_om, int has_bias, int xvec) {
    extern __shared__ uint4 smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 32;
    const int m0 = blockIdx.z * MROWS;
    const int mr = min(M - m0, MROWS);
    const int tiles = (K + TILE_ROWS - 1) / TILE_ROWS;
    const int t0 = blockIdx.y * tiles_per_split;
    const int t1 = min(t0 + tiles_per_split, tiles);
    const int col = n0 + 4 * g;  // this lane's 4 weight columns (N % 8 == 0: all in or all out)
    const bool col_ok = col < N;

    // Ping-pong: one tile's words, scales and zeros are computed while the next one's arrive.
    uint4 wa[8] = {}, wb[8] = {};
    TileGroups ga = {}, gb = {};
    load_words(wa, w, t0 + warp, col_ok && t0 + warp < t1, t, col, N);
    load_groups(ga, s, z, t0 + warp, col_ok && t0 + warp < t1, groups, col, N);
#if PDL
    // Nothing above reads what the previous kernel writes, and nothing is written before this point. Then the next
    // kernel may launch: it waits in its turn before touching what this one writes.
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif

    // Stage the activations of the block's tiles: entry (packed row p, activation row m) holds the 8 values that
    // word p multiplies, in pair order j = 0, 4, 1, 5, 2, 6, 3, 7 (registers: codes (0,4), (1,5), (2,6), (3,7)).
    // Unit u is 8 consecutive input rows of one activation row; each thread loads STAGE units before it stores
    // any, so their latencies overlap.
    unsigned short* xh = reinterpret_cast<unsigned short*>(smem);
    const int nt = t1 - t0, units = mr * nt * 32;
    for (int base = threadIdx.x; base < units; base += STAGE * blockDim.x) {
        uint4 v[STAGE];
#pragma unroll
        for (int q = 0; q < STAGE; ++q) {
            const int u = base + q * blockDim.x;
            if (u < units) v[q] = stage_load(x, perm, u, nt, t0, m0, K, stride_xm, xvec);
        }
#pragma unroll
        for (int q = 0; q < STAGE; ++q) {
            const int u = base + q * blockDim.x;
            if (u >= units) break;
            const int chunk = u & 3, j = (u >> 2) & 7, rest = u >> 5;
            const int tl = rest % nt, m = rest / nt, pos = (j & 3) * 2 + (j >> 2);
            const unsigned vv[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                xh[((tl * 32 + chunk * 8 + e) * mr + m) * 8 + pos] = (unsigned short)(vv[e >> 1] >> (16 * (e & 1)));
            }
        }
    }
    __syncthreads();

    float acc[2][MT][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int bt = 0; bt < MT; ++bt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[h][bt][c] = 0.f;

    unsigned sc[4][4], zc[4][4];
    for (int tile = t0 + warp; tile < t1; tile += 2 * WARPS) {
        const int next = tile + WARPS, after = next + WARPS;
        if (PREFETCH) {
            load_words(wb, w, next, col_ok && next < t1, t, col, N);
            load_groups(gb, s, z, next, col_ok && next < t1, groups, col, N);
        }
        tile_scales(sc, zc, ga);
        tile_products(acc, wa, smem, (tile - t0) * 32, mr, g, t, sc, zc);
        if (next >= t1) break;
        if (!PREFETCH) {
            load_words(wb, w, next, col_ok, t, col, N);
            load_groups(gb, s, z, next, col_ok, groups, col, N);
        } else {
            load_words(wa, w, after, col_ok && after < t1, t, col, N);
            load_groups(ga, s, z, after, col_ok && after < t1, groups, col, N);
        }
        tile_scales(sc, zc, gb);
        tile_products(acc, wb, smem, (next - t0) * 32, mr, g, t, sc, zc);
        if (!PREFETCH && after < t1) {
            load_words(wa, w, after, col_ok, t, col, N);
            load_groups(ga, s, z, after, col_ok, groups, col, N);
        }
    }

    // Sum the warps' products through shared memory (the staged activations are no longer read).
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int bt = 0; bt < MT; ++bt)
#pragma unroll
            for (int c = 0; c < 4; ++c) red[(warp * 32 + lane) * RV + (h * MT + bt) * 4 + c] = acc[h][bt][c];
    __syncthreads();
    // Value v of lane L: h = v / (4 MT), bt = v / 4 % MT, c = v % 4: activation row 8 bt + 2 (L % 4) + c % 2,
    // column n0 + 4 (L / 4) + 2 h + c / 2.
    const bool split = gridDim.y > 1;
    for (int o = threadIdx.x; o < 32 * RV; o += blockDim.x) {
        const int L = o / RV, v = o % RV, c = v & 3, bt = (v >> 2) % MT, h = v / (4 * MT);
        const int m = 8 * bt + 2 * (L & 3) + (c & 1), n = n0 + 4 * (L >> 2) + 2 * h + (c >> 1);
        if (m >= mr || n >= N) continue;
        float sum = 0.f;
        for (int wi = 0; wi < WARPS; ++wi) sum += red[(wi * 32 + L) * RV + v];
        if (split) {
            atomicAdd(ws + (size_t)(m0 + m) * N + n, sum);
        } else {
            if (has_bias) sum += to_float(bias[n]);
            out[(size_t)(m0 + m) * stride_om + n] = from_float(sum);
        }
    }
    if (!split) return;
    __shared__ int last;
    __threadfence();  // this block's sums are visible before it is counted
    __syncthreads();
    const int slot = blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) last = atomicAdd(count + slot, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int o = threadIdx.x; o < 32 * RV; o += blockDim.x) {
        const int L = o / RV, v = o % RV, c = v & 3, bt = (v >> 2) % MT, h = v / (4 * MT);
        const int m = 8 * bt + 2 * (L & 3) + (c & 1), n = n0 + 4 * (L >> 2) + 2 * h + (c >> 1);
        if (m >= mr || n >= N) continue;
        float sum = atomicExch(ws + (size_t)(m0 + m) * N + n, 0.f);  // read where the sums were made; reset
        if (has_bias) sum += to_float(bias[n]);
        out[(size_t)(m0 + m) * stride_om + n] = from_float(sum);
    }
    if (threadIdx.x == 0) count[slot] = 0;
}
