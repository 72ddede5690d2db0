/* inferscope's hot path in C.
 *
 *   Ring      the record ring (ringcore.h) as a Python object, with drain() into a numpy buffer
 *   Runtime   the clocks, the ring, the counter set and the per-context frames
 *   Tracked   a sync callable wrapper for @track_inference (vectorcall, method descriptor)
 *   Stage     `with stage("x")`: one shared object per name; its state lives in the frame
 *   fold_records   the drainer's fold of a drained batch into per-series histograms (fold.h)
 *   Collector      the native drainer: a thread that drains the ring and folds without the GIL
 *                  (collector.h)
 *
 * The hot path (Tracked.__call__, Stage.__enter__/__exit__) reads clocks, pushes onto a fixed
 * stack in the current frame, and pushes one fixed-size record into the ring. It never takes a
 * lock, never formats a string, never calls OTel, and never raises into user code: internal
 * failures are counted in Runtime.internal_errors. Python objects are only touched with the GIL
 * held; the ring itself does not rely on the GIL (see ringcore.h).
 *
 * Frames. A frame is a small stack of open entries, one frame per contextvars.Context, held in a
 * ContextVar. It is reused for every later inference in that context, so the steady state does no
 * ContextVar.set. A frame holds a reference to the Context that owns it: an asyncio task inherits
 * its parent's frame through the copied context, sees that it does not own it, and starts its own
 * frame rooted at the innermost entry the parent had open when it copied the context.
 *
 * That is the contextvars meaning, the same as the pure-Python backend's: a task belongs to what
 * was open when it was created, whatever its parent does afterwards. A frame is therefore copied on
 * write: before the owner changes its frame while a copy of its context exists (the context's
 * variable mapping is then shared, its reference count above one), the owner moves to a clone of
 * the frame and leaves the old one, frozen, to the copies. Without copies, nothing is cloned. See
 * docs/architecture.md.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sys/random.h>
#include <time.h>

#include "collector.h"
#include "counters.h"
#include "fold.h"
#include "ringcore.h"
#include "share.h"

#define MAX_STACK_DEPTH 32
#define MAX_STAGE_NAME_LENGTH 256 /* as in _records.py */
#define NO_MODEL_KEY 0
#define STAGE_CACHE_LIMIT 10000
#define FLAG_ABANDONED 1
#define FLAG_TRACED 2
#define FLAG_SAMPLED 4
#define FLAG_PARENT_REMOTE 8

static inline int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The stage CPU sample (docs/counters.md): a stage entry reads the thread CPU clock (a system call
 * on many VMs, ~400-1,000 ns for the pair) while its key's entries come on average at least
 * STAGE_CPU_EXACT_GAP_NS apart, else on one entry in cpu_sample_every, at random. The average is
 * over the key's last STAGE_CPU_GAP_WEIGHT entries or so (an exponential moving average), each gap
 * counted up to STAGE_CPU_GAP_CAP_NS: it follows the key's rate, never one call's pause, so the
 * calls read of a busy key are a random sample of its calls, never the calls that came after a
 * stall (which are slower than the rest). Inferences always read it. Must match _records.py. The
 * coarse clock (a few ns, no system call) is precise enough for a mean gap of 10 ms. */
#define STAGE_CPU_SAMPLE_EVERY 64
#define STAGE_CPU_EXACT_GAP_NS 10000000LL
#define STAGE_CPU_GAP_CAP_NS (4 * STAGE_CPU_EXACT_GAP_NS)
#define STAGE_CPU_GAP_WEIGHT 16

typedef struct {
    int64_t last_ns;     /* coarse time of the key's last stage entry */
    int64_t mean_gap_ns; /* moving average of the gaps between its entries */
} stage_gap;

static inline int64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A per-thread xorshift, separate from the RSS sampler's so that the two samples are independent. */
static __thread uint32_t cpu_sample_state;

static inline uint32_t cpu_sample_next(void)
{
    uint32_t x = cpu_sample_state;
    if (x == 0) {
        x = (uint32_t)(uintptr_t)&cpu_sample_state ^ 0x85ebca6bu;
    }
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    cpu_sample_state = x;
    return x;
}

/* ------------------------------------------------------------------------------------------ */
/* Ring                                                                                       */

typedef struct {
    PyObject_HEAD
    inferscope_ring *core; /* separately allocated so its 64-byte alignment holds */
} RingObject;

static PyTypeObject Ring_Type;

static int Ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:Ring", kwlist, &capacity)) {
        return -1;
    }
    if (capacity < 2 || capacity > (1LL << 26) || (capacity & (capacity - 1)) != 0) {
        PyErr_Format(PyExc_ValueError, "Ring capacity must be a power of two from 2 to %lld, got %zd",
                     1LL << 26, capacity);
        return -1;
    }
    if (self->core != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is already initialised");
        return -1;
    }
    inferscope_ring *core = aligned_alloc(64, sizeof(inferscope_ring));
    if (core == NULL || !inferscope_ring_init(core, (uint64_t)capacity)) {
        free(core);
        PyErr_NoMemory();
        return -1;
    }
    self->core = core;
    return 0;
}

static void Ring_dealloc(RingObject *self)
{
    if (self->core != NULL) {
        inferscope_ring_free(self->core);
        free(self->core);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ring_ready(RingObject *self)
{
    if (self->core == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring was not initialised");
        return 0;
    }
    return 1;
}

static PyObject *Ring_push(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!ring_ready(self)) {
        return NULL;
    }
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "push(key, error, flags, start_ns, wall_ns, cpu_ns) takes 6 arguments");
        return NULL;
    }
    inferscope_record rec = {0};
    unsigned long key = PyLong_AsUnsignedLong(args[0]);
    unsigned long error = PyLong_AsUnsignedLong(args[1]);
    unsigned long flags = PyLong_AsUnsignedLong(args[2]);
    rec.start_ns = PyLong_AsLongLong(args[3]);
    rec.wall_ns = PyLong_AsLongLong(args[4]);
    rec.cpu_ns = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (key > UINT32_MAX || error > UINT16_MAX || flags > UINT16_MAX) {
        PyErr_SetString(PyExc_OverflowError, "key must fit 32 bits, error and flags 16 bits");
        return NULL;
    }
    rec.key = (uint32_t)key;
    rec.error = (uint16_t)error;
    rec.flags = (uint16_t)flags;
    return PyBool_FromLong(inferscope_ring_push(self->core, &rec));
}

/* push_records(records) -> int: push each record of a RECORD_DTYPE array whole (counters and trace
 * linkage included), as the hot path would; returns how many the ring took. */
static PyObject *Ring_push_records(RingObject *self, PyObject *records)
{
    if (!ring_ready(self)) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(records, &view, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (view.ndim != 1 || view.itemsize != (Py_ssize_t)sizeof(inferscope_record) ||
        (uintptr_t)view.buf % _Alignof(inferscope_record) != 0) {
        PyErr_Format(PyExc_TypeError,
                     "push_records: records must be a 1-D contiguous, %zu-byte aligned array of RECORD_DTYPE "
                     "(%zu-byte records), got %d dimension(s) of %zd-byte items",
                     _Alignof(inferscope_record), sizeof(inferscope_record), view.ndim, view.itemsize);
        PyBuffer_Release(&view);
        return NULL;
    }
    const inferscope_record *recs = view.buf;
    size_t count = (size_t)view.len / sizeof(inferscope_record), pushed = 0;
    for (size_t i = 0; i < count; i++) {
        pushed += (size_t)inferscope_ring_push(self->core, &recs[i]);
    }
    PyBuffer_Release(&view);
    return PyLong_FromSize_t(pushed);
}

static PyObject *Ring_drain(RingObject *self, PyObject *out)
{
    if (!ring_ready(self)) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(out, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    size_t max = (size_t)view.len / sizeof(inferscope_record);
    /* The GIL is kept on purpose: the copy takes tens of microseconds, while giving the GIL up
     * would let busy serving threads keep it for a whole switch interval (5 ms) each before the
     * drainer gets it back, which starves the drainer exactly when the ring fills fastest. */
    size_t n = inferscope_ring_drain(self->core, (inferscope_record *)view.buf, max);
    PyBuffer_Release(&view);
    return PyLong_FromSize_t(n);
}

static PyObject *Ring_reset(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!ring_ready(self)) {
        return NULL;
    }
    inferscope_ring_clear(self->core);
    Py_RETURN_NONE;
}

static Py_ssize_t Ring_len(RingObject *self)
{
    if (!ring_ready(self)) {
        return -1;
    }
    return (Py_ssize_t)inferscope_ring_len(self->core);
}

static PyObject *Ring_get_capacity(RingObject *self, void *closure)
{
    if (!ring_ready(self)) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(self->core->mask + 1);
}

static PyObject *Ring_get_dropped(RingObject *self, void *closure)
{
    if (!ring_ready(self)) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&self->core->dropped, memory_order_relaxed));
}

static PyObject *Ring_get_wake_fd(RingObject *self, void *closure)
{
    if (!ring_ready(self)) {
        return NULL;
    }
    return PyLong_FromLong(atomic_load_explicit(&self->core->wake_fd, memory_order_relaxed));
}

static int Ring_set_wake_fd(RingObject *self, PyObject *value, void *closure)
{
    if (!ring_ready(self)) {
        return -1;
    }
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "wake_fd cannot be deleted (set it to -1)");
        return -1;
    }
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fd < -1 || fd > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "wake_fd must be a file descriptor or -1, got %ld", fd);
        return -1;
    }
    atomic_store_explicit(&self->core->wake_sent, 0, memory_order_relaxed);
    atomic_store_explicit(&self->core->wake_fd, (int)fd, memory_order_relaxed);
    return 0;
}

static PyMethodDef Ring_methods[] = {
    {"push", (PyCFunction)(void (*)(void))Ring_push, METH_FASTCALL,
     "push(key, error, flags, start_ns, wall_ns, cpu_ns) -> bool: queue one record; False if full"},
    {"push_records", (PyCFunction)Ring_push_records, METH_O,
     "push_records(records) -> int: queue each record of a RECORD_DTYPE array whole; how many fit"},
    {"drain", (PyCFunction)Ring_drain, METH_O,
     "drain(out) -> int: move up to len(out) records into a writable RECORD_DTYPE buffer"},
    {"reset", (PyCFunction)Ring_reset, METH_NOARGS, "reset(): discard every record and zero the drop count"},
    {NULL}};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "slots in the ring", NULL},
    {"dropped", (getter)Ring_get_dropped, NULL, "records dropped because the ring was full", NULL},
    {"wake_fd", (getter)Ring_get_wake_fd, (setter)Ring_set_wake_fd,
     "a non-blocking pipe's write end: one byte is written to it once the ring is half full (-1: none)",
     NULL},
    {NULL}};

static PySequenceMethods Ring_as_sequence = {.sq_length = (lenfunc)Ring_len};

static PyTypeObject Ring_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "inferscope._native.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(capacity): bounded multi-producer ring of fixed-size records.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_as_sequence = &Ring_as_sequence,
};

/* ------------------------------------------------------------------------------------------ */
/* Frame                                                                                      */

/* An entry's place in a trace, assigned when it opens while tracing is on. flags == 0: untraced. */
typedef struct {
    uint64_t trace_hi;
    uint64_t trace_lo;
    uint64_t span_id;
    uint64_t parent_id;
    uint64_t root_id;
    uintptr_t otel_ctx; /* identity of the OTel context current when it opened; never dereferenced */
    uint16_t flags;     /* FLAG_TRACED | FLAG_SAMPLED | FLAG_PARENT_REMOTE */
} TraceIds;

typedef struct {
    PyObject *owner; /* borrowed, identity only: the Tracked, Stage or Python owner that pushed it */
    uint32_t key;
    int mask; /* the counter set in force when it opened */
    int64_t start_ns;
    int64_t cpu_ns;
    int64_t counters[INFERSCOPE_COUNTER_SLOTS];
    TraceIds trace;
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *context; /* the owning contextvars.Context (a strong reference, so never reused) */
    uint64_t generation;
    uint32_t root_key;
    int depth;
    int overflow; /* entries that did not fit; their exits are absorbed */
    TraceIds base; /* the trace position inherited from the frame this one was rooted in */
    Entry stack[MAX_STACK_DEPTH];
} FrameObject;

static PyTypeObject Frame_Type;

/* ------------------------------------------------------------------------------------------ */
/* Runtime                                                                                    */

typedef struct {
    PyObject_HEAD
    RingObject *ring;
    PyObject *registry;  /* has stage_key(parent, name) -> int and error_id(type) -> int */
    PyObject *var;       /* ContextVar holding this runtime's frame */
    PyObject *stages;    /* name -> Stage */
    PyObject *decorate;  /* Python callable: decorate(stage, func) for @stage("x") */
    PyObject *heap_reader; /* Python callable -> traced bytes, for COUNTER_PY_HEAP */
    PyObject *cuda_reader; /* Python callable(start) -> (allocated, peak) or None, for COUNTER_CUDA_MEMORY */
    PyObject *device_stage; /* Python callable(stage, device) -> a stage timed on that device */
    int counters;
    int enabled;
    PyObject *trace_var;  /* OTel's current-context ContextVar while tracing is on, else NULL */
    PyObject *span_key;   /* OTel's context key of the current span */
    uint64_t ratio_bound; /* a root is sampled at entry when trace_lo < ratio_bound (UINT64_MAX: all) */
    int parent_based;     /* a parent's sampled flag decides instead of the ratio */
    uint64_t generation; /* bumped at fork: entries opened before it are never recorded */
    uint64_t epoch;      /* bumped when the registry changes: stage caches are dropped */
    uint64_t depth_dropped;
    uint64_t internal_errors;
    long cpu_sample_every;   /* 1: every stage entry reads the thread CPU clock */
    uint32_t cpu_sample_below; /* UINT32_MAX / cpu_sample_every: a draw below it reads (no division) */
    stage_gap *stage_gaps;   /* per key: when its stage was last entered, and its mean gap */
    uint32_t stage_entry_len;
} RuntimeObject;

static PyTypeObject Runtime_Type;

static FrameObject *new_frame(RuntimeObject *rt, uint32_t root_key)
{
    FrameObject *f = PyObject_GC_New(FrameObject, &Frame_Type);
    if (f == NULL) {
        return NULL;
    }
    f->context = NULL;
    f->generation = rt->generation;
    f->root_key = root_key;
    f->depth = 0;
    f->overflow = 0;
    memset(&f->base, 0, sizeof(TraceIds));
    PyObject_GC_Track(f);
    return f;
}

/* A frame and the Context it lives in refer to each other; the collector breaks the cycle. */
static int Frame_traverse(FrameObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->context);
    return 0;
}

static int Frame_clear(FrameObject *self)
{
    Py_CLEAR(self->context);
    return 0;
}

static void Frame_dealloc(FrameObject *self)
{
    PyObject_GC_UnTrack(self);
    Frame_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The start of a contextvars.Context, as CPython 3.8 to 3.13 lay it out (pycore_context.h), to
 * read whether its variable mapping is shared with a copy. context_layout_known says whether the
 * layout was confirmed when the module loaded; when it was not, every change copies the frame. */
typedef struct {
    PyObject_HEAD
    PyObject *ctx_prev;
    PyObject *ctx_vars;
} ContextLayout;

static int context_layout_known;

static int check_context_layout(void)
{
    PyObject *probe = PyContext_New();
    if (probe == NULL) {
        return -1;
    }
    PyObject *vars = ((ContextLayout *)probe)->ctx_vars;
    context_layout_known = vars != NULL && strcmp(Py_TYPE(vars)->tp_name, "hamt") == 0;
    Py_DECREF(probe);
    return 0;
}

/* Whether a copy of `context` (an asyncio task's, copy_context()) shares its variables now. */
static inline int context_is_shared(PyObject *context)
{
    return !context_layout_known || Py_REFCNT(((ContextLayout *)context)->ctx_vars) > 1;
}

static inline uint32_t frame_top_key(FrameObject *f)
{
    return f->depth > 0 ? f->stack[f->depth - 1].key : f->root_key;
}

/* The trace position of the innermost open entry, or the inherited one when none is open. */
static inline const TraceIds *frame_top_trace(FrameObject *f)
{
    return f->depth > 0 ? &f->stack[f->depth - 1].trace : &f->base;
}

/* Installs `f` as the frame of the current context. */
static int install_frame(RuntimeObject *rt, FrameObject *f)
{
    PyObject *token = PyContextVar_Set(rt->var, (PyObject *)f);
    if (token == NULL) {
        return -1;
    }
    Py_DECREF(token);
    /* Setting a variable makes sure the thread has a current context. */
    Py_XSETREF(f->context, Py_XNewRef(PyThreadState_Get()->context));
    return 0;
}

/* Moves the current context to a clone of its frame `f` (which it owns), leaving `f` unchanged
 * for the copies of the context that share it. Returns the clone, a new reference; NULL with an
 * exception set on failure. */
static FrameObject *unshare_frame(RuntimeObject *rt, FrameObject *f)
{
    FrameObject *clone = new_frame(rt, f->root_key);
    if (clone == NULL) {
        return NULL;
    }
    clone->generation = f->generation;
    clone->depth = f->depth;
    clone->overflow = f->overflow;
    clone->base = f->base;
    memcpy(clone->stack, f->stack, (size_t)f->depth * sizeof(Entry));
    if (install_frame(rt, clone) < 0) {
        Py_DECREF(clone);
        return NULL;
    }
    return clone;
}

/* The frame of the current context, as a new reference; creates one on first use. NULL with an
 * exception set on failure. */
static FrameObject *current_frame(RuntimeObject *rt)
{
    PyObject *value = NULL;
    if (PyContextVar_Get(rt->var, NULL, &value) < 0) {
        return NULL;
    }
    uint32_t root = NO_MODEL_KEY;
    TraceIds base = {0};
    if (value != NULL) {
        FrameObject *f = (FrameObject *)value;
        if (Py_IS_TYPE(value, &Frame_Type) && f->generation == rt->generation) {
            PyObject *context = PyThreadState_Get()->context;
            if (f->context == context) {
                if (!context_is_shared(context)) {
                    return f;
                }
                /* A copy of this context sees `f` as it is now: change a clone instead. */
                FrameObject *clone = unshare_frame(rt, f);
                Py_DECREF(value);
                return clone;
            }
            /* Inherited through a copied context (an asyncio task, Context.run in a thread):
             * `f` is what the parent had open when the context was copied. */
            root = frame_top_key(f);
            base = *frame_top_trace(f);
        }
        Py_DECREF(value);
    }
    FrameObject *f = new_frame(rt, root);
    if (f == NULL) {
        return NULL;
    }
    f->base = base;
    if (install_frame(rt, f) < 0) {
        Py_DECREF(f);
        return NULL;
    }
    return f;
}

static void count_internal_error(RuntimeObject *rt)
{
    rt->internal_errors++;
    PyErr_Clear();
}

/* Bytes traced by tracemalloc now, through the Python callable the runtime was given; 0 when
 * there is none or it fails (counted). Only called when COUNTER_PY_HEAP is on. */
static int64_t py_heap_bytes(RuntimeObject *rt)
{
    if (rt->heap_reader == NULL || rt->heap_reader == Py_None) {
        return 0;
    }
    PyObject *value = PyObject_CallNoArgs(rt->heap_reader);
    if (value == NULL) {
        rt->internal_errors++;
        PyErr_Clear();
        return 0;
    }
    long long bytes = PyLong_AsLongLong(value);
    Py_DECREF(value);
    if (bytes == -1 && PyErr_Occurred()) {
        rt->internal_errors++;
        PyErr_Clear();
        return 0;
    }
    return bytes;
}

/* The CUDA allocator's (allocated, peak) bytes now, through the Python callable the runtime was
 * given; at the start of an inference (`start`) it also resets the peak. 0 when CUDA is not in use
 * (the callable returned None) or the read failed (counted). Only called when COUNTER_CUDA_MEMORY
 * is on, and only around inferences. */
static int cuda_memory_read(RuntimeObject *rt, int start, int64_t *allocated, int64_t *peak)
{
    if (rt->cuda_reader == NULL || rt->cuda_reader == Py_None) {
        return 0;
    }
    PyObject *value = PyObject_CallOneArg(rt->cuda_reader, start ? Py_True : Py_False);
    if (value == NULL) {
        count_internal_error(rt);
        return 0;
    }
    int found = 0;
    if (PyTuple_Check(value) && PyTuple_GET_SIZE(value) == 2) {
        long long a = PyLong_AsLongLong(PyTuple_GET_ITEM(value, 0));
        long long p = PyLong_AsLongLong(PyTuple_GET_ITEM(value, 1));
        if (PyErr_Occurred()) {
            count_internal_error(rt);
        }
        else {
            *allocated = a;
            *peak = p;
            found = 1;
        }
    }
    else if (value != Py_None) {
        rt->internal_errors++;
    }
    Py_DECREF(value);
    return found;
}

/* ------------------------------------------------------------------------------------------ */
/* Trace linkage                                                                              */
/*
 * While tracing is on, each entry gets a span id, its trace id and its parent's span id when it
 * opens, so that spans built later (export/traces.py) link up with spans the application creates
 * meanwhile. The parent is the enclosing entry, unless the OTel context changed since that entry
 * opened (the application attached a span of its own in between, or there is no enclosing entry):
 * then it is the span of the current OTel context. Nothing OTel is built here; the context is
 * compared by identity, and its span read only when it changed.
 */

static PyObject *str_get_span_context; /* interned "get_span_context" */
static PyObject *int_64;               /* the int 64, for the trace id's high half */

/* Span and trace ids: splitmix64 per thread, seeded from the kernel and reseeded after fork so
 * that a child never repeats its parent's ids. */
static __thread uint64_t id_state;
static __thread uint64_t id_generation = UINT64_MAX;

static uint64_t next_id(void)
{
    if (id_generation != counters_generation) {
        uint64_t seed = 0;
        if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed)) {
            seed = (uint64_t)monotonic_ns() ^ ((uint64_t)(uintptr_t)&seed << 16);
        }
        id_state = seed;
        id_generation = counters_generation;
    }
    for (;;) {
        uint64_t z = (id_state += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        if (z != 0) {
            return z;
        }
    }
}

static inline int ratio_sampled(RuntimeObject *rt, uint64_t trace_lo)
{
    return rt->ratio_bound == UINT64_MAX || trace_lo < rt->ratio_bound;
}

/* The span of an OTel context as the parent `out` (trace id, parent_id, flags); 0 when the
 * context holds no valid span. Never raises: failures are counted. */
static int parent_from_otel(RuntimeObject *rt, PyObject *ctx, TraceIds *out)
{
    if (ctx == NULL || !PyDict_Check(ctx) || PyDict_GET_SIZE(ctx) == 0) {
        return 0;
    }
    PyObject *span = PyDict_GetItemWithError(ctx, rt->span_key); /* borrowed */
    if (span == NULL) {
        if (PyErr_Occurred()) {
            count_internal_error(rt);
        }
        return 0;
    }
    PyObject *sc = PyObject_CallMethodNoArgs(span, str_get_span_context);
    if (sc == NULL) {
        count_internal_error(rt);
        return 0;
    }
    int found = 0;
    if (PyTuple_Check(sc) && PyTuple_GET_SIZE(sc) >= 4) {
        PyObject *trace_id = PyTuple_GET_ITEM(sc, 0);
        PyObject *high = PyLong_Check(trace_id) ? PyNumber_Rshift(trace_id, int_64) : NULL;
        if (high != NULL) {
            out->trace_hi = PyLong_AsUnsignedLongLongMask(high);
            out->trace_lo = PyLong_AsUnsignedLongLongMask(trace_id);
            out->parent_id = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(sc, 1));
            int remote = PyObject_IsTrue(PyTuple_GET_ITEM(sc, 2));
            unsigned long long trace_flags = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(sc, 3));
            Py_DECREF(high);
            if (PyErr_Occurred()) {
                count_internal_error(rt);
            }
            else if ((out->trace_hi | out->trace_lo) != 0 && out->parent_id != 0) {
                out->flags = (uint16_t)(FLAG_TRACED | (remote > 0 ? FLAG_PARENT_REMOTE : 0) |
                                        ((trace_flags & 1) ? FLAG_SAMPLED : 0));
                found = 1;
            }
        }
        else if (PyErr_Occurred()) {
            count_internal_error(rt);
        }
    }
    Py_DECREF(sc);
    return found;
}

/* Assign the ids of the entry on top of `f`, which was just pushed. */
static void trace_open(RuntimeObject *rt, FrameObject *f, TraceIds *t)
{
    const TraceIds *up = f->depth > 1 ? &f->stack[f->depth - 2].trace : &f->base;
    PyObject *ctx = NULL;
    if (PyContextVar_Get(rt->trace_var, NULL, &ctx) < 0) {
        count_internal_error(rt);
        t->flags = 0;
        return;
    }
    TraceIds parent = {0};
    t->otel_ctx = (uintptr_t)ctx;
    t->root_id = up->flags ? up->root_id : 0;
    if (!(up->flags && up->otel_ctx == (uintptr_t)ctx) && parent_from_otel(rt, ctx, &parent)) {
        t->trace_hi = parent.trace_hi;
        t->trace_lo = parent.trace_lo;
        t->parent_id = parent.parent_id;
        int sampled = rt->parent_based ? (parent.flags & FLAG_SAMPLED) : ratio_sampled(rt, parent.trace_lo);
        t->flags = (uint16_t)(FLAG_TRACED | (parent.flags & FLAG_PARENT_REMOTE) | (sampled ? FLAG_SAMPLED : 0));
    }
    else if (up->flags) {
        t->trace_hi = up->trace_hi;
        t->trace_lo = up->trace_lo;
        t->parent_id = up->span_id;
        t->flags = (uint16_t)(FLAG_TRACED | (up->flags & FLAG_SAMPLED));
    }
    else {
        t->trace_hi = next_id();
        t->trace_lo = next_id();
        t->parent_id = 0;
        t->flags = (uint16_t)(FLAG_TRACED | (ratio_sampled(rt, t->trace_lo) ? FLAG_SAMPLED : 0));
    }
    t->span_id = next_id();
    if (t->root_id == 0) {
        t->root_id = t->span_id;
    }
    Py_XDECREF(ctx);
}

/* Opens an entry on top of `f`. Only an outermost inference reads the CUDA allocator: not a stage,
 * and not an inference inside another (its peak reset would cut the outer one's peak short). */
static inline void entry_push(RuntimeObject *rt, FrameObject *f, PyObject *owner, uint32_t key, int inference,
                              int cpu)
{
    if (f->depth >= MAX_STACK_DEPTH) {
        f->overflow++;
        rt->depth_dropped++;
        return;
    }
    int outermost = inference && f->depth == 0 && f->root_key == NO_MODEL_KEY;
    Entry *e = &f->stack[f->depth++];
    int mask = outermost ? rt->counters : rt->counters & ~COUNTER_CUDA_MEMORY;
    if (!cpu) {
        mask &= ~COUNTER_THREAD_CPU;
    }
    e->owner = owner;
    e->key = key;
    e->mask = mask;
    e->cpu_ns = -1;
    e->trace.flags = 0;
    if (rt->trace_var != NULL) {
        trace_open(rt, f, &e->trace);
    }
    if (mask & ~COUNTER_THREAD_CPU) {
        counters_read(mask, &e->cpu_ns, e->counters);
        if (mask & COUNTER_RSS) {
            e->counters[SLOT_RSS_SAMPLES] = rss_sample_start();
        }
        if (mask & COUNTER_PY_HEAP) {
            e->counters[SLOT_PY_HEAP_DELTA] = py_heap_bytes(rt);
        }
        if (mask & COUNTER_CUDA_MEMORY) {
            /* A peak of -1 marks an entry opened while CUDA was not in use: nothing to subtract. */
            e->counters[SLOT_CUDA_PEAK] = -1;
            cuda_memory_read(rt, 1, &e->counters[SLOT_CUDA_ALLOCATED_DELTA], &e->counters[SLOT_CUDA_PEAK]);
        }
    }
    if (mask & COUNTER_THREAD_CPU) {
        e->cpu_ns = thread_cpu_ns();
    }
    /* Read last so that our own bookkeeping falls outside the measured window. */
    e->start_ns = monotonic_ns();
}

/* The index of the most recent entry pushed by `owner` (normally the top one; not when a
 * generator yielded inside a stage), or -1 when there is none to record. */
static inline int entry_find(FrameObject *f, PyObject *owner)
{
    /* Entries that overflowed the stack were pushed last, so they are closed first. */
    if (f->overflow > 0) {
        f->overflow--;
        return -1;
    }
    for (int i = f->depth - 1; i >= 0; i--) {
        if (f->stack[i].owner == owner) {
            return i;
        }
    }
    return -1;
}

static inline void entry_remove(FrameObject *f, int i)
{
    if (i != f->depth - 1) {
        memmove(&f->stack[i], &f->stack[i + 1], (size_t)(f->depth - 1 - i) * sizeof(Entry));
    }
    f->depth--;
}

typedef struct {
    int mask;
    int64_t end_ns;
    int64_t cpu_end;
    int64_t counters[INFERSCOPE_COUNTER_SLOTS];
} EndClocks;

/* The counters of an exit after its wall clock; `cpu` 0 leaves out the thread CPU clock. */
static inline void read_end_counters(RuntimeObject *rt, EndClocks *c, int cpu)
{
    c->mask = cpu ? rt->counters : rt->counters & ~COUNTER_THREAD_CPU;
    c->cpu_end = -1;
    if (c->mask & COUNTER_THREAD_CPU) {
        c->cpu_end = thread_cpu_ns();
    }
    if (c->mask & ~COUNTER_THREAD_CPU) {
        counters_read(c->mask, &c->cpu_end, c->counters);
        if (c->mask & COUNTER_PY_HEAP) {
            c->counters[SLOT_PY_HEAP_DELTA] = py_heap_bytes(rt);
        }
    }
}

/* Read first on every exit, before any bookkeeping, so that it stays outside the window. */
static inline void read_end_clocks(RuntimeObject *rt, EndClocks *c)
{
    c->end_ns = monotonic_ns();
    read_end_counters(rt, c, 1);
}

/* Whether a stage entry of `key` reads the thread CPU clock (see STAGE_CPU_SAMPLE_EVERY). */
static inline int stage_reads_cpu(RuntimeObject *rt, uint32_t key)
{
    if (!(rt->counters & COUNTER_THREAD_CPU) || rt->cpu_sample_every <= 1) {
        return 1;
    }
    if (key >= rt->stage_entry_len) {
        uint32_t len = rt->stage_entry_len ? rt->stage_entry_len : 64;
        while (len <= key) {
            len *= 2;
        }
        stage_gap *grown = PyMem_Realloc(rt->stage_gaps, sizeof(stage_gap) * len);
        if (grown == NULL) {
            return 1; /* no state to sample with: read it */
        }
        for (uint32_t i = rt->stage_entry_len; i < len; i++) {
            /* A new key is read on every entry until its rate says otherwise. */
            grown[i].last_ns = INT64_MIN / 2;
            grown[i].mean_gap_ns = STAGE_CPU_GAP_CAP_NS;
        }
        rt->stage_gaps = grown;
        rt->stage_entry_len = len;
    }
    stage_gap *g = &rt->stage_gaps[key];
    int64_t now = coarse_ns();
    int64_t gap = now - g->last_ns;
    g->last_ns = now;
    gap = gap < 0 ? 0 : (gap > STAGE_CPU_GAP_CAP_NS ? STAGE_CPU_GAP_CAP_NS : gap);
    g->mean_gap_ns += (gap - g->mean_gap_ns) / STAGE_CPU_GAP_WEIGHT;
    return g->mean_gap_ns >= STAGE_CPU_EXACT_GAP_NS || cpu_sample_next() < rt->cpu_sample_below;
}

/* Whether the entry that `owner` closes next on `f` read the thread CPU clock at entry. */
static inline int exit_reads_cpu(FrameObject *f, PyObject *owner)
{
    if (f->overflow > 0) {
        return 0; /* absorbed: nothing is recorded */
    }
    for (int i = f->depth - 1; i >= 0; i--) {
        if (f->stack[i].owner == owner) {
            return (f->stack[i].mask & COUNTER_THREAD_CPU) != 0;
        }
    }
    return 0;
}

/* Fills a record's counter slots with end - start for the counters on at both ends. */
static inline void counters_delta(RuntimeObject *rt, const Entry *e, const EndClocks *c, inferscope_record *rec)
{
    int both = e->mask & c->mask;
    if (both & COUNTER_RUSAGE) {
        for (int i = SLOT_VOLUNTARY_SWITCHES; i <= SLOT_MAJOR_FAULTS; i++) {
            rec->counters[i] = c->counters[i] - e->counters[i];
        }
    }
    if (both & COUNTER_PERF) {
        for (int i = SLOT_PERF; i < SLOT_PERF + PERF_EVENTS; i++) {
            rec->counters[i] = c->counters[i] - e->counters[i];
        }
    }
    if ((both & COUNTER_RSS) && e->counters[SLOT_RSS_SAMPLES] >= 0) {
        int64_t rss = read_rss_bytes();
        if (rss >= 0) {
            rec->counters[SLOT_RSS_DELTA] = rss - e->counters[SLOT_RSS_SAMPLES];
            rec->counters[SLOT_RSS_SAMPLES] = 1;
        }
    }
    if (both & COUNTER_PY_HEAP) {
        rec->counters[SLOT_PY_HEAP_DELTA] = c->counters[SLOT_PY_HEAP_DELTA] - e->counters[SLOT_PY_HEAP_DELTA];
    }
    if ((both & COUNTER_CUDA_MEMORY) && e->counters[SLOT_CUDA_PEAK] >= 0) {
        int64_t allocated, peak;
        if (cuda_memory_read(rt, 0, &allocated, &peak)) {
            int64_t start = e->counters[SLOT_CUDA_ALLOCATED_DELTA];
            rec->counters[SLOT_CUDA_ALLOCATED_DELTA] = allocated - start;
            rec->counters[SLOT_CUDA_PEAK] = peak > start ? peak - start : 0;
        }
    }
}

static inline void record_trace(inferscope_record *rec, const TraceIds *t)
{
    rec->flags |= t->flags;
    rec->trace_hi = t->trace_hi;
    rec->trace_lo = t->trace_lo;
    rec->span_id = t->span_id;
    rec->parent_id = t->parent_id;
    rec->root_id = t->root_id;
}

static inline void entry_record(RuntimeObject *rt, FrameObject *f, PyObject *owner, const EndClocks *c,
                                uint16_t error, uint16_t flags)
{
    int i = entry_find(f, owner);
    if (i < 0) {
        return;
    }
    const Entry *e = &f->stack[i];
    if (f->generation == rt->generation) {
        inferscope_record rec = {0};
        rec.key = e->key;
        rec.error = error;
        rec.flags = flags;
        rec.start_ns = e->start_ns;
        rec.wall_ns = c->end_ns - e->start_ns;
        rec.cpu_ns = (e->cpu_ns >= 0 && c->cpu_end >= 0) ? c->cpu_end - e->cpu_ns : -1;
        /* One thread cannot spend more CPU than wall time. The CPU window is a little wider than
         * the wall window (its reads sit just outside it) and the two clocks run at slightly
         * different rates, so a tiny call could read above 1 otherwise. */
        if (rec.cpu_ns > rec.wall_ns) {
            rec.cpu_ns = rec.wall_ns;
        }
        if (e->mask & ~COUNTER_THREAD_CPU) {
            counters_delta(rt, e, c, &rec);
        }
        if (e->trace.flags) {
            record_trace(&rec, &e->trace);
        }
        inferscope_ring_push(rt->ring->core, &rec);
    }
    entry_remove(f, i);
}

/* error id for an exception type; must be called with no exception set. Never fails: an
 * unknown type on a registry failure counts as an internal error and maps to the _OTHER id. */
static uint16_t error_id_for(RuntimeObject *rt, PyObject *exc_type)
{
    if (exc_type == NULL || exc_type == Py_None) {
        return 0;
    }
    PyObject *id = PyObject_CallMethod(rt->registry, "error_id", "O", exc_type);
    if (id == NULL) {
        count_internal_error(rt);
        return 1;
    }
    long v = PyLong_AsLong(id);
    Py_DECREF(id);
    if (v < 0 || v > UINT16_MAX) {
        count_internal_error(rt);
        return 1;
    }
    return (uint16_t)v;
}

/* The exception being raised, taken out while we record (our own Python calls, tracemalloc and
 * torch.cuda, must not run with it set) and put back unchanged. */
typedef struct {
    PyObject *type; /* borrowed from value on 3.12+ */
    PyObject *value;
    PyObject *tb;
} SavedError;

static inline void error_take(SavedError *s)
{
#if PY_VERSION_HEX >= 0x030C0000
    s->value = PyErr_GetRaisedException();
    s->type = s->value ? (PyObject *)Py_TYPE(s->value) : NULL;
    s->tb = NULL;
#else
    PyErr_Fetch(&s->type, &s->value, &s->tb);
#endif
}

static inline void error_put_back(SavedError *s)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(s->value);
#else
    PyErr_Restore(s->type, s->value, s->tb);
#endif
}

/* A Tracked or Stage whose references the garbage collector cleared (tp_clear) while breaking a
 * cycle can still be reached from a finalizer: it raises, as wrapt's C wrapper does, instead of
 * following a NULL pointer. */
static PyObject *cleared_error(PyObject *self)
{
    PyErr_Format(PyExc_ValueError, "%s was cleared by the garbage collector and can no longer be used",
                 Py_TYPE(self)->tp_name);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Tracked: the sync @track_inference wrapper                                                 */

typedef struct {
    PyObject_HEAD
    RuntimeObject *runtime;
    PyObject *func;
    PyObject *dict;
    PyObject *weakrefs;
    vectorcallfunc vectorcall;
    uint32_t key;
} TrackedObject;

static PyTypeObject Tracked_Type;

static PyObject *Tracked_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TrackedObject *self = (TrackedObject *)callable;
    RuntimeObject *rt = self->runtime;
    if (rt == NULL || self->func == NULL) {
        return cleared_error(callable);
    }
    if (!rt->enabled) {
        return PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    }
    FrameObject *f = current_frame(rt);
    if (f == NULL) {
        count_internal_error(rt);
        return PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    }
    entry_push(rt, f, callable, self->key, 1, 1);
    Py_DECREF(f);
    PyObject *result = PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    EndClocks c;
    SavedError raised;
    if (result == NULL) {
        error_take(&raised);
    }
    read_end_clocks(rt, &c);
    /* Looked up again: if the call copied its context (it created a task), the entry now lives
     * in a clone of the frame it was pushed on. */
    f = current_frame(rt);
    if (f == NULL) {
        count_internal_error(rt);
    }
    else {
        entry_record(rt, f, callable, &c, result == NULL ? error_id_for(rt, raised.type) : 0, 0);
        Py_DECREF(f);
    }
    if (result == NULL) {
        error_put_back(&raised);
    }
    return result;
}

static PyObject *Tracked_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "use Runtime.track(func, key)");
    return NULL;
}

static int Tracked_traverse(TrackedObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runtime);
    Py_VISIT(self->func);
    Py_VISIT(self->dict);
    return 0;
}

static int Tracked_clear(TrackedObject *self)
{
    Py_CLEAR(self->runtime);
    Py_CLEAR(self->func);
    Py_CLEAR(self->dict);
    return 0;
}

static void Tracked_dealloc(TrackedObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    Tracked_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Tracked_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *Tracked_repr(TrackedObject *self)
{
    if (self->func == NULL) {
        return PyUnicode_FromString("<inferscope tracked (cleared)>");
    }
    return PyUnicode_FromFormat("<inferscope tracked %R>", self->func);
}

/* Pickle by qualified name, as for a plain function (multiprocessing spawn pickles targets). */
static PyObject *Tracked_reduce(TrackedObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyObject_GetAttrString((PyObject *)self, "__qualname__");
}

static PyObject *Tracked_get_key(TrackedObject *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->key);
}

static PyMethodDef Tracked_methods[] = {
    {"__reduce__", (PyCFunction)Tracked_reduce, METH_NOARGS, NULL},
    {NULL}};


static PyGetSetDef Tracked_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"inferscope_key", (getter)Tracked_get_key, NULL, "the interned key of this inference", NULL},
    {NULL}};

static PyTypeObject Tracked_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "inferscope._native.Tracked",
    .tp_basicsize = sizeof(TrackedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A function wrapped by @track_inference.",
    .tp_new = Tracked_new,
    .tp_dealloc = (destructor)Tracked_dealloc,
    .tp_traverse = (traverseproc)Tracked_traverse,
    .tp_clear = (inquiry)Tracked_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TrackedObject, vectorcall),
    .tp_descr_get = Tracked_descr_get,
    .tp_dictoffset = offsetof(TrackedObject, dict),
    .tp_weaklistoffset = offsetof(TrackedObject, weakrefs),
    .tp_repr = (reprfunc)Tracked_repr,
    .tp_methods = Tracked_methods,
    .tp_getset = Tracked_getset,
};

/* ------------------------------------------------------------------------------------------ */
/* Stage                                                                                      */

typedef struct {
    uint32_t parent; /* UINT32_MAX: empty */
    uint32_t key;
} CacheSlot;

typedef struct {
    PyObject_HEAD
    RuntimeObject *runtime;
    PyObject *name;
    PyObject *weakrefs;
    uint64_t epoch;
    uint32_t cache_mask;
    uint32_t cache_used;
    CacheSlot *cache; /* open addressing: parent key -> this stage's key under that parent */
} StageObject;

static PyTypeObject Stage_Type;

static void cache_reset(StageObject *s)
{
    for (uint32_t i = 0; i <= s->cache_mask; i++) {
        s->cache[i].parent = UINT32_MAX;
    }
    s->cache_used = 0;
    s->epoch = s->runtime->epoch;
}

static int cache_insert(StageObject *s, uint32_t parent, uint32_t key)
{
    if ((s->cache_used + 1) * 2 > s->cache_mask + 1) {
        uint32_t old_size = s->cache_mask + 1;
        CacheSlot *old = s->cache;
        CacheSlot *grown = PyMem_Malloc(sizeof(CacheSlot) * old_size * 2);
        if (grown == NULL) {
            return -1;
        }
        s->cache = grown;
        s->cache_mask = old_size * 2 - 1;
        for (uint32_t i = 0; i <= s->cache_mask; i++) {
            s->cache[i].parent = UINT32_MAX;
        }
        s->cache_used = 0;
        for (uint32_t i = 0; i < old_size; i++) {
            if (old[i].parent != UINT32_MAX) {
                cache_insert(s, old[i].parent, old[i].key);
            }
        }
        PyMem_Free(old);
    }
    uint32_t i = (parent * 2654435761u) & s->cache_mask;
    while (s->cache[i].parent != UINT32_MAX) {
        i = (i + 1) & s->cache_mask;
    }
    s->cache[i].parent = parent;
    s->cache[i].key = key;
    s->cache_used++;
    return 0;
}

/* The key of this stage under `parent`; UINT32_MAX with an exception set on failure. */
static uint32_t stage_key(StageObject *s, uint32_t parent)
{
    if (s->epoch != s->runtime->epoch) {
        cache_reset(s);
    }
    uint32_t i = (parent * 2654435761u) & s->cache_mask;
    while (s->cache[i].parent != UINT32_MAX) {
        if (s->cache[i].parent == parent) {
            return s->cache[i].key;
        }
        i = (i + 1) & s->cache_mask;
    }
    PyObject *key_obj = PyObject_CallMethod(s->runtime->registry, "stage_key", "kO", (unsigned long)parent, s->name);
    if (key_obj == NULL) {
        return UINT32_MAX;
    }
    unsigned long key = PyLong_AsUnsignedLong(key_obj);
    Py_DECREF(key_obj);
    if (PyErr_Occurred()) {
        return UINT32_MAX;
    }
    if (key >= UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "stage key out of range");
        return UINT32_MAX;
    }
    if (cache_insert(s, parent, (uint32_t)key) < 0) {
        return UINT32_MAX;
    }
    return (uint32_t)key;
}

static PyObject *Stage_enter(StageObject *self, PyObject *Py_UNUSED(ignored))
{
    RuntimeObject *rt = self->runtime;
    if (rt == NULL) {
        return cleared_error((PyObject *)self);
    }
    if (rt->enabled) {
        FrameObject *f = current_frame(rt);
        if (f == NULL) {
            count_internal_error(rt);
        }
        else {
            uint32_t key = stage_key(self, frame_top_key(f));
            if (key == UINT32_MAX) {
                count_internal_error(rt);
            }
            else {
                entry_push(rt, f, (PyObject *)self, key, 0, stage_reads_cpu(rt, key));
            }
            Py_DECREF(f);
        }
    }
    return Py_NewRef(self);
}

static PyObject *Stage_exit(StageObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    RuntimeObject *rt = self->runtime;
    if (rt == NULL) {
        return cleared_error((PyObject *)self);
    }
    if (rt->enabled) {
        EndClocks c;
        c.end_ns = monotonic_ns();
        FrameObject *f = current_frame(rt);
        /* The CPU clock only where the entry read it at its start (see stage_reads_cpu()). */
        read_end_counters(rt, &c, f != NULL && exit_reads_cpu(f, (PyObject *)self));
        if (f == NULL) {
            count_internal_error(rt);
        }
        else {
            PyObject *exc_type = nargs > 0 ? args[0] : Py_None;
            if (exc_type == PyExc_GeneratorExit) {
                /* The generator it was open in was closed before it finished: abandoned, no error. */
                entry_record(rt, f, (PyObject *)self, &c, 0, FLAG_ABANDONED);
            }
            else {
                entry_record(rt, f, (PyObject *)self, &c, error_id_for(rt, exc_type), 0);
            }
            Py_DECREF(f);
        }
    }
    Py_RETURN_FALSE;
}

static PyObject *Stage_call(StageObject *self, PyObject *args, PyObject *kwargs)
{
    if (self->runtime == NULL) {
        return cleared_error((PyObject *)self);
    }
    if (self->runtime->decorate == NULL || self->runtime->decorate == Py_None) {
        PyErr_SetString(PyExc_TypeError, "stage objects are not callable here");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *full = PyTuple_New(n + 1);
    if (full == NULL) {
        return NULL;
    }
    PyTuple_SET_ITEM(full, 0, Py_NewRef(self));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTuple_SET_ITEM(full, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    }
    PyObject *result = PyObject_Call(self->runtime->decorate, full, kwargs);
    Py_DECREF(full);
    return result;
}

static int Stage_traverse(StageObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runtime);
    return 0;
}

static int Stage_clear(StageObject *self)
{
    Py_CLEAR(self->runtime);
    return 0;
}

static void Stage_dealloc(StageObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    Stage_clear(self);
    Py_CLEAR(self->name);
    PyMem_Free(self->cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Stage_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyErr_SetString(PyExc_TypeError, "use inferscope.stage(name)");
    return NULL;
}

static PyObject *Stage_repr(StageObject *self)
{
    return PyUnicode_FromFormat("<inferscope stage %R>", self->name);
}

static PyObject *Stage_get_name(StageObject *self, void *closure)
{
    return Py_NewRef(self->name);
}

static PyMethodDef Stage_methods[] = {
    {"__enter__", (PyCFunction)Stage_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Stage_exit, METH_FASTCALL, NULL},
    {NULL}};

static PyGetSetDef Stage_getset[] = {{"name", (getter)Stage_get_name, NULL, "the stage name", NULL}, {NULL}};

static PyTypeObject Stage_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "inferscope._native.Stage",
    .tp_basicsize = sizeof(StageObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A pipeline stage: a context manager and a decorator. Get one with inferscope.stage(name).",
    .tp_new = Stage_new,
    .tp_dealloc = (destructor)Stage_dealloc,
    .tp_traverse = (traverseproc)Stage_traverse,
    .tp_clear = (inquiry)Stage_clear,
    .tp_call = (ternaryfunc)Stage_call,
    .tp_weaklistoffset = offsetof(StageObject, weakrefs),
    .tp_repr = (reprfunc)Stage_repr,
    .tp_methods = Stage_methods,
    .tp_getset = Stage_getset,
};

static StageObject *make_stage(RuntimeObject *rt, PyObject *name)
{
    StageObject *s = PyObject_GC_New(StageObject, &Stage_Type);
    if (s == NULL) {
        return NULL;
    }
    s->runtime = (RuntimeObject *)Py_NewRef(rt);
    s->name = Py_NewRef(name);
    s->weakrefs = NULL;
    s->cache_mask = 7;
    s->cache = PyMem_Malloc(sizeof(CacheSlot) * 8);
    if (s->cache == NULL) {
        Py_DECREF(s);
        PyErr_NoMemory();
        return NULL;
    }
    cache_reset(s);
    PyObject_GC_Track(s);
    return s;
}

/* ------------------------------------------------------------------------------------------ */
/* Runtime methods                                                                            */

static int Runtime_init(RuntimeObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ring", "registry", NULL};
    PyObject *ring, *registry;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O:Runtime", kwlist, &Ring_Type, &ring, &registry)) {
        return -1;
    }
    if (!ring_ready((RingObject *)ring)) {
        return -1;
    }
    Py_XSETREF(self->ring, (RingObject *)Py_NewRef(ring));
    Py_XSETREF(self->registry, Py_NewRef(registry));
    if (self->var == NULL) {
        self->var = PyContextVar_New("inferscope_frame", NULL);
        if (self->var == NULL) {
            return -1;
        }
    }
    if (self->stages == NULL) {
        self->stages = PyDict_New();
        if (self->stages == NULL) {
            return -1;
        }
    }
    self->enabled = 1;
    self->epoch++;
    if (self->cpu_sample_every == 0) {
        self->cpu_sample_every = STAGE_CPU_SAMPLE_EVERY;
        self->cpu_sample_below = UINT32_MAX / STAGE_CPU_SAMPLE_EVERY;
    }
    return 0;
}

static int Runtime_traverse(RuntimeObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ring);
    Py_VISIT(self->registry);
    Py_VISIT(self->var);
    Py_VISIT(self->stages);
    Py_VISIT(self->decorate);
    Py_VISIT(self->heap_reader);
    Py_VISIT(self->cuda_reader);
    Py_VISIT(self->device_stage);
    Py_VISIT(self->trace_var);
    Py_VISIT(self->span_key);
    return 0;
}

static int Runtime_clear(RuntimeObject *self)
{
    Py_CLEAR(self->ring);
    Py_CLEAR(self->registry);
    Py_CLEAR(self->var);
    Py_CLEAR(self->stages);
    Py_CLEAR(self->decorate);
    Py_CLEAR(self->heap_reader);
    Py_CLEAR(self->cuda_reader);
    Py_CLEAR(self->device_stage);
    Py_CLEAR(self->trace_var);
    Py_CLEAR(self->span_key);
    return 0;
}

static void Runtime_dealloc(RuntimeObject *self)
{
    PyObject_GC_UnTrack(self);
    Runtime_clear(self);
    PyMem_Free(self->stage_gaps);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int runtime_ready(RuntimeObject *self)
{
    if (self->ring == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Runtime was not initialised");
        return 0;
    }
    return 1;
}

static PyObject *Runtime_track(RuntimeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "track(func, key) takes 2 arguments");
        return NULL;
    }
    if (!PyCallable_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "track() needs a callable, got %R", args[0]);
        return NULL;
    }
    unsigned long key = PyLong_AsUnsignedLong(args[1]);
    if (key == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (key >= UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "key must fit 32 bits");
        return NULL;
    }
    TrackedObject *t = PyObject_GC_New(TrackedObject, &Tracked_Type);
    if (t == NULL) {
        return NULL;
    }
    t->runtime = (RuntimeObject *)Py_NewRef(self);
    t->func = Py_NewRef(args[0]);
    t->dict = NULL;
    t->weakrefs = NULL;
    t->vectorcall = Tracked_vectorcall;
    t->key = (uint32_t)key;
    PyObject_GC_Track(t);
    return (PyObject *)t;
}

static PyObject *stage_named(RuntimeObject *self, PyObject *name)
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    /* Fast path: the name was seen before. */
    PyObject *found = PyDict_GetItemWithError(self->stages, name);
    if (found != NULL) {
        return Py_NewRef(found);
    }
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    if (!PyUnicode_Check(name)) {
        if (PyCallable_Check(name)) {
            PyErr_SetString(PyExc_TypeError,
                            "stage() needs a name: write @stage(\"preprocess\"), not @stage "
                            "(did you forget the brackets and the name?)");
        }
        else {
            PyErr_Format(PyExc_TypeError, "stage name must be a str, got %R", name);
        }
        return NULL;
    }
    if (PyUnicode_GET_LENGTH(name) == 0) {
        PyErr_SetString(PyExc_ValueError, "stage name must not be empty, e.g. stage(\"preprocess\")");
        return NULL;
    }
    if (PyUnicode_GET_LENGTH(name) > MAX_STAGE_NAME_LENGTH) {
        PyObject *head = PyUnicode_Substring(name, 0, 40);
        if (head != NULL) {
            PyErr_Format(PyExc_ValueError, "stage name is %zd characters long; at most %d are accepted: %R...",
                         PyUnicode_GET_LENGTH(name), MAX_STAGE_NAME_LENGTH, head);
            Py_DECREF(head);
        }
        return NULL;
    }
    if (PyUnicode_FindChar(name, '/', 0, PyUnicode_GET_LENGTH(name), 1) >= 0) {
        PyErr_Format(PyExc_ValueError,
                     "stage name %R must not contain '/': nest stages instead, the path is built for you",
                     name);
        return NULL;
    }
    StageObject *s = make_stage(self, name);
    if (s == NULL) {
        return NULL;
    }
    /* Past the cap, names still work (their keys fold into the overflow key) but are not cached,
     * so a stage name built from request data cannot grow this dict without bound. */
    if (PyDict_GET_SIZE(self->stages) < STAGE_CACHE_LIMIT && PyDict_SetItem(self->stages, name, (PyObject *)s) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

/* stage(name, *, device=None): the shared Stage called `name`; with a device, what the Python
 * side makes of it (device_stage: a stage that also times the work queued on that device). */
static PyObject *Runtime_stage(RuntimeObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs != 1 || nkw > 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "device") != 0)) {
        PyErr_SetString(PyExc_TypeError, "stage() takes a name and, optionally, device=: stage(\"infer\", device=\"cuda\")");
        return NULL;
    }
    PyObject *s = stage_named(self, args[0]);
    if (s == NULL || nkw == 0 || args[1] == Py_None) {
        return s;
    }
    if (self->device_stage == NULL || self->device_stage == Py_None) {
        Py_DECREF(s);
        PyErr_SetString(PyExc_TypeError, "stage(device=...) is not available here");
        return NULL;
    }
    PyObject *timed = PyObject_CallFunctionObjArgs(self->device_stage, s, args[1], NULL);
    Py_DECREF(s);
    return timed;
}

/* A record's key (32 bits) or flags (16 bits) from a Python int; -1 with OverflowError set when it
 * does not fit, as Ring.push() does, instead of truncating it into another key. */
static int uint_field(PyObject *value, uint64_t max, const char *what, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (v > max) {
        PyErr_Format(PyExc_OverflowError, "%s must fit %d bits, got %llu", what, max == UINT32_MAX ? 32 : 16, v);
        return -1;
    }
    *out = v;
    return 0;
}

/* enter(owner, key, stash=None, trace=None): open an entry; then reopen the entries that a
 * previous exit_segment(owner) stashed (the stages a generator was inside when it yielded). A
 * `trace` from exit_segment() gives the entry back its span: a generator is one span however
 * often it resumes. */
static PyObject *Runtime_enter(RuntimeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "enter(owner, key, stash=None, trace=None) takes 2 to 4 arguments");
        return NULL;
    }
    PyObject *stash = nargs >= 3 ? args[2] : Py_None;
    if (stash != Py_None && !PyBytes_Check(stash)) {
        PyErr_SetString(PyExc_TypeError, "stash must be None or what exit_segment() returned");
        return NULL;
    }
    PyObject *trace = nargs == 4 ? args[3] : Py_None;
    if (trace != Py_None && !(PyBytes_Check(trace) && PyBytes_GET_SIZE(trace) == sizeof(TraceIds))) {
        PyErr_SetString(PyExc_TypeError, "trace must be None or what exit_segment() returned");
        return NULL;
    }
    uint64_t key;
    if (uint_field(args[1], UINT32_MAX, "key", &key) < 0) {
        return NULL;
    }
    if (!runtime_ready(self)) {
        return NULL;
    }
    if (!self->enabled) {
        Py_RETURN_NONE;
    }
    FrameObject *f = current_frame(self);
    if (f == NULL) {
        count_internal_error(self);
        Py_RETURN_NONE;
    }
    int depth = f->depth;
    entry_push(self, f, args[0], (uint32_t)key, stash == Py_None && trace == Py_None, 1);
    uintptr_t otel_ctx = f->depth > depth ? f->stack[f->depth - 1].trace.otel_ctx : 0;
    if (trace != Py_None && f->depth > depth && self->trace_var != NULL) {
        Entry *e = &f->stack[f->depth - 1];
        memcpy(&e->trace, PyBytes_AS_STRING(trace), sizeof(TraceIds));
        e->trace.otel_ctx = otel_ctx; /* the context of this resumption, for spans made inside it */
    }
    if (stash != Py_None) {
        Py_ssize_t n = PyBytes_GET_SIZE(stash) / (Py_ssize_t)sizeof(Entry);
        const Entry *saved = (const Entry *)PyBytes_AS_STRING(stash);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (f->depth >= MAX_STACK_DEPTH) {
                f->overflow++;
                self->depth_dropped++;
                continue;
            }
            f->stack[f->depth] = saved[i];
            if (f->stack[f->depth].trace.flags) {
                f->stack[f->depth].trace.otel_ctx = otel_ctx;
            }
            f->depth++;
        }
    }
    Py_DECREF(f);
    Py_RETURN_NONE;
}

static PyObject *Runtime_exit(RuntimeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "exit(owner, exc_type, flags=0) takes 2 or 3 arguments");
        return NULL;
    }
    if (!runtime_ready(self)) {
        return NULL;
    }
    uint64_t flags = 0;
    if (nargs == 3 && uint_field(args[2], UINT16_MAX, "flags", &flags) < 0) {
        return NULL;
    }
    if (!self->enabled) {
        Py_RETURN_NONE;
    }
    EndClocks c;
    read_end_clocks(self, &c);
    FrameObject *f = current_frame(self);
    if (f == NULL) {
        count_internal_error(self);
        Py_RETURN_NONE;
    }
    entry_record(self, f, args[0], &c, error_id_for(self, args[1]), (uint16_t)flags);
    Py_DECREF(f);
    Py_RETURN_NONE;
}

/* exit_segment(owner) -> (start_ns, wall_ns, cpu_ns, stash, trace) | None: close owner's most recent entry
 * without recording it. Entries opened above it (a generator yielding inside a stage) are removed
 * too and returned as `stash` (bytes, or None when there were none) for enter() to reopen, so the
 * consumer's own stages between two items never nest under the generator's stages. `trace` is the
 * entry's span (bytes, or None when untraced), for enter() and record(). */
static PyObject *Runtime_exit_segment(RuntimeObject *self, PyObject *owner)
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    if (!self->enabled) {
        Py_RETURN_NONE;
    }
    EndClocks c;
    read_end_clocks(self, &c);
    int64_t end_ns = c.end_ns;
    int64_t cpu_end = c.cpu_end;
    FrameObject *f = current_frame(self);
    if (f == NULL) {
        count_internal_error(self);
        Py_RETURN_NONE;
    }
    int i = f->depth - 1;
    while (i >= 0 && f->stack[i].owner != owner) {
        i--;
    }
    if (i < 0 || f->generation != self->generation) {
        Py_DECREF(f);
        Py_RETURN_NONE;
    }
    Entry e = f->stack[i];
    PyObject *stash = Py_None;
    int above = f->depth - 1 - i;
    if (above > 0) {
        stash = PyBytes_FromStringAndSize((const char *)&f->stack[i + 1], (Py_ssize_t)(above * sizeof(Entry)));
        if (stash == NULL) {
            count_internal_error(self);
            stash = Py_None;
        }
    }
    f->depth = i;
    Py_DECREF(f);
    PyObject *trace = Py_None;
    if (e.trace.flags) {
        trace = PyBytes_FromStringAndSize((const char *)&e.trace, (Py_ssize_t)sizeof(TraceIds));
        if (trace == NULL) {
            count_internal_error(self);
            trace = Py_None;
        }
    }
    long long cpu = (e.cpu_ns >= 0 && cpu_end >= 0) ? cpu_end - e.cpu_ns : -1;
    if (cpu > end_ns - e.start_ns) {
        cpu = end_ns - e.start_ns; /* as in entry_record() */
    }
    PyObject *result =
        Py_BuildValue("LLLOO", (long long)e.start_ns, (long long)(end_ns - e.start_ns), cpu, stash, trace);
    if (stash != Py_None) {
        Py_DECREF(stash);
    }
    if (trace != Py_None) {
        Py_DECREF(trace);
    }
    return result;
}

/* record(key, exc_type, flags, start_ns, wall_ns, cpu_ns, trace=None): push a finished record;
 * `trace` is what exit_segment() returned for the entry. */
static PyObject *Runtime_record(RuntimeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 && nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "record(key, exc_type, flags, start_ns, wall_ns, cpu_ns, trace=None) takes 6 or 7 arguments");
        return NULL;
    }
    PyObject *trace = nargs == 7 ? args[6] : Py_None;
    if (trace != Py_None && !(PyBytes_Check(trace) && PyBytes_GET_SIZE(trace) == sizeof(TraceIds))) {
        PyErr_SetString(PyExc_TypeError, "trace must be None or what exit_segment() returned");
        return NULL;
    }
    if (!runtime_ready(self)) {
        return NULL;
    }
    inferscope_record rec = {0};
    uint64_t key, flags;
    if (uint_field(args[0], UINT32_MAX, "key", &key) < 0 || uint_field(args[2], UINT16_MAX, "flags", &flags) < 0) {
        return NULL;
    }
    rec.start_ns = PyLong_AsLongLong(args[3]);
    rec.wall_ns = PyLong_AsLongLong(args[4]);
    rec.cpu_ns = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (!self->enabled) {
        Py_RETURN_NONE;
    }
    rec.key = (uint32_t)key;
    rec.flags = (uint16_t)flags;
    rec.error = error_id_for(self, args[1]);
    if (rec.cpu_ns > rec.wall_ns) {
        rec.cpu_ns = rec.wall_ns; /* as in entry_record() */
    }
    if (trace != Py_None) {
        TraceIds t;
        memcpy(&t, PyBytes_AS_STRING(trace), sizeof(TraceIds));
        record_trace(&rec, &t);
    }
    inferscope_ring_push(self->ring->core, &rec);
    Py_RETURN_NONE;
}

static PyObject *Runtime_current_key(RuntimeObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    FrameObject *f = current_frame(self);
    if (f == NULL) {
        return NULL;
    }
    uint32_t key = frame_top_key(f);
    Py_DECREF(f);
    return PyLong_FromUnsignedLong(key);
}

/* use_frame(root_key, trace=None): start a fresh frame in the current context, rooted at root_key
 * and, when `trace` is what current_trace() returned, at that span. */
static PyObject *Runtime_use_frame(RuntimeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "use_frame(root_key, trace=None) takes 1 or 2 arguments");
        return NULL;
    }
    if (!runtime_ready(self)) {
        return NULL;
    }
    PyObject *trace = nargs == 2 ? args[1] : Py_None;
    if (trace != Py_None && !(PyBytes_Check(trace) && PyBytes_GET_SIZE(trace) == sizeof(TraceIds))) {
        PyErr_SetString(PyExc_TypeError, "trace must be None or what current_trace() returned");
        return NULL;
    }
    uint64_t key;
    if (uint_field(args[0], UINT32_MAX, "key", &key) < 0) {
        return NULL;
    }
    FrameObject *f = new_frame(self, (uint32_t)key);
    if (f == NULL) {
        return NULL;
    }
    if (trace != Py_None) {
        memcpy(&f->base, PyBytes_AS_STRING(trace), sizeof(TraceIds));
    }
    int rc = install_frame(self, f);
    Py_DECREF(f);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The frame visible in this context (its own, or the one it inherited), as a new reference, or
 * NULL (no exception) when there is none. Creates nothing. */
static FrameObject *visible_frame(RuntimeObject *rt)
{
    PyObject *value = NULL;
    if (PyContextVar_Get(rt->var, NULL, &value) < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (value != NULL && !(Py_IS_TYPE(value, &Frame_Type) && ((FrameObject *)value)->generation == rt->generation)) {
        Py_DECREF(value);
        return NULL;
    }
    return (FrameObject *)value;
}

/* The innermost open span visible here into `t`; 0 when there is none. */
static int visible_trace(RuntimeObject *rt, TraceIds *t)
{
    FrameObject *f = visible_frame(rt);
    if (f == NULL) {
        return 0;
    }
    *t = *frame_top_trace(f);
    Py_DECREF(f);
    return t->flags != 0;
}

/* current_trace() -> bytes | None: the innermost open span here, for use_frame() in another thread. */
static PyObject *Runtime_current_trace(RuntimeObject *self, PyObject *Py_UNUSED(ignored))
{
    TraceIds t;
    if (!runtime_ready(self)) {
        return NULL;
    }
    if (!visible_trace(self, &t)) {
        Py_RETURN_NONE;
    }
    return PyBytes_FromStringAndSize((const char *)&t, (Py_ssize_t)sizeof(TraceIds));
}

/* current_span() -> (trace_hi, trace_lo, span_id, flags, otel_ctx_id) | None: the innermost open
 * span here and the identity of the OTel context current when it opened. */
static PyObject *Runtime_current_span(RuntimeObject *self, PyObject *Py_UNUSED(ignored))
{
    TraceIds t;
    if (!runtime_ready(self)) {
        return NULL;
    }
    if (!visible_trace(self, &t)) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("KKKiK", (unsigned long long)t.trace_hi, (unsigned long long)t.trace_lo,
                         (unsigned long long)t.span_id, (int)t.flags, (unsigned long long)t.otel_ctx);
}

/* set_tracing(var, span_key, ratio_bound, parent_based) or set_tracing(None): while on, every
 * entry reads `var` (OTel's current-context ContextVar) when it opens and gets span ids. */
static PyObject *Runtime_set_tracing(RuntimeObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 1 && args[0] == Py_None) {
        Py_CLEAR(self->trace_var);
        Py_CLEAR(self->span_key);
        Py_RETURN_NONE;
    }
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "set_tracing(var, span_key, ratio_bound, parent_based) or set_tracing(None)");
        return NULL;
    }
    if (!PyContextVar_CheckExact(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_tracing needs a ContextVar and a str key");
        return NULL;
    }
    unsigned long long bound = PyLong_AsUnsignedLongLong(args[2]);
    if (bound == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    int parent_based = PyObject_IsTrue(args[3]);
    if (parent_based < 0) {
        return NULL;
    }
    Py_XSETREF(self->trace_var, Py_NewRef(args[0]));
    Py_XSETREF(self->span_key, Py_NewRef(args[1]));
    self->ratio_bound = bound;
    self->parent_based = parent_based;
    Py_RETURN_NONE;
}

static PyObject *Runtime_get_tracing(RuntimeObject *self, void *closure)
{
    return PyBool_FromLong(self->trace_var != NULL);
}

/* active_depth() -> int: open entries in the current context's frame (0 when it has none). */
static PyObject *Runtime_active_depth(RuntimeObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    PyObject *value = NULL;
    if (PyContextVar_Get(self->var, NULL, &value) < 0) {
        return NULL;
    }
    long depth = 0;
    if (value != NULL) {
        FrameObject *f = (FrameObject *)value;
        if (Py_IS_TYPE(value, &Frame_Type) && f->generation == self->generation &&
            f->context == PyThreadState_Get()->context) {
            depth = f->depth + f->overflow;
        }
        Py_DECREF(value);
    }
    return PyLong_FromLong(depth);
}

static PyObject *Runtime_after_fork_in_child(RuntimeObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    self->generation++;
    counters_generation++;
    self->depth_dropped = 0;
    self->internal_errors = 0;
    inferscope_ring_clear(self->ring->core);
    Py_RETURN_NONE;
}

static PyObject *Runtime_get_ring(RuntimeObject *self, void *closure)
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    return Py_NewRef(self->ring);
}

static int Runtime_set_ring(RuntimeObject *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyObject_TypeCheck(value, &Ring_Type)) {
        PyErr_SetString(PyExc_TypeError, "ring must be a Ring");
        return -1;
    }
    if (!ring_ready((RingObject *)value)) {
        return -1;
    }
    Py_XSETREF(self->ring, (RingObject *)Py_NewRef(value));
    return 0;
}

static PyObject *Runtime_get_registry(RuntimeObject *self, void *closure)
{
    if (!runtime_ready(self)) {
        return NULL;
    }
    return Py_NewRef(self->registry);
}

static int Runtime_set_registry(RuntimeObject *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete registry");
        return -1;
    }
    Py_XSETREF(self->registry, Py_NewRef(value));
    self->epoch++;
    return 0;
}

static PyObject *Runtime_get_decorate(RuntimeObject *self, void *closure)
{
    return Py_NewRef(self->decorate ? self->decorate : Py_None);
}

static int Runtime_set_decorate(RuntimeObject *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->decorate, Py_XNewRef(value));
    return 0;
}

static PyObject *Runtime_get_heap_reader(RuntimeObject *self, void *closure)
{
    return Py_NewRef(self->heap_reader ? self->heap_reader : Py_None);
}

static int Runtime_set_heap_reader(RuntimeObject *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->heap_reader, Py_XNewRef(value));
    return 0;
}

static PyObject *Runtime_get_cuda_reader(RuntimeObject *self, void *closure)
{
    return Py_NewRef(self->cuda_reader ? self->cuda_reader : Py_None);
}

static int Runtime_set_cuda_reader(RuntimeObject *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->cuda_reader, Py_XNewRef(value));
    return 0;
}

static PyObject *Runtime_get_device_stage(RuntimeObject *self, void *closure)
{
    return Py_NewRef(self->device_stage ? self->device_stage : Py_None);
}

static int Runtime_set_device_stage(RuntimeObject *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->device_stage, Py_XNewRef(value));
    return 0;
}

static PyObject *Runtime_get_counters(RuntimeObject *self, void *closure)
{
    return PyLong_FromLong(self->counters);
}

static int Runtime_set_counters(RuntimeObject *self, PyObject *value, void *closure)
{
    long v = value ? PyLong_AsLong(value) : -1;
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 0 || v > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "counters must be a non-negative bitmask");
        return -1;
    }
    self->counters = (int)v;
    return 0;
}

static PyObject *Runtime_get_cpu_sample_every(RuntimeObject *self, void *closure)
{
    return PyLong_FromLong(self->cpu_sample_every);
}

static int Runtime_set_cpu_sample_every(RuntimeObject *self, PyObject *value, void *closure)
{
    long v = value ? PyLong_AsLong(value) : -1;
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 1 || v > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "cpu_sample_every must be a positive integer");
        return -1;
    }
    self->cpu_sample_every = v;
    self->cpu_sample_below = (uint32_t)(UINT32_MAX / (unsigned long)v);
    return 0;
}

static PyObject *Runtime_get_enabled(RuntimeObject *self, void *closure)
{
    return PyBool_FromLong(self->enabled);
}

static int Runtime_set_enabled(RuntimeObject *self, PyObject *value, void *closure)
{
    int v = value ? PyObject_IsTrue(value) : -1;
    if (v < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "cannot delete enabled");
        }
        return -1;
    }
    self->enabled = v;
    return 0;
}

static PyObject *Runtime_get_depth_dropped(RuntimeObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->depth_dropped);
}

static PyObject *Runtime_get_internal_errors(RuntimeObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->internal_errors);
}

static PyMethodDef Runtime_methods[] = {
    {"track", (PyCFunction)(void (*)(void))Runtime_track, METH_FASTCALL,
     "track(func, key) -> callable: wrap a sync callable as a tracked inference"},
    {"stage", (PyCFunction)(void (*)(void))Runtime_stage, METH_FASTCALL | METH_KEYWORDS,
     "stage(name, *, device=None) -> Stage: the stage called `name`"},
    {"enter", (PyCFunction)(void (*)(void))Runtime_enter, METH_FASTCALL,
     "enter(owner, key, stash=None, trace=None): open an inference entry owned by `owner`"},
    {"exit", (PyCFunction)(void (*)(void))Runtime_exit, METH_FASTCALL,
     "exit(owner, exc_type, flags=0): close owner's most recent entry and record it"},
    {"exit_segment", (PyCFunction)Runtime_exit_segment, METH_O,
     "exit_segment(owner) -> (start_ns, wall_ns, cpu_ns, stash, trace) | None: close without recording"},
    {"record", (PyCFunction)(void (*)(void))Runtime_record, METH_FASTCALL,
     "record(key, exc_type, flags, start_ns, wall_ns, cpu_ns, trace=None): push a finished record"},
    {"current_key", (PyCFunction)Runtime_current_key, METH_NOARGS, "the innermost open key in this context"},
    {"use_frame", (PyCFunction)(void (*)(void))Runtime_use_frame, METH_FASTCALL,
     "use_frame(root_key, trace=None): start a fresh frame here"},
    {"current_trace", (PyCFunction)Runtime_current_trace, METH_NOARGS,
     "current_trace() -> bytes | None: the innermost open span, for use_frame()"},
    {"current_span", (PyCFunction)Runtime_current_span, METH_NOARGS,
     "current_span() -> (trace_hi, trace_lo, span_id, flags, otel_ctx_id) | None"},
    {"set_tracing", (PyCFunction)(void (*)(void))Runtime_set_tracing, METH_FASTCALL,
     "set_tracing(var, span_key, ratio_bound, parent_based) or set_tracing(None)"},
    {"active_depth", (PyCFunction)Runtime_active_depth, METH_NOARGS, "open entries in this context"},
    {"after_fork_in_child", (PyCFunction)Runtime_after_fork_in_child, METH_NOARGS,
     "forget everything recorded or opened before fork()"},
    {NULL}};

static PyGetSetDef Runtime_getset[] = {
    {"ring", (getter)Runtime_get_ring, (setter)Runtime_set_ring, NULL, NULL},
    {"registry", (getter)Runtime_get_registry, (setter)Runtime_set_registry, NULL, NULL},
    {"decorate", (getter)Runtime_get_decorate, (setter)Runtime_set_decorate, NULL, NULL},
    {"heap_reader", (getter)Runtime_get_heap_reader, (setter)Runtime_set_heap_reader, NULL, NULL},
    {"cuda_reader", (getter)Runtime_get_cuda_reader, (setter)Runtime_set_cuda_reader, NULL, NULL},
    {"device_stage", (getter)Runtime_get_device_stage, (setter)Runtime_set_device_stage, NULL, NULL},
    {"counters", (getter)Runtime_get_counters, (setter)Runtime_set_counters, NULL, NULL},
    {"enabled", (getter)Runtime_get_enabled, (setter)Runtime_set_enabled, NULL, NULL},
    {"cpu_sample_every", (getter)Runtime_get_cpu_sample_every, (setter)Runtime_set_cpu_sample_every,
     "a stage entry reads the thread CPU clock 1 time in this many (docs/counters.md)", NULL},
    {"tracing", (getter)Runtime_get_tracing, NULL, NULL, NULL},
    {"depth_dropped", (getter)Runtime_get_depth_dropped, NULL, NULL, NULL},
    {"internal_errors", (getter)Runtime_get_internal_errors, NULL, NULL, NULL},
    {NULL}};

static PyTypeObject Runtime_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "inferscope._native.Runtime",
    .tp_basicsize = sizeof(RuntimeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Runtime(ring, registry): the hot-path state shared by every tracked call and stage.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Runtime_init,
    .tp_dealloc = (destructor)Runtime_dealloc,
    .tp_traverse = (traverseproc)Runtime_traverse,
    .tp_clear = (inquiry)Runtime_clear,
    .tp_methods = Runtime_methods,
    .tp_getset = Runtime_getset,
};

static PyTypeObject Frame_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "inferscope._native.Frame",
    .tp_basicsize = sizeof(FrameObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Frame_traverse,
    .tp_clear = (inquiry)Frame_clear,
    .tp_dealloc = (destructor)Frame_dealloc,
    .tp_doc = "The open inference and stage entries of one context.",
};

/* ------------------------------------------------------------------------------------------ */
/* Fold                                                                                       */

/* A table of histogram._sub_bucket_tables(scale): 1 << 12 int64 cells, each value in [0, limit].
 * The bounds keep every bucket index fold.h computes small, whatever the caller passes. */
static int table_buffer(PyObject *obj, const char *name, int64_t limit, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return 0;
    }
    const char *format = view->format != NULL ? view->format : "B";
    char code = format[strlen(format) - 1];
    if (view->ndim != 1 || view->itemsize != 8 || (code != 'q' && code != 'l') ||
        view->len != FOLD_TABLE_CELLS * 8) {
        PyErr_Format(PyExc_TypeError,
                     "fold_records: %s must be a 1-D int64 buffer of %d cells "
                     "(histogram._sub_bucket_tables(scale)), got format '%s', itemsize %zd, length %zd bytes",
                     name, FOLD_TABLE_CELLS, format, view->itemsize, view->len);
        PyBuffer_Release(view);
        return 0;
    }
    const int64_t *cells = view->buf;
    for (int i = 0; i < FOLD_TABLE_CELLS; i++) {
        if (cells[i] < 0 || cells[i] > limit) {
            PyErr_Format(PyExc_ValueError,
                         "fold_records: %s[%d] is %lld, outside [0, %lld]: not histogram._sub_bucket_tables(scale)",
                         name, i, (long long)cells[i], (long long)limit);
            PyBuffer_Release(view);
            return 0;
        }
    }
    return 1;
}

/* One fold_histograms as the tuple of _BatchHistograms' fields, each one bytes. */
static PyObject *histograms_tuple(const fold_histograms *h, size_t rows)
{
    size_t r8 = rows * 8;
    return Py_BuildValue("(y#y#y#y#y#y#y#y#y#)", (const char *)h->value_count, (Py_ssize_t)r8,
                         (const char *)h->value_sum, (Py_ssize_t)r8, (const char *)h->zero_count, (Py_ssize_t)r8,
                         (const char *)h->min_positive, (Py_ssize_t)r8, (const char *)h->max_positive,
                         (Py_ssize_t)r8, (const char *)h->low_index, (Py_ssize_t)r8, (const char *)h->start,
                         (Py_ssize_t)r8, (const char *)h->span, (Py_ssize_t)r8, (const char *)h->buckets,
                         (Py_ssize_t)(h->bucket_slots * 8));
}

/* A fold as fold_records returns it (see below). */
static PyObject *fold_result_tuple(const fold_result *result)
{
    size_t rows = result->rows;
    PyObject *out = NULL;
    PyObject *duration = histograms_tuple(&result->duration, rows);
    PyObject *cpu = result->has_cpu ? histograms_tuple(&result->cpu, rows) : Py_NewRef(Py_None);
    if (duration != NULL && cpu != NULL) {
        out = Py_BuildValue("(y#OOy#y#y#)", (const char *)result->series_ids, (Py_ssize_t)(rows * 8), duration, cpu,
                            result->has_cpu ? (const char *)result->cpu_wall : NULL, (Py_ssize_t)(rows * 8),
                            result->has_abandoned ? (const char *)result->abandoned : NULL, (Py_ssize_t)(rows * 8),
                            result->has_counters ? (const char *)result->counter_sums : NULL,
                            (Py_ssize_t)(rows * INFERSCOPE_COUNTER_SLOTS * 8));
    }
    Py_XDECREF(duration);
    Py_XDECREF(cpu);
    return out;
}

/* fold_records(records, scale, below, next_start, /) -> (series_ids, duration, cpu, cpu_wall,
 *                                                        abandoned, counter_sums)
 *
 * Folds a batch of records as Aggregator._add does before it takes its lock, with the GIL
 * released for the whole fold (see fold.h for what it computes and why it is bit-identical to the
 * numpy fold). `records` is a 1-D C-contiguous buffer of RECORD_DTYPE (176-byte items); `below`
 * and `next_start` are histogram._sub_bucket_tables(scale), for 1 <= scale <= 10. Every array
 * comes back as bytes, native byte order, one entry per row (rows ordered by series id):
 *   series_ids     int64: (key << 16) | error
 *   duration       the 9 fields of _BatchHistograms (int64 value_count, float64 value_sum, int64
 *                  zero_count, float64 min_positive and max_positive, int64 low_index, start, span
 *                  and buckets) for the wall seconds
 *   cpu            the same for the CPU seconds of the records with cpu_ns >= 0; None if none has
 *   cpu_wall       float64: the wall seconds of those records; None with cpu
 *   abandoned      int64: records with FLAG_ABANDONED; None if no record has it
 *   counter_sums   int64, rows x 13: sums of the counters; None if every counter is 0
 * The records may be read while other threads run: the caller must not change them meanwhile.
 */
static PyObject *mod_fold_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "fold_records(records, scale, below, next_start) takes 4 arguments");
        return NULL;
    }
    long scale = PyLong_AsLong(args[1]);
    if (scale == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (scale < 1 || scale > 10) {
        PyErr_Format(PyExc_ValueError, "fold_records: scale must be from 1 to 10 (the table scales), got %ld",
                     scale);
        return NULL;
    }
    Py_buffer records, below, next_start;
    if (PyObject_GetBuffer(args[0], &records, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (records.ndim != 1 || records.itemsize != (Py_ssize_t)sizeof(inferscope_record)) {
        PyErr_Format(PyExc_TypeError,
                     "fold_records: records must be a 1-D contiguous array of RECORD_DTYPE (%zu-byte records), "
                     "got %d dimension(s) of %zd-byte items",
                     sizeof(inferscope_record), records.ndim, records.itemsize);
        PyBuffer_Release(&records);
        return NULL;
    }
    if ((uintptr_t)records.buf % _Alignof(inferscope_record) != 0 || records.len / records.itemsize > INT32_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "fold_records: records must be %zu-byte aligned and at most %d of them, got %zd at address %p",
                     _Alignof(inferscope_record), INT32_MAX, records.len / records.itemsize, records.buf);
        PyBuffer_Release(&records);
        return NULL;
    }
    if (!table_buffer(args[2], "below", (int64_t)1 << scale, &below)) {
        PyBuffer_Release(&records);
        return NULL;
    }
    if (!table_buffer(args[3], "next_start", (int64_t)1 << FOLD_FRACTION_BITS, &next_start)) {
        PyBuffer_Release(&records);
        PyBuffer_Release(&below);
        return NULL;
    }

    fold_result result = {0};
    fold_status status;
    Py_BEGIN_ALLOW_THREADS
    status = fold_records(records.buf, (size_t)(records.len / records.itemsize),
                          (int)scale, below.buf, next_start.buf, &result);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&records);
    PyBuffer_Release(&below);
    PyBuffer_Release(&next_start);

    PyObject *out = NULL;
    if (status == FOLD_NO_MEMORY) {
        PyErr_NoMemory();
    } else if (status == FOLD_BAD_TABLES) {
        PyErr_SetString(PyExc_ValueError,
                        "fold_records: the tables put a value outside its row's bucket range: "
                        "not histogram._sub_bucket_tables(scale)");
    } else {
        out = fold_result_tuple(&result);
    }
    fold_result_free(&result);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Collector: the native drainer (collector.h)                                                */

typedef struct {
    PyObject_HEAD
    /* NULL until __init__. Left allocated for good if its thread would not stop in time: that thread
     * may still read it. */
    inferscope_collector *core;
    PyObject *ring; /* the Ring drained, or NULL */
} CollectorObject;

static PyTypeObject Collector_Type;

static int Collector_init(CollectorObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"scale", "below", "next_start", NULL};
    int scale;
    PyObject *below_obj, *next_start_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOO:Collector", kwlist, &scale, &below_obj, &next_start_obj)) {
        return -1;
    }
    if (self->core != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Collector is already initialised");
        return -1;
    }
    if (scale < 1 || scale > 10) {
        PyErr_Format(PyExc_ValueError, "Collector: scale must be from 1 to 10 (the table scales), got %d", scale);
        return -1;
    }
    Py_buffer below, next_start;
    if (!table_buffer(below_obj, "below", (int64_t)1 << scale, &below)) {
        return -1;
    }
    if (!table_buffer(next_start_obj, "next_start", (int64_t)1 << FOLD_FRACTION_BITS, &next_start)) {
        PyBuffer_Release(&below);
        return -1;
    }
    inferscope_collector *core = malloc(sizeof *core);
    int ok = core != NULL && collector_init(core, scale, below.buf, next_start.buf);
    PyBuffer_Release(&below);
    PyBuffer_Release(&next_start);
    if (!ok) {
        free(core);
        PyErr_NoMemory();
        return -1;
    }
    self->core = core;
    return 0;
}

static int collector_ready(CollectorObject *self)
{
    if (self->core == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Collector was not initialised");
        return 0;
    }
    return 1;
}

static long timeout_argument(PyObject *const *args, Py_ssize_t nargs, const char *name)
{
    if (nargs == 0) {
        return 5000;
    }
    long millis = PyLong_AsLong(args[0]);
    if (millis == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (nargs > 1 || millis < 0 || millis > 3600000) {
        PyErr_Format(PyExc_ValueError, "%s(timeout_millis=5000): timeout_millis must be from 0 to 3600000",
                     name);
        return -1;
    }
    return millis;
}

static void Collector_dealloc(CollectorObject *self)
{
    if (self->core != NULL) {
        int stopped;
        Py_BEGIN_ALLOW_THREADS
        stopped = collector_stop(self->core, 5000);
        if (stopped) {
            collector_set_ring(self->core, NULL, 5000);
        }
        Py_END_ALLOW_THREADS
        if (stopped) {
            collector_free(self->core);
            free(self->core);
        }
        self->core = NULL;
    }
    Py_CLEAR(self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set_ring(ring): drain the current ring whole, then drain `ring` (a Ring, or None) from now on. */
static PyObject *Collector_set_ring(CollectorObject *self, PyObject *ring)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    if (ring != Py_None && !PyObject_TypeCheck(ring, &Ring_Type)) {
        PyErr_Format(PyExc_TypeError, "set_ring: expected a Ring or None, got %s", Py_TYPE(ring)->tp_name);
        return NULL;
    }
    if (ring != Py_None && !ring_ready((RingObject *)ring)) {
        return NULL;
    }
    inferscope_ring *core = ring == Py_None ? NULL : ((RingObject *)ring)->core;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = collector_set_ring(self->core, core, 10000);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_TimeoutError, "set_ring: the collector stayed busy for 10 s");
        return NULL;
    }
    PyObject *old = self->ring;
    self->ring = ring == Py_None ? NULL : Py_NewRef(ring);
    Py_XDECREF(old); /* after the switch: the core never reads a freed ring */
    Py_RETURN_NONE;
}

static PyObject *Collector_start(CollectorObject *self, PyObject *arg)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    long interval = PyLong_AsLong(arg);
    if (interval == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (interval < 1 || interval > 3600000) {
        PyErr_Format(PyExc_ValueError, "start: interval_millis must be from 1 to 3600000, got %ld", interval);
        return NULL;
    }
    if (!collector_start(self->core, interval)) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Collector_stop(CollectorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    long millis = timeout_argument(args, nargs, "stop");
    if (millis < 0) {
        return NULL;
    }
    int stopped;
    Py_BEGIN_ALLOW_THREADS
    stopped = collector_stop(self->core, millis);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(stopped);
}

/* collect(timeout_millis=5000) -> (fold, traced, counts); see the type's doc. */
static PyObject *Collector_collect(CollectorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    long millis = timeout_argument(args, nargs, "collect");
    if (millis < 0) {
        return NULL;
    }
    collector_taken taken;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = collector_take(self->core, millis, &taken);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_Format(PyExc_TimeoutError, "collect: the collector stayed busy for %ld ms", millis);
        return NULL;
    }
    PyObject *fold = taken.has_fold ? fold_result_tuple(&taken.fold) : Py_NewRef(Py_None);
    PyObject *out = NULL;
    if (fold != NULL) {
        /* Empty bytes, not None, when nothing was kept (y# turns NULL into None). */
        out = Py_BuildValue("(Ny#(KKKKK))", fold, taken.traced ? (const char *)taken.traced : "",
                            (Py_ssize_t)(taken.traced_len * sizeof(inferscope_record)),
                            (unsigned long long)taken.folded, (unsigned long long)taken.failed,
                            (unsigned long long)taken.traced_dropped, (unsigned long long)taken.missed,
                            (unsigned long long)taken.passes);
    }
    collector_taken_free(&taken);
    return out;
}

/* take_credits(flush=False, timeout_millis=5000) -> {key: seconds}: the process CPU credited per
 * inference key since the last call (share.h); `flush` shares out every closed interval first. */
static PyObject *Collector_take_credits(CollectorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    int flush = nargs > 0 ? PyObject_IsTrue(args[0]) : 0;
    if (flush < 0) {
        return NULL;
    }
    long millis = timeout_argument(args + (nargs > 0), nargs > 0 ? nargs - 1 : 0, "take_credits");
    if (millis < 0) {
        return NULL;
    }
    uint32_t *keys;
    double *seconds;
    size_t count;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = collector_take_credits(self->core, millis, flush, &keys, &seconds, &count);
    Py_END_ALLOW_THREADS
    if (!ok) {
        free(keys);
        free(seconds);
        PyErr_Format(PyExc_TimeoutError, "take_credits: the collector stayed busy for %ld ms, or memory ran out",
                     millis);
        return NULL;
    }
    PyObject *out = PyDict_New();
    for (size_t i = 0; out != NULL && i < count; i++) {
        PyObject *key = PyLong_FromUnsignedLong(keys[i]);
        PyObject *value = PyFloat_FromDouble(seconds[i]);
        if (key == NULL || value == NULL || PyDict_SetItem(out, key, value) < 0) {
            Py_CLEAR(out);
        }
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    free(keys);
    free(seconds);
    return out;
}

/* set_own_threads(clock_ids, ended_seconds): inferscope's own threads, whose CPU the sharer
 * leaves out (_process_cpu.OWN_THREADS); the first COLLECTOR_MAX_OWN clocks are kept. */
static PyObject *Collector_set_own_threads(CollectorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    if (nargs != 2 || !PyTuple_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "set_own_threads(clock_ids: tuple[int, ...], ended_seconds: float)");
        return NULL;
    }
    /* The first COLLECTOR_MAX_OWN are kept: more (a burst of concurrent scrapes) count as the
     * process's for as long as they run. */
    Py_ssize_t n = PyTuple_GET_SIZE(args[0]);
    n = n < COLLECTOR_MAX_OWN ? n : COLLECTOR_MAX_OWN;
    clockid_t clocks[COLLECTOR_MAX_OWN];
    for (Py_ssize_t i = 0; i < n; i++) {
        long value = PyLong_AsLong(PyTuple_GET_ITEM(args[0], i));
        if (value == -1 && PyErr_Occurred()) {
            return NULL;
        }
        clocks[i] = (clockid_t)value;
    }
    double ended = PyFloat_AsDouble(args[1]);
    if (ended == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    collector_set_own(self->core, clocks, (size_t)n, (int64_t)(ended * 1e9));
    Py_RETURN_NONE;
}

/* own_cpu_seconds(): the CPU inferscope's own threads have used (the sharer leaves it out). */
static PyObject *Collector_own_cpu_seconds(CollectorObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!collector_ready(self)) {
        return NULL;
    }
    return PyFloat_FromDouble((double)collector_own_cpu_ns(self->core) / 1e9);
}

/* sample(now_ns, process_cpu_seconds): close the sharer's interval as the thread does each interval
 * (for tests: the thread reads the clocks itself). */
static PyObject *Collector_sample(CollectorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sample(now_ns, process_cpu_seconds) takes 2 arguments");
        return NULL;
    }
    long long now = PyLong_AsLongLong(args[0]);
    double cpu = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = collector_lock(self->core, 10000);
    if (ok) {
        ok = share_sample(&self->core->share, (int64_t)now, cpu) ? 1 : 2;
        pthread_mutex_unlock(&self->core->lock);
    }
    Py_END_ALLOW_THREADS
    if (ok != 1) {
        return ok == 0 ? PyErr_Format(PyExc_TimeoutError, "sample: the collector stayed busy for 10 s")
                       : PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyObject *Collector_get_folded(CollectorObject *self, void *closure)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&self->core->folded, memory_order_relaxed));
}

static PyObject *Collector_mark_inference(CollectorObject *self, PyObject *arg)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    unsigned long key = PyLong_AsUnsignedLong(arg);
    if (key == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (key >= COLLECTOR_KEYS) {
        PyErr_Format(PyExc_OverflowError, "mark_inference: key must be below %d, got %lu", COLLECTOR_KEYS, key);
        return NULL;
    }
    collector_mark_inference(self->core, (uint32_t)key);
    Py_RETURN_NONE;
}

static PyObject *Collector_after_fork_in_child(CollectorObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!collector_ready(self)) {
        return NULL;
    }
    collector_after_fork_in_child(self->core);
    Py_RETURN_NONE;
}

static PyObject *Collector_get_running(CollectorObject *self, void *closure)
{
    if (!collector_ready(self)) {
        return NULL;
    }
    return PyBool_FromLong(self->core->running);
}

static PyObject *Collector_get_ring(CollectorObject *self, void *closure)
{
    return Py_NewRef(self->ring != NULL ? self->ring : Py_None);
}

static PyMethodDef Collector_methods[] = {
    {"set_ring", (PyCFunction)Collector_set_ring, METH_O,
     "set_ring(ring): drain the current ring whole, then drain `ring` (None: no ring) from now on"},
    {"start", (PyCFunction)Collector_start, METH_O,
     "start(interval_millis): start the thread, which drains, folds and samples the process CPU once per "
     "interval, and drains at once whenever a producer finds the ring half full"},
    {"stop", (PyCFunction)(void (*)(void))Collector_stop, METH_FASTCALL,
     "stop(timeout_millis=5000) -> bool: stop the thread; False if it did not end in time"},
    {"collect", (PyCFunction)(void (*)(void))Collector_collect, METH_FASTCALL,
     "collect(timeout_millis=5000) -> (fold, traced, (folded, failed, traced_dropped, missed, passes)): "
     "drain what the ring holds now, then take everything folded since the last collect, with the GIL "
     "released"},
    {"take_credits", (PyCFunction)(void (*)(void))Collector_take_credits, METH_FASTCALL,
     "take_credits(flush=False, timeout_millis=5000) -> {key: seconds}: process CPU per inference key "
     "since the last call"},
    {"set_own_threads", (PyCFunction)(void (*)(void))Collector_set_own_threads, METH_FASTCALL,
     "set_own_threads(clock_ids, ended_seconds): inferscope's own threads, whose CPU the sharer leaves out"},
    {"own_cpu_seconds", (PyCFunction)Collector_own_cpu_seconds, METH_NOARGS,
     "own_cpu_seconds(): the CPU inferscope's own threads have used, this collector's thread included"},
    {"sample", (PyCFunction)(void (*)(void))Collector_sample, METH_FASTCALL,
     "sample(now_ns, process_cpu_seconds): close the sharer's interval (the thread does it itself)"},
    {"mark_inference", (PyCFunction)Collector_mark_inference, METH_O,
     "mark_inference(key): share the process CPU out to this key's records (an inference key)"},
    {"after_fork_in_child", (PyCFunction)Collector_after_fork_in_child, METH_NOARGS,
     "after_fork_in_child(): start over with no thread, no pipe and nothing folded"},
    {NULL}};

static PyGetSetDef Collector_getset[] = {
    {"running", (getter)Collector_get_running, NULL, "whether the thread runs", NULL},
    {"folded", (getter)Collector_get_folded, NULL, "records folded so far (read without waiting)", NULL},
    {"ring", (getter)Collector_get_ring, NULL, "the Ring drained, or None", NULL},
    {NULL}};

static PyTypeObject Collector_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "inferscope._native.Collector",
    .tp_basicsize = sizeof(CollectorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Collector(scale, below, next_start): the native drainer (collector.h).\n\n"
              "A thread of its own drains the ring once per interval and whenever a producer finds it\n"
              "half full, folds its records into per-series histograms at `scale` and shares the process\n"
              "CPU out to inferences (share.h), without the GIL. collect() drains the rest and hands over\n"
              "the fold (as fold_records returns it, or None when nothing was folded), the traced\n"
              "records (RECORD_DTYPE bytes) and cumulative counts; take_credits() the process CPU.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Collector_init,
    .tp_dealloc = (destructor)Collector_dealloc,
    .tp_methods = Collector_methods,
    .tp_getset = Collector_getset,
};

/* ------------------------------------------------------------------------------------------ */
/* Module                                                                                     */

static PyObject *mod_monotonic_ns(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(monotonic_ns());
}

static PyObject *mod_thread_cpu_ns(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(thread_cpu_ns());
}

/* perf_status() -> (mode, errno, kernel_counted): "hardware", "software" or "none", why hardware
 * events failed, and whether kernel-mode events (context switches) are counted. */
static PyObject *mod_perf_status(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    static const char *names[] = {"unknown", "hardware", "software", "none"};
    int mode = perf_probe();
    return Py_BuildValue("siO", names[mode], perf_errno, perf_exclude_kernel ? Py_False : Py_True);
}

/* read_counters(mask) -> (cpu_ns, counters tuple): what one entry would read, for doctor. */
static PyObject *mod_read_counters(PyObject *module, PyObject *arg)
{
    long mask = PyLong_AsLong(arg);
    if (mask == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t cpu = -1;
    int64_t counters[INFERSCOPE_COUNTER_SLOTS] = {0};
    counters_read((int)mask, &cpu, counters);
    if (mask & COUNTER_THREAD_CPU) {
        cpu = thread_cpu_ns();
    }
    if (mask & COUNTER_RSS) {
        counters[SLOT_RSS_DELTA] = read_rss_bytes();
    }
    PyObject *values = PyTuple_New(INFERSCOPE_COUNTER_SLOTS);
    if (values == NULL) {
        return NULL;
    }
    for (int i = 0; i < INFERSCOPE_COUNTER_SLOTS; i++) {
        PyObject *value = PyLong_FromLongLong(counters[i]);
        if (value == NULL) {
            Py_DECREF(values);
            return NULL;
        }
        PyTuple_SET_ITEM(values, i, value);
    }
    return Py_BuildValue("LN", (long long)cpu, values);
}

static PyMethodDef module_methods[] = {
    {"perf_status", mod_perf_status, METH_NOARGS, "perf_status() -> (mode, errno)"},
    {"read_counters", mod_read_counters, METH_O, "read_counters(mask) -> (cpu_ns, counters)"},
    {"monotonic_ns", mod_monotonic_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns: the clock of start_ns"},
    {"thread_cpu_ns", mod_thread_cpu_ns, METH_NOARGS, "CLOCK_THREAD_CPUTIME_ID in ns"},
    {"fold_records", (PyCFunction)(void (*)(void))mod_fold_records, METH_FASTCALL,
     "fold_records(records, scale, below, next_start) -> (series_ids, duration, cpu, cpu_wall, abandoned, "
     "counter_sums): fold a batch of records with the GIL released"},
    {NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "inferscope._native._ringbuf",
    .m_doc = "inferscope's C hot path: ring, runtime, tracked calls and stages.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__ringbuf(void)
{
    PyTypeObject *types[] = {&Ring_Type, &Runtime_Type, &Tracked_Type, &Stage_Type, &Frame_Type, &Collector_Type};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0) {
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    const char *names[] = {"Ring", "Runtime", "Tracked", "Stage", "Frame", "Collector"};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (check_context_layout() < 0) {
        Py_DECREF(m);
        return NULL;
    }
    str_get_span_context = PyUnicode_InternFromString("get_span_context");
    int_64 = PyLong_FromLong(64);
    if (str_get_span_context == NULL || int_64 == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_STACK_DEPTH", MAX_STACK_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(inferscope_record)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
