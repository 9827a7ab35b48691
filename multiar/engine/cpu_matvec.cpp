// A decode step's int8, int4 and float Linears at a few rows, and a prompt's rows where they beat a
// layer's kernel (multiar::int8_matvec, multiar::int4_matvec, multiar::matvec), and its attention
// (multiar::decode_attention), as torch operators that compiled code and AOTInductor packages call
// through the dispatcher. Built and loaded by engine/cpu_matvec.py; see there for why.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <vector>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// AVX2's loops, 8 floats a vector, where there is no AVX-512 (a Zen 3 EPYC): AVX-512's loops below are
// kept as they were measured on a Zen 5 EPYC, and a CPU with AVX-512 takes them
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define MULTIAR_AVX2 1
#endif
// AVX2's 256-bit integer and FMA instructions, which AVX-512 CPUs have too: the int4 loop (int4_dot) and
// the int16 rounding of activations it reads
#if defined(__AVX2__) && defined(__FMA__)
#define MULTIAR_INT4_VECTORS 1
#endif

namespace {

// bf16 weights and rows multiplied by AVX512-BF16's dot product, in pairs (float_dots)
#if defined(__AVX512F__) && defined(__AVX512BF16__)
constexpr bool BF16_PAIRS = true;
#else
constexpr bool BF16_PAIRS = false;
#endif

// How far ahead the int8 loops ask for codes: without it 85M's int8 mat-vecs read 40-57 GB/s from RAM,
// 16 KB ahead 53-99 (a /tmp probe of many weights of each layer shape, Zen 5 EPYC); in the 85M int8
// package a token took 1.13-1.23x as long 4 KB ahead or without, 0.93-0.94x 64 KB ahead (0.98 at 32,
// 1.0 at 128, 1.21 at 256)
constexpr int64_t INT8_AHEAD = 65536;  // bytes, rows of codes on
// How far ahead the bf16 loops ask for weights (float_dots): in the 85M bf16 package, 128-token jobs in
// turns in one process, a token took 0.64x as long 8 KB ahead as without (3.02 against 4.72 ms, medians
// of 130 rounds; 2 KB 0.69x, 4 KB 0.65x, 16 KB 0.65x), in minutes when the step without it ran at its
// slow pace only (session 35; in session 34's minutes 16-64 KB ahead made no difference). fp32: measured
// per weight shape (FLOAT32_AHEAD below); in the Zen 5's package the hint took 0.965x as long a token at
// its slow pace, 1.065x at its fast one
constexpr int64_t FLOAT_AHEAD = 8192;  // bytes of weights on

// Whether fp32 weights are asked for ahead pays on one CPU and not on another: on the AMX Xeon a pass of
// one-row mat-vecs over the 85M model's 49 fp32 weights took 0.89-0.90x as long 16 KB ahead (0.91-0.93x
// at 2-8 KB, 0.92x at 32; session 43, in turns in one process), where on the Zen 5 EPYC the hint took
// 1.065x as long a token at its fast pace. So it is measured where it runs, on the weights it serves, one
// measure per weight shape (a model's layer shapes; where two models' shapes differ, a small one's
// weights, which sit in cache between steps, do not decide for a big one's): one-row fp32 calls
// (ONE_ROW's loop; the general one, measured at one row, lost with the hint: 0.968x against 0.945x
// without it) on weights of TRIAL_BYTES or more draw with or without the hint, each timed; after
// TRIAL_WARMUP untimed draws, TRIAL_CALLS timed ones decide by the median time per byte of each way, and
// the hint then serves that shape's calls (fp32_ahead_mode; MULTIAR_FP32_AHEAD=0|1 pins it for every
// shape). The hint changes which lines are asked for early, never a sum.
constexpr int64_t FLOAT32_AHEAD = 16384;  // bytes of weights on, two lines a step
constexpr int64_t TRIAL_BYTES = int64_t{1} << 20;  // smaller weights sit in cache and time the call, not the read
constexpr int64_t TRIAL_WARMUP = 16;  // a shape's first draws untimed: cold caches, first touches
constexpr int64_t TRIAL_CALLS = 512;  // a shape's timed draws, both ways together (85M: 44 tokens a layer shape)
constexpr int TRIAL_SHAPES = 64;  // shapes measured; a process's further shapes run without the hint
constexpr int TRIAL_SHIFT = 58;  // a hash's top log2(TRIAL_SHAPES) bits pick a shape's first slot
static_assert(TRIAL_SHAPES == 1 << (64 - TRIAL_SHIFT));

struct Fp32Trial {
  std::atomic<uint64_t> key{0};  // out << 32 | in, 0 while the slot is free
  std::atomic<int> state{-1};  // -1: measuring, 0 / 1: decided
  std::atomic<int64_t> draws{0}, done{0};
  float per_byte[TRIAL_CALLS];  // ns a byte of each timed draw, its way in way
  int8_t way[TRIAL_CALLS];
  float median[2];  // each way's median, once decided
};
Fp32Trial fp32_trials[TRIAL_SHAPES];
std::atomic<int> fp32_ahead_pin{-2};  // -2: the environment not read yet, -1: measured, 0 / 1: pinned
std::atomic<int64_t> fp32_untracked{0};  // calls of a shape that found the table full: run without the hint

// The trial of the shape (out, in): its slot, claimed on the shape's first call (nullptr when the table
// is full)
Fp32Trial* fp32_trial(int64_t out, int64_t in) {
  TORCH_CHECK(out < (int64_t{1} << 32) && in < (int64_t{1} << 32), "matvec: a weight of ", out, " x ", in);
  const uint64_t key = static_cast<uint64_t>(out) << 32 | static_cast<uint64_t>(in);
  const uint64_t hash = key * 0x9E3779B97F4A7C15ull;
  for (int probe = 0; probe < TRIAL_SHAPES; probe++) {
    Fp32Trial& trial = fp32_trials[((hash >> TRIAL_SHIFT) + probe) & (TRIAL_SHAPES - 1)];
    uint64_t held = trial.key.load(std::memory_order_acquire);
    if (held == 0 && trial.key.compare_exchange_strong(held, key)) return &trial;
    if (held == key) return &trial;
  }
  return nullptr;
}

// The hint for one fp32 call of `rows` rows on an (out, in) weight of `bytes`: 0 or 1, and the trial and
// its slot where the call is to be timed (*slot -1 where not). Drawn pseudo-randomly, not alternated:
// layers of a shape come round in a fixed cycle that alternation could split, one always with the hint.
int fp32_ahead_mode(int64_t rows, int64_t out, int64_t in, int64_t bytes, Fp32Trial** trial, int64_t* slot) {
  *slot = -1;
  if (rows != 1 || bytes < TRIAL_BYTES) return 0;
  int pin = fp32_ahead_pin.load(std::memory_order_acquire);
  if (pin == -2) {
    const char* pinned = std::getenv("MULTIAR_FP32_AHEAD");
    const bool pins = pinned != nullptr && (pinned[0] == '0' || pinned[0] == '1') && pinned[1] == 0;
    fp32_ahead_pin.store(pins ? pinned[0] - '0' : -1, std::memory_order_release);
    pin = pins ? pinned[0] - '0' : -1;
  }
  if (pin >= 0) return pin;
  *trial = fp32_trial(out, in);
  if (*trial == nullptr) {
    fp32_untracked.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  const int state = (*trial)->state.load(std::memory_order_acquire);
  if (state >= 0) return state;
  const int64_t draw = (*trial)->draws.fetch_add(1);
  if (draw >= TRIAL_WARMUP + TRIAL_CALLS) return 0;  // concurrent calls past the last draw: not timed
  if (draw >= TRIAL_WARMUP) *slot = draw - TRIAL_WARMUP;
  return __builtin_popcountll(static_cast<uint64_t>(draw) * 0x9E3779B97F4A7C15ull) & 1;
}

// A timed call's ns per byte in its slot; the call that completes the trial's last slot decides (a way
// never drawn loses)
void fp32_ahead_timed(Fp32Trial& trial, int way, int64_t slot, double per_byte) {
  trial.per_byte[slot] = static_cast<float>(per_byte);
  trial.way[slot] = static_cast<int8_t>(way);
  if (trial.done.fetch_add(1, std::memory_order_acq_rel) + 1 != TRIAL_CALLS) return;
  for (int m = 0; m < 2; m++) {
    std::vector<float> times;
    for (int64_t i = 0; i < TRIAL_CALLS; i++) {
      if (trial.way[i] == m) times.push_back(trial.per_byte[i]);
    }
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    trial.median[m] = times.empty() ? INFINITY : times[times.size() / 2];
  }
  trial.state.store(trial.median[1] < trial.median[0] ? 1 : 0, std::memory_order_release);
}

// [the pin (-2 not read yet, -1 measured, 0 / 1 pinned), FLOAT32_AHEAD, TRIAL_CALLS, the calls that
// found the table full, then per shape measured: out, in, state (-1 measuring, 0 without the hint, 1
// with it), the median ns per byte without, with (0 until decided), the draws so far (untimed ones
// included)]: cpu_matvec.fp32_ahead
std::vector<double> fp32_ahead_report() {
  std::vector<double> report = {double(fp32_ahead_pin.load(std::memory_order_acquire)), double(FLOAT32_AHEAD),
                                double(TRIAL_CALLS), double(fp32_untracked.load())};
  for (Fp32Trial& trial : fp32_trials) {
    const uint64_t key = trial.key.load(std::memory_order_acquire);
    if (key == 0) continue;
    const int state = trial.state.load(std::memory_order_acquire);
    const double off = state >= 0 ? trial.median[0] : 0.0, on = state >= 0 ? trial.median[1] : 0.0;
    report.insert(report.end(), {double(key >> 32), double(key & 0xFFFFFFFF), double(state), off, on,
                                 double(std::min(trial.draws.load(), TRIAL_WARMUP + TRIAL_CALLS))});
  }
  return report;
}

#if defined(__AVX512F__) || defined(MULTIAR_AVX2)
// A hint to bring the cache line `ahead` bytes past p into L1 (a hint never faults, even past the weight's
// end; the address is formed as an integer, not as a pointer past the buffer)
inline void prefetch(const void* p, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + ahead), _MM_HINT_T0);
}

// What float_dots' loops of 32 weights a step ask for ahead of w: bf16 (64 bytes, a line) FLOAT_AHEAD on;
// fp32 (128 bytes, two lines) FLOAT32_AHEAD on where the weight's shape measured the hint faster (AHEAD),
// else nothing
template <typename T, bool AHEAD>
inline void weights_ahead(const T* w) {
  if constexpr (!std::is_same_v<T, float>) {
    prefetch(w, FLOAT_AHEAD);
  } else if constexpr (AHEAD) {
    prefetch(w, FLOAT32_AHEAD);
    prefetch(w, FLOAT32_AHEAD + 64);
  }
}
#endif

#ifdef MULTIAR_INT4_VECTORS
inline float sum8(__m256 v) {  // the sum of v's 8 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float max8(__m256 v) {  // the largest of v's 8 lanes
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 codes8(const int8_t* q) {  // 8 int8 codes as fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// 8 values of T as fp32 (bf16: a 16-bit shift left)
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
}
#endif

// sum_i x[i] * q[i] over int8 codes q
inline float int8_dot(const float* x, const int8_t* q, int64_t in) {
  float acc = 0.0f;
  int64_t i = 0;
#ifdef __AVX512F__
  // 16 codes a load, widened to fp32 as they are read (one instruction from memory: a masked 512-bit byte
  // load ran 4x slower from RAM on a Zen 5 EPYC, a 256-bit load split in two 11% slower on one core), two
  // accumulators so the adds overlap
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= in; i += 32) {
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
    __m512 w1 =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i + 16))));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
    prefetch(q + i, INT8_AHEAD);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(MULTIAR_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= in; i += 16) {  // 8 codes a load, widened to fp32
    a0 = _mm256_fmadd_ps(codes8(q + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(codes8(q + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  acc = sum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < in; i++) acc += x[i] * static_cast<float>(q[i]);
  return acc;
}

// codes of int16_int8_dot (VNNI) / int16_int8_dots (AVX2) summed in int32 before a flush to fp32: no int32
// overflow (see there)
constexpr int64_t INT32_CHUNK = 4096;

#ifdef __AVX512VNNI__
// sum_i x16[i] * q[i] over int16 activations and int8 codes, exact in int32 within each chunk
// (|x16| <= 32767, |q| <= 128: a lane gains at most 2 x 4.2e6 a step, at most 128 steps a chunk (64 in
// each of the two chains), under 2^31)
inline float int16_int8_dot(const int16_t* x16, const int8_t* q, int64_t in) {
  float acc = 0.0f;
  int64_t i = 0;
  const int64_t whole = in & ~int64_t(31);  // the codes in 32s; the rest below
  while (i < whole) {
    const int64_t end = std::min(whole, i + INT32_CHUNK);
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();  // two chains, so the sums overlap
    for (; i + 64 <= end; i += 64) {  // 32 codes widened to int16 as they load, 32 products summed in pairs
      __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
      __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 32)));
      a = _mm512_dpwssd_epi32(a, w0, _mm512_loadu_si512(x16 + i));
      b = _mm512_dpwssd_epi32(b, w1, _mm512_loadu_si512(x16 + i + 32));
      prefetch(q + i, INT8_AHEAD);
    }
    for (; i < end; i += 32) {
      __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
      a = _mm512_dpwssd_epi32(a, w, _mm512_loadu_si512(x16 + i));
    }
    // lanes summed in fp32: 16 of them may pass 2^31
    acc += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_cvtepi32_ps(a), _mm512_cvtepi32_ps(b)));
  }
  for (; i < in; i++) acc += static_cast<float>(x16[i]) * static_cast<float>(q[i]);
  return acc;
}
#elif defined(MULTIAR_AVX2)
// int16_int8_dot without VNNI, for R rows of int16 activations (x16[r]) against one row of codes, into
// sums[r]: 16 codes widened to int16 once for all R rows, their products summed in pairs into int32
// (vpmaddwd) and added, exact within a chunk (a lane gains at most 2 x 4.2e6 a product, and one chain
// takes at most 130 of a chunk's 256: under 2^31). A row's integer lanes and their flush to fp32 are the
// same whatever R: its sum does not depend on the rows beside it.
template <int R>
inline void int16_int8_dots(const int16_t* const* rows, const int8_t* q, int64_t in, float* sums) {
  int64_t i = 0;
  const int64_t whole = in & ~int64_t(15);  // the codes in 16s; the rest below
  // the rows' pointers and sums held here rather than read and written through the arguments: a measured
  // difference, not a reasoned one. With ONE_ROW one row took 0.89-0.96x as long as before, 0.95-1.00x
  // with the sums written through `sums`; at 8 rows (a batch, a prompt's fours) it takes 1.02-1.03x
  // (session 42, Zen 3 EPYC; batch 1 is the target)
  const int16_t* x16[R];
  float acc[R];
  for (int r = 0; r < R; r++) x16[r] = rows[r], acc[r] = 0.0f;
  auto times = [&](__m256i codes, int r, int64_t at) {
    return _mm256_madd_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16[r] + at)));
  };
  while (i < whole) {
    const int64_t end = std::min(whole, i + INT32_CHUNK);
    __m256i a[R], b[R];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm256_setzero_si256();
    // a cache line of codes a step, 32 codes a load, each half widened: 16 codes a load read them from
    // RAM 0.82-0.95x as fast on 2 threads, 0.76-0.81x on one (session 39, Zen 3 EPYC: the two loops in
    // turns in one process over 200 MB of codes, 13 pairs); 85M's 49 int8 mat-vecs took 3.42-3.77 ms a
    // pass against 3.93-4.43 (processes in turns)
    for (; i + 64 <= end; i += 64) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 32));
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v0));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v0, 1));
      const __m256i w2 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v1));
      const __m256i w3 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v1, 1));
      for (int r = 0; r < R; r++) {
        a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(times(w0, r, i), times(w2, r, i + 32)));
        b[r] = _mm256_add_epi32(b[r], _mm256_add_epi32(times(w1, r, i + 16), times(w3, r, i + 48)));
      }
      prefetch(q + i, INT8_AHEAD);
    }
    for (; i < end; i += 16) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
      for (int r = 0; r < R; r++) a[r] = _mm256_add_epi32(a[r], times(w, r, i));
    }
    for (int r = 0; r < R; r++) acc[r] += sum8(_mm256_add_ps(_mm256_cvtepi32_ps(a[r]), _mm256_cvtepi32_ps(b[r])));
  }
  for (; i < in; i++) {
    for (int r = 0; r < R; r++) acc[r] += static_cast<float>(x16[r][i]) * static_cast<float>(q[i]);
  }
  for (int r = 0; r < R; r++) sums[r] = acc[r];
}
#endif

#ifdef __AVX512F__
// x (in,) to int16 in x16 as int8_matvec describes; the scale, or 0 for a row that takes the fp32 loop.
// The same int16 values as nearbyint(x * to16) by construction (one fp32 multiply, the same rounding mode,
// |x * to16| <= 32767 but for its rounding). In 512-bit vectors: an 85M int8 token took 0.991x as long as
// with a scalar pass (jobs in turns in one process, the median of 379 rounds' ratios, session 36)
inline float row_to_int16(const float* x, int64_t in, int16_t* x16) {
  // nan: the sum of v - v, 0 but for NaN and inf (no fast-math in the build, which could fold it to 0)
  __m512 top = _mm512_setzero_ps(), nan = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
    nan = _mm512_add_ps(nan, _mm512_sub_ps(v, v));
  }
  float t = _mm512_reduce_max_ps(top);
  bool finite = _mm512_reduce_add_ps(nan) == 0.0f;
  for (int64_t j = i; j < in; j++) {
    finite = finite && std::isfinite(x[j]);
    t = std::max(t, std::fabs(x[j]));
  }
  if (!finite || t < 1e-30f) return 0.0f;
  const float to16 = 32767.0f / t;
  const __m512 k = _mm512_set1_ps(to16);
  for (i = 0; i + 16 <= in; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), k));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + i), _mm512_cvtsepi32_epi16(q));
  }
  for (; i < in; i++) x16[i] = static_cast<int16_t>(std::nearbyint(x[i] * to16));
  return t / 32767.0f;
}
#elif defined(MULTIAR_AVX2)
// row_to_int16 in AVX2's vectors: the same values (one fp32 multiply, the current rounding mode)
inline float row_to_int16(const float* x, int64_t in, int16_t* x16) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps(), nan = _mm256_setzero_ps();  // nan: as AVX-512's above
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v));
    nan = _mm256_add_ps(nan, _mm256_sub_ps(v, v));
  }
  float t = max8(top);
  bool finite = sum8(nan) == 0.0f;
  for (int64_t j = i; j < in; j++) {
    finite = finite && std::isfinite(x[j]);
    t = std::max(t, std::fabs(x[j]));
  }
  if (!finite || t < 1e-30f) return 0.0f;
  const float to16 = 32767.0f / t;
  const __m256 k = _mm256_set1_ps(to16);
  for (i = 0; i + 8 <= in; i += 8) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), k));
    const __m128i pair = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x16 + i), pair);
  }
  for (; i < in; i++) x16[i] = static_cast<int16_t>(std::nearbyint(x[i] * to16));
  return t / 32767.0f;
}
#endif

#ifdef __AVX512F__
// 16 values of T as fp32 (bf16: a 16-bit shift left)
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
}
#endif

// sums[r] = sum_i x[r][i] * w[i] for R rows of x against one weight row, fp32 or bf16 (x fp32 or w's
// dtype), in fp32. The weight is loaded (and widened) once for the R rows; each row keeps its own two
// chains, in the same order whatever R, so its sum has the same bits as when it runs alone. One weight
// row at a time (in the 85M packages, four weight rows at once with hints 4 blocks ahead took 1.06-1.18x
// as long a bf16 token, and fp32 through inductor's fused loop 1.25-1.29x as long a step: see
// cpu_matvec.py); bf16 weights asked for FLOAT_AHEAD bytes on (the hardware's prefetchers alone did not
// always keep up)
template <typename X, typename T, int R, bool AHEAD = false>
inline void float_dots(const X* const* x, const T* w, int64_t in, float* sums) {
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 a[R], b[R];
  for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
#ifdef __AVX512BF16__
  constexpr bool pairs = !std::is_same_v<T, float> && std::is_same_v<X, T>;  // bf16 by AVX512-BF16's dot product
#else
  constexpr bool pairs = false;
#endif
  if constexpr (pairs) {
#ifdef __AVX512BF16__
    // 32 bf16 products a step, summed in pairs into fp32
    auto dot = [](__m512 sum, __m512bh weights, const X* p) {
      return _mm512_dpbf16_ps(sum, weights, (__m512bh)_mm512_loadu_si512(p));
    };
    for (; i + 64 <= in; i += 64) {  // 128 bytes of weights a step: two cache lines asked for
      prefetch(w + i, FLOAT_AHEAD);
      prefetch(w + i, FLOAT_AHEAD + 64);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i), w1 = (__m512bh)_mm512_loadu_si512(w + i + 32);
      for (int r = 0; r < R; r++) {
        a[r] = dot(a[r], w0, x[r] + i);
        b[r] = dot(b[r], w1, x[r] + i + 32);
      }
    }
    if (i + 32 <= in) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i);
      for (int r = 0; r < R; r++) a[r] = dot(a[r], w0, x[r] + i);
      i += 32;
    }
#endif
  } else {  // 16 values a load as fp32
    for (; i + 32 <= in; i += 32) {
      weights_ahead<T, AHEAD>(w + i);  // bf16 here: without AVX512-BF16
      const __m512 w0 = load16(w + i), w1 = load16(w + i + 16);
      for (int r = 0; r < R; r++) {
        a[r] = _mm512_fmadd_ps(w0, load16(x[r] + i), a[r]);
        b[r] = _mm512_fmadd_ps(w1, load16(x[r] + i + 16), b[r]);
      }
    }
    if (i + 16 <= in) {
      const __m512 w0 = load16(w + i);
      for (int r = 0; r < R; r++) a[r] = _mm512_fmadd_ps(w0, load16(x[r] + i), a[r]);
      i += 16;
    }
  }
  for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
#elif defined(MULTIAR_AVX2)
  __m256 a[R], b[R];
  for (int r = 0; r < R; r++) a[r] = b[r] = _mm256_setzero_ps();
  for (; i + 32 <= in; i += 32) {  // 32 values a step (bf16: a cache line, asked for ahead as above)
    weights_ahead<T, AHEAD>(w + i);
    const __m256 w0 = load8(w + i), w1 = load8(w + i + 8), w2 = load8(w + i + 16), w3 = load8(w + i + 24);
    for (int r = 0; r < R; r++) {
      a[r] = _mm256_fmadd_ps(w0, load8(x[r] + i), a[r]);
      b[r] = _mm256_fmadd_ps(w1, load8(x[r] + i + 8), b[r]);
      a[r] = _mm256_fmadd_ps(w2, load8(x[r] + i + 16), a[r]);
      b[r] = _mm256_fmadd_ps(w3, load8(x[r] + i + 24), b[r]);
    }
  }
  for (; i + 8 <= in; i += 8) {
    const __m256 w0 = load8(w + i);
    for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(w0, load8(x[r] + i), a[r]);
  }
  for (int r = 0; r < R; r++) sums[r] = sum8(_mm256_add_ps(a[r], b[r]));
#else
  for (int r = 0; r < R; r++) sums[r] = 0.0f;
#endif
  // the tail fused by hand: g++ fuses `sum += x * w` or not as the inlining around it allows, so a row's
  // sum differed in its last bit between the ONE_ROW loop and the rows' fours (a test caught it; the
  // whole library built -ffp-contract=off instead took 1.07-1.17x as long for bf16's mat-vecs, session 42)
  for (int r = 0; r < R; r++) {
    for (int64_t j = i; j < in; j++) sums[r] = std::fma(static_cast<float>(x[r][j]), static_cast<float>(w[j]), sums[r]);
  }
}

// y[n, o] = dot(o, n) for every output row o and row n of x; output rows split over torch's thread count
// (set per calling thread: not OpenMP's default). Each weight row is read from RAM once for all rows of x.
// ONE_ROW: a decode step's one row of x takes a lambda small enough to be inlined into each thread's loop.
// The general one (x's rows in fours, pairs, ones, the fp32 loop's) stays a call per output row, its
// frame set up and its captures loaded again each time. At one row, 85M's 49 mat-vecs against the
// operators before (session 42, Zen 3 EPYC; the two builds in turns in one process, the median of 30
// rounds' ratios, each build also moved by 16, 32 and 48 bytes, as an edit elsewhere would move it): int8
// 0.89-0.96x as long (the old code moved: 0.96-1.01x), fp32 0.92-0.97x (0.99-1.02x). bf16 keeps the
// call: inlined it took 1.04-1.08x as long; unchanged it measured 1.00-1.03x (0.99-1.00x). AVX-512
// builds take the fp32 path too: on the AMX Xeon (session 43, in turns in one process) one row took 0.94x
// as long through the general path as through ONE_ROW without the fp32 hint, yet ONE_ROW with the hint
// 0.89x and the general path with it 0.97x (int8's ONE_ROW is in AVX2's branch alone).
template <typename Output>
void for_each_output(int64_t out, Output output) {
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t o = 0; o < out; o++) output(o);
}

template <typename Dot>
void each_output(int64_t rows, int64_t out, float* y, Dot dot) {
  for_each_output(out, [&](int64_t o) {
    for (int64_t n = 0; n < rows; n++) y[n * out + o] = dot(o, n);
  });
}

constexpr int64_t OUT_BLOCK = 8;

at::Tensor matvec(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "matvec: x (rows, in), w (out, in)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "matvec: x and w both fp32 or both bf16");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  const int64_t in = x.size(1);
  const int64_t rows = x.size(0), out = w.size(0);
  float* yp = y.data_ptr<float>();
  // a prompt's or a batch's rows against each weight row in fours (then a pair, then one), the weight
  // loaded once for the four (each row's sum as it is alone: float_dots)
  const int64_t per = rows >= 4 ? OUT_BLOCK : 1;  // weight rows a four of x's rows meets in turn
  auto run = [&](auto* xp, auto* wp, auto ahead) {
    using X = std::remove_pointer_t<decltype(xp)>;
    using T = std::remove_pointer_t<decltype(wp)>;
    constexpr bool AHEAD = decltype(ahead)::value;
    if (rows == 1 && std::is_same_v<T, float>) {  // a decode step's one fp32 row (ONE_ROW)
      for_each_output(out, [&](int64_t o) { float_dots<X, T, 1, AHEAD>(&xp, wp + o * in, in, yp + o); });
      return;
    }
    for_each_output((out + per - 1) / per, [&](int64_t block) {
      const int64_t first = block * per, end = std::min(out, first + per);
      auto dots = [&](auto width, int64_t n0) {
        constexpr int R = decltype(width)::value;
        const X* xs[R];
        float sums[R];
        for (int r = 0; r < R; r++) xs[r] = xp + (n0 + r) * in;
        for (int64_t o = first; o < end; o++) {
          float_dots<X, T, R>(xs, wp + o * in, in, sums);  // no hint: it lost here (FLOAT32_AHEAD)
          for (int r = 0; r < R; r++) yp[(n0 + r) * out + o] = sums[r];
        }
      };
      int64_t n = 0;
      for (; n + 4 <= rows; n += 4) dots(std::integral_constant<int, 4>(), n);
      if (n + 2 <= rows) dots(std::integral_constant<int, 2>(), n), n += 2;
      if (n < rows) dots(std::integral_constant<int, 1>(), n);
    });
  };
  const std::false_type no_hint;
  if (w.scalar_type() == at::kFloat) {
    const int64_t bytes = w.numel() * 4;
    Fp32Trial* trial = nullptr;
    int64_t slot;
    const int way = fp32_ahead_mode(rows, out, in, bytes, &trial, &slot);
    const auto start = slot >= 0 ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
    if (way) {
      run(xc.data_ptr<float>(), wc.data_ptr<float>(), std::true_type());
    } else {
      run(xc.data_ptr<float>(), wc.data_ptr<float>(), no_hint);
    }
    if (slot >= 0) {
      const std::chrono::duration<double, std::nano> ns = std::chrono::steady_clock::now() - start;
      fp32_ahead_timed(*trial, way, slot, ns.count() / double(bytes));
    }
  } else if (BF16_PAIRS || rows == 1) {
    run(xc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(), no_hint);
  } else {
    // bf16 rows widened to fp32 once, not once per weight row (exact: the same products): without
    // AVX512-BF16's dot product a row of x is widened per load
    at::Tensor xf = xc.to(at::kFloat);
    run(xf.data_ptr<float>(), wc.data_ptr<at::BFloat16>(), no_hint);
  }
  return y;
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 1, "int8_matvec: x (rows, in), q (out, in), scales (out,)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_matvec: x fp32, q int8, scales fp32");
  TORCH_CHECK(x.size(1) == q.size(1) && scales.size(0) == q.size(0), "int8_matvec: shapes do not match");
  at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({x.size(0), q.size(0)}, x.options());
  const int64_t in = x.size(1), rows = x.size(0);
  const float *xp = xc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
#if defined(__AVX512VNNI__) || defined(MULTIAR_AVX2)
  // each row of x once to int16 on its own scale (max|x| -> 32767: at most 2^-16 of max|x| off, finer
  // than the bf16 activations of torch's int8 kernel for values within 2^7 of the row's largest), then
  // integer dot products, 32 codes an instruction with VNNI: the fp32 loop (widen, convert, multiply-add)
  // read 34 GB/s of codes on one core, this one 39 (Zen 5); AVX2's, 16 codes a vpmaddwd, was not timed
  // against AVX2's fp32 loop (session 37 measured it against the scalar loop it replaced).
  // A row with a NaN or an infinity (which the scale would hide), or all but zero (a scale past fp32's
  // range), takes the fp32 loop.
  std::vector<int16_t> x16(rows * in);
  std::vector<float> x_scale(rows);  // 0: the fp32 loop
  for (int64_t n = 0; n < rows; n++) x_scale[n] = row_to_int16(xp + n * in, in, x16.data() + n * in);
  const int16_t* x16p = x16.data();
#ifdef MULTIAR_AVX2
  // a prompt's or a batch's rows against each row of codes in fours (then a pair, then one), the codes
  // widened once for the four (each row's sum as it is alone: int16_int8_dots); rows for the fp32 loop
  // one at a time
  std::vector<int64_t> scaled, unscaled;
  for (int64_t n = 0; n < rows; n++) (x_scale[n] == 0.0f ? unscaled : scaled).push_back(n);
  const int64_t out = q.size(0);
  float* yp = y.data_ptr<float>();
  if (rows == 1 && x_scale[0] != 0.0f) {  // a decode step's one row (ONE_ROW)
    const int16_t* xs[1] = {x16p};
    const float x_scale0 = x_scale[0];
    for_each_output(out, [&](int64_t o) {
      float sum;
      int16_int8_dots<1>(xs, qp + o * in, in, &sum);
      yp[o] = sp[o] * x_scale0 * sum;
    });
    return y;
  }
  for_each_output(out, [&](int64_t o) {
    const int8_t* codes = qp + o * in;
    auto dots = [&](auto width, size_t k) {
      constexpr int R = decltype(width)::value;
      const int16_t* xs[R];
      float sums[R];
      for (int r = 0; r < R; r++) xs[r] = x16p + scaled[k + r] * in;
      int16_int8_dots<R>(xs, codes, in, sums);
      for (int r = 0; r < R; r++) yp[scaled[k + r] * out + o] = sp[o] * x_scale[scaled[k + r]] * sums[r];
    };
    size_t k = 0;
    for (; k + 4 <= scaled.size(); k += 4) dots(std::integral_constant<int, 4>(), k);
    if (k + 2 <= scaled.size()) dots(std::integral_constant<int, 2>(), k), k += 2;
    if (k < scaled.size()) dots(std::integral_constant<int, 1>(), k);
    for (int64_t n : unscaled) yp[n * out + o] = sp[o] * int8_dot(xp + n * in, codes, in);
  });
#else
  // one weight row at a time: four at once read int8 codes 1.3-1.8x slower from RAM here (session 32)
  each_output(rows, q.size(0), y.data_ptr<float>(), [&](int64_t o, int64_t n) {
    if (x_scale[n] == 0.0f) return sp[o] * int8_dot(xp + n * in, qp + o * in, in);
    return sp[o] * x_scale[n] * int16_int8_dot(x16p + n * in, qp + o * in, in);
  });
#endif
#else
  // scaled after the sum: one multiply per output
  each_output(rows, q.size(0), y.data_ptr<float>(), [&](int64_t o, int64_t n) {
    return sp[o] * int8_dot(xp + n * in, qp + o * in, in);
  });
#endif
  return y;
}

// int4: a byte holds two codes in [0, 15], input 2j's high and input 2j + 1's low
// (engine.quantize.Int4Linear's weight, read as it is), 32 inputs a group with a scale and a min (the
// weight at code 0) in bf16, laid (out, 2, groups): a row's scales, then its mins. w = code * scale +
// min, so a row's dot product is sum_g scale_g * sum_{i in g} x_i code_i + sum_g min_g * sum_{i in g} x_i;
// the second sum is x's per group, once per row of x.
constexpr int64_t INT4_GROUP = 32;

#ifdef MULTIAR_INT4_VECTORS
// sum_g scale_g * sum_{i in g} x16_i code_i for one output row: x16 int16, each group's even inputs then its
// odd ones (the order the nibbles come out in), scales bf16. A group's 16 bytes widened to int16, nibbles
// split by a shift and a mask, products summed in pairs into int32 (vpmaddwd: a lane holds at most
// 4 x 15 x 32767 < 2^21, exact in fp32), then scaled in fp32
inline float int4_dot(const int16_t* x16, const uint8_t* codes, const at::BFloat16* scales, int64_t groups) {
  const __m256i low = _mm256_set1_epi16(15);
  auto group = [&](int64_t g) {  // (8,) fp32: the group's products summed in pairs of pairs
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * g)));
    const __m256i* x = reinterpret_cast<const __m256i*>(x16 + INT4_GROUP * g);
    const __m256i even = _mm256_madd_epi16(_mm256_srli_epi16(w, 4), _mm256_loadu_si256(x));
    const __m256i odd = _mm256_madd_epi16(_mm256_and_si256(w, low), _mm256_loadu_si256(x + 1));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
  };
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {  // 128 bytes of codes a step, 8 scales converted at once
    prefetch(codes + 16 * g, INT8_AHEAD);
    prefetch(codes + 16 * g, INT8_AHEAD + 64);
    const __m256 s = load8(scales + g);
    for (int k = 0; k < 8; k += 2) {  // lane k of s spread over a vector
      a = _mm256_fmadd_ps(group(g + k), _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(k)), a);
      b = _mm256_fmadd_ps(group(g + k + 1), _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(k + 1)), b);
    }
  }
  for (; g < groups; g++) a = _mm256_fmadd_ps(group(g), _mm256_set1_ps(static_cast<float>(scales[g])), a);
  return sum8(_mm256_add_ps(a, b));
}
#endif

// a row's whole dot product in fp32 over x as it is (a row int16 cannot hold, or a build without AVX2):
// each weight code * scale + min, times its input, so that an infinity keeps its sign (a product with the
// codes' and the mins' terms apart could make inf - inf)
inline float int4_dot_fp32(const float* x, const uint8_t* codes, const at::BFloat16* scales,
                           const at::BFloat16* mins, int64_t groups) {
  float acc = 0.0f;
  for (int64_t g = 0; g < groups; g++) {
    const float scale = static_cast<float>(scales[g]), low = static_cast<float>(mins[g]);
    for (int64_t j = 0; j < INT4_GROUP / 2; j++) {
      const uint8_t byte = codes[INT4_GROUP / 2 * g + j];
      acc += x[INT4_GROUP * g + 2 * j] * (static_cast<float>(byte >> 4) * scale + low) +
             x[INT4_GROUP * g + 2 * j + 1] * (static_cast<float>(byte & 15) * scale + low);
    }
  }
  return acc;
}

#ifdef MULTIAR_INT4_VECTORS
// sum_g mins_g * sums_g: the mins (bf16) against x's sums per group (fp32)
inline float min_term(const at::BFloat16* mins, const float* sums, int64_t groups) {
  __m256 a = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) a = _mm256_fmadd_ps(load8(mins + g), _mm256_loadu_ps(sums + g), a);
  float acc = sum8(a);
  for (; g < groups; g++) acc += static_cast<float>(mins[g]) * sums[g];
  return acc;
}
#endif

at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_and_mins) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scales_and_mins.dim() == 3,
              "int4_matvec: x (rows, in), codes (out, in / 2), scales_and_mins (out, 2, in / 32)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && codes.scalar_type() == at::kByte &&
                  scales_and_mins.scalar_type() == at::kBFloat16,
              "int4_matvec: x fp32, codes uint8, scales_and_mins bf16");
  const int64_t in = x.size(1), rows = x.size(0), out = codes.size(0), groups = in / INT4_GROUP;
  TORCH_CHECK(in % INT4_GROUP == 0 && codes.size(1) * 2 == in && scales_and_mins.size(0) == out &&
                  scales_and_mins.size(1) == 2 && scales_and_mins.size(2) == groups,
              "int4_matvec: shapes do not match");
  at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = scales_and_mins.contiguous();
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
#ifdef MULTIAR_INT4_VECTORS
  std::vector<float> sums(rows * groups);  // x's sum per group, for the mins
  for (int64_t n = 0; n < rows; n++) {
    for (int64_t g = 0; g < groups; g++) {
      float sum = 0.0f;
      for (int64_t i = 0; i < INT4_GROUP; i++) sum += xp[n * in + INT4_GROUP * g + i];
      sums[n * groups + g] = sum;
    }
  }
  // each row of x to int16 on its own scale as int8_matvec's (a row with a NaN or an infinity, or all but
  // zero, takes the fp32 loop), then each group's even inputs before its odd ones
  std::vector<int16_t> x16(rows * in), natural(in);
  std::vector<float> x_scale(rows);  // 0: the fp32 loop
  for (int64_t n = 0; n < rows; n++) {
    x_scale[n] = row_to_int16(xp + n * in, in, natural.data());
    for (int64_t i = 0; i < in; i++) {
      const int64_t g = i / INT4_GROUP, j = i % INT4_GROUP;
      x16[n * in + INT4_GROUP * g + (j % 2) * (INT4_GROUP / 2) + j / 2] = natural[i];
    }
  }
  each_output(rows, out, y.data_ptr<float>(), [&](int64_t o, int64_t n) {
    const at::BFloat16* row = sp + o * 2 * groups;
    if (x_scale[n] == 0.0f) return int4_dot_fp32(xp + n * in, cp + o * in / 2, row, row + groups, groups);
    return x_scale[n] * int4_dot(x16.data() + n * in, cp + o * in / 2, row, groups) +
           min_term(row + groups, sums.data() + n * groups, groups);
  });
#else
  each_output(rows, out, y.data_ptr<float>(), [&](int64_t o, int64_t n) {
    const at::BFloat16* row = sp + o * 2 * groups;
    return int4_dot_fp32(xp + n * in, cp + o * in / 2, row, row + groups, groups);
  });
#endif
  return y;
}

#ifdef __AVX512F__
// e^x for 16 floats x <= 0 (scores less their row's largest): 2^n e^r, n = round(x / ln 2), r = x - n ln 2
// (|r| <= ln 2 / 2; ln 2 in two parts, so n ln 2 adds no error of its own at large n), e^r by its Taylor
// series to r^7 (truncated at ~5e-9, under fp32's rounding, a few units in the last place in all). Below
// -100 it is taken at -100 (~4e-44, a weight that adds nothing); a NaN stays NaN.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-100.0f), x);  // x second: a NaN in x passes through
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#elif defined(MULTIAR_AVX2)
// exp_nonpositive for 8 floats, as AVX-512's above, but taken at -87 below it (~1.6e-38): 2^n is built in
// its exponent bits (AVX2 has no scalef), which hold a normal number down to n = -126. A NaN stays NaN.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // x second: a NaN in x passes through
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));  // p * 2^n
}
#endif

// One query (hs,) against m keys and values (m, hs) of one head, rows `stride` apart: softmax(q k^T *
// scale) v in fp32 -> out (hs,). Keys read once, then values once: each pass one stream through RAM.
template <typename T>
void attend_one(const float* q, const T* k, const T* v, int64_t m, int64_t hs, int64_t stride, float scale,
                float* out, float* scores) {
  float top = -INFINITY;
  for (int64_t j = 0; j < m; j++) {
    const T* kj = k + j * stride;
    float s = 0.0f;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps();
    for (; i + 16 <= hs; i += 16) a = _mm512_fmadd_ps(load16(kj + i), _mm512_loadu_ps(q + i), a);
    s = _mm512_reduce_add_ps(a);
#elif defined(MULTIAR_AVX2)
    __m256 a = _mm256_setzero_ps();
    for (; i + 8 <= hs; i += 8) a = _mm256_fmadd_ps(load8(kj + i), _mm256_loadu_ps(q + i), a);
    s = sum8(a);
#else
    // The scalar build (a CPU without AVX2; its speed not measured) sums in fp64: one fp32 chain of hs
    // terms drifted past fp32 rounding of the result (the AMX Xeon's build, bf16 keys, hs 24 and 64)
    double exact = 0.0;
    for (; i < hs; i++) exact += static_cast<double>(q[i]) * static_cast<double>(static_cast<float>(kj[i]));
    s = static_cast<float>(exact);
#endif
    for (; i < hs; i++) s += q[i] * static_cast<float>(kj[i]);
    scores[j] = s * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.0f;
  int64_t j = 0;
#ifdef __AVX512F__
  __m512 sum = _mm512_setzero_ps();
  for (; j + 16 <= m; j += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#elif defined(MULTIAR_AVX2)
  __m256 sum = _mm256_setzero_ps();
  for (; j + 8 <= m; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = sum8(sum);
#endif
  for (; j < m; j++) total += (scores[j] = std::exp(scores[j] - top));
  for (int64_t i = 0; i < hs; i++) out[i] = 0.0f;
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 64 <= hs; i += 64) {  // 64 dims in four accumulators
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t t = 0; t < m; t++) {
      const T* vt = v + t * stride + i;
      const __m512 w = _mm512_set1_ps(scores[t]);
      a0 = _mm512_fmadd_ps(w, load16(vt), a0);
      a1 = _mm512_fmadd_ps(w, load16(vt + 16), a1);
      a2 = _mm512_fmadd_ps(w, load16(vt + 32), a2);
      a3 = _mm512_fmadd_ps(w, load16(vt + 48), a3);
    }
    _mm512_storeu_ps(out + i, a0);
    _mm512_storeu_ps(out + i + 16, a1);
    _mm512_storeu_ps(out + i + 32, a2);
    _mm512_storeu_ps(out + i + 48, a3);
  }
  for (; i + 16 <= hs; i += 16) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t t = 0; t < m; t++) a = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), load16(v + t * stride + i), a);
    _mm512_storeu_ps(out + i, a);
  }
#elif defined(MULTIAR_AVX2)
  for (; i + 32 <= hs; i += 32) {  // 32 dims in four accumulators (at 64 dims, two passes over the values)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t t = 0; t < m; t++) {
      const T* vt = v + t * stride + i;
      const __m256 w = _mm256_set1_ps(scores[t]);
      a0 = _mm256_fmadd_ps(w, load8(vt), a0);
      a1 = _mm256_fmadd_ps(w, load8(vt + 8), a1);
      a2 = _mm256_fmadd_ps(w, load8(vt + 16), a2);
      a3 = _mm256_fmadd_ps(w, load8(vt + 24), a3);
    }
    _mm256_storeu_ps(out + i, a0);
    _mm256_storeu_ps(out + i + 8, a1);
    _mm256_storeu_ps(out + i + 16, a2);
    _mm256_storeu_ps(out + i + 24, a3);
  }
  for (; i + 8 <= hs; i += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t t = 0; t < m; t++) {
      a = _mm256_fmadd_ps(_mm256_set1_ps(scores[t]), load8(v + t * stride + i), a);
    }
    _mm256_storeu_ps(out + i, a);
  }
#endif
  for (; i < hs; i++) {
    for (int64_t t = 0; t < m; t++) out[i] += scores[t] * static_cast<float>(v[t * stride + i]);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < hs; d++) out[d] *= inv;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& positions, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "decode_attention: q (d, nh, hs), keys and values (rows, nh, n, hs)");
  const int64_t d = q.size(0), nh = q.size(1), hs = q.size(2), n = keys.size(2);
  TORCH_CHECK((rows || keys.size(0) == d) && keys.size(1) == nh && keys.size(3) == hs && positions.dim() == 1 &&
                  positions.size(0) == d,
              "decode_attention: shapes do not match");
  TORCH_CHECK(n > 0, "decode_attention: no slot to attend to");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == values.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16),
              "decode_attention: q fp32, keys and values both fp32 or both bf16");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "decode_attention: positions int64");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1 && keys.strides() == values.strides(),
              "decode_attention: keys and values of one layout, each position's head contiguous");
  // each query's row of keys and values: rows[b] (a slot engine's cache row), else b
  std::vector<int64_t> row_of(d);
  at::Tensor rc = rows ? rows->contiguous() : at::Tensor();
  if (rows) {
    TORCH_CHECK(rc.dim() == 1 && rc.size(0) == d && rc.scalar_type() == at::kLong, "decode_attention: rows (d,) int64");
  }
  for (int64_t b = 0; b < d; b++) {
    row_of[b] = rows ? rc.data_ptr<int64_t>()[b] : b;
    TORCH_CHECK(row_of[b] >= 0 && row_of[b] < keys.size(0), "decode_attention: row ", row_of[b], " out of range");
  }
  at::Tensor pc = positions.contiguous();
  const int64_t* pos = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < d; b++) {  // a position past the view sees all of it (attend_rows's mask)
    TORCH_CHECK(pos[b] >= 0, "decode_attention: position ", pos[b], " is negative");
  }
  at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({d, nh, hs}, q.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  float* op = out.data_ptr<float>();
  const float* qp = qc.data_ptr<float>();
  const int64_t row_stride = keys.stride(0), head_stride = keys.stride(1), slot_stride = keys.stride(2);
  auto run = [&](auto* kp, auto* vp) {
    const int threads = at::get_num_threads();
    // tasks dealt in turn, not in blocks: rows spread over the context differ in length
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int64_t task = 0; task < d * nh; task++) {
      const int64_t b = task / nh, h = task % nh;
      const int64_t m = std::min(pos[b], n - 1) + 1;
      std::vector<float> scores(m);
      const int64_t base = row_of[b] * row_stride + h * head_stride;
      attend_one(qp + task * hs, kp + base, vp + base, m, hs, slot_stride, scale, op + task * hs, scores.data());
    }
  };
  if (keys.scalar_type() == at::kFloat) {
    run(keys.data_ptr<float>(), values.data_ptr<float>());
  } else {
    run(keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(multiar, m) {
  m.def("int8_matvec(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_matvec(Tensor x, Tensor codes, Tensor scales_and_mins) -> Tensor");
  m.def("matvec(Tensor x, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor positions, Tensor? rows=None) -> Tensor");
  m.def("fp32_ahead() -> float[]", fp32_ahead_report);  // no tensor to dispatch on: every backend
}

TORCH_LIBRARY_IMPL(multiar, CPU, m) {
  m.impl("int8_matvec", int8_matvec);
  m.impl("int4_matvec", int4_matvec);
  m.impl("matvec", matvec);
  m.impl("decode_attention", decode_attention);
}
