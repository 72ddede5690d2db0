#define _GNU_SOURCE
/* The native drainer under the sanitizers: 4 pthread producers push records while the collector's
 * own thread drains and folds them (woken at half full), and a reader thread takes the folds, as
 * the Python drainer does every interval. Built by tests/test_ring_tsan.py with -fsanitize=thread
 * and with -fsanitize=address,undefined. Checks that every record pushed is folded exactly once
 * (per key counts, counter sums and bucket totals), that traced records come through or are
 * counted, that process CPU is credited to the inference key alone, and that stop and the final take
 * leave nothing behind. The reader also sets and drops its clock as one of inferscope's own threads
 * while the thread samples them.
 * Prints "folded=N dropped=N passes=N takes=N failures=N"; exit status 0 = correct. */
#include <stdio.h>
#include <sched.h>

#include "collector.h"

#define PRODUCERS 4
#define PER_PRODUCER 200000
#define CAPACITY 4096
#define SCALE 6

static inferscope_ring ring;
static inferscope_collector collector;
static _Atomic int producers_done;
static _Atomic uint64_t accepted[PRODUCERS], accepted_traced;

/* Totals over every fold taken, per key (= producer). */
static uint64_t count[PRODUCERS], bucket_total[PRODUCERS], counter_sum[PRODUCERS];
static uint64_t traced_taken, takes, failures;
static double credited;

static void *produce(void *arg)
{
    uint32_t id = (uint32_t)(uintptr_t)arg;
    for (int64_t seq = 0; seq < PER_PRODUCER; seq++) {
        inferscope_record rec = {0};
        rec.key = id;
        rec.wall_ns = 1000 + (seq % 5000) * 997; /* 1 us to 5 ms: many buckets */
        rec.start_ns = collector_clock_ns(CLOCK_MONOTONIC) - rec.wall_ns; /* the sharer's clock */
        rec.cpu_ns = seq % 3 == 0 ? -1 : rec.wall_ns / 2;
        rec.counters[3] = 1;
        rec.flags = seq % 10 == 0 ? COLLECTOR_FLAG_TRACED : 0;
        rec.counters[5] = rec.flags ? 1 : 0;
        if (inferscope_ring_push(&ring, &rec)) {
            atomic_fetch_add_explicit(&accepted[id], 1, memory_order_relaxed);
            if (rec.flags) {
                atomic_fetch_add_explicit(&accepted_traced, 1, memory_order_relaxed);
            }
        }
        else {
            sched_yield();
        }
    }
    atomic_fetch_add_explicit(&producers_done, 1, memory_order_release);
    return NULL;
}

static void take(void)
{
    collector_taken t;
    if (!collector_take(&collector, 10000, &t)) {
        fprintf(stderr, "take timed out\n");
        failures++;
        return;
    }
    takes++;
    if (t.has_fold) {
        const fold_histograms *h = &t.fold.duration;
        for (size_t r = 0; r < t.fold.rows; r++) {
            uint64_t key = (uint64_t)t.fold.series_ids[r] >> FOLD_ERROR_BITS;
            if (key >= PRODUCERS || (r > 0 && t.fold.series_ids[r] <= t.fold.series_ids[r - 1])) {
                fprintf(stderr, "bad row %zu: series %lld\n", r, (long long)t.fold.series_ids[r]);
                failures++;
                continue;
            }
            count[key] += (uint64_t)h->value_count[r];
            for (int64_t k = 0; k < h->span[r]; k++) {
                bucket_total[key] += (uint64_t)h->buckets[h->start[r] + k];
            }
            bucket_total[key] += (uint64_t)h->zero_count[r];
            counter_sum[key] += (uint64_t)t.fold.counter_sums[r * INFERSCOPE_COUNTER_SLOTS + 3];
        }
    }
    for (size_t i = 0; i < t.traced_len; i++) {
        if (!(t.traced[i].flags & COLLECTOR_FLAG_TRACED) || t.traced[i].counters[5] != 1) {
            fprintf(stderr, "an untraced record among the traced ones\n");
            failures++;
        }
    }
    traced_taken += t.traced_len;
    collector_taken_free(&t);
}

static void take_credits(int flush)
{
    uint32_t *keys;
    double *seconds;
    size_t count;
    if (!collector_take_credits(&collector, 10000, flush, &keys, &seconds, &count)) {
        fprintf(stderr, "taking the credits failed\n");
        failures++;
        return;
    }
    for (size_t i = 0; i < count; i++) {
        if (keys[i] != 0 || !(seconds[i] >= 0.0)) {
            fprintf(stderr, "%g s of process CPU credited to key %u, which is not the inference\n", seconds[i],
                    keys[i]);
            failures++;
        }
        credited += seconds[i];
    }
    free(keys);
    free(seconds);
}

static void *read_folds(void *arg)
{
    (void)arg;
    clockid_t own;
    int has_own = pthread_getcpuclockid(pthread_self(), &own) == 0;
    for (int i = 0; atomic_load_explicit(&producers_done, memory_order_acquire) < PRODUCERS; i++) {
        take();
        if (i % 8 == 0) {
            take_credits(0);
        }
        if (i % 16 == 0 && has_own) { /* as Python registers and drops its own threads */
            collector_set_own(&collector, &own, (size_t)(i % 32 == 0), 0);
        }
        usleep(2000);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    /* histogram._sub_bucket_tables(6), written by the test as 2 x 4096 native int64. */
    static int64_t tables[2][FOLD_TABLE_CELLS];
    FILE *file = argc == 2 ? fopen(argv[1], "rb") : NULL;
    if (file == NULL || fread(tables, sizeof tables, 1, file) != 1) {
        fprintf(stderr, "usage: collector_stress TABLES (histogram._sub_bucket_tables(6) as int64)\n");
        return 2;
    }
    fclose(file);
    const int64_t *below = tables[0], *next_start = tables[1];
    if (!inferscope_ring_init(&ring, CAPACITY) || !collector_init(&collector, SCALE, below, next_start)) {
        fprintf(stderr, "allocation failed\n");
        return 2;
    }
    collector_mark_inference(&collector, 0);
    collector_set_ring(&collector, &ring, 1000);
    if (!collector_start(&collector, 1)) { /* a pass and a process-CPU sample every millisecond */
        perror("collector_start");
        return 2;
    }
    pthread_t threads[PRODUCERS], reader;
    for (uintptr_t i = 0; i < PRODUCERS; i++) {
        pthread_create(&threads[i], NULL, produce, (void *)i);
    }
    pthread_create(&reader, NULL, read_folds, NULL);
    for (int i = 0; i < PRODUCERS; i++) {
        pthread_join(threads[i], NULL);
    }
    pthread_join(reader, NULL);
    if (!collector_stop(&collector, 5000)) {
        fprintf(stderr, "the collector's thread did not stop\n");
        failures++;
    }
    take(); /* what the thread left, and the rest of the ring */
    take_credits(1);
    collector_taken last;
    collector_take(&collector, 1000, &last);
    uint64_t passes = last.passes, traced_dropped = last.traced_dropped;
    if (last.has_fold || last.traced_len || last.failed) {
        fprintf(stderr, "something was left after the final take, or failed (%llu)\n", (unsigned long long)last.failed);
        failures++;
    }
    collector_taken_free(&last);
    uint64_t folded = 0;
    for (int i = 0; i < PRODUCERS; i++) {
        uint64_t want = atomic_load(&accepted[i]);
        if (count[i] != want || bucket_total[i] != want || counter_sum[i] != want) {
            fprintf(stderr, "key %d: %llu accepted, folded %llu, in buckets %llu, counter sum %llu\n", i,
                    (unsigned long long)want, (unsigned long long)count[i], (unsigned long long)bucket_total[i],
                    (unsigned long long)counter_sum[i]);
            failures++;
        }
        folded += count[i];
    }
    if (!(credited > 0.0)) {
        fprintf(stderr, "no process CPU was credited to the inference key\n");
        failures++;
    }
    if (traced_taken + traced_dropped != atomic_load(&accepted_traced)) {
        fprintf(stderr, "traced %llu+%llu of %llu\n", (unsigned long long)traced_taken,
                (unsigned long long)traced_dropped, (unsigned long long)atomic_load(&accepted_traced));
        failures++;
    }
    if (atomic_load(&ring.wake_fd) != -1) {
        fprintf(stderr, "the ring still wakes a stopped collector\n");
        failures++;
    }
    printf("folded=%llu dropped=%llu passes=%llu takes=%llu failures=%llu\n", (unsigned long long)folded,
           (unsigned long long)atomic_load(&ring.dropped), (unsigned long long)passes, (unsigned long long)takes,
           (unsigned long long)failures);
    collector_free(&collector);
    inferscope_ring_free(&ring);
    return failures ? 1 : 0;
}
