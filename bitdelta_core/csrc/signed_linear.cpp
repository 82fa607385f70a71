// Fused multi-tenant Linear for CPU: out[rows_g] = x[rows_g] @ (W + diag(scale_g) * sign_g)^T + b_g
// for every tenant group g, without materialising any tenant's merged weight matrix. With
// `transposed` the weight is GPT-2 Conv1D's (in, out) matrix and out = x @ (W + ...) + b.
//
// The output features are cut into tiles small enough to stay in the core's cache; for each
// tile every group's merged rows are rebuilt from the base rows and the packed sign bits (one
// 8-wide table read per byte) into a per-thread buffer, then multiplied by that group's rows
// of x with an ordinary GEMM. The base weight is read from memory once per layer instead of
// once per tenant, and no merged weight ever goes to memory. The merged values are bit-for-bit
// those of bitdelta_core.multitenant.merged_weight (W + (+/-scale), one rounding).
//
// Packed layout (bitdelta_core/packing.py): bit j (LSB first) of byte b is the sign of element
// 8*b + j of the row-major (stored rows x cols) matrix, 1 = positive; cols % 8 == 0 is required
// so every row starts on a byte. `index` (ascending int64) lists the stored rows when unchanged
// rows are left out (those rows equal the base); an empty tensor means every row is stored.
// Rows are output features for a Linear weight (N, K) and input features for Conv1D's (K, N).
//
// `rows` (optional, int64) maps each group's rows onto rows of x and out: group g computes rows
// rows[starts[g]:ends[g]] (distinct), so a padded batch's real tokens are read and written in
// place, without gathering them into a matrix and scattering the result back; `zero_rows` lists
// rows of out set to zero (the padding).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(_MSC_VER)
#define BD_RESTRICT __restrict
#else
#define BD_RESTRICT __restrict__
#endif

namespace {

struct Lut {
  alignas(32) float v[256][8];
  Lut() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = ((b >> j) & 1) ? 1.0f : -1.0f;
  }
};
const Lut kLut;

// dst[0:n] = base[0:n] + s * signs(bits) for n % 8 == 0
inline void merge_row(float* BD_RESTRICT dst, const float* BD_RESTRICT base,
                      const uint8_t* BD_RESTRICT bits, float s, int64_t n) {
  int64_t kb = 0;
#if defined(__AVX512F__)
  // two bytes of signs select +s or -s for 16 values at once (a mask blend, no table read)
  const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
  for (; kb + 2 <= n / 8; kb += 2) {
    uint16_t m;
    std::memcpy(&m, bits + kb, sizeof m);  // little-endian: bit j of byte b is value 8*b + j
    _mm512_storeu_ps(dst + kb * 8, _mm512_add_ps(_mm512_loadu_ps(base + kb * 8),
                                                 _mm512_mask_blend_ps(static_cast<__mmask16>(m), neg, pos)));
  }
#endif
  for (; kb < n / 8; ++kb) {
    const float* l = kLut.v[bits[kb]];
    float* d = dst + kb * 8;
    const float* w = base + kb * 8;
    for (int j = 0; j < 8; ++j) d[j] = w[j] + s * l[j];
  }
}

#if defined(__GNUC__) || defined(__clang__)
// Small groups (a few sentences of one tenant): a GEMM library call per group and tile costs a
// pass over the merged tile to pack it, which at a few dozen rows takes as long as the product.
// Here NR merged rows are rebuilt into a buffer that stays in L1 and a register-blocked kernel
// multiplies every row of the group by them: each merged value is built once per group and
// read from L1, nothing is packed, and the base tile is read from the cache shared by groups.
#define BD_SMALL_GROUPS 1
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum8(v8f v) {
  float t[8];
  std::memcpy(t, &v, sizeof t);
  return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

// rows of x per block: MR x NR accumulators, MR inputs and one weight vector fit the vector
// registers (16 with AVX2, 32 with AVX-512)
#if defined(__AVX512F__)
constexpr int kMR = 6;
#else
constexpr int kMR = 3;
#endif
constexpr int kNR = 4;  // merged weight rows (output features) per block

// os[r][j] = xs[r][:] . w[j, :] (+ bias[j]) for r < MR, j < NR; K % 8 == 0. xs and os hold each
// row's address (the rows of a group need not be evenly spaced: the real tokens of a padded batch).
template <int MR, int NR>
inline void micro(const float* const* xs, const float* BD_RESTRICT w, int64_t K, float* const* os,
                  const float* BD_RESTRICT bias) {
  const float* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = xs[r];
  v8f acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = v8f{};
  for (int64_t k = 0; k < K; k += 8) {
    v8f xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = load8(xr[r] + k);
    for (int j = 0; j < NR; ++j) {
      const v8f wv = load8(w + j * K + k);
      for (int r = 0; r < MR; ++r) acc[r][j] += xv[r] * wv;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* o = os[r];
#if defined(__AVX__)
    if constexpr (NR == 4) {  // the four sums of a row in one vector: three horizontal adds, one add
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps((__m256)acc[r][0], (__m256)acc[r][1]),
                                      _mm256_hadd_ps((__m256)acc[r][2], (__m256)acc[r][3]));
      __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      if (bias) sum = _mm_add_ps(sum, _mm_loadu_ps(bias));
      _mm_storeu_ps(o, sum);
      continue;
    }
#endif
    for (int j = 0; j < NR; ++j) o[j] = hsum8(acc[r][j]) + (bias ? bias[j] : 0.0f);
  }
}

template <int MR>
inline void micro_nr(int nr, const float* const* xs, const float* w, int64_t K, float* const* os,
                     const float* bias) {
  switch (nr) {
    case 4: micro<MR, 4>(xs, w, K, os, bias); break;
    case 3: micro<MR, 3>(xs, w, K, os, bias); break;
    case 2: micro<MR, 2>(xs, w, K, os, bias); break;
    default: micro<MR, 1>(xs, w, K, os, bias); break;
  }
}

// One group's m rows of x (xs: each row's address, K values) times output features n0..n0+nt of
// the merged weight, into out (os: each row's address, column 0). Linear layout: weight rows
// are output features.
void small_group(const float* const* xs, int64_t m, int64_t K, float* const* os, const float* W, int64_t n0,
                 int64_t nt, const uint8_t* bits, const float* sc, const int64_t* idx, int64_t kept,
                 const float* bias, float* mbuf) {
  int64_t p = idx ? std::lower_bound(idx, idx + kept, n0) - idx : 0;
  float* ob[kMR];  // one block's output addresses at the current column
  const int64_t nblocks = (m + kMR - 1) / kMR;
  for (int64_t n = n0; n < n0 + nt; n += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, n0 + nt - n));
    for (int j = 0; j < nr; ++j) {
      const int64_t row = n + j;
      if (!idx) {
        merge_row(mbuf + j * K, W + row * K, bits + row * (K / 8), sc[row], K);
      } else if (p < kept && idx[p] == row) {
        merge_row(mbuf + j * K, W + row * K, bits + p * (K / 8), sc[p], K);
        ++p;
      } else {
        std::memcpy(mbuf + j * K, W + row * K, sizeof(float) * K);
      }
    }
    const float* b = bias ? bias + n : nullptr;
    // the rows in nblocks blocks of equal size (within one): a lone last row would run a 1-row
    // block, which loads a weight vector per multiply-add and costs several rows' time
    for (int64_t r = 0, i = 0; i < nblocks; ++i) {
      const int rows = static_cast<int>(m / nblocks + (i < m % nblocks ? 1 : 0));
      for (int q = 0; q < rows; ++q) ob[q] = os[r + q] + n;
      switch (rows) {
#if defined(__AVX512F__)
        case 6: micro_nr<6>(nr, xs + r, mbuf, K, ob, b); break;
        case 5: micro_nr<5>(nr, xs + r, mbuf, K, ob, b); break;
        case 4: micro_nr<4>(nr, xs + r, mbuf, K, ob, b); break;
#endif
        case 3: micro_nr<3>(nr, xs + r, mbuf, K, ob, b); break;
        case 2: micro_nr<2>(nr, xs + r, mbuf, K, ob, b); break;
        default: micro_nr<1>(nr, xs + r, mbuf, K, ob, b); break;
      }
      r += rows;
    }
  }
}
#endif

}  // namespace

void signed_linear_groups(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& weight,
                          const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
                          const std::vector<torch::Tensor>& signs, const std::vector<torch::Tensor>& scales,
                          const std::vector<torch::Tensor>& index, const std::vector<torch::Tensor>& bias,
                          int64_t tile, bool transposed, int64_t small_rows, int64_t small_chunk_bytes,
                          const torch::Tensor& rows, const torch::Tensor& zero_rows) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous 2-D float32");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "weight must be contiguous 2-D float32");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.scalar_type() == at::kFloat, "out must be 2-D float32, rows contiguous");
  const int64_t N = transposed ? weight.size(1) : weight.size(0);
  const int64_t K = transposed ? weight.size(0) : weight.size(1);
  const int64_t srows = weight.size(0), cols = weight.size(1);  // of the stored sign matrix
  TORCH_CHECK(cols % 8 == 0, transposed ? "out_features" : "in_features", " must be a multiple of 8");
  TORCH_CHECK(x.size(1) == K && out.size(1) == N && out.size(0) == x.size(0), "shape mismatch");
  // rows: group g's rows are x/out rows rows[starts[g]:ends[g]] (empty: rows starts[g]:ends[g])
  const bool mapped = rows.numel() > 0;
  const int64_t nrows = mapped ? rows.numel() : x.size(0);
  TORCH_CHECK(!mapped || (rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous()),
              "rows must be contiguous 1-D int64");
  TORCH_CHECK(!zero_rows.numel() || (zero_rows.dim() == 1 && zero_rows.scalar_type() == at::kLong &&
                                     zero_rows.is_contiguous()), "zero_rows must be contiguous 1-D int64");
  const int64_t* rmap = mapped ? rows.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < (mapped ? nrows : 0); ++i)
    TORCH_CHECK(0 <= rmap[i] && rmap[i] < x.size(0), "rows[", i, "] = ", rmap[i], " is not a row of x");
  const int64_t* zmap = zero_rows.numel() ? zero_rows.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < zero_rows.numel(); ++i)
    TORCH_CHECK(0 <= zmap[i] && zmap[i] < out.size(0), "zero_rows[", i, "] = ", zmap[i], " is not a row of out");
  const size_t G = starts.size();
  TORCH_CHECK(ends.size() == G && signs.size() == G && scales.size() == G && index.size() == G && bias.size() == G,
              "one entry per group in every list");
  for (size_t g = 0; g < G; ++g) {
    TORCH_CHECK(0 <= starts[g] && starts[g] <= ends[g] && ends[g] <= nrows, "bad row range");
    const int64_t kept = index[g].numel() ? index[g].numel() : srows;
    TORCH_CHECK(signs[g].scalar_type() == at::kByte && signs[g].is_contiguous() && signs[g].numel() * 8 >= kept * cols,
                "signs must be contiguous uint8 covering the stored rows");
    TORCH_CHECK(scales[g].scalar_type() == at::kFloat && scales[g].is_contiguous() && scales[g].numel() == kept,
                "one float32 scale per stored row");
    TORCH_CHECK(!index[g].numel() || (index[g].scalar_type() == at::kLong && index[g].is_contiguous()),
                "index must be contiguous int64");
    TORCH_CHECK(!bias[g].numel() || (bias[g].scalar_type() == at::kFloat && bias[g].numel() == N), "bias must be (N,) float32");
  }
  tile = std::max<int64_t>(8, std::min(tile, N));
  if (transposed) tile = tile / 8 * 8;  // column tiles start on a byte of every row
  const int64_t ntiles = (N + tile - 1) / tile;
  const float* W = weight.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  for (int64_t i = 0; i < zero_rows.numel(); ++i) std::memset(O + zmap[i] * ldo, 0, sizeof(float) * N);

#ifdef BD_SMALL_GROUPS
  const bool has_small = !transposed && small_rows > 0;
  // base rows read by every small group before the next ones (a multiple of the block rows)
  const int64_t chunk = std::max<int64_t>(kNR, small_chunk_bytes / (4 * K) / kNR * kNR);
  // every row's address in x and in out (a small group's rows need not be evenly spaced)
  std::vector<const float*> xptr(has_small ? nrows : 0);
  std::vector<float*> optr(has_small ? nrows : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xptr.size()); ++i) {
    const int64_t r = rmap ? rmap[i] : i;
    xptr[i] = x.data_ptr<float>() + r * K;
    optr[i] = O + r * ldo;
  }
#else
  const bool has_small = false;
#endif
  // groups the GEMM path runs on mapped rows: their rows of x gathered, their output written
  // to a buffer and copied to its rows after the loop
  std::vector<at::Tensor> gx(G), go(G), grows(G);
  for (size_t g = 0; g < G; ++g) {
    const int64_t m = ends[g] - starts[g];
    if (!mapped || m == 0 || (has_small && m <= small_rows)) continue;
    grows[g] = rows.narrow(0, starts[g], m);
    gx[g] = x.index_select(0, grows[g]);
    go[g] = at::empty({m, N}, out.options());
  }
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    // worker threads do not inherit the caller's thread-local modes
    c10::InferenceMode guard(inference);
    at::NoGradGuard no_grad;
    at::Tensor buf = at::empty({tile * K}, weight.options());
    float* B = buf.data_ptr<float>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, nt = std::min(tile, N - n0);
#ifdef BD_SMALL_GROUPS
      // small groups, a chunk of base rows at a time: the chunk stays in L2 while every small
      // group reads it (a whole tile of a large layer does not fit, and each group would read
      // it again from the last-level cache)
      if (has_small) {
        for (int64_t c0 = n0; c0 < n0 + nt; c0 += chunk) {
          const int64_t ct = std::min(chunk, n0 + nt - c0);
          for (size_t g = 0; g < G; ++g) {
            const int64_t m = ends[g] - starts[g];
            if (m == 0 || m > small_rows) continue;
            small_group(xptr.data() + starts[g], m, K, optr.data() + starts[g], W, c0, ct,
                        signs[g].data_ptr<uint8_t>(), scales[g].data_ptr<float>(),
                        index[g].numel() ? index[g].data_ptr<int64_t>() : nullptr, index[g].numel(),
                        bias[g].numel() ? bias[g].data_ptr<float>() : nullptr, B);
          }
        }
      }
#endif
      for (size_t g = 0; g < G; ++g) {
        const int64_t m = ends[g] - starts[g];
        if (m == 0 || (has_small && m <= small_rows)) continue;
        const uint8_t* bits = signs[g].data_ptr<uint8_t>();
        const float* sc = scales[g].data_ptr<float>();
        if (transposed) {  // the tile is columns n0..n0+nt of every one of the K rows: (K, nt)
          const int64_t* idx = index[g].numel() ? index[g].data_ptr<int64_t>() : nullptr;
          const int64_t kept = index[g].numel();
          int64_t p = 0;
          for (int64_t k = 0; k < K; ++k) {
            int64_t q = k;  // stored position of row k, or -1
            if (idx) {
              if (p < kept && idx[p] == k) q = p++;
              else q = -1;
            }
            if (q >= 0)
              merge_row(B + k * nt, W + k * N + n0, bits + q * (N / 8) + n0 / 8, sc[q], nt);
            else
              std::memcpy(B + k * nt, W + k * N + n0, sizeof(float) * nt);
          }
        } else if (!index[g].numel()) {
          for (int64_t r = 0; r < nt; ++r)
            merge_row(B + r * K, W + (n0 + r) * K, bits + (n0 + r) * (K / 8), sc[n0 + r], K);
        } else {
          const int64_t* idx = index[g].data_ptr<int64_t>();
          const int64_t kept = index[g].numel();
          int64_t p = std::lower_bound(idx, idx + kept, n0) - idx;
          for (int64_t r = 0; r < nt; ++r) {
            if (p < kept && idx[p] == n0 + r) {
              merge_row(B + r * K, W + (n0 + r) * K, bits + p * (K / 8), sc[p], K);
              ++p;
            } else {
              std::memcpy(B + r * K, W + (n0 + r) * K, sizeof(float) * K);
            }
          }
        }
        at::Tensor o = (mapped ? go[g] : out.narrow(0, starts[g], m)).narrow(1, n0, nt);
        at::Tensor w = transposed ? buf.narrow(0, 0, K * nt).view({K, nt}) : buf.narrow(0, 0, nt * K).view({nt, K}).t();
        at::Tensor xg = mapped ? gx[g] : x.narrow(0, starts[g], m);
        if (bias[g].numel()) {
          o.copy_(bias[g].narrow(0, n0, nt).unsqueeze(0).expand({m, nt}));
          o.addmm_(xg, w);
        } else {
          at::mm_out(o, xg, w);
        }
      }
    }
  });
  for (size_t g = 0; g < G; ++g)
    if (go[g].defined()) out.index_copy_(0, grows[g], go[g]);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released for the whole call (no Python object is touched), so a server's event
  // loop and other Python threads keep running during a forward, as they do during torch ops
  m.def("signed_linear_groups", &signed_linear_groups, py::call_guard<py::gil_scoped_release>(),
        "out[rows_g] = x[rows_g] @ (W + scale_g * sign_g)^T + b_g for every group g (in place into out); "
        "transposed: W is (in, out) and out[rows_g] = x[rows_g] @ (W + scale_g * sign_g) + b_g; rows_g: "
        "rows[starts[g]:ends[g]] (rows empty: starts[g]:ends[g]); out[zero_rows] = 0");
}
