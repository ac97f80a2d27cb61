// The `keyed` kernels as warp-specialised Hopper kernels (sm_90a: wgmma, TMA bulk reduce-adds), compiled at
// first use by NVRTC (vmoba/_keyed_cuda.py); no headers, so NVRTC needs no toolkit. Same contracts as PASS 1
// and PASS 2 of vmoba/_keyed_kernels.py (bf16, D = 128). docs/notes/25-keyed-wgmma-kernels.md.
//
// keyed_forward: per key tile, the gathered query rows' p = exp2(s * scale_log2 - offset) (s = q.k) on valid
// keys, p @ v added to the fp32 accumulator and the row sums of p to rowsum.
// Program (key tile of 128 keys, b * H + h): K, V in shared memory, and two independent pipelines, one per
// 64-row half of each 128-row query tile: a consumer warpgroup (S = Q K^T and O = P V by wgmma, P from
// registers), a producer warp (cp.async row gathers into two query buffers) and a reducer warp (a TMA bulk
// reduce-add of each staged fp32 output row: one warp keeps the L2 reductions going while the tensor cores
// work, docs/notes/22-atomics-and-bulk-reduce.md). mbarriers hand the buffers between the roles. Shared
// tiles are [2 halves of 64 columns][rows][128 B], the 16-byte chunks of each row XOR-swizzled by row % 8:
// wgmma's 128-byte swizzle, so one layout serves Q and K (K-major operands) and V (the MN-major B operand
// of P V).
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned short bf16;

#define D_REGS "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, " \
  "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// wgmma's accumulator operands: a thread's 64 (N = 128) or 32 (N = 64) fp32 fragment registers d[i].
#define D_OUT64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define D_OUT32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define D_REGS32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"

namespace {

constexpr int D = 128, BN = 128;  // head dim; keys per program
constexpr int KV_BYTES = BN * D * 2;  // a key tile
// fp32 per staged output row: 544 B, 16-B aligned; 8 banks apart, so the 64-bit fragment writes of a half-warp
// (4 rows x 4 lanes x 8 B) hit 32 distinct banks (D + 4 left them 2-way conflicted).
constexpr int OSTRIDE = D + 8;
constexpr int O_BYTES = 64 * OSTRIDE * 4;  // 64 staged rows

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
// Byte offset of 16-byte chunk c (0..15) of row r in a swizzled [2][rows][128 B] tile.
__device__ __forceinline__ u32 chunk_offset(int r, int c, int rows) {
  return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(ok ? 4 : 0) : "memory");
}
__device__ __forceinline__ void st_shared2(u32 addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
  u32 done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}
// wgmma shared-memory descriptor, 128-byte swizzle: start, leading and stride byte offsets (>> 4).
__device__ __forceinline__ u64 desc(u32 addr, u32 lbo, u32 sbo) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) |
         (1ull << 62);
}
// Descriptor d moved `bytes` (a multiple of 16) further into shared memory: one 32-bit add to the start field
// (addr >> 4 in bits 0-13; shared addresses stay below 2^18, so it cannot carry into the next field). Each
// product's descriptors are a base computed once plus constants: computed whole per product they cost ~15%
// of the consumers' issue slots (docs/notes/29-descriptors-base-constants.md).
__device__ __forceinline__ u64 plus(u64 d, u32 bytes) {
  return (d & 0xFFFFFFFF00000000ull) | (u32)((u32)d + (bytes >> 4));
}
// x, which the caller knows to be the same in every lane, as the compiler can see it is: from lane 0. Then
// addresses and descriptors built from it live in uniform registers, as wgmma takes them, instead of being
// moved there before every product (backward -1 ms, docs/notes/29-descriptors-base-constants.md).
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_wait() {
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// Keeps the compiler from moving accumulator reads or writes across the asynchronous products.
template <int N = 64>
__device__ __forceinline__ void fence_regs(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// D[64 x 128] (+)= A[64 x 16] B[16 x 128]; A, B from shared memory, both K-major.
__device__ __forceinline__ void wgmma_ss(float* d, u64 a, u64 b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" D_REGS "}, %64, %65, p, 1, 1, 0, 0;\n}"
      : D_OUT64
      : "l"(a), "l"(b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_rs(float* d, const u32* a, u64 b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" D_REGS "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}"
      : D_OUT64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], A and B from shared memory; TA / TB: MN-major (transposed) operand.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss64(float* d, u64 a, u64 b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" D_REGS32 "}, %32, %33, p, 1, 1, %35, %36;\n}"
      : D_OUT32
      : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}
// A warp's share of rows first + lane and first + 32 + lane of a row list of n (-1 past its end).
__device__ __forceinline__ void warp_rows(const int* list, int first, int n, int lane, int* out) {
#pragma unroll
  for (int m = 0; m < 2; ++m) out[m] = first + 32 * m + lane < n ? list[first + 32 * m + lane] : -1;
}
__device__ __forceinline__ u32 pack(float lo, float hi) {  // two bf16, lo in the low half
  u32 v;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(v) : "f"(hi), "f"(lo));
  return v;
}

// --- What both kernels share. A tile's gathered rows are 64 rows of a row list, staged as a swizzled
// [2][64][128 B] tile; full / empty mbarriers hand buffers between the roles.

// Traps unless the dynamic shared memory (at `base`) is 1024-byte aligned, as wgmma's swizzle needs (no room
// is left to align by hand), and holds `bytes`.
__device__ __forceinline__ void check_smem(u32 base, u32 bytes) {
  u32 size;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
  if ((base & 1023) || size < bytes) __trap();
}

// A pipeline's mbarriers, 8 bytes each from `at`: each query buffer's full and empty, then the staging
// buffer's full and empty.
template <int NQ>
struct Barriers {
  static constexpr int BYTES = 8 * (2 * NQ + 2);
  u32 at;
  __device__ u32 q_full(int s) const { return at + 8 * s; }
  __device__ u32 q_empty(int s) const { return at + 8 * (NQ + s); }
  __device__ u32 o_full() const { return at + 16 * NQ; }
  __device__ u32 o_empty() const { return at + 16 * NQ + 8; }
  // By one thread: `gatherers` producer lanes fill each query buffer (each lane arrives when its copies
  // land); `consumers` threads free it and stage each tile's rows; lane 0 of each of `reducers` warps frees
  // the staging buffer.
  __device__ void init(int gatherers, int consumers, int reducers) const {
    for (int s = 0; s < NQ; ++s) {
      mbar_init(q_full(s), gatherers);
      mbar_init(q_empty(s), consumers);
    }
    mbar_init(o_full(), consumers);
    mbar_init(o_empty(), reducers);
  }
};

// All threads: the program's 128 keys of k and v into shared memory.
__device__ __forceinline__ void load_kv(u32 Ks, u32 Vs, const bf16* k, const bf16* v, i64 base, int key_tile,
                                        int stride_l) {
  for (int i = threadIdx.x; i < BN * 16; i += blockDim.x) {  // 128 rows x 16 chunks of 16 B
    const int r = i >> 4, c = i & 15;
    const i64 src = base + (i64)(key_tile * BN + r) * stride_l + c * 8;
    cp_async16(Ks + chunk_offset(r, c, BN), k + src, true);
    cp_async16(Vs + chunk_offset(r, c, BN), v + src, true);
  }
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
  fence_async_shared();
  __syncthreads();
}

// Producer warp: tile t's 64 rows of `list` (n rows; they start at t * tile_stride) gathered from src into
// query buffer stage(t % NQ), zeros past the list's end, and extra(stage, rows)'s copies (rows: this lane's two
// row indices, -1 past the end). Each tile's row indices load a tile ahead. The consumers fence the async
// proxy after their wait: cp.async writes are generic, wgmma reads are async.
template <int NQ, typename Stage, typename Extra>
__device__ __forceinline__ void produce(const int* list, int n, int tile_stride, int ntiles, const bf16* src,
                                        i64 base, int stride_l, Stage stage, const Barriers<NQ>& bar, int lane,
                                        Extra extra) {
  const int half = lane >> 4, c = lane & 15;
  int my_rows[2], next_rows[2];
  warp_rows(list, 0, n, lane, next_rows);
  for (int t = 0; t < ntiles; ++t) {
    const int s = t % NQ;
    if (t >= NQ) mbar_wait(bar.q_empty(s), (t / NQ - 1) & 1);
    my_rows[0] = next_rows[0];
    my_rows[1] = next_rows[1];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      // Each lane's row's address (row 0's past the list's end, which copy nothing) and which rows exist: the
      // lanes then shuffle addresses instead of each computing one from a row index per chunk (the 64-bit
      // multiplies made the producers the backward's bottleneck, docs/notes/31-producer-addresses.md).
      const u64 mine = (u64)(src + base + (i64)(my_rows[m] < 0 ? 0 : my_rows[m]) * stride_l);
      const u32 exists = __ballot_sync(0xffffffffu, my_rows[m] >= 0);
#pragma unroll 4
      for (int j = 0; j < 16; ++j) {  // rows 32 m + 2j and + 1, one per half-warp, 16 chunks each
        const int r = 32 * m + 2 * j + half;
        const bf16* at = reinterpret_cast<const bf16*>(__shfl_sync(0xffffffffu, mine, r & 31)) + c * 8;
        cp_async16(stage(s) + chunk_offset(r, c, 64), at, exists >> (r & 31) & 1);
      }
    }
    extra(stage(s), my_rows);
    warp_rows(list, (t + 1) * tile_stride, n, lane, next_rows);
    // The buffer is full once this lane's copies have landed: the mbarrier tracks them, so the warp goes on
    // to the next buffer at once (waiting here would serialise the roles,
    // docs/notes/26-producer-handover.md).
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar.q_full(s)) : "memory");
  }
  asm volatile("cp.async.wait_all;" ::: "memory");  // no copy outlives its warp
}

// Reducer warp: once the consumers have staged tile t's 64 fp32 rows (stride OSTRIDE), adds rows first + lane
// + 32 i (i < PER_LANE) to dst + list[t * tile_stride + r] * stride_l (rows past n skipped), one bulk
// reduce-add each. One staging buffer is all that fits: it is free again once its rows have been read. The
// backward splits each tile's 64 rows over two warps (its fourth warp was idle; -0.3 ms,
// docs/notes/28-backward-line-profile.md); the SM itself takes a bulk copy every ~45 cycles however many
// warps issue them (docs/notes/30-forward-reducers-doubled.md).
template <int PER_LANE>
__device__ __forceinline__ void reduce(const float* staged, const int* list, int n, int tile_stride, int ntiles,
                                       float* dst, int stride_l, u32 full, u32 empty, int lane, int first) {
  for (int t = 0; t < ntiles; ++t) {
    mbar_wait(full, t & 1);
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int r = first + lane + 32 * i;
      if (t * tile_stride + r < n) {
        float* row = dst + (i64)list[t * tile_stride + r] * stride_l;
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(row),
                     "r"(smem_addr(staged + r * OSTRIDE)), "r"(D * 4)
                     : "memory");
      }
    }
    asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;" ::: "memory");
    __syncwarp();
    if (lane == 0) mbar_arrive(empty);
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

}  // namespace

namespace fwd {
constexpr int BM = 128, WM = 64, NQ = 2, THREADS = 384;  // query rows per tile and per warpgroup
constexpr int Q_BYTES = WM * D * 2;                      // a warpgroup's 64 query rows
constexpr int SMEM = 2 * KV_BYTES + 2 * NQ * Q_BYTES + 2 * O_BYTES + 2 * Barriers<NQ>::BYTES;
}  // namespace fwd

// Launch: grid (L / 128, B * H), 384 threads, SMEM = 200,800 bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(fwd::THREADS, 1)
    keyed_forward(const bf16* q, const bf16* k, const bf16* v,  // [B, L, H, D] block order
                  float* acc, float* rowsum,                    // [B, L, H, D] and [B, H, L], added to
                  const float* offsets,                         // [B, H, L], log2 units
                  const i64* starts, const int* rows,       // CSR row lists per (b, h, block)
                  const unsigned char* valid,                   // [L]
                  int L, int C, int H, int tiles_per_block, int stride_b, int stride_l, double scale) {
  using namespace fwd;
  extern __shared__ __align__(1024) unsigned char smem[];
  const u32 Ks = smem_addr(smem), Vs = Ks + KV_BYTES;
  check_smem(Ks, SMEM);
  const float scale_log2 = (float)(scale * 1.4426950408889634);  // scale = D^-0.5
  const int key_tile = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int w = warp_uniform(warp < 8 ? warp >> 2 : warp & 1);  // the pipeline (query half) of this warp
  const u32 Qs = Vs + KV_BYTES + w * NQ * Q_BYTES;  // this pipeline's NQ query buffers
  float* Os = reinterpret_cast<float*>(smem + 2 * KV_BYTES + 2 * NQ * Q_BYTES + w * O_BYTES);
  const Barriers<NQ> bar{Ks + 2 * KV_BYTES + 2 * NQ * Q_BYTES + 2 * O_BYTES + w * Barriers<NQ>::BYTES};

  const i64 base = b * (i64)stride_b + (i64)h * D, stat_base = (i64)bh * L;
  const i64 cell = (i64)bh * C + key_tile / tiles_per_block;
  const i64 start = starts[cell];
  const int count = (int)(starts[cell + 1] - start), ntiles = (count + BM - 1) / BM;
  if (ntiles == 0) return;
  const int* half_rows = rows + start + w * WM;  // + t * BM: this pipeline's rows of tile t
  const int half_count = count - w * WM;         // its row r of tile t exists while t * BM + r < half_count

  if (warp >= 8 && warp < 10 && lane == 0) bar.init(32, 128, 1);  // per pipeline: producer, warpgroup, reducer
  load_kv(Ks, Vs, k, v, base, key_tile, stride_l);

  if (warp == 8 || warp == 9) {  // producer: the pipeline's 64 rows of each 128-row tile
    produce<NQ>(half_rows, half_count, BM, ntiles, q, base, stride_l, [&](int s) { return Qs + s * Q_BYTES; },
                bar, lane, [](u32, const int*) {});
  } else if (warp >= 10) {  // reducer: the pipeline's staged output rows into acc
    reduce<2>(Os, half_rows, half_count, BM, ntiles, acc + base, stride_l, bar.o_full(), bar.o_empty(), lane, 0);
  } else {  // consumer warpgroup w: rows (warp % 4) * 16 + g and + 8 of its half (g = lane / 4, q4 = lane % 4)
    const int g = lane >> 2, q4 = lane & 3, r0 = (warp & 3) * 16 + g, r1 = r0 + 8;
    u32 key_ok = 0;  // bit 2 nt + e: key nt * 8 + 2 q4 + e of the tile is valid
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) key_ok |= (u32)(valid[key_tile * BN + nt * 8 + 2 * q4 + e] != 0) << (2 * nt + e);
    float s[64], o[64];
    u32 pa[8][4];
    // Descriptors: k and the query buffers K-major, v MN-major (its column halves KV_BYTES / 2 apart)
    const u64 k_desc = desc(Ks, 16, 1024), q_desc = desc(Qs, 16, 1024), v_desc = desc(Vs, KV_BYTES / 2, 1024);
    // This thread's two rows of each tile and their offsets, loaded a tile ahead (their latency under the
    // products): the row indices at the start of the previous tile, the offsets after its s.
    bool ok0 = r0 < half_count, ok1 = r1 < half_count;
    int row0 = ok0 ? half_rows[r0] : 0, row1 = ok1 ? half_rows[r1] : 0;
    float off0 = ok0 ? offsets[stat_base + row0] : 0.f, off1 = ok1 ? offsets[stat_base + row1] : 0.f;
    for (int t = 0; t < ntiles; ++t) {
      const int st = t % NQ;
      const bool nok0 = (t + 1) * BM + r0 < half_count, nok1 = (t + 1) * BM + r1 < half_count;
      const int nrow0 = nok0 ? half_rows[(t + 1) * BM + r0] : 0, nrow1 = nok1 ? half_rows[(t + 1) * BM + r1] : 0;
      mbar_wait(bar.q_full(st), (t / NQ) & 1);
      fence_async_shared();

      const u64 qd = plus(q_desc, st * Q_BYTES);
      fence_regs(s);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {  // 16 columns of D per step; 4 steps per 64-column half
        const u32 col = (kk & 3) * 32;
        wgmma_ss(s, plus(qd, (kk >> 2) * Q_BYTES / 2 + col), plus(k_desc, (kk >> 2) * KV_BYTES / 2 + col), kk);
      }
      wgmma_commit_wait();
      fence_regs(s);
      mbar_arrive(bar.q_empty(st));
      const float noff0 = nok0 ? offsets[stat_base + nrow0] : 0.f, noff1 = nok1 ? offsets[stat_base + nrow1] : 0.f;

      // p = exp2(s * scale - offset) on valid keys, as bf16 A fragments of P V; row sums over the quad
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const bool v0 = key_ok >> (2 * nt) & 1, v1 = key_ok >> (2 * nt + 1) & 1;
        const float p00 = v0 ? exp2f(s[4 * nt + 0] * scale_log2 - off0) : 0.f;
        const float p01 = v1 ? exp2f(s[4 * nt + 1] * scale_log2 - off0) : 0.f;
        const float p10 = v0 ? exp2f(s[4 * nt + 2] * scale_log2 - off1) : 0.f;
        const float p11 = v1 ? exp2f(s[4 * nt + 3] * scale_log2 - off1) : 0.f;
        sum0 += p00 + p01;
        sum1 += p10 + p11;
        pa[nt >> 1][(nt & 1) * 2 + 0] = pack(p00, p01);
        pa[nt >> 1][(nt & 1) * 2 + 1] = pack(p10, p11);
      }
      sum0 += __shfl_xor_sync(0xffffffffu, sum0, 1);
      sum0 += __shfl_xor_sync(0xffffffffu, sum0, 2);
      sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
      sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
      if (q4 == 0) {
        if (ok0) atomicAdd(rowsum + stat_base + row0, sum0);
        if (ok1) atomicAdd(rowsum + stat_base + row1, sum1);
      }

      fence_regs(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk)  // 16 keys per step: 2 groups of 8 rows of V (SBO), 2 column halves (LBO)
        wgmma_rs(o, pa[kk], plus(v_desc, kk * 2048), kk);
      wgmma_commit_wait();
      fence_regs(o);

      if (t > 0) mbar_wait(bar.o_empty(), (t - 1) & 1);
      const u32 orow0 = smem_addr(Os + r0 * OSTRIDE + 2 * q4), orow1 = smem_addr(Os + r1 * OSTRIDE + 2 * q4);
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        st_shared2(orow0 + nt * 32, o[4 * nt + 0], o[4 * nt + 1]);
        st_shared2(orow1 + nt * 32, o[4 * nt + 2], o[4 * nt + 3]);
      }
      fence_async_shared();  // generic writes -> the bulk copies' reads
      mbar_arrive(bar.o_full());
      ok0 = nok0, ok1 = nok1, row0 = nrow0, row1 = nrow1, off0 = noff0, off1 = noff1;
    }
  }
}

namespace bwd {
constexpr int BM = 64, NQ = 2, THREADS = 384;
constexpr int ROWS_BYTES = BM * D * 2;              // 64 gathered rows of q or dO
constexpr int STAGE_BYTES = 2 * ROWS_BYTES + 1024;  // q, dO, then the rows' lse and delta (1024: alignment)
constexpr int DS_BYTES = BN * BM * 2;               // ds^T, [128 keys][64 queries] bf16
constexpr int SMEM = 2 * KV_BYTES + NQ * STAGE_BYTES + 2 * DS_BYTES + O_BYTES + Barriers<NQ>::BYTES;
}  // namespace bwd

// The backward (dq added, dk and dv written), FlashAttention-3's key-major loop over each key tile's gathered
// query tiles: two consumer warpgroups (64 keys each: s^T = k q^T, dp^T = v do^T, dv += p^T do, dk += ds^T q;
// then dq = ds k, 64 columns of D each, from ds^T in shared memory), two producer warps (cp.async gathers of
// q, and of dO with the rows' lse and delta), two reducer warps (TMA bulk reduce-adds of the staged dq rows,
// 32 each). Launch: grid (L / 128, B * H), 384 threads, bwd::SMEM = 200,752 bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(bwd::THREADS, 1)
    keyed_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,  // [B, L, H, D] block order
                   float* dq, bf16* dk, bf16* dv,        // dq [B, L, H, D] fp32, added to; dk, dv written
                   const float* lse, const float* delta,  // [B, H, L]; lse in log2 units
                   const i64* starts, const int* rows, const unsigned char* valid,
                   int L, int C, int H, int tiles_per_block, int stride_b, int stride_l, double scale) {
  using namespace bwd;
  extern __shared__ __align__(1024) unsigned char smem[];
  const u32 Ks = smem_addr(smem), Vs = Ks + KV_BYTES, stages = Vs + KV_BYTES, dS = stages + NQ * STAGE_BYTES;
  float* Os = reinterpret_cast<float*>(smem + 2 * KV_BYTES + NQ * STAGE_BYTES + 2 * DS_BYTES);
  const Barriers<NQ> bar{smem_addr(Os) + O_BYTES};
  check_smem(Ks, SMEM);
  const float sm_scale = (float)scale, scale_log2 = (float)(scale * 1.4426950408889634);

  const int key_tile = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const i64 base = b * (i64)stride_b + (i64)h * D, stat_base = (i64)bh * L;
  const i64 cell = (i64)bh * C + key_tile / tiles_per_block;
  const i64 start = starts[cell];
  const int count = (int)(starts[cell + 1] - start), ntiles = (count + BM - 1) / BM;
  const int* tile_rows = rows + start;

  if (threadIdx.x == 0) bar.init(64, 256, 2);  // 2 producer warps, 2 warpgroups, 2 reducer warps
  load_kv(Ks, Vs, k, v, base, key_tile, stride_l);

  if (warp >= 8) {  // the third warpgroup: registers to the consumers, then two producers and two reducers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
    auto stage = [&](int s) { return stages + s * STAGE_BYTES + (warp - 8) * ROWS_BYTES; };
    if (warp == 8) {  // q rows
      produce<NQ>(tile_rows, count, BM, ntiles, q, base, stride_l, stage, bar, lane,
                  [](u32, const int*) {});
    } else if (warp == 9) {  // dO rows, then their lse and delta (zeros past the list's end, where dO's rows
                             // are zeros too: no contribution)
      produce<NQ>(tile_rows, count, BM, ntiles, dout, base, stride_l, stage, bar, lane,
                  [&](u32 rows_at, const int* my_rows) {
                    const u32 stat = rows_at + ROWS_BYTES;
#pragma unroll
                    for (int m = 0; m < 2; ++m) {
                      const int row = my_rows[m];
                      const i64 at = stat_base + (row < 0 ? 0 : row);
                      cp_async4(stat + 4 * (32 * m + lane), lse + at, row >= 0);
                      cp_async4(stat + 4 * (BM + 32 * m + lane), delta + at, row >= 0);
                    }
                  });
    } else {  // reducers: the staged dq rows, 32 per warp
      reduce<1>(Os, tile_rows, count, BM, ntiles, dq + base, stride_l, bar.o_full(), bar.o_empty(), lane,
                32 * (warp - 10));
    }
    return;
  }

  // Consumer warpgroup w: key rows 64 w + k0 and + k1 of the tile (k0 = (warp % 4) * 16 + g, k1 = k0 + 8);
  // in dq, query rows k0, k1 and columns 64 w + 8 nt + 2 q4 (g = lane / 4, q4 = lane % 4).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
  const int w = warp_uniform(warp >> 2), g = lane >> 2, q4 = lane & 3, k0 = (warp & 3) * 16 + g, k1 = k0 + 8;
  const bool kok0 = valid[key_tile * BN + w * 64 + k0] != 0, kok1 = valid[key_tile * BN + w * 64 + k1] != 0;
  const u32 ka = Ks + w * 64 * 128, va = Vs + w * 64 * 128;  // this warpgroup's keys in each column half
  const u32 ostage0 = smem_addr(Os + k0 * OSTRIDE + w * 64 + 2 * q4), ostage1 = ostage0 + 8 * OSTRIDE * 4;
  // Descriptors: k, v and the stages' rows K-major; the stages' rows, ds^T and k MN-major (column halves
  // ROWS_BYTES / 2 or KV_BYTES / 2 apart)
  const u64 k_desc = desc(ka, 16, 1024), v_desc = desc(va, 16, 1024), rows_k = desc(stages, 16, 1024);
  const u64 rows_mn = desc(stages, ROWS_BYTES / 2, 1024), ds_mn = desc(dS, ROWS_BYTES / 2, 1024);
  const u64 k_mn = desc(Ks + w * KV_BYTES / 2, KV_BYTES / 2, 1024);
  float dk_acc[64], dv_acc[64], sp[32], dp[32], dqa[32];
  u32 pa[4][4], da[4][4];
#pragma unroll
  for (int i = 0; i < 64; ++i) dk_acc[i] = dv_acc[i] = 0.f;
  for (int t = 0; t < ntiles; ++t) {
    const int s = t % NQ;
    const u32 at = s * STAGE_BYTES, ds_at = (t & 1) * DS_BYTES, dsb = dS + ds_at;  // this tile's stage, ds^T
    const u64 q_k = plus(rows_k, at), do_k = plus(rows_k, at + ROWS_BYTES);
    const u64 q_mn = plus(rows_mn, at), do_mn = plus(rows_mn, at + ROWS_BYTES), ds_t = plus(ds_mn, ds_at);
    const float* stat = reinterpret_cast<const float*>(smem + (stages - Ks) + at + 2 * ROWS_BYTES);
    mbar_wait(bar.q_full(s), (t / NQ) & 1);
    fence_async_shared();

    // s^T = k q^T and dp^T = v do^T, [64 keys x 64 queries]: 8 steps of 16 columns of D each
    fence_regs<32>(sp);
    fence_regs<32>(dp);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const u32 col = (kk & 3) * 32, hk = (kk >> 2) * KV_BYTES / 2, hq = (kk >> 2) * ROWS_BYTES / 2;
      wgmma_ss64<0, 0>(sp, plus(k_desc, hk + col), plus(q_k, hq + col), kk);
    }
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const u32 col = (kk & 3) * 32, hk = (kk >> 2) * KV_BYTES / 2, hq = (kk >> 2) * ROWS_BYTES / 2;
      wgmma_ss64<0, 0>(dp, plus(v_desc, hk + col), plus(do_k, hq + col), kk);
    }
    wgmma_commit_wait();
    fence_regs<32>(sp);
    fence_regs<32>(dp);

    // p^T = exp2(s^T * scale - lse) on valid keys, ds^T = p^T (dp^T - delta); as bf16 A fragments
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int col = 8 * nt + 2 * q4;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float l = stat[col + (e & 1)], dl = stat[BM + col + (e & 1)];
        const float p = (e < 2 ? kok0 : kok1) ? exp2f(sp[4 * nt + e] * scale_log2 - l) : 0.f;
        sp[4 * nt + e] = p;
        dp[4 * nt + e] = p * (dp[4 * nt + e] - dl);
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pa[kk][i] = pack(sp[8 * kk + 2 * i], sp[8 * kk + 2 * i + 1]);
        da[kk][i] = pack(dp[8 * kk + 2 * i], dp[8 * kk + 2 * i + 1]);
      }
    // ds^T into shared memory for dq (both warpgroups' halves): rows 64 w + k0, k1; chunk nt swizzled by row
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const u32 chunk = ((nt ^ g) << 4) + 4 * q4;  // (64 w + k0) % 8 == (64 w + k1) % 8 == g
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(dsb + (w * 64 + k0) * 128 + chunk), "r"(da[nt >> 1][(nt & 1) * 2]) : "memory");
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(dsb + (w * 64 + k1) * 128 + chunk), "r"(da[nt >> 1][(nt & 1) * 2 + 1]) : "memory");
    }
    fence_async_shared();

    // dv += p^T do, dk += ds^T q, [64 keys x 128]: 4 steps of 16 queries
    fence_regs(dv_acc);
    fence_regs(dk_acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs(dv_acc, pa[kk], plus(do_mn, kk * 2048), 1);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs(dk_acc, da[kk], plus(q_mn, kk * 2048), 1);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("bar.sync 1, 256;" ::: "memory");  // both warpgroups' ds^T are in shared memory

    // dq[:, 64 w : 64 w + 64] = ds k: 8 steps of 16 keys; ds (MN-major A) and k (MN-major B)
    fence_regs<32>(dqa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      wgmma_ss64<1, 1>(dqa, plus(ds_t, kk * 2048), plus(k_mn, kk * 2048), kk);
    wgmma_commit_wait();
    fence_regs(dv_acc);
    fence_regs(dk_acc);
    fence_regs<32>(dqa);
    mbar_arrive(bar.q_empty(s));  // q and dO of this stage are read

    if (t > 0) mbar_wait(bar.o_empty(), (t - 1) & 1);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      st_shared2(ostage0 + nt * 32, dqa[4 * nt + 0] * sm_scale, dqa[4 * nt + 1] * sm_scale);
      st_shared2(ostage1 + nt * 32, dqa[4 * nt + 2] * sm_scale, dqa[4 * nt + 3] * sm_scale);
    }
    fence_async_shared();  // generic writes -> the bulk copies' reads
    mbar_arrive(bar.o_full());
  }

  // dk (scaled) and dv of this warpgroup's 64 keys, as bf16 pairs
  const i64 krow0 = base + (i64)(key_tile * BN + w * 64 + k0) * stride_l + 2 * q4, krow1 = krow0 + 8 * (i64)stride_l;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    *reinterpret_cast<u32*>(dk + krow0 + 8 * nt) = pack(dk_acc[4 * nt + 0] * sm_scale, dk_acc[4 * nt + 1] * sm_scale);
    *reinterpret_cast<u32*>(dk + krow1 + 8 * nt) = pack(dk_acc[4 * nt + 2] * sm_scale, dk_acc[4 * nt + 3] * sm_scale);
    *reinterpret_cast<u32*>(dv + krow0 + 8 * nt) = pack(dv_acc[4 * nt + 0], dv_acc[4 * nt + 1]);
    *reinterpret_cast<u32*>(dv + krow1 + 8 * nt) = pack(dv_acc[4 * nt + 2], dv_acc[4 * nt + 3]);
  }
}
