/* The drainer's fold of one batch of records into per-series histograms, in plain C.
 *
 * It computes what aggregator._fold_batch computes with numpy, and Aggregator.add before it takes
 * its lock: the batch's distinct (key, error) series, and per series the exponential histogram of
 * the wall seconds and of the CPU seconds, the wall seconds of the records whose CPU was measured,
 * the abandoned count and the counter sums. ringbuf.c runs it with the GIL released, so it touches
 * no Python object and allocates with malloc alone; it has no Python dependency.
 *
 * Bit-identical to the numpy fold, by construction:
 * - seconds are (double)ns / 1e9, as numpy converts int64 to float64 and divides; a wall time of
 *   0 or less counts as 0 seconds (max(wall / 1e9, 0.0)), and CPU time counts where cpu_ns >= 0;
 * - sums add in record order, starting from 0.0, as numpy's bincount adds its weights;
 * - bucket indices come from the same exact integer arithmetic on the float's bits and from the
 *   very tables of histogram._sub_bucket_tables(scale), which the caller passes in;
 * - counter sums are int64 and wrap on overflow as numpy's do (added as uint64: no signed
 *   overflow, which C leaves undefined);
 * - rows are ordered by series id, (key << 16) | error, as _series_rows numbers them.
 */
#ifndef INFERSCOPE_FOLD_H
#define INFERSCOPE_FOLD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ringcore.h"

#define FOLD_FRACTION_BITS 52
#define FOLD_CELL_BITS 12 /* histogram._CELL_BITS: the tables have 1 << 12 cells */
#define FOLD_TABLE_CELLS (1 << FOLD_CELL_BITS)
#define FOLD_ERROR_BITS 16 /* aggregator._ERROR_BITS */
#define FOLD_FLAG_ABANDONED 1
#define FOLD_NO_INDEX INT32_MIN

/* One histogram of one batch, per row: the fields of aggregator._BatchHistograms. */
typedef struct {
    int64_t *value_count;
    double *value_sum;
    int64_t *zero_count;
    double *min_positive; /* +inf for a row without positive values */
    double *max_positive; /* 0.0 for a row without positive values */
    int64_t *low_index;   /* bucket index of the row's first slot; 0 without positive values */
    int64_t *start;       /* where the row's slots begin in `buckets` */
    int64_t *span;        /* how many slots the row has */
    int64_t *buckets;
    size_t bucket_slots;
} fold_histograms;

/* Everything the fold hands back. Arrays have `rows` entries (counter_sums rows * 13), in order of
 * series id. `has_cpu`, `has_abandoned` and `has_counters` say whether any record measured CPU,
 * was abandoned, or had a non-zero counter; the arrays are filled either way. */
typedef struct {
    size_t rows;
    int64_t *series_ids;
    fold_histograms duration;
    fold_histograms cpu;
    double *cpu_wall;
    int64_t *abandoned;
    int64_t *counter_sums;
    int has_cpu, has_abandoned, has_counters;
} fold_result;

typedef enum { FOLD_OK = 0, FOLD_NO_MEMORY, FOLD_BAD_TABLES } fold_status;

/* The OTel bucket index at `scale` of a positive finite value: histogram._bucket_indices for one
 * value, for 1 <= scale <= 10 (the table scales). */
static inline int64_t fold_bucket_index(double value, int scale, const int64_t *below, const int64_t *next_start)
{
    int64_t bits;
    memcpy(&bits, &value, sizeof bits);
    int64_t exponent = bits >> FOLD_FRACTION_BITS;
    if (exponent == 0) {
        /* Subnormals have no implicit leading 1; scaling them by 2**64 (exact) makes them normal. */
        double scaled = value * 18446744073709551616.0;
        memcpy(&bits, &scaled, sizeof bits);
        exponent = (bits >> FOLD_FRACTION_BITS) - 64;
    }
    exponent -= 1023;
    int64_t fraction = bits & ((INT64_C(1) << FOLD_FRACTION_BITS) - 1);
    int64_t cell = fraction >> (FOLD_FRACTION_BITS - FOLD_CELL_BITS);
    /* A multiplication, not a shift: the exponent may be negative. */
    return exponent * (INT64_C(1) << scale) - 1 + below[cell] + (fraction >= next_start[cell]);
}

/* Per-series accumulators while the batch is read, in the order series first appear. */
typedef struct {
    int64_t count, zeros;
    double sum, min_positive, max_positive;
} fold_acc;

typedef struct {
    uint64_t series_id;
    fold_acc wall, cpu;
    double cpu_wall;
    int64_t abandoned;
    uint64_t counters[INFERSCOPE_COUNTER_SLOTS];
    int32_t first_row; /* the order in which the series first appeared in the batch */
} fold_series;

/* series id -> index into the fold_series array: open addressing, linear probing. */
typedef struct {
    uint64_t *ids; /* FOLD_EMPTY where free */
    int32_t *index;
    size_t mask;
} fold_table;

#define FOLD_EMPTY UINT64_MAX /* no series id has all 64 bits set: key is 32 bits and error 16 */

static inline size_t fold_slot(const fold_table *t, uint64_t id)
{
    size_t slot = (size_t)((id * UINT64_C(0x9E3779B97F4A7C15)) >> 20) & t->mask;
    while (t->ids[slot] != id && t->ids[slot] != FOLD_EMPTY) {
        slot = (slot + 1) & t->mask;
    }
    return slot;
}

static int fold_table_init(fold_table *t, size_t capacity)
{
    t->ids = malloc(capacity * sizeof *t->ids);
    t->index = malloc(capacity * sizeof *t->index);
    t->mask = capacity - 1;
    if (t->ids == NULL || t->index == NULL) {
        free(t->ids);
        free(t->index);
        return 0;
    }
    memset(t->ids, 0xff, capacity * sizeof *t->ids);
    return 1;
}

static int fold_table_grow(fold_table *t)
{
    fold_table bigger;
    if (!fold_table_init(&bigger, 2 * (t->mask + 1))) {
        return 0;
    }
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->ids[i] != FOLD_EMPTY) {
            size_t slot = fold_slot(&bigger, t->ids[i]);
            bigger.ids[slot] = t->ids[i];
            bigger.index[slot] = t->index[i];
        }
    }
    free(t->ids);
    free(t->index);
    *t = bigger;
    return 1;
}

static inline void fold_acc_add(fold_acc *acc, double seconds)
{
    acc->count++;
    acc->sum += seconds;
    if (seconds > 0.0) {
        if (seconds < acc->min_positive) {
            acc->min_positive = seconds;
        }
        if (seconds > acc->max_positive) {
            acc->max_positive = seconds;
        }
    } else {
        acc->zeros++;
    }
}

static inline double fold_wall_seconds(const inferscope_record *rec)
{
    double seconds = (double)rec->wall_ns / 1e9;
    return seconds > 0.0 ? seconds : 0.0; /* a clock step must not make a negative duration */
}

static int fold_compare_ids(const void *a, const void *b)
{
    uint64_t x = ((const fold_series *)a)->series_id, y = ((const fold_series *)b)->series_id;
    return (x > y) - (x < y);
}

static void fold_histograms_free(fold_histograms *h)
{
    free(h->value_count);
    free(h->value_sum);
    free(h->zero_count);
    free(h->min_positive);
    free(h->max_positive);
    free(h->low_index);
    free(h->start);
    free(h->span);
    free(h->buckets);
    memset(h, 0, sizeof *h);
}

static void fold_result_free(fold_result *r)
{
    free(r->series_ids);
    fold_histograms_free(&r->duration);
    fold_histograms_free(&r->cpu);
    free(r->cpu_wall);
    free(r->abandoned);
    free(r->counter_sums);
    memset(r, 0, sizeof *r);
}

/* The per-row arrays of a histogram of `rows` rows (not its buckets); FOLD_NO_MEMORY leaves what
 * was allocated for fold_histograms_free. */
static fold_status fold_histograms_alloc(fold_histograms *h, size_t rows)
{
    size_t n = rows ? rows : 1; /* malloc(0) may return NULL */
    h->value_count = malloc(n * sizeof(int64_t));
    h->value_sum = malloc(n * sizeof(double));
    h->zero_count = malloc(n * sizeof(int64_t));
    h->min_positive = malloc(n * sizeof(double));
    h->max_positive = malloc(n * sizeof(double));
    h->low_index = malloc(n * sizeof(int64_t));
    h->start = malloc(n * sizeof(int64_t));
    h->span = malloc(n * sizeof(int64_t));
    return h->value_count && h->value_sum && h->zero_count && h->min_positive && h->max_positive && h->low_index &&
                   h->start && h->span
               ? FOLD_OK
               : FOLD_NO_MEMORY;
}

/* The per-row fields of one histogram from the accumulators, and its zeroed buckets. */
static fold_status fold_histograms_init(fold_histograms *h, const fold_series *series, size_t rows, int of_cpu,
                                        int scale, const int64_t *below, const int64_t *next_start)
{
    if (fold_histograms_alloc(h, rows) != FOLD_OK) {
        return FOLD_NO_MEMORY;
    }
    size_t slots = 0;
    for (size_t row = 0; row < rows; row++) {
        const fold_acc *acc = of_cpu ? &series[row].cpu : &series[row].wall;
        h->value_count[row] = acc->count;
        h->value_sum[row] = acc->sum;
        h->zero_count[row] = acc->zeros;
        h->min_positive[row] = acc->min_positive;
        h->max_positive[row] = acc->max_positive;
        h->low_index[row] = 0;
        h->span[row] = 0;
        if (acc->count > acc->zeros) {
            /* The index is monotone, so a row's buckets run from its minimum's to its maximum's. */
            int64_t low = fold_bucket_index(acc->min_positive, scale, below, next_start);
            int64_t high = fold_bucket_index(acc->max_positive, scale, below, next_start);
            if (high < low) {
                return FOLD_BAD_TABLES;
            }
            h->low_index[row] = low;
            h->span[row] = high - low + 1;
        }
        h->start[row] = (int64_t)slots;
        slots += (size_t)h->span[row];
    }
    h->bucket_slots = slots;
    h->buckets = calloc(slots ? slots : 1, sizeof(int64_t));
    return h->buckets == NULL ? FOLD_NO_MEMORY : FOLD_OK;
}

/* Count one value of bucket `index` into its row's slot; FOLD_BAD_TABLES if the index lies outside
 * the row's range (only tables other than histogram._sub_bucket_tables' can do that). */
static inline fold_status fold_count(fold_histograms *h, size_t row, int64_t index)
{
    uint64_t slot = (uint64_t)(index - h->low_index[row]);
    if (slot >= (uint64_t)h->span[row]) {
        return FOLD_BAD_TABLES;
    }
    h->buckets[h->start[row] + (int64_t)slot]++;
    return FOLD_OK;
}

/* A fold in progress: the first pass's state. fold_batch_init sizes it for at most `max` records;
 * fold_batch_add reads each record once (in any memory: an array, or the ring's slots in place),
 * finds its series, sums and extremes (which fix each row's bucket range) and keeps its row and
 * bucket indices; fold_batch_finish counts the buckets from those into a fold_result. */
typedef struct {
    fold_table table;
    fold_series *series;
    size_t capacity, rows, count;
    int32_t *row_of;
    /* The bucket index of each record's wall and CPU seconds, FOLD_NO_INDEX where not positive.
     * Any positive double's index at scale 10 lies within +-1.1 M, far inside int32. */
    int32_t *wall_index, *cpu_index;
    uint64_t last_id;
    int32_t row;
    int scale;
    const int64_t *below, *next_start;
    int has_cpu, has_abandoned, has_counters;
    int failed; /* memory ran out in fold_batch_add: the batch is lost */
} fold_batch;

static void fold_batch_free(fold_batch *b)
{
    free(b->series);
    free(b->row_of);
    free(b->wall_index);
    free(b->cpu_index);
    free(b->table.ids);
    free(b->table.index);
    memset(b, 0, sizeof *b);
}

/* `below` and `next_start` are histogram._sub_bucket_tables(scale), 1 << 12 cells each,
 * 1 <= scale <= 10. FOLD_NO_MEMORY leaves what was allocated for fold_batch_free. */
static fold_status fold_batch_init(fold_batch *b, size_t max, int scale, const int64_t *below,
                                   const int64_t *next_start)
{
    memset(b, 0, sizeof *b);
    size_t n = max ? max : 1; /* malloc(0) may return NULL */
    b->capacity = 16;
    b->series = malloc(b->capacity * sizeof *b->series);
    b->row_of = malloc(n * sizeof *b->row_of);
    b->wall_index = malloc(n * sizeof *b->wall_index);
    b->cpu_index = malloc(n * sizeof *b->cpu_index);
    b->last_id = FOLD_EMPTY;
    b->row = -1;
    b->scale = scale;
    b->below = below;
    b->next_start = next_start;
    if (b->series == NULL || b->row_of == NULL || b->wall_index == NULL || b->cpu_index == NULL ||
        !fold_table_init(&b->table, 64)) {
        return FOLD_NO_MEMORY;
    }
    return FOLD_OK;
}

/* The row of series `id`, added if new; -1 when memory ran out. */
static int32_t fold_batch_row(fold_batch *b, uint64_t id)
{
    size_t slot = fold_slot(&b->table, id);
    if (b->table.ids[slot] != FOLD_EMPTY) {
        return b->table.index[slot];
    }
    if (b->rows == b->capacity) {
        fold_series *grown = realloc(b->series, 2 * b->capacity * sizeof *b->series);
        if (grown == NULL) {
            return -1;
        }
        b->series = grown;
        b->capacity *= 2;
    }
    fold_series *s = &b->series[b->rows];
    memset(s, 0, sizeof *s);
    s->series_id = id;
    s->first_row = (int32_t)b->rows;
    s->wall.min_positive = s->cpu.min_positive = HUGE_VAL;
    b->table.ids[slot] = id;
    b->table.index[slot] = (int32_t)b->rows++;
    if (2 * b->rows > b->table.mask + 1 && !fold_table_grow(&b->table)) {
        return -1;
    }
    return (int32_t)(b->rows - 1);
}

/* The first pass over one record, the batch's next (at most `max` of fold_batch_init). */
static inline void fold_batch_add(fold_batch *b, const inferscope_record *rec)
{
    if (b->failed) {
        return;
    }
    uint64_t id = ((uint64_t)rec->key << FOLD_ERROR_BITS) | rec->error;
    if (id != b->last_id) { /* runs of one series are common: skip the table for them */
        b->row = fold_batch_row(b, id);
        if (b->row < 0) {
            b->failed = 1;
            return;
        }
        b->last_id = id;
    }
    size_t i = b->count++;
    b->row_of[i] = b->row;
    fold_series *s = &b->series[b->row];
    double wall = fold_wall_seconds(rec);
    fold_acc_add(&s->wall, wall);
    b->wall_index[i] =
        wall > 0.0 ? (int32_t)fold_bucket_index(wall, b->scale, b->below, b->next_start) : FOLD_NO_INDEX;
    b->cpu_index[i] = FOLD_NO_INDEX;
    if (rec->cpu_ns >= 0) {
        double cpu = (double)rec->cpu_ns / 1e9;
        fold_acc_add(&s->cpu, cpu);
        s->cpu_wall += wall;
        b->has_cpu = 1;
        if (cpu > 0.0) {
            b->cpu_index[i] = (int32_t)fold_bucket_index(cpu, b->scale, b->below, b->next_start);
        }
    }
    if (rec->flags & FOLD_FLAG_ABANDONED) {
        s->abandoned++;
        b->has_abandoned = 1;
    }
    for (int k = 0; k < INFERSCOPE_COUNTER_SLOTS; k++) {
        s->counters[k] += (uint64_t)rec->counters[k];
        b->has_counters |= rec->counters[k] != 0;
    }
}

/* The second pass: the batch's rows in order of series id, as the numpy fold numbers them, and
 * their buckets, into `out` (zeroed by the caller, who frees it with fold_result_free whatever the
 * status). */
static fold_status fold_batch_finish(fold_batch *b, fold_result *out)
{
    if (b->failed) {
        return FOLD_NO_MEMORY;
    }
    fold_series *series = b->series;
    size_t rows = b->rows;
    out->has_cpu = b->has_cpu;
    out->has_abandoned = b->has_abandoned;
    out->has_counters = b->has_counters;
    qsort(series, rows, sizeof *series, fold_compare_ids);
    size_t r = rows ? rows : 1;
    int32_t *final_row = malloc(r * sizeof *final_row);
    out->series_ids = malloc(r * sizeof(int64_t));
    out->cpu_wall = malloc(r * sizeof(double));
    out->abandoned = malloc(r * sizeof(int64_t));
    out->counter_sums = malloc(r * INFERSCOPE_COUNTER_SLOTS * sizeof(int64_t));
    if (!final_row || !out->series_ids || !out->cpu_wall || !out->abandoned || !out->counter_sums) {
        free(final_row);
        return FOLD_NO_MEMORY;
    }
    out->rows = rows;
    for (size_t k = 0; k < rows; k++) {
        const fold_series *s = &series[k];
        final_row[s->first_row] = (int32_t)k;
        out->series_ids[k] = (int64_t)s->series_id;
        out->cpu_wall[k] = s->cpu_wall;
        out->abandoned[k] = s->abandoned;
        for (int slot = 0; slot < INFERSCOPE_COUNTER_SLOTS; slot++) {
            out->counter_sums[k * INFERSCOPE_COUNTER_SLOTS + slot] = (int64_t)s->counters[slot];
        }
    }
    fold_status status = fold_histograms_init(&out->duration, series, rows, 0, b->scale, b->below, b->next_start);
    if (status == FOLD_OK) {
        status = fold_histograms_init(&out->cpu, series, rows, 1, b->scale, b->below, b->next_start);
    }
    for (size_t i = 0; i < b->count && status == FOLD_OK; i++) {
        size_t k = (size_t)final_row[b->row_of[i]];
        if (b->wall_index[i] != FOLD_NO_INDEX) {
            status = fold_count(&out->duration, k, b->wall_index[i]);
        }
        if (b->cpu_index[i] != FOLD_NO_INDEX && status == FOLD_OK) {
            status = fold_count(&out->cpu, k, b->cpu_index[i]);
        }
    }
    free(final_row);
    return status;
}

/* Fold `count` records of an array into `out`, which the caller zeroed and frees with
 * fold_result_free whatever the status (tables as fold_batch_init's). */
static inline fold_status fold_records(const inferscope_record *records, size_t count, int scale, const int64_t *below,
                                const int64_t *next_start, fold_result *out)
{
    fold_batch batch;
    fold_status status = fold_batch_init(&batch, count, scale, below, next_start);
    if (status == FOLD_OK) {
        for (size_t i = 0; i < count; i++) {
            fold_batch_add(&batch, &records[i]);
        }
        status = fold_batch_finish(&batch, out);
    }
    fold_batch_free(&batch);
    return status;
}

#endif
