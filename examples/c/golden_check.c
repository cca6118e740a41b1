/*
 * golden_check.c -- check a plain C LSTM cell, GRU cell and attention against golden vectors.
 *
 * The golden files are written by `python -m numpy_ref.golden write DIR`: one safetensors
 * file per case holding the inputs, parameters and cotangents of one call, the outputs and
 * gradients numpy_ref computed in float64 (rounded to float32 in the float32 files), and the
 * allowed error of each output/gradient in the file's `__metadata__` (`atol.<tensor>`,
 * `rtol.<tensor>`).  This program
 *
 *   1. reads a safetensors file with nothing but libc (a small JSON reader for its header,
 *      every offset bounds-checked: a truncated or malformed file is a message, never a crash),
 *   2. runs its own forward AND backward of the case, in double for float64 files and in float
 *      for float32 files (a float implementation, as yours would likely be),
 *   3. compares every output and gradient elementwise, |got - want| <= atol + rtol * |want|,
 *      and prints a table: the worst error, where it is, what was allowed.
 *
 * Usage:  golden_check DIR          (reads the six cases below from DIR)
 *         golden_check FILE...      (files of these three ops: an LSTM cell without
 *                                    projection, torch's GRU cell, scaled-dot attention with
 *                                    many queries, either dtype)
 * Exit:   0 every tensor passes, 1 some tensor fails, 2 a file is unreadable or malformed.
 *
 * Build:  cc -std=c11 -O2 -Wall -Wextra -Werror -pedantic golden_check.c -lm -o golden_check
 *
 * To check your own implementation, replace the body of one of the `*_f32` (or `*_f64`)
 * functions below with a call into your code; the drivers and the comparison stay as they are.
 */

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(double) == 8 && sizeof(float) == 4, "needs IEEE 754 float and double");

/* The six cases `golden_check DIR` reads (names fixed by the golden file format). */
static const char *const DEFAULT_CASES[] = {
    "lstm_cell-basic-float64",
    "lstm_cell-basic-float32",
    "gru_cell-basic-float64",
    "gru_cell-basic-float32",
    "attention-scaled_dot_lengths-float64",
    "attention-scaled_dot_lengths-float32",
};

enum { EXIT_PASS = 0, EXIT_MISMATCH = 1, EXIT_BAD_FILE = 2 };
enum { MAX_RANK = 8, MAX_DEPTH = 64 };
/* Golden files are tiny; this cap keeps every index computation below well inside an int. */
#define MAX_ELEMENTS ((int64_t)1 << 28)

/* ======================================================================================== */
/* Part 1: the math.  Row-major arrays; comments give each formula and the shapes.           */
/* ======================================================================================== */

/*
 * LSTM cell forward, as torch.nn.LSTMCell (gate order i, f, g, o):
 *   a  = x W_ih^T + b_ih + h W_hh^T + b_hh                 a [B, 4H]
 *   i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
 *   c' = f * c + i * g                                      c, c' [B, H]
 *   h' = o * tanh(c')                                       h, h' [B, H]
 * Shapes: x [B, I], W_ih [4H, I], W_hh [4H, H], b_ih, b_hh [4H].
 * Writes gates [B, 4H] (the activated i, f, g, o; the backward reads them), h_new, c_new.
 */
static double sigmoid_f64(double a)
{
    /* exp of a non-positive number only: never overflows */
    double e = exp(-fabs(a));
    return a >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

static void lstm_cell_forward_f64(int B, int I, int H, const double *x, const double *h,
                                  const double *c, const double *w_ih, const double *w_hh,
                                  const double *b_ih, const double *b_hh, double *gates,
                                  double *h_new, double *c_new)
{
    for (int b = 0; b < B; b++) {
        double *gate = gates + b * 4 * H; /* this sample's 4H gates */
        for (int k = 0; k < 4 * H; k++) {
            double a = b_ih[k] + b_hh[k];
            for (int j = 0; j < I; j++) a += x[b * I + j] * w_ih[k * I + j];
            for (int j = 0; j < H; j++) a += h[b * H + j] * w_hh[k * H + j];
            /* rows [0, 2H) are i and f, [2H, 3H) is g, [3H, 4H) is o */
            gate[k] = (k >= 2 * H && k < 3 * H) ? tanh(a) : sigmoid_f64(a);
        }
        for (int j = 0; j < H; j++) {
            double i = gate[j], f = gate[H + j], g = gate[2 * H + j], o = gate[3 * H + j];
            c_new[b * H + j] = f * c[b * H + j] + i * g;
            h_new[b * H + j] = o * tanh(c_new[b * H + j]);
        }
    }
}

/*
 * LSTM cell backward, given both cotangents dL/dh' = d_h_new and dL/dc' = d_c_new [B, H]:
 *   t    = tanh(c')
 *   dc'  = d_c_new + d_h_new * o * (1 - t^2)        total gradient reaching c'
 *   da_i = dc' * g * i (1 - i)                      (c' = f c + i g, i = sigmoid(a_i))
 *   da_f = dc' * c * f (1 - f)
 *   da_g = dc' * i * (1 - g^2)                      (g = tanh(a_g))
 *   da_o = d_h_new * t * o (1 - o)                  (h' = o t)
 *   d_c  = dc' * f                                  [B, H]
 *   d_x  = da W_ih [B, I],   d_h = da W_hh [B, H]
 *   d_W_ih = da^T x [4H, I], d_W_hh = da^T h [4H, H], d_b_ih = d_b_hh = sum_b da [4H]
 * `da` is scratch space of B * 4H.
 */
static void lstm_cell_backward_f64(int B, int I, int H, const double *x, const double *h,
                                   const double *c, const double *w_ih, const double *w_hh,
                                   const double *gates, const double *c_new,
                                   const double *d_h_new, const double *d_c_new, double *da,
                                   double *d_x, double *d_h, double *d_c, double *d_w_ih,
                                   double *d_w_hh, double *d_b_ih, double *d_b_hh)
{
    for (int b = 0; b < B; b++) {
        const double *gate = gates + b * 4 * H;
        double *da_b = da + b * 4 * H;
        for (int j = 0; j < H; j++) {
            double i = gate[j], f = gate[H + j], g = gate[2 * H + j], o = gate[3 * H + j];
            double t = tanh(c_new[b * H + j]);
            double dh = d_h_new[b * H + j];
            double dc = d_c_new[b * H + j] + dh * o * (1.0 - t * t);
            da_b[j] = dc * g * i * (1.0 - i);
            da_b[H + j] = dc * c[b * H + j] * f * (1.0 - f);
            da_b[2 * H + j] = dc * i * (1.0 - g * g);
            da_b[3 * H + j] = dh * t * o * (1.0 - o);
            d_c[b * H + j] = dc * f;
        }
    }
    for (int b = 0; b < B; b++) { /* d_x = da W_ih, d_h = da W_hh */
        for (int j = 0; j < I; j++) {
            double s = 0.0;
            for (int k = 0; k < 4 * H; k++) s += da[b * 4 * H + k] * w_ih[k * I + j];
            d_x[b * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            double s = 0.0;
            for (int k = 0; k < 4 * H; k++) s += da[b * 4 * H + k] * w_hh[k * H + j];
            d_h[b * H + j] = s;
        }
    }
    for (int k = 0; k < 4 * H; k++) { /* parameter gradients: sums over the batch */
        for (int j = 0; j < I; j++) {
            double s = 0.0;
            for (int b = 0; b < B; b++) s += da[b * 4 * H + k] * x[b * I + j];
            d_w_ih[k * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            double s = 0.0;
            for (int b = 0; b < B; b++) s += da[b * 4 * H + k] * h[b * H + j];
            d_w_hh[k * H + j] = s;
        }
        double s = 0.0;
        for (int b = 0; b < B; b++) s += da[b * 4 * H + k];
        d_b_ih[k] = s; /* both biases are added to a: the same gradient */
        d_b_hh[k] = s;
    }
}

/*
 * GRU cell (torch.nn.GRUCell), gates stacked r, z, n in w_ih [3H, I], w_hh [3H, H]:
 *   gi = x w_ih^T + b_ih,  gh = h w_hh^T + b_hh                        [B, 3H]
 *   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
 *   h_new = (1 - z) * n + z * h                                        [B, H]
 * The reset gate multiplies gh_n = W_hn h + b_hn as a whole (torch's GRU; ONNX calls it
 * linear_before_reset=1).  Forward writes gates [B, 3H] (r, z, n activated) and keeps gh.
 * Backward, from dh = dL/dh_new:
 *   da_n = dh (1 - z) (1 - n^2),  da_z = dh (h - n) z (1 - z),  da_r = da_n gh_n r (1 - r)
 *   dgi = [da_r, da_z, da_n],  dgh = [da_r, da_z, da_n * r]
 *   d_x = dgi w_ih,  d_h = dh z + dgh w_hh,  dW_ih = dgi^T x,  dW_hh = dgh^T h,
 *   db_ih = sum_b dgi,  db_hh = sum_b dgh      (so d_b_in != d_b_hn)
 */
static void gru_cell_forward_f64(int B, int I, int H, const double *x, const double *h,
                                 const double *w_ih, const double *w_hh, const double *b_ih,
                                 const double *b_hh, double *gh, double *gates, double *h_new)
{
    for (int b = 0; b < B; b++) {
        double *gate = gates + b * 3 * H, *ghb = gh + b * 3 * H;
        for (int k = 0; k < 3 * H; k++) { /* gi into gates for now, gh beside it */
            double gi = b_ih[k], hh = b_hh[k];
            for (int j = 0; j < I; j++) gi += x[b * I + j] * w_ih[k * I + j];
            for (int j = 0; j < H; j++) hh += h[b * H + j] * w_hh[k * H + j];
            gate[k] = gi;
            ghb[k] = hh;
        }
        for (int j = 0; j < H; j++) {
            double r = sigmoid_f64(gate[j] + ghb[j]), z = sigmoid_f64(gate[H + j] + ghb[H + j]);
            double n = tanh(gate[2 * H + j] + r * ghb[2 * H + j]);
            gate[j] = r, gate[H + j] = z, gate[2 * H + j] = n;
            h_new[b * H + j] = (1.0 - z) * n + z * h[b * H + j];
        }
    }
}

static void gru_cell_backward_f64(int B, int I, int H, const double *x, const double *h,
                                  const double *w_ih, const double *w_hh, const double *gh,
                                  const double *gates, const double *d_h_new, double *dgi, double *dgh,
                                  double *d_x, double *d_h, double *d_w_ih, double *d_w_hh, double *d_b_ih,
                                  double *d_b_hh)
{
    for (int b = 0; b < B; b++) {
        const double *gate = gates + b * 3 * H;
        for (int j = 0; j < H; j++) {
            double r = gate[j], z = gate[H + j], n = gate[2 * H + j], dh = d_h_new[b * H + j];
            double da_n = dh * (1.0 - z) * (1.0 - n * n);
            double da_z = dh * (h[b * H + j] - n) * z * (1.0 - z);
            double da_r = da_n * gh[b * 3 * H + 2 * H + j] * r * (1.0 - r);
            dgi[b * 3 * H + j] = da_r, dgi[b * 3 * H + H + j] = da_z;
            dgi[b * 3 * H + 2 * H + j] = da_n;
            dgh[b * 3 * H + j] = da_r, dgh[b * 3 * H + H + j] = da_z;
            dgh[b * 3 * H + 2 * H + j] = da_n * r; /* the reset multiplies W_hn h + b_hn */
        }
        for (int j = 0; j < I; j++) {
            double s = 0.0;
            for (int k = 0; k < 3 * H; k++) s += dgi[b * 3 * H + k] * w_ih[k * I + j];
            d_x[b * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            double s = d_h_new[b * H + j] * gate[H + j]; /* h_new = ... + z * h */
            for (int k = 0; k < 3 * H; k++) s += dgh[b * 3 * H + k] * w_hh[k * H + j];
            d_h[b * H + j] = s;
        }
    }
    for (int k = 0; k < 3 * H; k++) { /* parameter gradients: sums over the batch */
        for (int j = 0; j < I; j++) {
            double s = 0.0;
            for (int b = 0; b < B; b++) s += dgi[b * 3 * H + k] * x[b * I + j];
            d_w_ih[k * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            double s = 0.0;
            for (int b = 0; b < B; b++) s += dgh[b * 3 * H + k] * h[b * H + j];
            d_w_hh[k * H + j] = s;
        }
        double si = 0.0, sh = 0.0;
        for (int b = 0; b < B; b++) si += dgi[b * 3 * H + k], sh += dgh[b * 3 * H + k];
        d_b_ih[k] = si; /* b_in and b_hn differ: only b_hn is scaled by r */
        d_b_hh[k] = sh;
    }
}

/*
 * Scaled-dot attention forward, many queries, keys past lengths[b] masked:
 *   s[b,i,j] = scale * (q[b,i,:] . k[b,j,:])            q [B, Tq, H], k [B, Tk, H]
 *   w[b,i,j] = exp(s_ij - m_i) / sum_{j' < L} exp(s_ij' - m_i)   for j < L = lengths[b],
 *              0 for j >= L;  m_i = max_{j < L} s_ij (subtracted so exp never overflows)
 *   context[b,i,:] = sum_j w[b,i,j] v[b,j,:]            v [B, Tk, H], context [B, Tq, H]
 * Writes scores [B, Tq, Tk] (every entry, masked ones as computed), weights, context.
 * A row with L = 0 sees no key: weights 0 and context 0.
 */
static void attention_forward_f64(int B, int Tq, int Tk, int H, double scale, const double *q,
                                  const double *k, const double *v, const int64_t *lengths,
                                  double *scores, double *weights, double *context)
{
    for (int b = 0; b < B; b++) {
        int L = (int)lengths[b];
        for (int i = 0; i < Tq; i++) {
            const double *qi = q + (b * Tq + i) * H;
            double *s = scores + (b * Tq + i) * Tk, *w = weights + (b * Tq + i) * Tk;
            double m = -INFINITY, sum = 0.0;
            for (int j = 0; j < Tk; j++) {
                double dot = 0.0;
                for (int d = 0; d < H; d++) dot += qi[d] * k[(b * Tk + j) * H + d];
                s[j] = scale * dot;
                if (j < L && s[j] > m) m = s[j];
            }
            for (int j = 0; j < Tk; j++) {
                w[j] = j < L ? exp(s[j] - m) : 0.0;
                sum += w[j];
            }
            for (int j = 0; j < L; j++) w[j] /= sum;
            for (int d = 0; d < H; d++) {
                double acc = 0.0;
                for (int j = 0; j < L; j++) acc += w[j] * v[(b * Tk + j) * H + d];
                context[(b * Tq + i) * H + d] = acc;
            }
        }
    }
}

/*
 * Scaled-dot attention backward, given dL/dcontext = dctx [B, Tq, H] AND dL/dw = dW
 * [B, Tq, Tk] (the weights are an output too):
 *   dw[b,i,j]  = dctx[b,i,:] . v[b,j,:] + dW[b,i,j]          total gradient reaching w
 *   ds[b,i,j]  = w_ij * (dw_ij - delta_i),  delta_i = sum_j w_ij dw_ij   (softmax backward;
 *                forgetting delta is the classic bug; masked j have w = 0, so ds = 0)
 *   d_q[b,i,:] = scale * sum_j ds_ij k[b,j,:]                 (ds K * scale)
 *   d_k[b,j,:] = scale * sum_i ds_ij q[b,i,:]                 (ds^T q * scale)
 *   d_v[b,j,:] = sum_i w_ij dctx[b,i,:]                       (w^T dctx)
 * `ds` is scratch space of B * Tq * Tk.
 */
static void attention_backward_f64(int B, int Tq, int Tk, int H, double scale, const double *q,
                                   const double *k, const double *v, const double *weights,
                                   const double *d_context, const double *d_weights,
                                   double *ds, double *d_q, double *d_k, double *d_v)
{
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < Tq; i++) {
            const double *w = weights + (b * Tq + i) * Tk, *dW = d_weights + (b * Tq + i) * Tk;
            const double *dctx = d_context + (b * Tq + i) * H;
            double *dsi = ds + (b * Tq + i) * Tk;
            double delta = 0.0;
            for (int j = 0; j < Tk; j++) {
                double dw = dW[j];
                for (int d = 0; d < H; d++) dw += dctx[d] * v[(b * Tk + j) * H + d];
                dsi[j] = dw; /* dw for now; becomes ds below */
                delta += w[j] * dw;
            }
            for (int j = 0; j < Tk; j++) dsi[j] = w[j] * (dsi[j] - delta);
        }
        for (int i = 0; i < Tq; i++) {
            for (int d = 0; d < H; d++) {
                double acc = 0.0;
                for (int j = 0; j < Tk; j++)
                    acc += ds[(b * Tq + i) * Tk + j] * k[(b * Tk + j) * H + d];
                d_q[(b * Tq + i) * H + d] = scale * acc;
            }
        }
        for (int j = 0; j < Tk; j++) {
            for (int d = 0; d < H; d++) {
                double acc_k = 0.0, acc_v = 0.0;
                for (int i = 0; i < Tq; i++) {
                    acc_k += ds[(b * Tq + i) * Tk + j] * q[(b * Tq + i) * H + d];
                    acc_v += weights[(b * Tq + i) * Tk + j] * d_context[(b * Tq + i) * H + d];
                }
                d_k[(b * Tk + j) * H + d] = scale * acc_k;
                d_v[(b * Tk + j) * H + d] = acc_v;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The same four functions in float, written the way a float implementation usually is:      */
/* float storage, float accumulation, expf/tanhf.  Same formulas as the double ones above.   */
/* ---------------------------------------------------------------------------------------- */

static float sigmoid_f32(float a)
{
    float e = expf(-fabsf(a));
    return a >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

static void lstm_cell_forward_f32(int B, int I, int H, const float *x, const float *h,
                                  const float *c, const float *w_ih, const float *w_hh,
                                  const float *b_ih, const float *b_hh, float *gates,
                                  float *h_new, float *c_new)
{
    for (int b = 0; b < B; b++) {
        float *gate = gates + b * 4 * H;
        for (int k = 0; k < 4 * H; k++) {
            float a = b_ih[k] + b_hh[k];
            for (int j = 0; j < I; j++) a += x[b * I + j] * w_ih[k * I + j];
            for (int j = 0; j < H; j++) a += h[b * H + j] * w_hh[k * H + j];
            gate[k] = (k >= 2 * H && k < 3 * H) ? tanhf(a) : sigmoid_f32(a);
        }
        for (int j = 0; j < H; j++) {
            float i = gate[j], f = gate[H + j], g = gate[2 * H + j], o = gate[3 * H + j];
            c_new[b * H + j] = f * c[b * H + j] + i * g;
            h_new[b * H + j] = o * tanhf(c_new[b * H + j]);
        }
    }
}

static void lstm_cell_backward_f32(int B, int I, int H, const float *x, const float *h,
                                   const float *c, const float *w_ih, const float *w_hh,
                                   const float *gates, const float *c_new, const float *d_h_new,
                                   const float *d_c_new, float *da, float *d_x, float *d_h,
                                   float *d_c, float *d_w_ih, float *d_w_hh, float *d_b_ih,
                                   float *d_b_hh)
{
    for (int b = 0; b < B; b++) {
        const float *gate = gates + b * 4 * H;
        float *da_b = da + b * 4 * H;
        for (int j = 0; j < H; j++) {
            float i = gate[j], f = gate[H + j], g = gate[2 * H + j], o = gate[3 * H + j];
            float t = tanhf(c_new[b * H + j]);
            float dh = d_h_new[b * H + j];
            float dc = d_c_new[b * H + j] + dh * o * (1.0f - t * t);
            da_b[j] = dc * g * i * (1.0f - i);
            da_b[H + j] = dc * c[b * H + j] * f * (1.0f - f);
            da_b[2 * H + j] = dc * i * (1.0f - g * g);
            da_b[3 * H + j] = dh * t * o * (1.0f - o);
            d_c[b * H + j] = dc * f;
        }
    }
    for (int b = 0; b < B; b++) {
        for (int j = 0; j < I; j++) {
            float s = 0.0f;
            for (int k = 0; k < 4 * H; k++) s += da[b * 4 * H + k] * w_ih[k * I + j];
            d_x[b * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            float s = 0.0f;
            for (int k = 0; k < 4 * H; k++) s += da[b * 4 * H + k] * w_hh[k * H + j];
            d_h[b * H + j] = s;
        }
    }
    for (int k = 0; k < 4 * H; k++) {
        for (int j = 0; j < I; j++) {
            float s = 0.0f;
            for (int b = 0; b < B; b++) s += da[b * 4 * H + k] * x[b * I + j];
            d_w_ih[k * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            float s = 0.0f;
            for (int b = 0; b < B; b++) s += da[b * 4 * H + k] * h[b * H + j];
            d_w_hh[k * H + j] = s;
        }
        float s = 0.0f;
        for (int b = 0; b < B; b++) s += da[b * 4 * H + k];
        d_b_ih[k] = s;
        d_b_hh[k] = s;
    }
}

static void gru_cell_forward_f32(int B, int I, int H, const float *x, const float *h,
                                 const float *w_ih, const float *w_hh, const float *b_ih,
                                 const float *b_hh, float *gh, float *gates, float *h_new)
{
    for (int b = 0; b < B; b++) {
        float *gate = gates + b * 3 * H, *ghb = gh + b * 3 * H;
        for (int k = 0; k < 3 * H; k++) { /* gi into gates for now, gh beside it */
            float gi = b_ih[k], hh = b_hh[k];
            for (int j = 0; j < I; j++) gi += x[b * I + j] * w_ih[k * I + j];
            for (int j = 0; j < H; j++) hh += h[b * H + j] * w_hh[k * H + j];
            gate[k] = gi;
            ghb[k] = hh;
        }
        for (int j = 0; j < H; j++) {
            float r = sigmoid_f32(gate[j] + ghb[j]), z = sigmoid_f32(gate[H + j] + ghb[H + j]);
            float n = tanhf(gate[2 * H + j] + r * ghb[2 * H + j]);
            gate[j] = r, gate[H + j] = z, gate[2 * H + j] = n;
            h_new[b * H + j] = (1.0f - z) * n + z * h[b * H + j];
        }
    }
}

static void gru_cell_backward_f32(int B, int I, int H, const float *x, const float *h,
                                  const float *w_ih, const float *w_hh, const float *gh,
                                  const float *gates, const float *d_h_new, float *dgi, float *dgh,
                                  float *d_x, float *d_h, float *d_w_ih, float *d_w_hh, float *d_b_ih,
                                  float *d_b_hh)
{
    for (int b = 0; b < B; b++) {
        const float *gate = gates + b * 3 * H;
        for (int j = 0; j < H; j++) {
            float r = gate[j], z = gate[H + j], n = gate[2 * H + j], dh = d_h_new[b * H + j];
            float da_n = dh * (1.0f - z) * (1.0f - n * n);
            float da_z = dh * (h[b * H + j] - n) * z * (1.0f - z);
            float da_r = da_n * gh[b * 3 * H + 2 * H + j] * r * (1.0f - r);
            dgi[b * 3 * H + j] = da_r, dgi[b * 3 * H + H + j] = da_z;
            dgi[b * 3 * H + 2 * H + j] = da_n;
            dgh[b * 3 * H + j] = da_r, dgh[b * 3 * H + H + j] = da_z;
            dgh[b * 3 * H + 2 * H + j] = da_n * r; /* the reset multiplies W_hn h + b_hn */
        }
        for (int j = 0; j < I; j++) {
            float s = 0.0f;
            for (int k = 0; k < 3 * H; k++) s += dgi[b * 3 * H + k] * w_ih[k * I + j];
            d_x[b * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            float s = d_h_new[b * H + j] * gate[H + j]; /* h_new = ... + z * h */
            for (int k = 0; k < 3 * H; k++) s += dgh[b * 3 * H + k] * w_hh[k * H + j];
            d_h[b * H + j] = s;
        }
    }
    for (int k = 0; k < 3 * H; k++) { /* parameter gradients: sums over the batch */
        for (int j = 0; j < I; j++) {
            float s = 0.0f;
            for (int b = 0; b < B; b++) s += dgi[b * 3 * H + k] * x[b * I + j];
            d_w_ih[k * I + j] = s;
        }
        for (int j = 0; j < H; j++) {
            float s = 0.0f;
            for (int b = 0; b < B; b++) s += dgh[b * 3 * H + k] * h[b * H + j];
            d_w_hh[k * H + j] = s;
        }
        float si = 0.0f, sh = 0.0f;
        for (int b = 0; b < B; b++) si += dgi[b * 3 * H + k], sh += dgh[b * 3 * H + k];
        d_b_ih[k] = si; /* b_in and b_hn differ: only b_hn is scaled by r */
        d_b_hh[k] = sh;
    }
}

static void attention_forward_f32(int B, int Tq, int Tk, int H, float scale, const float *q,
                                  const float *k, const float *v, const int64_t *lengths,
                                  float *scores, float *weights, float *context)
{
    for (int b = 0; b < B; b++) {
        int L = (int)lengths[b];
        for (int i = 0; i < Tq; i++) {
            const float *qi = q + (b * Tq + i) * H;
            float *s = scores + (b * Tq + i) * Tk, *w = weights + (b * Tq + i) * Tk;
            float m = -INFINITY, sum = 0.0f;
            for (int j = 0; j < Tk; j++) {
                float dot = 0.0f;
                for (int d = 0; d < H; d++) dot += qi[d] * k[(b * Tk + j) * H + d];
                s[j] = scale * dot;
                if (j < L && s[j] > m) m = s[j];
            }
            for (int j = 0; j < Tk; j++) {
                w[j] = j < L ? expf(s[j] - m) : 0.0f;
                sum += w[j];
            }
            for (int j = 0; j < L; j++) w[j] /= sum;
            for (int d = 0; d < H; d++) {
                float acc = 0.0f;
                for (int j = 0; j < L; j++) acc += w[j] * v[(b * Tk + j) * H + d];
                context[(b * Tq + i) * H + d] = acc;
            }
        }
    }
}

static void attention_backward_f32(int B, int Tq, int Tk, int H, float scale, const float *q,
                                   const float *k, const float *v, const float *weights,
                                   const float *d_context, const float *d_weights, float *ds,
                                   float *d_q, float *d_k, float *d_v)
{
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < Tq; i++) {
            const float *w = weights + (b * Tq + i) * Tk, *dW = d_weights + (b * Tq + i) * Tk;
            const float *dctx = d_context + (b * Tq + i) * H;
            float *dsi = ds + (b * Tq + i) * Tk;
            float delta = 0.0f;
            for (int j = 0; j < Tk; j++) {
                float dw = dW[j];
                for (int d = 0; d < H; d++) dw += dctx[d] * v[(b * Tk + j) * H + d];
                dsi[j] = dw;
                delta += w[j] * dw;
            }
            for (int j = 0; j < Tk; j++) dsi[j] = w[j] * (dsi[j] - delta);
        }
        for (int i = 0; i < Tq; i++) {
            for (int d = 0; d < H; d++) {
                float acc = 0.0f;
                for (int j = 0; j < Tk; j++)
                    acc += ds[(b * Tq + i) * Tk + j] * k[(b * Tk + j) * H + d];
                d_q[(b * Tq + i) * H + d] = scale * acc;
            }
        }
        for (int j = 0; j < Tk; j++) {
            for (int d = 0; d < H; d++) {
                float acc_k = 0.0f, acc_v = 0.0f;
                for (int i = 0; i < Tq; i++) {
                    acc_k += ds[(b * Tq + i) * Tk + j] * q[(b * Tq + i) * H + d];
                    acc_v += weights[(b * Tq + i) * Tk + j] * d_context[(b * Tq + i) * H + d];
                }
                d_k[(b * Tk + j) * H + d] = scale * acc_k;
                d_v[(b * Tk + j) * H + d] = acc_v;
            }
        }
    }
}

/* ======================================================================================== */
/* Part 2: reading a safetensors file.                                                       */
/*   bytes 0..7      N, the header length, an unsigned 64-bit little-endian integer          */
/*   bytes 8..8+N    a JSON object: {"name": {"dtype": "F64", "shape": [3, 5],               */
/*                   "data_offsets": [begin, end]}, ..., "__metadata__": {"key": "value"}}   */
/*   the rest        the tensors' raw little-endian C-order bytes; offsets are relative to   */
/*                   the start of this part                                                  */
/* ======================================================================================== */

typedef enum { DT_F64, DT_F32, DT_I64, DT_BOOL, DT_OTHER } DType;

typedef struct {
    char *name;
    char dtype_name[8]; /* as written in the file, e.g. "F32" */
    DType dtype;
    size_t item_size;   /* bytes per element */
    int rank;
    int64_t shape[MAX_RANK];
    int64_t count;      /* number of elements */
    uint64_t begin, end; /* data_offsets */
} TensorInfo;

typedef struct {
    char *key, *value;
} MetaEntry;

typedef struct {
    const char *path;
    unsigned char *bytes; /* the whole file */
    size_t size;
    const unsigned char *data; /* the tensor bytes, after the header */
    size_t data_size;
    TensorInfo *tensors;
    size_t n_tensors, cap_tensors;
    MetaEntry *meta;
    size_t n_meta, cap_meta;
} Golden;

/* Every error goes through here: the file's name and what is wrong with it. */
static void file_error(const Golden *g, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "golden_check: %s: ", g->path);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    va_end(args);
}

/* ---- a minimal JSON reader: just what a safetensors header holds ---- */

typedef struct {
    const char *p, *end; /* the unread part of the header */
    const char *error;   /* set on the first error, with `p` where it happened */
} Json;

static int json_fail(Json *js, const char *why)
{
    if (!js->error) js->error = why;
    return -1;
}

static void json_skip_ws(Json *js)
{
    while (js->p < js->end && (*js->p == ' ' || *js->p == '\t' || *js->p == '\n' || *js->p == '\r'))
        js->p++;
}

/* Consume the character `ch` (after whitespace), or fail. */
static int json_expect(Json *js, char ch, const char *why)
{
    json_skip_ws(js);
    if (js->p >= js->end || *js->p != ch) return json_fail(js, why);
    js->p++;
    return 0;
}

/* After whitespace: is the next character `ch`?  Consumes it if so. */
static int json_accept(Json *js, char ch)
{
    json_skip_ws(js);
    if (js->p < js->end && *js->p == ch) {
        js->p++;
        return 1;
    }
    return 0;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int n = 0; n < 4; n++) {
        char ch = p[n];
        v <<= 4;
        if (ch >= '0' && ch <= '9') v |= (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f') v |= (unsigned)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F') v |= (unsigned)(ch - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

/* Read a JSON string into a new NUL-terminated buffer (escapes decoded, \u as UTF-8). */
static int json_string(Json *js, char **out)
{
    *out = NULL;
    if (json_expect(js, '"', "expected a string") < 0) return -1;
    const char *start = js->p;
    while (js->p < js->end && *js->p != '"') { /* find the closing quote */
        if (*js->p == '\\' && js->end - js->p >= 2) js->p++; /* skip what a backslash escapes */
        js->p++;
    }
    if (js->p >= js->end) return json_fail(js, "unterminated string");
    /* the decoded text is never longer than the raw text */
    char *buf = malloc((size_t)(js->p - start) + 1), *o = buf;
    if (!buf) return json_fail(js, "out of memory");
    for (const char *s = start; s < js->p;) {
        unsigned char ch = (unsigned char)*s++;
        if (ch < 0x20) goto bad_control;
        if (ch != '\\') {
            *o++ = (char)ch;
            continue;
        }
        ch = (unsigned char)*s++;
        switch (ch) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (js->p - s < 4 || hex4(s, &cp) < 0) goto bad_escape;
            s += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* a surrogate pair: \uD83D\uDE00 */
                if (js->p - s < 6 || s[0] != '\\' || s[1] != 'u' || hex4(s + 2, &lo) < 0 ||
                    lo < 0xDC00 || lo > 0xDFFF)
                    goto bad_escape;
                s += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                goto bad_escape;
            }
            if (cp == 0) goto bad_escape; /* would end our C string early */
            /* UTF-8: at most 4 bytes, never more than the 6 or 12 escape characters read */
            if (cp < 0x80) {
                *o++ = (char)cp;
            } else if (cp < 0x800) {
                *o++ = (char)(0xC0 | (cp >> 6));
                *o++ = (char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                *o++ = (char)(0xE0 | (cp >> 12));
                *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *o++ = (char)(0x80 | (cp & 0x3F));
            } else {
                *o++ = (char)(0xF0 | (cp >> 18));
                *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *o++ = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default: goto bad_escape;
        }
    }
    *o = '\0';
    js->p++; /* the closing quote */
    *out = buf;
    return 0;
bad_control:
    free(buf);
    return json_fail(js, "control character in a string");
bad_escape:
    free(buf);
    return json_fail(js, "bad escape in a string");
}

/* A non-negative integer (shapes and offsets), with overflow check. */
static int json_u64(Json *js, uint64_t *out)
{
    json_skip_ws(js);
    if (js->p >= js->end || *js->p < '0' || *js->p > '9')
        return json_fail(js, "expected a non-negative integer");
    uint64_t v = 0;
    while (js->p < js->end && *js->p >= '0' && *js->p <= '9') {
        unsigned digit = (unsigned)(*js->p++ - '0');
        if (v > (UINT64_MAX - digit) / 10) return json_fail(js, "integer too large");
        v = v * 10 + digit;
    }
    if (js->p < js->end && (*js->p == '.' || *js->p == 'e' || *js->p == 'E'))
        return json_fail(js, "expected an integer");
    *out = v;
    return 0;
}

/* Skip any JSON value (for keys this reader does not need). */
static int json_skip_value(Json *js, int depth)
{
    if (depth > MAX_DEPTH) return json_fail(js, "nested too deeply");
    json_skip_ws(js);
    if (js->p >= js->end) return json_fail(js, "expected a value");
    char ch = *js->p;
    if (ch == '"') {
        char *s;
        if (json_string(js, &s) < 0) return -1;
        free(s);
        return 0;
    }
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        js->p++;
        if (json_accept(js, close)) return 0;
        do {
            if (ch == '{') {
                char *key;
                if (json_string(js, &key) < 0) return -1;
                free(key);
                if (json_expect(js, ':', "expected ':'") < 0) return -1;
            }
            if (json_skip_value(js, depth + 1) < 0) return -1;
        } while (json_accept(js, ','));
        return json_expect(js, close, ch == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
    const char *lits[] = {"true", "false", "null"};
    for (int n = 0; n < 3; n++) {
        size_t len = strlen(lits[n]);
        if ((size_t)(js->end - js->p) >= len && memcmp(js->p, lits[n], len) == 0) {
            js->p += len;
            return 0;
        }
    }
    /* a number: -?digits(.digits)?([eE][+-]?digits)? */
    const char *start = js->p;
    if (*js->p == '-') js->p++;
    int digits = 0;
    while (js->p < js->end && ((*js->p >= '0' && *js->p <= '9') || *js->p == '.' ||
                               *js->p == 'e' || *js->p == 'E' || *js->p == '+' || *js->p == '-')) {
        digits += (*js->p >= '0' && *js->p <= '9');
        js->p++;
    }
    if (!digits) {
        js->p = start;
        return json_fail(js, "unexpected character");
    }
    return 0;
}

/* ---- the header: tensor entries and __metadata__ ---- */

static int dtype_from_name(const char *name, DType *dt, size_t *size)
{
    static const struct {
        const char *name;
        DType dt;
        size_t size;
    } known[] = {
        {"F64", DT_F64, 8},   {"F32", DT_F32, 4},   {"I64", DT_I64, 8},   {"BOOL", DT_BOOL, 1},
        {"U64", DT_OTHER, 8}, {"I32", DT_OTHER, 4}, {"U32", DT_OTHER, 4}, {"F16", DT_OTHER, 2},
        {"BF16", DT_OTHER, 2}, {"I16", DT_OTHER, 2}, {"U16", DT_OTHER, 2}, {"I8", DT_OTHER, 1},
        {"U8", DT_OTHER, 1},  {"F8_E4M3", DT_OTHER, 1}, {"F8_E5M2", DT_OTHER, 1},
    };
    for (size_t n = 0; n < sizeof known / sizeof known[0]; n++) {
        if (strcmp(name, known[n].name) == 0) {
            *dt = known[n].dt;
            *size = known[n].size;
            return 0;
        }
    }
    return -1;
}

/* One tensor entry {"dtype": ..., "shape": [...], "data_offsets": [b, e]}, keys in any order. */
static int parse_tensor_entry(Json *js, TensorInfo *t)
{
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    if (json_expect(js, '{', "a tensor entry must be an object") < 0) return -1;
    if (!json_accept(js, '}')) {
        do {
            char *key;
            if (json_string(js, &key) < 0) return -1;
            if (json_expect(js, ':', "expected ':'") < 0) {
                free(key);
                return -1;
            }
            int rc = 0;
            if (strcmp(key, "dtype") == 0 && !have_dtype) {
                char *name;
                have_dtype = 1;
                rc = json_string(js, &name);
                if (rc == 0) {
                    if (strlen(name) >= sizeof t->dtype_name ||
                        dtype_from_name(name, &t->dtype, &t->item_size) < 0)
                        rc = json_fail(js, "unknown dtype");
                    else
                        strcpy(t->dtype_name, name);
                    free(name);
                }
            } else if (strcmp(key, "shape") == 0 && !have_shape) {
                have_shape = 1;
                t->rank = 0;
                rc = json_expect(js, '[', "shape must be a list");
                if (rc == 0 && !json_accept(js, ']')) {
                    do {
                        uint64_t d;
                        if (t->rank == MAX_RANK) rc = json_fail(js, "too many dimensions");
                        else rc = json_u64(js, &d);
                        if (rc == 0 && d > (uint64_t)MAX_ELEMENTS)
                            rc = json_fail(js, "dimension too large");
                        if (rc == 0) t->shape[t->rank++] = (int64_t)d;
                    } while (rc == 0 && json_accept(js, ','));
                    if (rc == 0) rc = json_expect(js, ']', "expected ',' or ']' in shape");
                }
            } else if (strcmp(key, "data_offsets") == 0 && !have_offsets) {
                have_offsets = 1;
                rc = json_expect(js, '[', "data_offsets must be a list");
                if (rc == 0) rc = json_u64(js, &t->begin);
                if (rc == 0) rc = json_expect(js, ',', "data_offsets needs two integers");
                if (rc == 0) rc = json_u64(js, &t->end);
                if (rc == 0) rc = json_expect(js, ']', "data_offsets needs two integers");
            } else if (strcmp(key, "dtype") == 0 || strcmp(key, "shape") == 0 ||
                       strcmp(key, "data_offsets") == 0) {
                rc = json_fail(js, "duplicate key in a tensor entry");
            } else {
                rc = json_skip_value(js, 1); /* a key we do not need */
            }
            free(key);
            if (rc < 0) return -1;
        } while (json_accept(js, ','));
        if (json_expect(js, '}', "expected ',' or '}' in a tensor entry") < 0) return -1;
    }
    if (!have_dtype || !have_shape || !have_offsets)
        return json_fail(js, "a tensor entry needs dtype, shape and data_offsets");
    return 0;
}

/* "__metadata__": {"key": "value", ...}, strings only. */
static int parse_metadata(Json *js, Golden *g)
{
    if (json_expect(js, '{', "__metadata__ must be an object") < 0) return -1;
    if (json_accept(js, '}')) return 0;
    do {
        if (g->n_meta == g->cap_meta) {
            size_t cap = g->cap_meta ? 2 * g->cap_meta : 16;
            MetaEntry *m = realloc(g->meta, cap * sizeof *m);
            if (!m) return json_fail(js, "out of memory");
            g->meta = m;
            g->cap_meta = cap;
        }
        MetaEntry *e = &g->meta[g->n_meta];
        if (json_string(js, &e->key) < 0) return -1;
        if (json_expect(js, ':', "expected ':'") < 0 || json_string(js, &e->value) < 0) {
            free(e->key);
            return json_fail(js, "__metadata__ values must be strings");
        }
        g->n_meta++;
    } while (json_accept(js, ','));
    return json_expect(js, '}', "expected ',' or '}' in __metadata__");
}

static const TensorInfo *find_tensor(const Golden *g, const char *name)
{
    for (size_t n = 0; n < g->n_tensors; n++)
        if (strcmp(g->tensors[n].name, name) == 0) return &g->tensors[n];
    return NULL;
}

static const char *find_meta(const Golden *g, const char *key)
{
    for (size_t n = 0; n < g->n_meta; n++)
        if (strcmp(g->meta[n].key, key) == 0) return g->meta[n].value;
    return NULL;
}

/* The whole header: {"name": entry, ..., "__metadata__": {...}}, then only spaces. */
static int parse_header(Golden *g, const char *text, size_t len)
{
    Json js = {text, text + len, NULL};
    int metadata_seen = 0;
    if (json_expect(&js, '{', "the header must be a JSON object") < 0) goto fail;
    if (!json_accept(&js, '}')) {
        do {
            char *key;
            if (json_string(&js, &key) < 0) goto fail;
            if (json_expect(&js, ':', "expected ':'") < 0) {
                free(key);
                goto fail;
            }
            if (strcmp(key, "__metadata__") == 0) {
                free(key);
                if (metadata_seen++) {
                    json_fail(&js, "duplicate __metadata__");
                    goto fail;
                }
                if (parse_metadata(&js, g) < 0) goto fail;
                continue;
            }
            if (find_tensor(g, key)) {
                free(key);
                json_fail(&js, "duplicate tensor name");
                goto fail;
            }
            if (g->n_tensors == g->cap_tensors) {
                size_t cap = g->cap_tensors ? 2 * g->cap_tensors : 16;
                TensorInfo *t = realloc(g->tensors, cap * sizeof *t);
                if (!t) {
                    free(key);
                    json_fail(&js, "out of memory");
                    goto fail;
                }
                g->tensors = t;
                g->cap_tensors = cap;
            }
            TensorInfo *t = &g->tensors[g->n_tensors++];
            memset(t, 0, sizeof *t);
            t->name = key; /* owned by g from here on */
            if (parse_tensor_entry(&js, t) < 0) goto fail;
        } while (json_accept(&js, ','));
        if (json_expect(&js, '}', "expected ',' or '}' after a tensor entry") < 0) goto fail;
    }
    json_skip_ws(&js);
    if (js.p != js.end) {
        json_fail(&js, "unexpected text after the header object");
        goto fail;
    }
    return 0;
fail:;
    file_error(g, "malformed header: %s (header byte %ld)", js.error ? js.error : "malformed",
               (long)(js.p - text));
    return -1;
}

/* Every tensor's bytes must be inside the data part and match its dtype and shape. */
static int check_tensor_bounds(Golden *g)
{
    for (size_t n = 0; n < g->n_tensors; n++) {
        TensorInfo *t = &g->tensors[n];
        int64_t count = 1;
        for (int d = 0; d < t->rank; d++) {
            if (t->shape[d] != 0 && count > MAX_ELEMENTS / t->shape[d]) {
                file_error(g, "tensor %s: too many elements", t->name);
                return -1;
            }
            count *= t->shape[d];
        }
        t->count = count;
        if (t->begin > t->end || t->end > g->data_size) {
            file_error(g, "tensor %s: data_offsets outside the file (truncated?)", t->name);
            return -1;
        }
        if (t->end - t->begin != (uint64_t)count * t->item_size) {
            file_error(g, "tensor %s: data_offsets do not match its dtype and shape", t->name);
            return -1;
        }
    }
    return 0;
}

static void golden_free(Golden *g)
{
    for (size_t n = 0; n < g->n_tensors; n++) free(g->tensors[n].name);
    for (size_t n = 0; n < g->n_meta; n++) {
        free(g->meta[n].key);
        free(g->meta[n].value);
    }
    free(g->tensors);
    free(g->meta);
    free(g->bytes);
    memset(g, 0, sizeof *g);
}

/* Read and check a whole file.  Returns 0, or -1 after printing why. */
static int golden_open(Golden *g, const char *path)
{
    memset(g, 0, sizeof *g);
    g->path = path;
    FILE *f = fopen(path, "rb");
    if (!f) {
        file_error(g, "cannot open: %s", strerror(errno));
        return -1;
    }
    size_t cap = 1 << 16;
    g->bytes = malloc(cap);
    for (;;) { /* read it all, growing the buffer: works for pipes too */
        if (!g->bytes) {
            fclose(f);
            file_error(g, "out of memory");
            return -1;
        }
        g->size += fread(g->bytes + g->size, 1, cap - g->size, f);
        if (g->size < cap) break;
        unsigned char *grown = realloc(g->bytes, cap * 2);
        if (!grown) free(g->bytes);
        g->bytes = grown;
        cap *= 2;
    }
    int read_error = ferror(f);
    fclose(f);
    if (read_error) {
        file_error(g, "read error (a directory?)");
        return -1;
    }
    if (g->size < 8) {
        file_error(g, "shorter than the 8-byte header length (truncated?)");
        return -1;
    }
    uint64_t n = 0; /* little-endian, whatever this machine's byte order */
    for (int i = 7; i >= 0; i--) n = (n << 8) | g->bytes[i];
    if (n > g->size - 8) {
        file_error(g, "header length past the end of the file (truncated? not safetensors?)");
        return -1;
    }
    g->data = g->bytes + 8 + n;
    g->data_size = g->size - 8 - (size_t)n;
    if (parse_header(g, (const char *)g->bytes + 8, (size_t)n) < 0) return -1;
    return check_tensor_bounds(g);
}

/* Element `i` of a tensor, decoded from little-endian bytes (the data may be unaligned). */
static uint64_t load_le(const unsigned char *p, size_t size)
{
    uint64_t v = 0;
    for (size_t b = size; b-- > 0;) v = (v << 8) | p[b];
    return v;
}

static double element_f64(const TensorInfo *t, const unsigned char *data, int64_t i)
{
    const unsigned char *p = data + t->begin + (size_t)i * t->item_size;
    if (t->dtype == DT_F64) {
        uint64_t bits = load_le(p, 8);
        double v;
        memcpy(&v, &bits, 8);
        return v;
    }
    uint32_t bits = (uint32_t)load_le(p, 4);
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* Tensor `name`, if it exists with dtype `want` and this shape; NULL after a message. */
static const TensorInfo *checked_tensor(const Golden *g, const char *name, DType want, int rank,
                                        const int64_t *shape)
{
    const TensorInfo *t = find_tensor(g, name);
    if (!t) {
        file_error(g, "missing tensor %s", name);
        return NULL;
    }
    if (t->dtype != want) {
        file_error(g, "tensor %s has dtype %s, expected %s", name, t->dtype_name,
                   want == DT_F64 ? "F64" : want == DT_F32 ? "F32" : "I64");
        return NULL;
    }
    int same = t->rank == rank;
    for (int d = 0; same && d < rank; d++) same = t->shape[d] == shape[d];
    if (!same) {
        char msg[256];
        int len = snprintf(msg, sizeof msg, "tensor %s has an unexpected shape [", name);
        for (int d = 0; d < t->rank && len < 200; d++)
            len += snprintf(msg + len, sizeof msg - (size_t)len, d ? ",%lld" : "%lld",
                            (long long)t->shape[d]);
        snprintf(msg + len, sizeof msg - (size_t)len, "]");
        file_error(g, "%s", msg);
        return NULL;
    }
    return t;
}

/*
 * Fetch tensor `name`, checking its dtype and shape, as a new array of `want`
 * (DT_F64 -> double[], DT_F32 -> float[], DT_I64 -> int64_t[]).  NULL after a message.
 */
static void *load_tensor(const Golden *g, const char *name, DType want, int rank,
                         const int64_t *shape)
{
    const TensorInfo *t = checked_tensor(g, name, want, rank, shape);
    if (!t) return NULL;
    void *out = malloc(t->count ? (size_t)t->count * t->item_size : 1);
    if (!out) {
        file_error(g, "out of memory");
        return NULL;
    }
    for (int64_t i = 0; i < t->count; i++) {
        const unsigned char *p = g->data + t->begin + (size_t)i * t->item_size;
        if (want == DT_F64) ((double *)out)[i] = element_f64(t, g->data, i);
        else if (want == DT_F32) ((float *)out)[i] = (float)element_f64(t, g->data, i);
        else ((int64_t *)out)[i] = (int64_t)load_le(p, 8);
    }
    return out;
}

/* The shape of a tensor that must exist and have `rank` dimensions (to size the problem). */
static const int64_t *shape_of(const Golden *g, const char *name, int rank)
{
    const TensorInfo *t = find_tensor(g, name);
    if (!t) {
        file_error(g, "missing tensor %s", name);
        return NULL;
    }
    if (t->rank != rank) {
        file_error(g, "tensor %s has the wrong number of dimensions", name);
        return NULL;
    }
    return t->shape;
}

/* A metadata value that must parse entirely as a number. */
static int meta_number(const Golden *g, const char *key, double *out)
{
    const char *s = find_meta(g, key);
    if (!s) {
        file_error(g, "__metadata__ has no %s", key);
        return -1;
    }
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    while (*end == ' ') end++;
    if (end == s || *end != '\0') {
        file_error(g, "__metadata__ %s is not a number: \"%.100s\"", key, s);
        return -1;
    }
    return 0;
}

/* ======================================================================================== */
/* Part 3: comparing and reporting.                                                          */
/* ======================================================================================== */

typedef struct {
    int checked, failed; /* tensors compared against a tolerance, and how many failed */
} Tally;

/* A small bag of allocations, freed together at the end of a case (and on every error). */
typedef struct {
    void *p[64];
    int n;
} Allocs;

static void *keep(Allocs *a, void *p)
{
    if (p && a->n < (int)(sizeof a->p / sizeof a->p[0])) a->p[a->n++] = p;
    else if (p) { /* never happens with the fixed cases here; fail safe rather than leak */
        free(p);
        return NULL;
    }
    return p;
}

static void free_all(Allocs *a)
{
    while (a->n > 0) free(a->p[--a->n]);
}

static void *scratch(Allocs *a, size_t count, size_t size)
{
    return keep(a, calloc(count ? count : 1, size));
}

static void format_index(char *buf, size_t len, int64_t flat, int rank, const int64_t *shape)
{
    int64_t idx[MAX_RANK];
    for (int d = rank - 1; d >= 0; d--) {
        idx[d] = shape[d] ? flat % shape[d] : 0;
        flat = shape[d] ? flat / shape[d] : 0;
    }
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < rank && used < len; d++)
        used += (size_t)snprintf(buf + used, len - used, d ? ",%lld" : "%lld", (long long)idx[d]);
    if (used < len) snprintf(buf + used, len - used, "]");
}

static void print_table_header(void)
{
    printf("  %-20s %-9s %13s  %-16s %10s  %s\n", "tensor", "shape", "max|got-want|",
           "at: flat [index]", "allowed", "result");
}

/*
 * Compare our result `got` (`got_dt`: DT_F64 double[] or DT_F32 float[]) with the file's
 * tensor `name`.  A tensor with tolerances in the metadata passes when every element has
 * |got - want| <= atol + rtol * |want|; `debug` tensors (cache.*) have none and are only shown.
 * Returns -1 if the file lacks what is needed.
 */
static int compare(const Golden *g, const char *name, const void *got, DType got_dt, int rank,
                   const int64_t *shape, int debug, Tally *tally)
{
    const TensorInfo *t = find_tensor(g, name);
    if (debug && !t) {
        printf("  %-20s (not in this file: skipped)\n", name);
        return 0;
    }
    if (!checked_tensor(g, name, got_dt, rank, shape)) return -1;
    double *want = malloc(t->count ? (size_t)t->count * sizeof *want : 1);
    if (!want) {
        file_error(g, "out of memory");
        return -1;
    }
    for (int64_t i = 0; i < t->count; i++) want[i] = element_f64(t, g->data, i);

    /* tolerances: required for outputs and gradients; optional for the cache.* debugging aids */
    double atol = 0.0, rtol = 0.0;
    char atol_key[128], rtol_key[128];
    snprintf(atol_key, sizeof atol_key, "atol.%s", name);
    snprintf(rtol_key, sizeof rtol_key, "rtol.%s", name);
    int has_tol = !debug || (find_meta(g, atol_key) && find_meta(g, rtol_key));
    if (has_tol && (meta_number(g, atol_key, &atol) < 0 || meta_number(g, rtol_key, &rtol) < 0)) {
        free(want);
        return -1;
    }

    /* the worst error, and the element furthest past its allowance (they may differ) */
    double worst = -1.0, worst_excess = -INFINITY;
    int64_t at = 0, at_excess = 0, n_bad = 0;
    for (int64_t i = 0; i < t->count; i++) {
        double x = got_dt == DT_F64 ? ((const double *)got)[i] : ((const float *)got)[i];
        double err = fabs(x - want[i]);
        if (isnan(err)) err = INFINITY; /* a NaN is the worst error there is */
        double allowed_i = atol + rtol * fabs(want[i]);
        int bad = !(err <= allowed_i); /* written so that a NaN anywhere fails */
        double excess = isnan(allowed_i) ? INFINITY : err - allowed_i;
        if (err > worst) worst = err, at = i;
        if (excess > worst_excess) worst_excess = excess, at_excess = i;
        n_bad += bad;
    }
    if (t->count == 0) worst = 0.0;

    char shape_s[48], where[48];
    size_t used = (size_t)snprintf(shape_s, sizeof shape_s, "[");
    for (int d = 0; d < rank && used < sizeof shape_s; d++)
        used += (size_t)snprintf(shape_s + used, sizeof shape_s - used, d ? ",%lld" : "%lld",
                                 (long long)shape[d]);
    if (used < sizeof shape_s) snprintf(shape_s + used, sizeof shape_s - used, "]");
    char idx[32];
    format_index(idx, sizeof idx, at, rank, shape);
    snprintf(where, sizeof where, "%lld %s", (long long)at, idx);
    double allowed = atol + rtol * (t->count ? fabs(want[at]) : 0.0);
    if (debug) { /* shown to help find a bug, never counted in the exit status */
        if (has_tol)
            printf("  %-20s %-9s %13.3e  %-16s %10.3e  %s\n", name, shape_s, worst, where, allowed,
                   n_bad ? "over (debug, not counted)" : "ok (debug, not counted)");
        else
            printf("  %-20s %-9s %13.3e  %-16s %10s  %s\n", name, shape_s, worst, where, "-",
                   "(debug, not counted)");
        free(want);
        return 0;
    }
    tally->checked++;
    tally->failed += n_bad > 0;
    printf("  %-20s %-9s %13.3e  %-16s %10.3e  %s\n", name, shape_s, worst, where, allowed,
           n_bad ? "FAIL" : "ok");
    if (n_bad) {
        double x = got_dt == DT_F64 ? ((const double *)got)[at_excess]
                                    : ((const float *)got)[at_excess];
        format_index(idx, sizeof idx, at_excess, rank, shape);
        printf("  %-20s %lld of %lld elements fail; furthest over its allowance: %lld %s\n"
               "  %-20s got %.9g, want %.9g, allowed %.3e (atol %.3g + rtol %.3g * |want|)\n",
               "", (long long)n_bad, (long long)t->count, (long long)at_excess, idx, "", x,
               want[at_excess], atol + rtol * fabs(want[at_excess]), atol, rtol);
    }
    free(want);
    return 0;
}

/* ======================================================================================== */
/* Part 4: the two cases.  Each reads its inputs, runs the math above in the file's dtype,   */
/* and compares.                                                                             */
/* ======================================================================================== */

/* Our results are float[] or double[]: `elem` is the size of one element. */
#define ALLOC_LIKE(n) scratch(&mem, (size_t)(n), elem)

static int run_lstm_cell(const Golden *g, DType dt, Tally *tally)
{
    Allocs mem = {{0}, 0};
    size_t elem = dt == DT_F64 ? sizeof(double) : sizeof(float);
    if (find_tensor(g, "param.weight_hr")) {
        file_error(g, "has a projection (param.weight_hr); this program implements the cell "
                      "without one");
        return -1;
    }
    const int64_t *xs = shape_of(g, "input.x", 2), *cs = shape_of(g, "input.c", 2);
    if (!xs || !cs) return -1;
    const int64_t B = xs[0], I = xs[1], H = cs[1];
    const int64_t sBI[] = {B, I}, sBH[] = {B, H}, sB4H[] = {B, 4 * H};
    const int64_t s4HI[] = {4 * H, I}, s4HH[] = {4 * H, H}, s4H[] = {4 * H};

    /* the inputs, each checked against the sizes B, I, H; the first problem stops the case */
    void *x = NULL, *h = NULL, *c = NULL, *w_ih = NULL, *w_hh = NULL, *b_ih = NULL;
    void *b_hh = NULL, *d_h_new = NULL, *d_c_new = NULL;
    if (!(x = keep(&mem, load_tensor(g, "input.x", dt, 2, sBI))) ||
        !(h = keep(&mem, load_tensor(g, "input.h", dt, 2, sBH))) ||
        !(c = keep(&mem, load_tensor(g, "input.c", dt, 2, sBH))) ||
        !(w_ih = keep(&mem, load_tensor(g, "param.weight_ih", dt, 2, s4HI))) ||
        !(w_hh = keep(&mem, load_tensor(g, "param.weight_hh", dt, 2, s4HH))) ||
        !(b_ih = keep(&mem, load_tensor(g, "param.bias_ih", dt, 1, s4H))) ||
        !(b_hh = keep(&mem, load_tensor(g, "param.bias_hh", dt, 1, s4H))) ||
        !(d_h_new = keep(&mem, load_tensor(g, "cotangent.d_h_new", dt, 2, sBH))) ||
        !(d_c_new = keep(&mem, load_tensor(g, "cotangent.d_c_new", dt, 2, sBH)))) {
        free_all(&mem);
        return -1; /* the message is out */
    }
    void *gates = ALLOC_LIKE(B * 4 * H), *da = ALLOC_LIKE(B * 4 * H);
    void *h_new = ALLOC_LIKE(B * H), *c_new = ALLOC_LIKE(B * H);
    void *d_x = ALLOC_LIKE(B * I), *d_h = ALLOC_LIKE(B * H), *d_c = ALLOC_LIKE(B * H);
    void *d_w_ih = ALLOC_LIKE(4 * H * I), *d_w_hh = ALLOC_LIKE(4 * H * H);
    void *d_b_ih = ALLOC_LIKE(4 * H), *d_b_hh = ALLOC_LIKE(4 * H);
    if (!gates || !da || !h_new || !c_new || !d_x || !d_h || !d_c || !d_w_ih || !d_w_hh ||
        !d_b_ih || !d_b_hh) {
        file_error(g, "out of memory");
        free_all(&mem);
        return -1;
    }

    const int b_ = (int)B, i_ = (int)I, h_ = (int)H;
    if (dt == DT_F64) {
        lstm_cell_forward_f64(b_, i_, h_, x, h, c, w_ih, w_hh, b_ih, b_hh, gates, h_new, c_new);
        lstm_cell_backward_f64(b_, i_, h_, x, h, c, w_ih, w_hh, gates, c_new, d_h_new, d_c_new, da,
                               d_x, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh);
    } else {
        lstm_cell_forward_f32(b_, i_, h_, x, h, c, w_ih, w_hh, b_ih, b_hh, gates, h_new, c_new);
        lstm_cell_backward_f32(b_, i_, h_, x, h, c, w_ih, w_hh, gates, c_new, d_h_new, d_c_new, da,
                               d_x, d_h, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh);
    }

    const struct {
        const char *name;
        const void *got;
        int rank;
        const int64_t *shape;
    } results[] = {
        {"output.h_new", h_new, 2, sBH},        {"output.c_new", c_new, 2, sBH},
        {"grad.d_x", d_x, 2, sBI},              {"grad.d_h", d_h, 2, sBH},
        {"grad.d_c", d_c, 2, sBH},              {"grad.d_weight_ih", d_w_ih, 2, s4HI},
        {"grad.d_weight_hh", d_w_hh, 2, s4HH},  {"grad.d_bias_ih", d_b_ih, 1, s4H},
        {"grad.d_bias_hh", d_b_hh, 1, s4H},
    };
    int rc = 0;
    print_table_header();
    for (size_t n = 0; rc == 0 && n < sizeof results / sizeof results[0]; n++)
        rc = compare(g, results[n].name, results[n].got, dt, results[n].rank, results[n].shape,
                     0, tally);
    if (rc == 0) rc = compare(g, "cache.gates", gates, dt, 2, sB4H, 1, tally);
    free_all(&mem);
    return rc;
}

static int run_gru_cell(const Golden *g, DType dt, Tally *tally)
{
    Allocs mem = {{0}, 0};
    size_t elem = dt == DT_F64 ? sizeof(double) : sizeof(float);
    const char *lbr = find_meta(g, "linear_before_reset");
    if (lbr && strcmp(lbr, "true") != 0) {
        file_error(g, "is the GRU with linear_before_reset=%s; this program implements "
                      "torch's (the reset after the product)", lbr);
        return -1;
    }
    const int64_t *xs = shape_of(g, "input.x", 2), *hs = shape_of(g, "input.h", 2);
    if (!xs || !hs) return -1;
    const int64_t B = xs[0], I = xs[1], H = hs[1];
    const int64_t sBI[] = {B, I}, sBH[] = {B, H}, sB3H[] = {B, 3 * H};
    const int64_t s3HI[] = {3 * H, I}, s3HH[] = {3 * H, H}, s3H[] = {3 * H};
    void *x = NULL, *h = NULL, *w_ih = NULL, *w_hh = NULL, *b_ih = NULL, *b_hh = NULL;
    void *d_h_new = NULL;
    if (!(x = keep(&mem, load_tensor(g, "input.x", dt, 2, sBI))) ||
        !(h = keep(&mem, load_tensor(g, "input.h", dt, 2, sBH))) ||
        !(w_ih = keep(&mem, load_tensor(g, "param.weight_ih", dt, 2, s3HI))) ||
        !(w_hh = keep(&mem, load_tensor(g, "param.weight_hh", dt, 2, s3HH))) ||
        !(b_ih = keep(&mem, load_tensor(g, "param.bias_ih", dt, 1, s3H))) ||
        !(b_hh = keep(&mem, load_tensor(g, "param.bias_hh", dt, 1, s3H))) ||
        !(d_h_new = keep(&mem, load_tensor(g, "cotangent.d_h_new", dt, 2, sBH)))) {
        free_all(&mem);
        return -1; /* the message is out */
    }
    void *gh = ALLOC_LIKE(B * 3 * H), *gates = ALLOC_LIKE(B * 3 * H), *h_new = ALLOC_LIKE(B * H);
    void *dgi = ALLOC_LIKE(B * 3 * H), *dgh = ALLOC_LIKE(B * 3 * H);
    void *d_x = ALLOC_LIKE(B * I), *d_h = ALLOC_LIKE(B * H);
    void *d_w_ih = ALLOC_LIKE(3 * H * I), *d_w_hh = ALLOC_LIKE(3 * H * H);
    void *d_b_ih = ALLOC_LIKE(3 * H), *d_b_hh = ALLOC_LIKE(3 * H);
    if (!gh || !gates || !h_new || !dgi || !dgh || !d_x || !d_h || !d_w_ih || !d_w_hh ||
        !d_b_ih || !d_b_hh) {
        file_error(g, "out of memory");
        free_all(&mem);
        return -1;
    }
    const int b_ = (int)B, i_ = (int)I, h_ = (int)H;
    if (dt == DT_F64) {
        gru_cell_forward_f64(b_, i_, h_, x, h, w_ih, w_hh, b_ih, b_hh, gh, gates, h_new);
        gru_cell_backward_f64(b_, i_, h_, x, h, w_ih, w_hh, gh, gates, d_h_new, dgi, dgh, d_x,
                              d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh);
    } else {
        gru_cell_forward_f32(b_, i_, h_, x, h, w_ih, w_hh, b_ih, b_hh, gh, gates, h_new);
        gru_cell_backward_f32(b_, i_, h_, x, h, w_ih, w_hh, gh, gates, d_h_new, dgi, dgh, d_x,
                              d_h, d_w_ih, d_w_hh, d_b_ih, d_b_hh);
    }
    const struct {
        const char *name;
        const void *got;
        int rank;
        const int64_t *shape;
    } results[] = {
        {"output.h_new", h_new, 2, sBH},        {"grad.d_x", d_x, 2, sBI},
        {"grad.d_h", d_h, 2, sBH},              {"grad.d_weight_ih", d_w_ih, 2, s3HI},
        {"grad.d_weight_hh", d_w_hh, 2, s3HH},  {"grad.d_bias_ih", d_b_ih, 1, s3H},
        {"grad.d_bias_hh", d_b_hh, 1, s3H},
    };
    int rc = 0;
    print_table_header();
    for (size_t n = 0; rc == 0 && n < sizeof results / sizeof results[0]; n++)
        rc = compare(g, results[n].name, results[n].got, dt, results[n].rank, results[n].shape,
                     0, tally);
    if (rc == 0) rc = compare(g, "cache.gates", gates, dt, 2, sB3H, 1, tally);
    free_all(&mem);
    return rc;
}

static int run_attention(const Golden *g, DType dt, Tally *tally)
{
    Allocs mem = {{0}, 0};
    size_t elem = dt == DT_F64 ? sizeof(double) : sizeof(float);
    /* what this program implements: many queries [B, Tq, H], score scaled_dot, optional
       lengths; any other option of the attention cases is refused by name */
    const char *score = find_meta(g, "score"), *causal = find_meta(g, "causal");
    if (!score || strcmp(score, "scaled_dot") != 0) {
        file_error(g, "score is %s; this program implements only \"scaled_dot\"",
                   score ? score : "missing");
        return -1;
    }
    if (causal && strcmp(causal, "false") != 0) {
        file_error(g, "causal attention; this program implements lengths only");
        return -1;
    }
    for (size_t n = 0; n < g->n_tensors; n++) {
        const char *name = g->tensors[n].name;
        if ((strncmp(name, "input.", 6) == 0 || strncmp(name, "param.", 6) == 0) &&
            strcmp(name, "input.query") != 0 && strcmp(name, "input.keys") != 0 &&
            strcmp(name, "input.values") != 0 && strcmp(name, "input.lengths") != 0) {
            file_error(g, "has %s; this program implements query, keys, values and lengths",
                       name);
            return -1;
        }
    }
    const TensorInfo *qt = find_tensor(g, "input.query");
    if (qt && qt->rank != 3) {
        file_error(g, "input.query has %d dimensions; this program implements many queries "
                      "[B, Tq, H]", qt->rank);
        return -1;
    }
    const int64_t *qs = shape_of(g, "input.query", 3), *ks = shape_of(g, "input.keys", 3);
    if (!qs || !ks) return -1;
    const int64_t B = qs[0], Tq = qs[1], H = qs[2], Tk = ks[1];
    const int64_t sQ[] = {B, Tq, H}, sK[] = {B, Tk, H}, sW[] = {B, Tq, Tk}, sB[] = {B};

    double scale;
    if (meta_number(g, "scale", &scale) < 0) return -1;

    void *q = NULL, *k = NULL, *v = NULL, *d_context = NULL, *d_weights = NULL;
    int64_t *lengths = NULL;
    if (!(q = keep(&mem, load_tensor(g, "input.query", dt, 3, sQ))) ||
        !(k = keep(&mem, load_tensor(g, "input.keys", dt, 3, sK))) ||
        !(v = keep(&mem, load_tensor(g, "input.values", dt, 3, sK))) ||
        !(d_context = keep(&mem, load_tensor(g, "cotangent.d_context", dt, 3, sQ))) ||
        !(d_weights = keep(&mem, load_tensor(g, "cotangent.d_weights", dt, 3, sW)))) {
        free_all(&mem);
        return -1;
    }
    if (find_tensor(g, "input.lengths")) {
        lengths = keep(&mem, load_tensor(g, "input.lengths", DT_I64, 1, sB));
    } else { /* no lengths: every query sees every key */
        lengths = keep(&mem, malloc((B ? (size_t)B : 1) * sizeof *lengths));
        for (int64_t b = 0; lengths && b < B; b++) lengths[b] = Tk;
    }
    if (!lengths) {
        free_all(&mem);
        return -1;
    }
    void *scores = ALLOC_LIKE(B * Tq * Tk), *weights = ALLOC_LIKE(B * Tq * Tk);
    void *ds = ALLOC_LIKE(B * Tq * Tk), *context = ALLOC_LIKE(B * Tq * H);
    void *d_q = ALLOC_LIKE(B * Tq * H), *d_k = ALLOC_LIKE(B * Tk * H);
    void *d_v = ALLOC_LIKE(B * Tk * H);
    if (!scores || !weights || !ds || !context || !d_q || !d_k || !d_v) {
        file_error(g, "out of memory");
        free_all(&mem);
        return -1;
    }
    for (int64_t b = 0; b < B; b++) {
        if (lengths[b] < 0 || lengths[b] > Tk) {
            file_error(g, "input.lengths has an entry outside 0..Tk");
            free_all(&mem);
            return -1;
        }
    }

    const int b_ = (int)B, tq = (int)Tq, tk = (int)Tk, h_ = (int)H;
    if (dt == DT_F64) {
        attention_forward_f64(b_, tq, tk, h_, scale, q, k, v, lengths, scores, weights, context);
        attention_backward_f64(b_, tq, tk, h_, scale, q, k, v, weights, d_context, d_weights, ds,
                               d_q, d_k, d_v);
    } else {
        float s32 = (float)scale;
        attention_forward_f32(b_, tq, tk, h_, s32, q, k, v, lengths, scores, weights, context);
        attention_backward_f32(b_, tq, tk, h_, s32, q, k, v, weights, d_context, d_weights, ds,
                               d_q, d_k, d_v);
    }

    const struct {
        const char *name;
        const void *got;
        const int64_t *shape;
    } results[] = {
        {"output.context", context, sQ}, {"output.weights", weights, sW},
        {"grad.d_query", d_q, sQ},       {"grad.d_keys", d_k, sK},
        {"grad.d_values", d_v, sK},
    };
    int rc = 0;
    print_table_header();
    for (size_t n = 0; rc == 0 && n < sizeof results / sizeof results[0]; n++)
        rc = compare(g, results[n].name, results[n].got, dt, 3, results[n].shape, 0, tally);
    if (rc == 0) rc = compare(g, "cache.scores", scores, dt, 3, sW, 1, tally);
    free_all(&mem);
    return rc;
}

/* Check one file: 0 all pass, 1 some tensor fails, 2 the file is unusable. */
static int check_file(const char *path, Tally *total)
{
    Golden g;
    if (golden_open(&g, path) < 0) {
        golden_free(&g);
        return EXIT_BAD_FILE;
    }
    const char *op = find_meta(&g, "op"), *dtype = find_meta(&g, "dtype");
    const char *name = find_meta(&g, "case");
    DType dt = DT_OTHER;
    if (dtype && strcmp(dtype, "float64") == 0) dt = DT_F64;
    if (dtype && strcmp(dtype, "float32") == 0) dt = DT_F32;
    if (!op || dt == DT_OTHER) {
        file_error(&g, "__metadata__ needs `op` and `dtype` (float64 or float32)");
        golden_free(&g);
        return EXIT_BAD_FILE;
    }
    printf("%s  (%s, computed in %s)\n", name ? name : path, path,
           dt == DT_F64 ? "double" : "float");
    Tally tally = {0, 0};
    int rc;
    if (strcmp(op, "lstm_cell") == 0) {
        rc = run_lstm_cell(&g, dt, &tally);
    } else if (strcmp(op, "gru_cell") == 0) {
        rc = run_gru_cell(&g, dt, &tally);
    } else if (strcmp(op, "attention") == 0) {
        rc = run_attention(&g, dt, &tally);
    } else {
        file_error(&g, "unknown op \"%s\" (this program knows lstm_cell, gru_cell and attention)",
                   op);
        rc = -1;
    }
    golden_free(&g);
    if (rc < 0) return EXIT_BAD_FILE;
    printf("  => %d of %d tensors pass\n\n", tally.checked - tally.failed, tally.checked);
    total->checked += tally.checked;
    total->failed += tally.failed;
    return tally.failed ? EXIT_MISMATCH : EXIT_PASS;
}

static int ends_with(const char *s, const char *tail)
{
    size_t n = strlen(s), m = strlen(tail);
    return n >= m && strcmp(s + n - m, tail) == 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s DIR | FILE.safetensors...\n"
                        "  DIR: a folder written by `python -m numpy_ref.golden write DIR`\n",
                argv[0]);
        return EXIT_BAD_FILE;
    }
    Tally total = {0, 0};
    int status = EXIT_PASS, bad_files = 0;
    /* one argument that is not a .safetensors file: a directory holding the four cases */
    int is_dir = argc == 2 && !ends_with(argv[1], ".safetensors");
    int n_files = is_dir ? (int)(sizeof DEFAULT_CASES / sizeof DEFAULT_CASES[0]) : argc - 1;
    for (int n = 0; n < n_files; n++) {
        char path[4096];
        if (is_dir) {
            const char *sep = ends_with(argv[1], "/") ? "" : "/";
            int len = snprintf(path, sizeof path, "%s%s%s.safetensors", argv[1], sep,
                               DEFAULT_CASES[n]);
            if (len < 0 || (size_t)len >= sizeof path) {
                fprintf(stderr, "golden_check: path too long\n");
                return EXIT_BAD_FILE;
            }
        } else {
            snprintf(path, sizeof path, "%s", argv[n + 1]);
        }
        int rc = check_file(path, &total);
        if (rc == EXIT_BAD_FILE) bad_files++;
        if (rc > status) status = rc;
    }
    printf("%s: %d of %d tensors pass",
           status == EXIT_PASS ? "PASS" : status == EXIT_MISMATCH ? "FAIL" : "ERROR",
           total.checked - total.failed, total.checked);
    if (bad_files) printf("; %d file(s) could not be checked", bad_files);
    printf("\n");
    return status;
}
