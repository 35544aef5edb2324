/* oneDNN convolutions, matmuls and poolings whose primitives are created once, when a plan is
 * built, and only executed per call (PyTorch's oneDNN ops create the primitive
 * descriptor again on every call: 40-70 us each, measured on a Xeon with AMX).
 *
 * Reorders (a layout and dtype change in one pass) run the same way.
 *
 * A kernel holds its primitive, its weights reordered once into the layout the
 * primitive chose, and memory objects whose data handles are set per call. Activations
 * are NHWC (convolutions) or row-major (matmuls); post-ops: a residual (as a binary add
 * of another tensor, or as oneDNN's sum into the output buffer, which then holds the
 * residual on entry), then an element-wise activation.
 */
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* The oneDNN C API functions this file calls. Built with DS_DNNL_TABLE, it links no
 * libdnnl: each call goes through a pointer that ds_onednn_bind sets, in this order, to
 * the functions of a oneDNN already in the process (PyTorch's own copy, found by the
 * Python side); the C API is stable across oneDNN 3.x. */
#define DS_DNNL_FUNCTIONS(X) \
    X(dnnl_convolution_forward_primitive_desc_create) \
    X(dnnl_engine_create) \
    X(dnnl_matmul_primitive_desc_create) \
    X(dnnl_memory_create) \
    X(dnnl_memory_desc_create_with_strides) \
    X(dnnl_memory_desc_create_with_tag) \
    X(dnnl_memory_desc_destroy) \
    X(dnnl_memory_desc_get_size) \
    X(dnnl_memory_destroy) \
    X(dnnl_memory_get_data_handle) \
    X(dnnl_memory_set_data_handle) \
    X(dnnl_pooling_forward_primitive_desc_create) \
    X(dnnl_post_ops_append_binary) \
    X(dnnl_post_ops_append_eltwise) \
    X(dnnl_post_ops_append_sum) \
    X(dnnl_post_ops_create) \
    X(dnnl_post_ops_destroy) \
    X(dnnl_primitive_attr_create) \
    X(dnnl_primitive_attr_destroy) \
    X(dnnl_primitive_attr_set_scales_mask) \
    X(dnnl_primitive_attr_set_zero_points_mask) \
    X(dnnl_primitive_attr_set_post_ops) \
    X(dnnl_primitive_create) \
    X(dnnl_primitive_desc_destroy) \
    X(dnnl_primitive_desc_query_md) \
    X(dnnl_primitive_destroy) \
    X(dnnl_primitive_execute) \
    X(dnnl_reorder_primitive_desc_create) \
    X(dnnl_softmax_forward_primitive_desc_create) \
    X(dnnl_stream_create) \
    X(dnnl_stream_wait)
#define DS_NAME(f) #f ","
const char ds_onednn_symbol_names[] = DS_DNNL_FUNCTIONS(DS_NAME);
#ifdef DS_DNNL_TABLE
#define DS_POINTER(f) static __typeof__(f) *p_##f;
DS_DNNL_FUNCTIONS(DS_POINTER)
void ds_onednn_bind(void *const *fns) {
    int i = 0;
#define DS_BIND(f) p_##f = (__typeof__(f) *)fns[i++];
    DS_DNNL_FUNCTIONS(DS_BIND)
}
#define dnnl_convolution_forward_primitive_desc_create p_dnnl_convolution_forward_primitive_desc_create
#define dnnl_engine_create p_dnnl_engine_create
#define dnnl_matmul_primitive_desc_create p_dnnl_matmul_primitive_desc_create
#define dnnl_memory_create p_dnnl_memory_create
#define dnnl_memory_desc_create_with_strides p_dnnl_memory_desc_create_with_strides
#define dnnl_memory_desc_create_with_tag p_dnnl_memory_desc_create_with_tag
#define dnnl_memory_desc_destroy p_dnnl_memory_desc_destroy
#define dnnl_memory_desc_get_size p_dnnl_memory_desc_get_size
#define dnnl_memory_destroy p_dnnl_memory_destroy
#define dnnl_memory_get_data_handle p_dnnl_memory_get_data_handle
#define dnnl_memory_set_data_handle p_dnnl_memory_set_data_handle
#define dnnl_pooling_forward_primitive_desc_create p_dnnl_pooling_forward_primitive_desc_create
#define dnnl_post_ops_append_binary p_dnnl_post_ops_append_binary
#define dnnl_post_ops_append_eltwise p_dnnl_post_ops_append_eltwise
#define dnnl_post_ops_append_sum p_dnnl_post_ops_append_sum
#define dnnl_post_ops_create p_dnnl_post_ops_create
#define dnnl_post_ops_destroy p_dnnl_post_ops_destroy
#define dnnl_primitive_attr_create p_dnnl_primitive_attr_create
#define dnnl_primitive_attr_destroy p_dnnl_primitive_attr_destroy
#define dnnl_primitive_attr_set_scales_mask p_dnnl_primitive_attr_set_scales_mask
#define dnnl_primitive_attr_set_zero_points_mask p_dnnl_primitive_attr_set_zero_points_mask
#define dnnl_primitive_attr_set_post_ops p_dnnl_primitive_attr_set_post_ops
#define dnnl_primitive_create p_dnnl_primitive_create
#define dnnl_primitive_desc_destroy p_dnnl_primitive_desc_destroy
#define dnnl_primitive_desc_query_md p_dnnl_primitive_desc_query_md
#define dnnl_primitive_destroy p_dnnl_primitive_destroy
#define dnnl_primitive_execute p_dnnl_primitive_execute
#define dnnl_reorder_primitive_desc_create p_dnnl_reorder_primitive_desc_create
#define dnnl_softmax_forward_primitive_desc_create p_dnnl_softmax_forward_primitive_desc_create
#define dnnl_stream_create p_dnnl_stream_create
#define dnnl_stream_wait p_dnnl_stream_wait
#endif

enum { RES_NONE = 0, RES_BINARY = 1, RES_SUM = 2 };
/* activations, by code: none, relu, gelu (tanh), gelu (erf), sigmoid, tanh, silu, hardswish */
static const struct { dnnl_alg_kind_t alg; float alpha, beta; } ACTS[] = {
    {dnnl_alg_kind_undef, 0.f, 0.f}, {dnnl_eltwise_relu, 0.f, 0.f},
    {dnnl_eltwise_gelu_tanh, 0.f, 0.f}, {dnnl_eltwise_gelu_erf, 0.f, 0.f},
    {dnnl_eltwise_logistic, 0.f, 0.f}, {dnnl_eltwise_tanh, 0.f, 0.f},
    {dnnl_eltwise_swish, 1.f, 0.f}, {dnnl_eltwise_hardswish, 1.f / 6.f, 0.5f}};

typedef struct {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, bias, dst, res;
    /* int8: scales of the source, the weights (per output channel) and the destination,
     * and the source's and destination's zero points, fixed when the kernel is made */
    dnnl_memory_t q[5];
    int residual;
    pthread_mutex_t lock;
} ds_kernel;

static dnnl_engine_t g_engine;
static dnnl_stream_t g_stream;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_ok;

static void init_engine(void) {
    g_ok = dnnl_engine_create(&g_engine, dnnl_cpu, 0) == dnnl_success
        && dnnl_stream_create(&g_stream, g_engine, dnnl_stream_default_flags) == dnnl_success;
}

static dnnl_data_type_t dtype_of(int code) { return code == 1 ? dnnl_bf16 : dnnl_f32; }

/* post-ops: [residual (binary add of res_md, or sum)] then [activation] */
static dnnl_primitive_attr_t make_attr(int residual, const_dnnl_memory_desc_t res_md, int act) {
    dnnl_primitive_attr_t attr;
    dnnl_post_ops_t po;
    if (dnnl_primitive_attr_create(&attr) != dnnl_success) return NULL;
    dnnl_post_ops_create(&po);
    if (residual == RES_BINARY) dnnl_post_ops_append_binary(po, dnnl_binary_add, res_md);
    if (residual == RES_SUM) dnnl_post_ops_append_sum(po, 1.0f, 0, dnnl_data_type_undef);
    if (act > 0 && act < (int)(sizeof ACTS / sizeof ACTS[0]))
        dnnl_post_ops_append_eltwise(po, ACTS[act].alg, ACTS[act].alpha, ACTS[act].beta);
    dnnl_primitive_attr_set_post_ops(attr, po);
    dnnl_post_ops_destroy(po);
    return attr;
}

/* the primitive from pd, weights (if any) reordered from wsrc_md, memory objects */
static ds_kernel *finish(dnnl_primitive_desc_t pd, const_dnnl_memory_desc_t wsrc_md,
                         const void *weights, const_dnnl_memory_desc_t bias_md,
                         const void *bias, int residual) {
    ds_kernel *k = calloc(1, sizeof(ds_kernel));
    dnnl_memory_t wplain = NULL;
    dnnl_primitive_desc_t rpd = NULL;
    dnnl_primitive_t reorder = NULL;
    int ok = k != NULL;
    if (ok) {
        k->engine = g_engine;
        k->stream = g_stream;
        k->residual = residual;
        pthread_mutex_init(&k->lock, NULL);
        ok = dnnl_primitive_create(&k->prim, pd) == dnnl_success;
    }
    const_dnnl_memory_desc_t wmd = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    ok = ok && (!weights || (
        dnnl_memory_create(&k->wei, wmd, g_engine, DNNL_MEMORY_ALLOCATE) == dnnl_success
        && dnnl_memory_create(&wplain, wsrc_md, g_engine, (void *)weights) == dnnl_success
        && dnnl_reorder_primitive_desc_create(&rpd, wsrc_md, g_engine, wmd, g_engine, NULL)
               == dnnl_success
        && dnnl_primitive_create(&reorder, rpd) == dnnl_success));
    if (ok && weights) {
        dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, wplain}, {DNNL_ARG_TO, k->wei}};
        ok = dnnl_primitive_execute(reorder, g_stream, 2, args) == dnnl_success
            && dnnl_stream_wait(g_stream) == dnnl_success;
    }
    if (ok && bias) {  /* the bias is copied: the caller's tensor may go */
        ok = dnnl_memory_create(&k->bias, bias_md, g_engine, DNNL_MEMORY_ALLOCATE) == dnnl_success;
        void *h = NULL;
        if (ok) ok = dnnl_memory_get_data_handle(k->bias, &h) == dnnl_success;
        if (ok) memcpy(h, bias, dnnl_memory_desc_get_size(bias_md));
    }
    ok = ok && dnnl_memory_create(&k->src, dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0),
                                  g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && dnnl_memory_create(&k->dst, dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0),
                              g_engine, DNNL_MEMORY_NONE) == dnnl_success;
    if (ok && residual == RES_BINARY)  /* the binary post-op's operand: as the output */
        ok = dnnl_memory_create(&k->res, dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0),
                                g_engine, DNNL_MEMORY_NONE) == dnnl_success;
    if (reorder) dnnl_primitive_destroy(reorder);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (wplain) dnnl_memory_destroy(wplain);
    if (!ok && k) {
        if (k->prim) dnnl_primitive_destroy(k->prim);
        if (k->wei) dnnl_memory_destroy(k->wei);
        if (k->bias) dnnl_memory_destroy(k->bias);
        if (k->src) dnnl_memory_destroy(k->src);
        if (k->dst) dnnl_memory_destroy(k->dst);
        if (k->res) dnnl_memory_destroy(k->res);
        free(k);
        k = NULL;
    }
    return k;
}

/* The convolution of geometry p[0..17] (n, c, h, w, oc, kh, kw, sh, sw, ph0, pw0, ph1,
 * pw1, dh, dw, groups, oh, ow) from NHWC src of type st into NHWC dst of type dt, weights
 * of type wt (plain (oc, c/groups, kh, kw), reordered into the layout it chose), with
 * attr (destroyed here); NULL where oneDNN makes no primitive. */
static ds_kernel *conv_kernel(const int *p, dnnl_data_type_t st, dnnl_data_type_t wt,
                              dnnl_data_type_t dt, dnnl_primitive_attr_t attr,
                              const void *weights, const float *bias, int residual) {
    int n = p[0], c = p[1], h = p[2], w = p[3], oc = p[4], kh = p[5], kw = p[6];
    int g = p[15], oh = p[16], ow = p[17];
    dnnl_dims_t src_d = {n, c, h, w}, dst_d = {n, oc, oh, ow}, bias_d = {oc};
    dnnl_dims_t strides = {p[7], p[8]}, dil = {p[13] - 1, p[14] - 1};
    dnnl_dims_t pad_l = {p[9], p[10]}, pad_r = {p[11], p[12]};
    dnnl_memory_desc_t src_md, dst_md, wany_md, wsrc_md, bias_md;
    dnnl_memory_desc_create_with_tag(&src_md, 4, src_d, st, dnnl_nhwc);
    dnnl_memory_desc_create_with_tag(&dst_md, 4, dst_d, dt, dnnl_nhwc);
    dnnl_memory_desc_create_with_tag(&bias_md, 1, bias_d, dnnl_f32, dnnl_a);
    if (g == 1) {
        dnnl_dims_t wd = {oc, c, kh, kw};
        dnnl_memory_desc_create_with_tag(&wany_md, 4, wd, wt, dnnl_format_tag_any);
        dnnl_memory_desc_create_with_tag(&wsrc_md, 4, wd, wt, dnnl_oihw);
    } else {
        dnnl_dims_t wd = {g, oc / g, c / g, kh, kw};
        dnnl_memory_desc_create_with_tag(&wany_md, 5, wd, wt, dnnl_format_tag_any);
        dnnl_memory_desc_create_with_tag(&wsrc_md, 5, wd, wt, dnnl_goihw);
    }
    dnnl_primitive_desc_t pd = NULL;
    ds_kernel *k = NULL;
    if (attr && dnnl_convolution_forward_primitive_desc_create(
            &pd, g_engine, dnnl_forward_inference, dnnl_convolution_direct, src_md, wany_md,
            bias ? bias_md : NULL, dst_md, strides, dil, pad_l, pad_r, attr) == dnnl_success)
        k = finish(pd, wsrc_md, weights, bias_md, bias, residual);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    dnnl_memory_desc_destroy(wany_md);
    dnnl_memory_desc_destroy(wsrc_md);
    dnnl_memory_desc_destroy(bias_md);
    return k;
}

/* p: the geometry (conv_kernel's), then dtype (0 f32, 1 bf16), residual, act. weights:
 * plain (oc, c/groups, kh, kw) of dtype; bias: float32 or NULL. */
void *ds_onednn_conv_create(const int *p, const void *weights, const float *bias) {
    pthread_once(&g_once, init_engine);
    if (!g_ok) return NULL;
    dnnl_data_type_t dt = dtype_of(p[18]);
    dnnl_dims_t dst_d = {p[0], p[4], p[16], p[17]};
    dnnl_memory_desc_t dst_md;
    dnnl_memory_desc_create_with_tag(&dst_md, 4, dst_d, dt, dnnl_nhwc);
    dnnl_primitive_attr_t attr = make_attr(p[19], dst_md, p[20]);
    dnnl_memory_desc_destroy(dst_md);
    return conv_kernel(p, dt, dt, dt, attr, weights, bias, p[19]);
}

/* The GEMM of rows (mkn[0], mkn[1]) of type st times weights of type wt given in w_tag
 * order (dnnl_ab: (k, n) rows; dnnl_ba: a linear's (n, k) rows) into (m, n) of type dt,
 * bias float32 or NULL, with attr (destroyed here); NULL where oneDNN makes no primitive. */
static ds_kernel *matmul_kernel(const int *mkn, dnnl_data_type_t st, dnnl_data_type_t wt,
                                dnnl_format_tag_t w_tag, dnnl_data_type_t dt,
                                dnnl_primitive_attr_t attr, const void *weights,
                                const float *bias, int residual) {
    int m = mkn[0], kk = mkn[1], n = mkn[2];
    dnnl_dims_t a_d = {m, kk}, b_d = {kk, n}, c_d = {m, n}, bias_d = {1, n};
    dnnl_memory_desc_t a_md, b_any, b_src, c_md, bias_md;
    dnnl_memory_desc_create_with_tag(&a_md, 2, a_d, st, dnnl_ab);
    dnnl_memory_desc_create_with_tag(&b_any, 2, b_d, wt, dnnl_format_tag_any);
    dnnl_memory_desc_create_with_tag(&b_src, 2, b_d, wt, w_tag);
    dnnl_memory_desc_create_with_tag(&c_md, 2, c_d, dt, dnnl_ab);
    dnnl_memory_desc_create_with_tag(&bias_md, 2, bias_d, dnnl_f32, dnnl_ab);
    dnnl_primitive_desc_t pd = NULL;
    ds_kernel *k = NULL;
    if (attr && dnnl_matmul_primitive_desc_create(&pd, g_engine, a_md, b_any,
                                                  bias ? bias_md : NULL, c_md, attr)
                    == dnnl_success)
        k = finish(pd, b_src, weights, bias_md, bias, residual);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(a_md);
    dnnl_memory_desc_destroy(b_any);
    dnnl_memory_desc_destroy(b_src);
    dnnl_memory_desc_destroy(c_md);
    dnnl_memory_desc_destroy(bias_md);
    return k;
}

/* a 2-D (rows, cols) row-major memory descriptor of type dt (to be destroyed) */
static dnnl_memory_desc_t rows_md(int rows, int cols, dnnl_data_type_t dt) {
    dnnl_dims_t d = {rows, cols};
    dnnl_memory_desc_t md;
    dnnl_memory_desc_create_with_tag(&md, 2, d, dt, dnnl_ab);
    return md;
}

/* p: m, k, n, dtype, residual, act. Rows (m, k) times a (k, n) row-major weight into
 * (m, n); bias float32 or NULL. */
void *ds_onednn_matmul_create(const int *p, const void *weights, const float *bias) {
    pthread_once(&g_once, init_engine);
    if (!g_ok) return NULL;
    dnnl_data_type_t dt = dtype_of(p[3]);
    dnnl_memory_desc_t c_md = rows_md(p[0], p[2], dt);
    dnnl_primitive_attr_t attr = make_attr(p[4], c_md, p[5]);
    dnnl_memory_desc_destroy(c_md);
    return matmul_kernel(p, dt, dt, dnnl_ab, dt, attr, weights, bias, p[4]);
}

void ds_onednn_destroy(void *handle);

/* the execution arguments of ds_kernel.q, in order */
static const int Q_ARGS[5] = {
    DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS,
    DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC,
    DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST};

/* a memory object of n values of type dt holding a copy of values, or NULL */
static dnnl_memory_t constant(dnnl_data_type_t dt, int n, const void *values) {
    dnnl_dims_t d = {n};
    dnnl_memory_desc_t md;
    dnnl_memory_t m = NULL;
    void *h = NULL;
    dnnl_memory_desc_create_with_tag(&md, 1, d, dt, dnnl_a);
    if (dnnl_memory_create(&m, md, g_engine, DNNL_MEMORY_ALLOCATE) == dnnl_success
            && dnnl_memory_get_data_handle(m, &h) == dnnl_success)
        memcpy(h, values, dnnl_memory_desc_get_size(md));
    else if (m) {
        dnnl_memory_destroy(m);
        m = NULL;
    }
    dnnl_memory_desc_destroy(md);
    return m;
}

static dnnl_data_type_t qtype_of(int code) {
    return code == 2 ? dnnl_u8 : code == 3 ? dnnl_s8 : code == 1 ? dnnl_bf16 : dnnl_f32;
}

/* The attributes of an int8 primitive: post-ops (residual, act), the scales of the
 * source (one), the weights (mask wmask) and, for an integer dst, the destination (one),
 * the source's and an integer destination's zero points where non-zero (zps). NULL where
 * oneDNN refuses them. */
static dnnl_primitive_attr_t q_attr(int residual, const_dnnl_memory_desc_t dst_md, int act,
                                    int wmask, int int_dst, const int *zps) {
    dnnl_primitive_attr_t attr = make_attr(residual, dst_md, act);
    if (attr && !(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0) == dnnl_success
        && dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, wmask) == dnnl_success
        && (!int_dst || dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_DST, 0)
               == dnnl_success)
        && (!zps[0] || dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0)
               == dnnl_success)
        && (!zps[1] || !int_dst
            || dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_DST, 0) == dnnl_success))) {
        dnnl_primitive_attr_destroy(attr);
        attr = NULL;
    }
    return attr;
}

/* k (made with q_attr's attributes) given its scale and zero-point memories: scales holds
 * the source's, the destination's, then nw of the weights'; destroys k and returns NULL
 * where one cannot be made */
static ds_kernel *q_constants(ds_kernel *k, const float *scales, int nw, int int_dst,
                              const int *zps) {
    if (!k) return NULL;
    k->q[0] = constant(dnnl_f32, 1, &scales[0]);
    k->q[1] = constant(dnnl_f32, nw, &scales[2]);
    if (int_dst) k->q[2] = constant(dnnl_f32, 1, &scales[1]);
    if (zps[0]) k->q[3] = constant(dnnl_s32, 1, &zps[0]);
    if (zps[1] && int_dst) k->q[4] = constant(dnnl_s32, 1, &zps[1]);
    if (!k->q[0] || !k->q[1] || (int_dst && !k->q[2]) || (zps[0] && !k->q[3])
            || (zps[1] && int_dst && !k->q[4])) {
        ds_onednn_destroy(k);
        return NULL;
    }
    return k;
}

/* An int8 convolution: p: the geometry (conv_kernel's, one group), then src type (2 u8,
 * 3 s8), dst type (0 f32, 1 bf16, 2 u8, 3 s8), act, per-channel weight scales (0/1), src
 * zero point, dst zero point, residual (RES_*, for a float dst). weights: plain int8
 * (oc, c, kh, kw); bias float32 or NULL; scales: the src scale, the dst scale, then the
 * weights' (oc or 1). dst = act(src_scale * w_scale[o] * sum((src - src_zp) * w) + bias[o]
 * [+ residual]), for an integer dst then round(dst / dst_scale) + dst_zp, saturated. */
void *ds_onednn_qconv_create(const int *p, const void *weights, const float *bias,
                             const float *scales) {
    pthread_once(&g_once, init_engine);
    if (!g_ok || p[15] != 1) return NULL;
    int oc = p[4], act = p[20], per_channel = p[21], residual = p[24];
    int zps[2] = {p[22], p[23]};
    dnnl_data_type_t st = qtype_of(p[18]), dt = qtype_of(p[19]);
    int int_dst = dt == dnnl_u8 || dt == dnnl_s8;
    if (residual != RES_NONE && int_dst) return NULL;
    dnnl_dims_t dst_d = {p[0], oc, p[16], p[17]};
    dnnl_memory_desc_t dst_md;
    dnnl_memory_desc_create_with_tag(&dst_md, 4, dst_d, dt, dnnl_nhwc);
    dnnl_primitive_attr_t attr = q_attr(residual, dst_md, act, per_channel ? 1 : 0, int_dst,
                                        zps);
    dnnl_memory_desc_destroy(dst_md);
    ds_kernel *k = conv_kernel(p, st, dnnl_s8, dt, attr, weights, bias, residual);
    return q_constants(k, scales, per_channel ? oc : 1, int_dst, zps);
}

/* An int8 GEMM, a linear layer's: p: m, k, n, src type (2 u8, 3 s8), dst type (0 f32,
 * 1 bf16, 2 u8, 3 s8), act, per-channel weight scales (0/1), src zero point, dst zero
 * point. Rows (m, k) times an int8 (n, k) row-major weight; bias float32 or NULL; scales
 * and the result as ds_onednn_qconv_create's, per output column n. */
void *ds_onednn_qmatmul_create(const int *p, const void *weights, const float *bias,
                               const float *scales) {
    pthread_once(&g_once, init_engine);
    if (!g_ok) return NULL;
    int n = p[2], act = p[5], per_channel = p[6];
    int zps[2] = {p[7], p[8]};
    dnnl_data_type_t st = qtype_of(p[3]), dt = qtype_of(p[4]);
    int int_dst = dt == dnnl_u8 || dt == dnnl_s8;
    dnnl_memory_desc_t c_md = rows_md(p[0], n, dt);
    dnnl_primitive_attr_t attr = q_attr(RES_NONE, c_md, act, per_channel ? 2 : 0, int_dst,
                                        zps);
    dnnl_memory_desc_destroy(c_md);
    ds_kernel *k = matmul_kernel(p, st, dnnl_s8, dnnl_ba, dt, attr, weights, bias, RES_NONE);
    return q_constants(k, scales, per_channel ? n : 1, int_dst, zps);
}

/* p: n, c, h, w, kh, kw, sh, sw, ph0, pw0, ph1, pw1, dh, dw, oh, ow, dtype, alg (0 max:
 * padded positions never win; 1 average over the window's positions inside the input;
 * 2 average counting padded positions as zeros). Pooling of NHWC memory. */
void *ds_onednn_pool_create(const int *p) {
    static const dnnl_alg_kind_t ALGS[] = {dnnl_pooling_max, dnnl_pooling_avg_exclude_padding,
                                           dnnl_pooling_avg_include_padding};
    pthread_once(&g_once, init_engine);
    if (!g_ok || p[17] < 0 || p[17] > 2) return NULL;
    dnnl_data_type_t dt = dtype_of(p[16]);
    dnnl_dims_t src_d = {p[0], p[1], p[2], p[3]}, dst_d = {p[0], p[1], p[14], p[15]};
    dnnl_dims_t kernel = {p[4], p[5]}, strides = {p[6], p[7]}, dil = {p[12] - 1, p[13] - 1};
    dnnl_dims_t pad_l = {p[8], p[9]}, pad_r = {p[10], p[11]};
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_memory_desc_create_with_tag(&src_md, 4, src_d, dt, dnnl_nhwc);
    dnnl_memory_desc_create_with_tag(&dst_md, 4, dst_d, dt, dnnl_nhwc);
    dnnl_primitive_desc_t pd = NULL;
    ds_kernel *k = NULL;
    if (dnnl_pooling_forward_primitive_desc_create(
            &pd, g_engine, dnnl_forward_inference, ALGS[p[17]], src_md, dst_md, strides,
            kernel, dil, pad_l, pad_r, NULL) == dnnl_success)
        k = finish(pd, NULL, NULL, NULL, NULL, RES_NONE);
    if (pd) dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    return k;
}

/* p: n, c, h, w, src dtype, dst dtype. An NCHW tensor copied into NHWC memory, converting
 * its dtype on the way (one pass where .to(dtype) then .contiguous(channels_last) is two). */
void *ds_onednn_reorder_create(const int *p) {
    pthread_once(&g_once, init_engine);
    if (!g_ok) return NULL;
    dnnl_dims_t d = {p[0], p[1], p[2], p[3]};
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_memory_desc_create_with_tag(&src_md, 4, d, dtype_of(p[4]), dnnl_nchw);
    dnnl_memory_desc_create_with_tag(&dst_md, 4, d, dtype_of(p[5]), dnnl_nhwc);
    dnnl_primitive_desc_t pd = NULL;
    ds_kernel *k = NULL;
    if (dnnl_reorder_primitive_desc_create(&pd, src_md, g_engine, dst_md, g_engine, NULL)
            == dnnl_success)
        k = finish(pd, NULL, NULL, NULL, NULL, RES_NONE);
    if (pd) dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    return k;
}

/* dst = act(op(src) [+ res]); with RES_SUM, dst holds the residual on entry. 0 on success */
int ds_onednn_run(void *handle, void *src, void *dst, void *res) {
    ds_kernel *k = handle;
    dnnl_exec_arg_t args[10];
    int n = 0, st;
    pthread_mutex_lock(&k->lock);
    dnnl_memory_set_data_handle(k->src, src);
    dnnl_memory_set_data_handle(k->dst, dst);
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_SRC, k->src};
    if (k->wei) args[n++] = (dnnl_exec_arg_t){DNNL_ARG_WEIGHTS, k->wei};
    args[n++] = (dnnl_exec_arg_t){DNNL_ARG_DST, k->dst};
    if (k->bias) args[n++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, k->bias};
    if (k->residual == RES_BINARY) {
        dnnl_memory_set_data_handle(k->res, res);
        args[n++] = (dnnl_exec_arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, k->res};
    }
    for (int i = 0; i < 5; i++)
        if (k->q[i]) args[n++] = (dnnl_exec_arg_t){Q_ARGS[i], k->q[i]};
    st = dnnl_primitive_execute(k->prim, k->stream, n, args);
    if (st == dnnl_success) st = dnnl_stream_wait(k->stream);
    pthread_mutex_unlock(&k->lock);
    return st;
}

/* Runs n kernels in order, one call for a chain of them (no interpreter between), kernel
 * i through runs[i] (the ds_onednn_run of the library that made it). Step
 * i's source, destination and residual are each two int64s in refs[6i..6i+5]: a base
 * (0 = arena, 1 + j = bases[1 + j], -1 = none) and a byte offset from it. 0 on success,
 * else the failing step's status. */
typedef int (*ds_run_fn)(void *, void *, void *, void *);
int ds_onednn_run_chain(int n, void *const *handles, void *const *runs,
                        const long long *refs, char *const *bases) {
    for (int i = 0; i < n; i++) {
        const long long *r = refs + 6 * i;
        void *p[3];
        for (int j = 0; j < 3; j++)
            p[j] = r[2 * j] < 0 ? NULL : bases[r[2 * j]] + r[2 * j + 1];
        int st = ((ds_run_fn)runs[i])(handles[i], p[0], p[1], p[2]);
        if (st) return st;
    }
    return 0;
}

void ds_onednn_destroy(void *handle) {
    ds_kernel *k = handle;
    if (!k) return;
    dnnl_primitive_destroy(k->prim);
    if (k->wei) dnnl_memory_destroy(k->wei);
    if (k->bias) dnnl_memory_destroy(k->bias);
    dnnl_memory_destroy(k->src);
    dnnl_memory_destroy(k->dst);
    if (k->res) dnnl_memory_destroy(k->res);
    for (int i = 0; i < 5; i++)
        if (k->q[i]) dnnl_memory_destroy(k->q[i]);
    pthread_mutex_destroy(&k->lock);
    free(k);
}

/* Attention, softmax(scale * q @ k^T + mask) @ v, as three primitives made once: a batched
 * matmul whose post-ops scale the scores and add the mask, a softmax over the last axis,
 * and a batched matmul into the output. q, k, v and the output are 4-D (batch, heads,
 * rows, head dim) with any strides, so they are read where a projection wrote them (k
 * read transposed) and the output is written where the next GEMM reads it. The scores
 * are float32 (for bf16 operands the softmax writes its probabilities in bf16 after
 * them), in scratch memory the caller passes per call: b * h * sq * sk float32s, and
 * for bf16 as many bf16 values after them. */
typedef struct {
    dnnl_primitive_t mm1, sm, mm2;
    dnnl_memory_t q, kt, v, o, mask, s, p;
    size_t p_offset;
    pthread_mutex_t lock;
} ds_attention;

static dnnl_memory_desc_t strided_md(const int *dims, const int *strides, dnnl_data_type_t dt) {
    dnnl_dims_t d = {dims[0], dims[1], dims[2], dims[3]};
    dnnl_dims_t st = {strides[0], strides[1], strides[2], strides[3]};
    dnnl_memory_desc_t md;
    dnnl_memory_desc_create_with_strides(&md, 4, d, dt, st);
    return md;
}

void ds_onednn_attention_destroy(void *handle);

/* p: b, h, sq, sk, d, dtype, mask dtype (-1: no mask), then the strides (in elements) of
 * q (b, h, sq, d), k (b, h, sk, d), v (b, h, sk, d), o (b, h, sq, d), then the mask's
 * dims and strides (broadcast to (b, h, sq, sk)); scale: the scores' factor. */
void *ds_onednn_attention_create(const int *p, float scale) {
    pthread_once(&g_once, init_engine);
    if (!g_ok) return NULL;
    int b = p[0], h = p[1], sq = p[2], sk = p[3], d = p[4], has_mask = p[6] >= 0;
    dnnl_data_type_t dt = dtype_of(p[5]);
    const int *qs = p + 7, *ks = p + 11, *vs = p + 15, *os = p + 19, *mdims = p + 23,
              *mstr = p + 27;
    int qd[4] = {b, h, sq, d}, ktd[4] = {b, h, d, sk}, vd[4] = {b, h, sk, d},
        sd[4] = {b, h, sq, sk};
    int kts[4] = {ks[0], ks[1], ks[3], ks[2]};
    int ss[4] = {h * sq * sk, sq * sk, sk, 1};
    dnnl_memory_desc_t q_md = strided_md(qd, qs, dt), kt_md = strided_md(ktd, kts, dt),
                       v_md = strided_md(vd, vs, dt), o_md = strided_md(qd, os, dt),
                       s_md = strided_md(sd, ss, dnnl_f32), p_md = strided_md(sd, ss, dt),
                       m_md = has_mask ? strided_md(mdims, mstr, dtype_of(p[6])) : NULL;
    ds_attention *a = calloc(1, sizeof(ds_attention));
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd1 = NULL, pds = NULL, pd2 = NULL;
    if (a) {
        pthread_mutex_init(&a->lock, NULL);
        a->p_offset = dt == dnnl_f32 ? 0 : dnnl_memory_desc_get_size(s_md);
    }
    int ok = a != NULL && dnnl_primitive_attr_create(&attr) == dnnl_success
        && dnnl_post_ops_create(&po) == dnnl_success
        && dnnl_post_ops_append_eltwise(po, dnnl_eltwise_linear, scale, 0.f) == dnnl_success
        && (!has_mask || dnnl_post_ops_append_binary(po, dnnl_binary_add, m_md) == dnnl_success)
        && dnnl_primitive_attr_set_post_ops(attr, po) == dnnl_success
        && dnnl_matmul_primitive_desc_create(&pd1, g_engine, q_md, kt_md, NULL, s_md, attr)
               == dnnl_success
        && dnnl_softmax_forward_primitive_desc_create(&pds, g_engine, dnnl_forward_inference,
                                                      dnnl_softmax_accurate, s_md, p_md, 3,
                                                      NULL) == dnnl_success
        && dnnl_matmul_primitive_desc_create(&pd2, g_engine, p_md, v_md, NULL, o_md, NULL)
               == dnnl_success
        && dnnl_primitive_create(&a->mm1, pd1) == dnnl_success
        && dnnl_primitive_create(&a->sm, pds) == dnnl_success
        && dnnl_primitive_create(&a->mm2, pd2) == dnnl_success
        && dnnl_memory_create(&a->q, q_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && dnnl_memory_create(&a->kt, kt_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && dnnl_memory_create(&a->v, v_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && dnnl_memory_create(&a->o, o_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && dnnl_memory_create(&a->s, s_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && dnnl_memory_create(&a->p, p_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success
        && (!has_mask
            || dnnl_memory_create(&a->mask, m_md, g_engine, DNNL_MEMORY_NONE) == dnnl_success);
    if (pd1) dnnl_primitive_desc_destroy(pd1);
    if (pds) dnnl_primitive_desc_destroy(pds);
    if (pd2) dnnl_primitive_desc_destroy(pd2);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_t mds[7] = {q_md, kt_md, v_md, o_md, s_md, p_md, m_md};
    for (int i = 0; i < 7; i++)
        if (mds[i]) dnnl_memory_desc_destroy(mds[i]);
    if (!ok) {
        ds_onednn_attention_destroy(a);
        a = NULL;
    }
    return a;
}

/* o = attention(q, k, v, mask) (mask ignored where made without one), the scores in
 * scratch; 0 on success */
int ds_onednn_attention_run(void *handle, void *q, void *k, void *v, void *mask, void *o,
                            char *scratch) {
    ds_attention *a = handle;
    int st;
    pthread_mutex_lock(&a->lock);
    dnnl_memory_set_data_handle(a->q, q);
    dnnl_memory_set_data_handle(a->kt, k);
    dnnl_memory_set_data_handle(a->v, v);
    dnnl_memory_set_data_handle(a->o, o);
    dnnl_memory_set_data_handle(a->s, scratch);
    dnnl_memory_set_data_handle(a->p, scratch + a->p_offset);
    if (a->mask) dnnl_memory_set_data_handle(a->mask, mask);
    dnnl_exec_arg_t a1[4] = {{DNNL_ARG_SRC, a->q}, {DNNL_ARG_WEIGHTS, a->kt},
                             {DNNL_ARG_DST, a->s},
                             {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, a->mask}};
    dnnl_exec_arg_t as[2] = {{DNNL_ARG_SRC, a->s}, {DNNL_ARG_DST, a->p}};
    dnnl_exec_arg_t a2[3] = {{DNNL_ARG_SRC, a->p}, {DNNL_ARG_WEIGHTS, a->v},
                             {DNNL_ARG_DST, a->o}};
    st = dnnl_primitive_execute(a->mm1, g_stream, a->mask ? 4 : 3, a1);
    if (st == dnnl_success) st = dnnl_primitive_execute(a->sm, g_stream, 2, as);
    if (st == dnnl_success) st = dnnl_primitive_execute(a->mm2, g_stream, 3, a2);
    if (st == dnnl_success) st = dnnl_stream_wait(g_stream);
    pthread_mutex_unlock(&a->lock);
    return st;
}

void ds_onednn_attention_destroy(void *handle) {
    ds_attention *a = handle;
    if (!a) return;
    dnnl_primitive_t prims[3] = {a->mm1, a->sm, a->mm2};
    dnnl_memory_t mems[7] = {a->q, a->kt, a->v, a->o, a->mask, a->s, a->p};
    for (int i = 0; i < 3; i++)
        if (prims[i]) dnnl_primitive_destroy(prims[i]);
    for (int i = 0; i < 7; i++)
        if (mems[i]) dnnl_memory_destroy(mems[i]);
    pthread_mutex_destroy(&a->lock);
    free(a);
}
