/* The native drainer: a pthread that empties the record ring and folds the records into per-series
 * histograms, and shares the process CPU out to inferences, without ever taking the GIL.
 *
 * This header has no Python dependency, like ringcore.h and fold.h, so that
 * tests/c/collector_stress.c can run it against pthread producers under ThreadSanitizer. ringbuf.c wraps it as
 * _native.Collector; the Python drainer (_pipeline.Drainer) owns one on the C backend.
 *
 * Who drains. The ring has a single consumer: whoever holds `lock`. That is the collector's thread,
 * once per interval and whenever a producer finds the ring half full (the ring's wake-up pipe,
 * ringcore.h), or a Python thread inside collector_take() (before every read: snapshot(),
 * exports, windows; and every interval while tracing is on). Either one folds what it drained
 * into `acc`, the running fold since the last take, with fold_records and fold_merge (fold.h).
 * collector_take() hands the fold over and starts a new one; Python merges it into its Series
 * under the GIL once per take, so the GIL is held for the merge of a few rows, never per record.
 *
 * Beside the fold:
 *   traced    the records with FLAG_TRACED are kept whole, bounded and in ring order, for Python:
 *             the span pipeline builds spans from them. Past the bound they are counted
 *             (traced_dropped) and not kept.
 *   share     every inference record's wall time goes to the process-CPU sharer (share.h), which
 *             the thread samples once per interval. Inference keys are marked in `inference`, a
 *             bitmap that Python sets when a key is made, before any record of it. Python takes
 *             the credits when a window closes.
 *
 * Waits. The thread sleeps in poll() on its pipe until the interval ends: one wake-up per
 * interval, without the GIL, and one a second once nothing has arrived for 5 s. Every lock
 * wait has a deadline.
 */
#ifndef INFERSCOPE_COLLECTOR_H
#define INFERSCOPE_COLLECTOR_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "fold.h"
#include "ringcore.h"
#include "share.h"

#ifndef COLLECTOR_BATCH
#define COLLECTOR_BATCH 4096 /* records folded at a time, in place in the ring: their slots stay in cache */
#endif
#define COLLECTOR_MAX_TRACED 16384        /* traced records kept between two takes */
#define COLLECTOR_KEYS (1 << 15)          /* the bitmap covers keys below this (max_keys is 20,000) */
#define COLLECTOR_LOCK_MILLIS 10000       /* the thread's wait for the lock, at most */
#define COLLECTOR_NICE 10                 /* the thread's nice value above its creator's (at most 19) */
#define COLLECTOR_IDLE_NS 1000000000LL    /* between two passes while nothing arrives... */
#define COLLECTOR_IDLE_AFTER_NS 5000000000LL /* ...once nothing has arrived for this long */
#define COLLECTOR_SHARE_HORIZON_NS 1000000000LL /* _process_cpu.ProcessCpuSharer's horizon_seconds */
#define COLLECTOR_FLAG_TRACED 2
#define COLLECTOR_THREAD_NAME "inferscope-fold" /* at most 15 characters */
#define COLLECTOR_MAX_OWN 32 /* inferscope's own threads whose CPU the sharer leaves out */

typedef struct {
    pthread_mutex_t lock; /* guards everything below up to `thread`, and makes its holder the ring's consumer */
    inferscope_ring *ring; /* NULL: nothing to drain */
    int scale;
    int64_t below[FOLD_TABLE_CELLS];
    int64_t next_start[FOLD_TABLE_CELLS];
    fold_result acc;
    int has_acc;
    inferscope_record *traced;
    size_t traced_len, traced_cap;
    share_state share;
    /* Cumulative counts. */
    _Atomic uint64_t folded;  /* records folded; read without the lock */
    uint64_t failed;          /* records drained but lost to an allocation failure */
    uint64_t traced_dropped;  /* traced records past COLLECTOR_MAX_TRACED */
    uint64_t share_failed;    /* inference records the sharer lost to an allocation failure */
    uint64_t passes;          /* passes of the thread */
    /* The thread. Set by collector_start/stop only, which Python serialises. */
    pthread_t thread;
    int running;
    int64_t interval_ns; /* between two samples of the process CPU clock, and the thread's passes */
    int wake[2]; /* the pipe: read end polled by the thread, write end the ring's wake_fd */
    _Atomic int stop;
    _Atomic uint8_t inference[COLLECTOR_KEYS / 8];
    /* inferscope's own threads (_process_cpu.OWN_THREADS), whose CPU is left out of what the
     * sharer shares: their clocks and last readings, the CPU of those that ended, and this
     * collector's thread. Guarded by own_lock, never held long, and never with `lock` wanted. */
    pthread_mutex_t own_lock;
    clockid_t own_clocks[COLLECTOR_MAX_OWN];
    int64_t own_last[COLLECTOR_MAX_OWN];
    size_t own_len;
    int64_t own_ended_ns;
    clockid_t self_clock;
    int self_running;
    int64_t self_ended_ns; /* this collector's threads that ended */
} inferscope_collector;

/* ------------------------------------------------------------------------------------------ */
/* Merging two folds                                                                          */

/* One histogram of the merged rows: row r takes a's row from_a[r] and b's row from_b[r] (-1: none).
 * Sums add a's first, then b's: the order in which Python would merge the two folds in turn. */
static fold_status fold_histograms_merge(fold_histograms *h, const fold_histograms *a, const int32_t *from_a,
                                         const fold_histograms *b, const int32_t *from_b, size_t rows)
{
    if (fold_histograms_alloc(h, rows) != FOLD_OK) {
        return FOLD_NO_MEMORY;
    }
    size_t slots = 0;
    for (size_t r = 0; r < rows; r++) {
        const fold_histograms *parts[2] = {a, b};
        const int32_t rows_of[2] = {from_a[r], from_b[r]};
        int64_t count = 0, zeros = 0, low = 0, high = -1;
        double sum = 0.0, min_positive = HUGE_VAL, max_positive = 0.0;
        int occupied = 0;
        for (int p = 0; p < 2; p++) {
            int32_t i = rows_of[p];
            if (i < 0) {
                continue;
            }
            const fold_histograms *part = parts[p];
            count += part->value_count[i];
            zeros += part->zero_count[i];
            sum = p == 0 ? part->value_sum[i] : sum + part->value_sum[i];
            if (part->min_positive[i] < min_positive) {
                min_positive = part->min_positive[i];
            }
            if (part->max_positive[i] > max_positive) {
                max_positive = part->max_positive[i];
            }
            if (part->span[i] > 0) {
                int64_t part_low = part->low_index[i], part_high = part_low + part->span[i] - 1;
                low = occupied && low < part_low ? low : part_low;
                high = occupied && high > part_high ? high : part_high;
                occupied = 1;
            }
        }
        h->value_count[r] = count;
        h->value_sum[r] = sum;
        h->zero_count[r] = zeros;
        h->min_positive[r] = min_positive;
        h->max_positive[r] = max_positive;
        h->low_index[r] = occupied ? low : 0;
        h->span[r] = occupied ? high - low + 1 : 0;
        h->start[r] = (int64_t)slots;
        slots += (size_t)h->span[r];
    }
    h->bucket_slots = slots;
    h->buckets = calloc(slots ? slots : 1, sizeof(int64_t));
    if (h->buckets == NULL) {
        return FOLD_NO_MEMORY;
    }
    for (size_t r = 0; r < rows; r++) {
        const fold_histograms *parts[2] = {a, b};
        const int32_t rows_of[2] = {from_a[r], from_b[r]};
        for (int p = 0; p < 2; p++) {
            int32_t i = rows_of[p];
            if (i < 0 || parts[p]->span[i] == 0) {
                continue;
            }
            int64_t *to = h->buckets + h->start[r] + (parts[p]->low_index[i] - h->low_index[r]);
            const int64_t *from = parts[p]->buckets + parts[p]->start[i];
            for (int64_t k = 0; k < parts[p]->span[i]; k++) {
                to[k] += from[k];
            }
        }
    }
    return FOLD_OK;
}

/* `out` (zeroed by the caller, freed with fold_result_free whatever the status) becomes the fold of
 * a's records followed by b's: rows are the union of both, in order of series id. */
static fold_status fold_merge(const fold_result *a, const fold_result *b, fold_result *out)
{
    fold_status status = FOLD_NO_MEMORY;
    size_t most = a->rows + b->rows, n = most ? most : 1;
    int32_t *from_a = malloc(n * sizeof *from_a);
    int32_t *from_b = malloc(n * sizeof *from_b);
    out->series_ids = malloc(n * sizeof(int64_t));
    out->cpu_wall = malloc(n * sizeof(double));
    out->abandoned = malloc(n * sizeof(int64_t));
    out->counter_sums = malloc(n * INFERSCOPE_COUNTER_SLOTS * sizeof(int64_t));
    if (!from_a || !from_b || !out->series_ids || !out->cpu_wall || !out->abandoned || !out->counter_sums) {
        goto done;
    }
    size_t i = 0, j = 0, rows = 0;
    while (i < a->rows || j < b->rows) {
        int take_a = i < a->rows && (j >= b->rows || a->series_ids[i] <= b->series_ids[j]);
        int take_b = j < b->rows && (i >= a->rows || b->series_ids[j] <= a->series_ids[i]);
        from_a[rows] = take_a ? (int32_t)i : -1;
        from_b[rows] = take_b ? (int32_t)j : -1;
        out->series_ids[rows] = take_a ? a->series_ids[i] : b->series_ids[j];
        out->cpu_wall[rows] = take_a ? a->cpu_wall[i] : 0.0;
        out->abandoned[rows] = take_a ? a->abandoned[i] : 0;
        for (int slot = 0; slot < INFERSCOPE_COUNTER_SLOTS; slot++) {
            uint64_t sum = take_a ? (uint64_t)a->counter_sums[i * INFERSCOPE_COUNTER_SLOTS + slot] : 0;
            if (take_b) {
                sum += (uint64_t)b->counter_sums[j * INFERSCOPE_COUNTER_SLOTS + slot];
            }
            out->counter_sums[rows * INFERSCOPE_COUNTER_SLOTS + slot] = (int64_t)sum;
        }
        if (take_b) {
            out->cpu_wall[rows] = take_a ? out->cpu_wall[rows] + b->cpu_wall[j] : b->cpu_wall[j];
            out->abandoned[rows] += b->abandoned[j];
        }
        i += (size_t)take_a;
        j += (size_t)take_b;
        rows++;
    }
    out->rows = rows;
    out->has_cpu = a->has_cpu | b->has_cpu;
    out->has_abandoned = a->has_abandoned | b->has_abandoned;
    out->has_counters = a->has_counters | b->has_counters;
    status = fold_histograms_merge(&out->duration, &a->duration, from_a, &b->duration, from_b, rows);
    if (status == FOLD_OK) {
        status = fold_histograms_merge(&out->cpu, &a->cpu, from_a, &b->cpu, from_b, rows);
    }
done:
    free(from_a);
    free(from_b);
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* The collector                                                                              */

/* `below` and `next_start` are histogram._sub_bucket_tables(scale), checked by the caller. Returns
 * 0 when out of memory. */
static int collector_init(inferscope_collector *c, int scale, const int64_t *below, const int64_t *next_start)
{
    memset(c, 0, sizeof *c);
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        return 0;
    }
    if (pthread_mutex_init(&c->own_lock, NULL) != 0) {
        pthread_mutex_destroy(&c->lock);
        return 0;
    }
    c->scale = scale;
    memcpy(c->below, below, sizeof c->below);
    memcpy(c->next_start, next_start, sizeof c->next_start);
    c->wake[0] = c->wake[1] = -1;
    share_init(&c->share, COLLECTOR_SHARE_HORIZON_NS);
    return 1;
}

static inline void collector_mark_inference(inferscope_collector *c, uint32_t key)
{
    if (key < COLLECTOR_KEYS) {
        atomic_fetch_or_explicit(&c->inference[key / 8], (uint8_t)(1u << (key % 8)), memory_order_relaxed);
    }
}

static inline int collector_is_inference(inferscope_collector *c, uint32_t key)
{
    return key < COLLECTOR_KEYS &&
           (atomic_load_explicit(&c->inference[key / 8], memory_order_relaxed) >> (key % 8)) & 1;
}

/* Keep a traced record for Python; 0 when COLLECTOR_MAX_TRACED wait already or memory ran out. */
static int collector_keep_traced(inferscope_collector *c, const inferscope_record *rec)
{
    if (c->traced_len == c->traced_cap) {
        if (c->traced_cap >= COLLECTOR_MAX_TRACED) {
            return 0;
        }
        size_t bigger = c->traced_cap ? 2 * c->traced_cap : 256;
        bigger = bigger < COLLECTOR_MAX_TRACED ? bigger : COLLECTOR_MAX_TRACED;
        inferscope_record *grown = realloc(c->traced, bigger * sizeof *grown);
        if (grown == NULL) {
            return 0;
        }
        c->traced = grown;
        c->traced_cap = bigger;
    }
    c->traced[c->traced_len++] = *rec;
    return 1;
}

/* One record read in place from the ring: folded, kept if traced, its wall time given to the
 * sharer if it is an inference's. Caller holds the lock (inferscope_ring_consume's visitor). */
typedef struct {
    inferscope_collector *c;
    fold_batch batch;
} collector_pass;

static void collector_visit(void *ctx, const inferscope_record *rec, size_t i)
{
    collector_pass *pass = ctx;
    inferscope_collector *c = pass->c;
    (void)i;
    if ((rec->flags & COLLECTOR_FLAG_TRACED) && !collector_keep_traced(c, rec)) {
        c->traced_dropped++;
    }
    if (collector_is_inference(c, rec->key) && !share_add(&c->share, rec->key, rec->start_ns, rec->wall_ns)) {
        c->share_failed++;
    }
    fold_batch_add(&pass->batch, rec);
}

/* Merge the pass's `n` folded records into the running fold. Caller holds the lock. */
static void collector_merge(inferscope_collector *c, fold_batch *done, size_t n)
{
    fold_result batch = {0};
    fold_status status = fold_batch_finish(done, &batch);
    if (status == FOLD_OK && !c->has_acc) {
        c->acc = batch;
        c->has_acc = 1;
        atomic_fetch_add_explicit(&c->folded, n, memory_order_relaxed);
        return;
    }
    if (status == FOLD_OK) {
        fold_result merged = {0};
        status = fold_merge(&c->acc, &batch, &merged);
        if (status == FOLD_OK) {
            fold_result_free(&c->acc);
            c->acc = merged;
            atomic_fetch_add_explicit(&c->folded, n, memory_order_relaxed);
        }
        else {
            fold_result_free(&merged);
        }
    }
    fold_result_free(&batch);
    if (status != FOLD_OK) {
        c->failed += n; /* the tables are checked, so only memory can fail */
    }
}

/* Drain at most `limit` records (what the ring held when the caller began, so that producers that
 * never pause cannot keep the drain going), COLLECTOR_BATCH at a time, each in one pass over its
 * slots (inferscope_ring_consume): read in place, without a copy, and handed back to the producers
 * one by one. Caller holds the lock. */
static void collector_drain(inferscope_collector *c, uint64_t limit)
{
    if (c->ring == NULL) {
        return;
    }
    while (limit > 0) {
        size_t max = limit < COLLECTOR_BATCH ? (size_t)limit : COLLECTOR_BATCH;
        collector_pass pass = {.c = c};
        if (fold_batch_init(&pass.batch, max, c->scale, c->below, c->next_start) != FOLD_OK) {
            pass.batch.failed = 1; /* no memory for the fold: the records still leave the ring, lost */
        }
        size_t n = inferscope_ring_consume(c->ring, max, collector_visit, &pass);
        if (n > 0) {
            collector_merge(c, &pass.batch, n); /* counts a failed batch's records in `failed` */
        }
        fold_batch_free(&pass.batch);
        if (n == 0) {
            break;
        }
        limit -= n;
    }
}

/* Lock with a deadline `timeout_millis` from now; 0 when it passed. */
static int collector_lock(inferscope_collector *c, long timeout_millis)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_millis / 1000;
    deadline.tv_nsec += (timeout_millis % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    return pthread_mutex_timedlock(&c->lock, &deadline) == 0;
}

/* What collector_take hands over: the caller owns it and frees it with collector_taken_free. */
typedef struct {
    fold_result fold;
    int has_fold;
    inferscope_record *traced;
    size_t traced_len;
    uint64_t folded, failed, traced_dropped, missed, passes;
} collector_taken;

static void collector_taken_free(collector_taken *t)
{
    if (t->has_fold) {
        fold_result_free(&t->fold);
    }
    free(t->traced);
    memset(t, 0, sizeof *t);
}

/* Drain what the ring holds now, then hand over everything folded and kept since the last take.
 * Returns 0 if the lock could not be had within `timeout_millis` (nothing is taken then). */
static int collector_take(inferscope_collector *c, long timeout_millis, collector_taken *out)
{
    memset(out, 0, sizeof *out);
    if (!collector_lock(c, timeout_millis)) {
        return 0;
    }
    if (c->ring != NULL) {
        collector_drain(c, inferscope_ring_len(c->ring));
    }
    out->fold = c->acc;
    out->has_fold = c->has_acc;
    memset(&c->acc, 0, sizeof c->acc);
    c->has_acc = 0;
    out->traced = c->traced;
    out->traced_len = c->traced_len;
    c->traced = NULL;
    c->traced_len = c->traced_cap = 0;
    out->folded = atomic_load_explicit(&c->folded, memory_order_relaxed);
    out->failed = c->failed;
    out->traced_dropped = c->traced_dropped;
    out->missed = c->share.missed + c->share_failed;
    out->passes = c->passes;
    pthread_mutex_unlock(&c->lock);
    return 1;
}

/* Drain the current ring whole, then drain `ring` from now on (NULL: none). The thread's wake-ups
 * move with it. Returns 0 if the lock could not be had in time (nothing changed then). */
static int collector_set_ring(inferscope_collector *c, inferscope_ring *ring, long timeout_millis)
{
    if (!collector_lock(c, timeout_millis)) {
        return 0;
    }
    inferscope_ring *old = c->ring;
    if (old != NULL && old != ring) {
        collector_drain(c, inferscope_ring_len(old));
        int fd = c->wake[1];
        atomic_compare_exchange_strong(&old->wake_fd, &fd, -1);
    }
    c->ring = ring;
    if (ring != NULL && c->running) {
        atomic_store_explicit(&ring->wake_sent, 0, memory_order_relaxed);
        atomic_store_explicit(&ring->wake_fd, c->wake[1], memory_order_relaxed);
    }
    pthread_mutex_unlock(&c->lock);
    return 1;
}

static inline int64_t collector_clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Set inferscope's own threads: `n` CPU clock ids (at most COLLECTOR_MAX_OWN are kept) and the CPU
 * of those that ended. */
static void collector_set_own(inferscope_collector *c, const clockid_t *clocks, size_t n, int64_t ended_ns)
{
    n = n < COLLECTOR_MAX_OWN ? n : COLLECTOR_MAX_OWN;
    pthread_mutex_lock(&c->own_lock);
    int64_t last[COLLECTOR_MAX_OWN];
    for (size_t i = 0; i < n; i++) {
        last[i] = 0;
        for (size_t j = 0; j < c->own_len; j++) {
            if (c->own_clocks[j] == clocks[i]) {
                last[i] = c->own_last[j];
            }
        }
    }
    memcpy(c->own_clocks, clocks, n * sizeof *clocks);
    memcpy(c->own_last, last, n * sizeof *last);
    c->own_len = n;
    c->own_ended_ns = ended_ns;
    pthread_mutex_unlock(&c->own_lock);
}

/* CPU nanoseconds that inferscope's own threads have used, this collector's thread included. A
 * clock that cannot be read (its thread is ending) counts its last reading. */
static int64_t collector_own_cpu_ns(inferscope_collector *c)
{
    pthread_mutex_lock(&c->own_lock);
    int64_t total = c->own_ended_ns + c->self_ended_ns;
    struct timespec ts;
    for (size_t i = 0; i < c->own_len; i++) {
        if (clock_gettime(c->own_clocks[i], &ts) == 0) {
            c->own_last[i] = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        }
        total += c->own_last[i];
    }
    if (c->self_running && clock_gettime(c->self_clock, &ts) == 0) {
        total += (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    pthread_mutex_unlock(&c->own_lock);
    return total;
}

/* Close the sharer's interval now with the process CPU clock (time.process_time()), less what
 * inferscope's own threads used: the observer's CPU is not the inferences'. Caller holds the lock. */
static void collector_sample(inferscope_collector *c)
{
    int64_t now = collector_clock_ns(CLOCK_MONOTONIC);
    int64_t own = collector_own_cpu_ns(c);
    double cpu = (double)(collector_clock_ns(CLOCK_PROCESS_CPUTIME_ID) - own) / 1e9;
    share_sample(&c->share, now, cpu);
}

static void *collector_main(void *arg)
{
    inferscope_collector *c = arg;
    /* Below the serving threads: on a busy machine the scheduler runs them first, and the thread
     * still gets its few milliseconds a second (Linux: the nice value of this thread alone). */
    id_t tid = (id_t)syscall(SYS_gettid);
    errno = 0;
    int niceness = getpriority(PRIO_PROCESS, tid);
    if (errno == 0) {
        niceness = niceness + COLLECTOR_NICE < 19 ? niceness + COLLECTOR_NICE : 19;
        if (setpriority(PRIO_PROCESS, tid, niceness) != 0) {
            /* not allowed (a seccomp profile, say): it runs at the process's priority */
        }
    }
    pthread_mutex_lock(&c->own_lock);
    c->self_running = pthread_getcpuclockid(pthread_self(), &c->self_clock) == 0;
    pthread_mutex_unlock(&c->own_lock);
    struct pollfd wake = {.fd = c->wake[0], .events = POLLIN};
    int64_t next_sample = collector_clock_ns(CLOCK_MONOTONIC);
    uint64_t folded_at_sample = 0;
    int64_t active_at = next_sample; /* when records were last folded */
    while (!atomic_load_explicit(&c->stop, memory_order_acquire)) {
        int64_t left = next_sample - collector_clock_ns(CLOCK_MONOTONIC);
        int timeout = left > 0 ? (int)((left + 999999) / 1000000) : 0;
        if (poll(&wake, 1, timeout) > 0) {
            char bytes[64];
            while (read(c->wake[0], bytes, sizeof bytes) > 0) {
            }
        }
        if (atomic_load_explicit(&c->stop, memory_order_acquire)) {
            break;
        }
        if (!collector_lock(c, COLLECTOR_LOCK_MILLIS)) {
            continue; /* a take or a ring change holds it: they drain too */
        }
        if (c->ring != NULL) {
            collector_drain(c, inferscope_ring_len(c->ring));
        }
        int64_t now = collector_clock_ns(CLOCK_MONOTONIC);
        if (now >= next_sample) {
            collector_sample(c);
            /* Idle (nothing folded, by this thread or a take, for COLLECTOR_IDLE_AFTER_NS): pass
             * again in COLLECTOR_IDLE_NS, not every interval. Not sooner: a service with a few
             * calls a second keeps its intervals short, so that the CPU of the gaps between its
             * calls stays the process's own. The first records after an idle spell wait for that
             * pass or a half-full ring; their interval of the sharer spans the idle spell. */
            uint64_t folded = atomic_load_explicit(&c->folded, memory_order_relaxed);
            if (folded != folded_at_sample) {
                folded_at_sample = folded;
                active_at = now;
            }
            int idle = now - active_at >= COLLECTOR_IDLE_AFTER_NS;
            int64_t wait = c->interval_ns;
            if (idle && wait < COLLECTOR_IDLE_NS) {
                wait = COLLECTOR_IDLE_NS;
            }
            next_sample = now + wait;
        }
        c->passes++;
        pthread_mutex_unlock(&c->lock);
    }
    /* Its CPU stays left out once it has ended. */
    pthread_mutex_lock(&c->own_lock);
    c->self_ended_ns += collector_clock_ns(CLOCK_THREAD_CPUTIME_ID);
    c->self_running = 0;
    pthread_mutex_unlock(&c->own_lock);
    return NULL;
}

/* The process CPU credited per inference key since the last call: `keys` and `seconds` (malloc'd,
 * the caller frees them) of `*count` entries. `flush` shares out every closed interval first (at
 * shutdown). Returns 0 if the lock could not be had in time, or memory ran out. */
static int collector_take_credits(inferscope_collector *c, long timeout_millis, int flush, uint32_t **keys,
                                  double **seconds, size_t *count)
{
    *keys = NULL;
    *seconds = NULL;
    *count = 0;
    if (!collector_lock(c, timeout_millis)) {
        return 0;
    }
    if (flush) {
        share_until(&c->share, INT64_C(1) << 62);
    }
    share_state *s = &c->share;
    size_t n = 0;
    for (size_t key = 0; key < s->credits_cap; key++) {
        n += s->credited[key];
    }
    int ok = 1;
    if (n > 0) {
        *keys = malloc(n * sizeof **keys);
        *seconds = malloc(n * sizeof **seconds);
        ok = *keys != NULL && *seconds != NULL;
        for (size_t key = 0, i = 0; ok && key < s->credits_cap; key++) {
            if (s->credited[key]) {
                (*keys)[i] = (uint32_t)key;
                (*seconds)[i++] = s->credits[key];
                s->credited[key] = 0;
            }
        }
        *count = ok ? n : 0;
    }
    pthread_mutex_unlock(&c->lock);
    return ok;
}

/* Start the thread, which passes once every `interval_millis` (and at half full); returns 0 and
 * sets errno if it could not be. */
static int collector_start(inferscope_collector *c, long interval_millis)
{
    if (c->running) {
        return 1;
    }
    c->interval_ns = (int64_t)interval_millis * 1000000;
    if (c->wake[0] < 0) {
        if (pipe2(c->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
            c->wake[0] = c->wake[1] = -1;
            return 0;
        }
    }
    atomic_store_explicit(&c->stop, 0, memory_order_release);
    /* The thread takes no signal: the application's handlers run where the application expects. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    int error = pthread_create(&c->thread, NULL, collector_main, c);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (error != 0) {
        errno = error;
        return 0;
    }
    pthread_setname_np(c->thread, COLLECTOR_THREAD_NAME); /* what top -H and /proc show; may fail */
    c->running = 1;
    char byte = 0; /* a first pass at once: a ring that filled before the start wakes nobody */
    ssize_t written = write(c->wake[1], &byte, 1);
    (void)written;
    pthread_mutex_lock(&c->lock);
    if (c->ring != NULL) {
        atomic_store_explicit(&c->ring->wake_sent, 0, memory_order_relaxed);
        atomic_store_explicit(&c->ring->wake_fd, c->wake[1], memory_order_relaxed);
    }
    pthread_mutex_unlock(&c->lock);
    return 1;
}

/* Stop the thread and wait for it up to `timeout_millis`. Returns 0 if it did not end in time: it
 * is then detached, and the collector must never be freed (the thread may still read it). */
static int collector_stop(inferscope_collector *c, long timeout_millis)
{
    if (!c->running) {
        return 1;
    }
    atomic_store_explicit(&c->stop, 1, memory_order_release);
    char byte = 0;
    ssize_t written = write(c->wake[1], &byte, 1);
    (void)written; /* a full pipe already wakes it */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_millis / 1000 + 1;
    c->running = 0;
    if (pthread_timedjoin_np(c->thread, NULL, &deadline) != 0) {
        pthread_detach(c->thread);
        return 0;
    }
    if (c->ring != NULL) {
        int fd = c->wake[1];
        atomic_compare_exchange_strong(&c->ring->wake_fd, &fd, -1);
    }
    return 1;
}

/* In a child after fork(): only the forking thread exists. The collector starts over with no
 * thread, no pipe (the caller closes the parent's) and nothing folded: the child's aggregates start
 * from zero. What another thread was folding at fork() may be half-written, so it is then left
 * unfreed rather than trusted. */
static inline void collector_after_fork_in_child(inferscope_collector *c)
{
    if (pthread_mutex_trylock(&c->lock) == 0) {
        if (c->has_acc) {
            fold_result_free(&c->acc);
        }
        free(c->traced);
        share_free(&c->share);
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_init(&c->lock, NULL);
    /* The parent's threads do not exist here, and the child's CPU clock starts from zero. */
    pthread_mutex_init(&c->own_lock, NULL);
    c->own_len = 0;
    c->own_ended_ns = c->self_ended_ns = 0;
    c->self_running = 0;
    memset(&c->acc, 0, sizeof c->acc);
    c->has_acc = 0;
    c->traced = NULL;
    c->traced_len = c->traced_cap = 0;
    share_init(&c->share, COLLECTOR_SHARE_HORIZON_NS);
    atomic_store_explicit(&c->folded, 0, memory_order_relaxed);
    c->failed = c->traced_dropped = c->share_failed = c->passes = 0;
    c->running = 0;
    atomic_store_explicit(&c->stop, 0, memory_order_relaxed);
    if (c->ring != NULL) {
        int fd = c->wake[1];
        atomic_compare_exchange_strong(&c->ring->wake_fd, &fd, -1);
    }
    for (int i = 0; i < 2; i++) {
        if (c->wake[i] >= 0) {
            close(c->wake[i]);
            c->wake[i] = -1;
        }
    }
}

/* Free everything; the thread must be stopped. */
static void collector_free(inferscope_collector *c)
{
    if (c->has_acc) {
        fold_result_free(&c->acc);
    }
    free(c->traced);
    share_free(&c->share);
    for (int i = 0; i < 2; i++) {
        if (c->wake[i] >= 0) {
            close(c->wake[i]);
        }
    }
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->own_lock);
    memset(c, 0, sizeof *c);
}

#endif
