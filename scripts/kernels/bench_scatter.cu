// Kernels of scripts/kernels/bench_scatter.py: each program (key block c, head h) adds one 512-byte fp32
// row (D = 128) per query row of its list to acc [L, H, D], as the `keyed` kernels add partial outputs and
// dq.
// `scatter`: four ways that differ only in how the bytes leave the SM. `overlapped`: the same reductions
// beside synthetic tensor-core work in other warps of the program, as a warp-specialised kernel runs them.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int D = 128, TILE = 64, THREADS = 128;
enum Mode { RED_V4 = 0, SCATTER_STORE = 1, BULK_REDUCE = 2, CONTIGUOUS_STORE = 3 };

struct Lists {
  const int64_t* starts;  // [H * C + 1]
  const int* rows;        // rows of program (c, h): rows[starts[h * C + c] : starts[h * C + c + 1]]
  int H, C, L, window;    // rows are folded into [0, window) (window == L: no folding)
};

__device__ __forceinline__ float* row_ptr(float* acc, const Lists& s, int row, int h) {
  return acc + ((int64_t)(row % s.window) * s.H + h) * D;
}

// One warp: rows lane, lane + 32, ... of the staged tile `buf` (the first min(left, TILE) are real) added to
// their acc rows by one TMA bulk reduce-add each, committed as one bulk group per lane.
__device__ __forceinline__ void bulk_reduce_rows(float* acc, const Lists& s, int h, int64_t pair, int left,
                                                 const float* buf, int lane) {
  for (int r = lane; r < TILE && r < left; r += 32) {
    float* g = row_ptr(acc, s, s.rows[pair + r], h);
    const uint32_t src = (uint32_t)__cvta_generic_to_shared(buf + r * D);
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(g), "r"(src),
                 "r"(D * 4) : "memory");
  }
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Registers straight to memory, as Triton's tl.atomic_add / tl.store of a [TILE, D] tile: each warp
// writes rows w, w + 4, ... of the tile, each lane 4 floats (16 bytes) of a row.
template <int MODE>
__global__ void from_registers(float* acc, Lists s) {
  const int c = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t first_pair = s.starts[(int64_t)h * s.C + c];
  const int n = (int)(s.starts[(int64_t)h * s.C + c + 1] - first_pair);
  const float4 one = make_float4(1.f, 1.f, 1.f, 1.f);
  for (int first = 0; first < n; first += TILE) {
#pragma unroll
    for (int i = 0; i < TILE / 4; ++i) {
      const int r = first + w + 4 * i;
      if (r >= n) continue;
      // CONTIGUOUS_STORE: the program's rows back to back (the same bytes, no scatter)
      float* p = (MODE == CONTIGUOUS_STORE ? acc + ((first_pair + r) % ((int64_t)s.L * s.H)) * D
                                           : row_ptr(acc, s, s.rows[first_pair + r], h)) + lane * 4;
      if (MODE == RED_V4)
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(one.x), "f"(one.y),
                     "f"(one.z), "f"(one.w) : "memory");
      else
        *reinterpret_cast<float4*>(p) = one;
    }
  }
}

// FlashAttention-3's way for dq: the tile staged in shared memory (double-buffered), then one
// cp.reduce.async.bulk (TMA bulk reduce-add) per 512-byte row, issued by warp 0.
__global__ void bulk_reduce(float* acc, Lists s) {
  extern __shared__ __align__(128) float smem[];
  const int c = blockIdx.x, h = blockIdx.y, t = threadIdx.x;
  const int64_t first_pair = s.starts[(int64_t)h * s.C + c];
  const int n = (int)(s.starts[(int64_t)h * s.C + c + 1] - first_pair);
  for (int first = 0, tile = 0; first < n; first += TILE, ++tile) {
    float* buf = smem + (tile & 1) * TILE * D;
    // The buffer written two tiles ago must have been read by its bulk copies before it is rewritten.
    if (tile >= 2 && t < 32) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
    __syncthreads();
    for (int i = t; i < TILE * D / 4; i += THREADS) reinterpret_cast<float4*>(buf)[i] = make_float4(1.f, 1.f, 1.f, 1.f);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic-proxy writes -> TMA reads
    __syncthreads();
    if (t < 32) {
      bulk_reduce_rows(acc, s, h, first_pair + first, n - first, buf, t);
    }
  }
  if (t < 32) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Can the reductions run under tensor-core work? Warps 0-3 of each program do the forward's products of a
// tile (2 x 64 x 128 x 128 MACs: 256 mma.sync.m16n8k16 per warp) on register data, warps 4-7 add the
// tile's rows with red.v4, with no dependence between them, as in a warp-specialised kernel.
// WORK: 1 products only, 2 reductions only, 3 both; with 4 added, the reductions are TMA bulk reduce-adds
// issued by one warp from a double-buffered shared tile instead of red.v4 from four warps.
template <int WORK>
__global__ void __launch_bounds__(256) overlap(float* acc, Lists s, float* sink) {
  extern __shared__ __align__(128) float staged[];  // 2 x TILE x D fp32 tiles, then unused space
  const int c = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t first_pair = s.starts[(int64_t)h * s.C + c];
  const int n = (int)(s.starts[(int64_t)h * s.C + c + 1] - first_pair);
  if (w < 4) {
    if constexpr (!(WORK & 1)) return;
    float d[4][4] = {};
    const uint32_t a = 0x3f803f80u ^ threadIdx.x, b = 0x3f803f80u ^ (threadIdx.x << 3);  // bf16 pairs near 1
    for (int first = 0; first < n; first += TILE) {
#pragma unroll 4
      for (int i = 0; i < 64; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j)  // four independent chains keep the tensor cores fed
          asm volatile(
              "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
              "{%0,%1,%2,%3};"
              : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
              : "r"(a), "r"(a + j), "r"(a + 2 * j), "r"(a), "r"(b), "r"(b + j));
      }
    }
    sink[(blockIdx.y * gridDim.x + blockIdx.x) * 128 + threadIdx.x] = d[0][0] + d[1][1] + d[2][2] + d[3][3];
  } else if constexpr ((WORK & 6) == 6) {  // one warp: each tile's rows by cp.reduce.async.bulk from shared memory
    if (w != 4) return;
    for (int i = lane; i < 2 * TILE * D / 4; i += 32)
      reinterpret_cast<float4*>(staged)[i] = make_float4(1.f, 1.f, 1.f, 1.f);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncwarp();
    for (int first = 0, tile = 0; first < n; first += TILE, ++tile) {
      const float* buf = staged + (tile & 1) * TILE * D;
      // A real kernel rewrites the buffer of two tiles ago here: its copies must have read it.
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      bulk_reduce_rows(acc, s, h, first_pair + first, n - first, buf, lane);
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  } else if constexpr (WORK & 2) {
    const float4 one = make_float4(1.f, 1.f, 1.f, 1.f);
    for (int first = 0; first < n; first += TILE) {
#pragma unroll
      for (int i = 0; i < TILE / 4; ++i) {
        const int r = first + (w - 4) + 4 * i;
        if (r >= n) continue;
        float* p = row_ptr(acc, s, s.rows[first_pair + r], h) + lane * 4;
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(one.x), "f"(one.y),
                     "f"(one.z), "f"(one.w) : "memory");
      }
    }
  }
}

}  // namespace

extern "C" int overlapped(int work, float* acc, const int64_t* starts, const int* rows, int H, int C, int L,
                          float* sink, cudaStream_t stream) {
  const Lists s{starts, rows, H, C, L, L};
  const dim3 grid(C, H);
  // Unused shared memory, as much as a real program's tiles (keys, values, gathered queries, staging),
  // so that two programs share an SM as they would.
  const int smem = 96 * 1024;
  switch (work) {
#define LAUNCH(W)                                                                  \
  case W:                                                                          \
    cudaFuncSetAttribute(overlap<W>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); \
    overlap<W><<<grid, 256, smem, stream>>>(acc, s, sink);                         \
    break;
    LAUNCH(1) LAUNCH(2) LAUNCH(3) LAUNCH(6) LAUNCH(7)
#undef LAUNCH
    default: return -1;
  }
  return (int)cudaGetLastError();
}

extern "C" int scatter(int mode, float* acc, const int64_t* starts, const int* rows, int H, int C, int L,
                       int window, cudaStream_t stream) {
  const Lists s{starts, rows, H, C, L, window};
  const dim3 grid(C, H);
  switch (mode) {
    case RED_V4: from_registers<RED_V4><<<grid, THREADS, 0, stream>>>(acc, s); break;
    case SCATTER_STORE: from_registers<SCATTER_STORE><<<grid, THREADS, 0, stream>>>(acc, s); break;
    case CONTIGUOUS_STORE: from_registers<CONTIGUOUS_STORE><<<grid, THREADS, 0, stream>>>(acc, s); break;
    case BULK_REDUCE: {
      const int bytes = 2 * TILE * D * 4;
      cudaFuncSetAttribute(bulk_reduce, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      bulk_reduce<<<grid, THREADS, bytes, stream>>>(acc, s);
      break;
    }
    default: return -1;
  }
  return (int)cudaGetLastError();
}
