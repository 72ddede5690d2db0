#define _GNU_SOURCE
/* Several pthread producers and one consumer hammer the ring; built with -fsanitize=thread by
 * tests/test_ring_tsan.py. Checks that every record arrives exactly once or is counted as dropped,
 * and that each producer's records arrive in the order it pushed them. The producers wake the
 * consumer through a pipe (wake_fd) as the drainer is woken; the consumer reads the bytes and checks
 * that some came. Exit status 0 = correct. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sched.h>
#include <stdlib.h>

#include "ringcore.h"

#define PRODUCERS 4
#define PER_PRODUCER 200000
#define CAPACITY 4096

static inferscope_ring ring;
static _Atomic int producers_done;
static _Atomic uint64_t accepted[PRODUCERS];

static void *produce(void *arg)
{
    uint32_t id = (uint32_t)(uintptr_t)arg;
    for (int64_t seq = 0; seq < PER_PRODUCER; seq++) {
        inferscope_record rec = {0};
        rec.key = id;
        rec.start_ns = seq;
        rec.wall_ns = seq * 3 + id; /* checked by the consumer: a torn record would not match */
        rec.counters[3] = -seq;
        if (inferscope_ring_push(&ring, &rec)) {
            atomic_fetch_add_explicit(&accepted[id], 1, memory_order_relaxed);
        }
        else {
            sched_yield(); /* let the consumer run, so that both full and wrapping paths are exercised */
        }
    }
    atomic_fetch_add_explicit(&producers_done, 1, memory_order_release);
    return NULL;
}

/* Every small capacity, single-threaded: each slot is written, one record is dropped, and every
 * record comes back. Under ASan this also checks that the slot array's size is one aligned_alloc
 * accepts. */
static int small_rings(void)
{
    int failures = 0;
    for (uint64_t capacity = 2; capacity <= 1024; capacity *= 2) {
        inferscope_ring small;
        if (!inferscope_ring_init(&small, capacity)) {
            fprintf(stderr, "allocation failed at capacity %llu\n", (unsigned long long)capacity);
            return failures + 1;
        }
        inferscope_record rec = {0};
        for (uint64_t i = 0; i <= capacity; i++) {
            rec.start_ns = (int64_t)i;
            inferscope_ring_push(&small, &rec);
        }
        inferscope_record out[1024];
        size_t n = inferscope_ring_drain(&small, out, 1024);
        if (n != capacity || atomic_load(&small.dropped) != 1 || out[capacity - 1].start_ns != (int64_t)capacity - 1) {
            fprintf(stderr, "capacity %llu: drained %zu, dropped %llu\n", (unsigned long long)capacity, n,
                    (unsigned long long)atomic_load(&small.dropped));
            failures++;
        }
        inferscope_ring_free(&small);
    }
    return failures;
}

int main(void)
{
    int small_failures = small_rings();
    if (!inferscope_ring_init(&ring, CAPACITY)) {
        fprintf(stderr, "allocation failed\n");
        return 2;
    }
    int wake[2];
    if (pipe(wake) != 0 || fcntl(wake[0], F_SETFL, O_NONBLOCK) != 0 || fcntl(wake[1], F_SETFL, O_NONBLOCK) != 0) {
        fprintf(stderr, "no pipe\n");
        return 2;
    }
    atomic_store(&ring.wake_fd, wake[1]);
    uint64_t wakes = 0;
    pthread_t threads[PRODUCERS];
    for (uintptr_t i = 0; i < PRODUCERS; i++) {
        pthread_create(&threads[i], NULL, produce, (void *)i);
    }
    int64_t last[PRODUCERS];
    uint64_t received[PRODUCERS] = {0};
    for (int i = 0; i < PRODUCERS; i++) {
        last[i] = -1;
    }
    inferscope_record batch[256];
    int failures = small_failures;
    for (;;) {
        int done = atomic_load_explicit(&producers_done, memory_order_acquire) == PRODUCERS;
        char bytes[64];
        ssize_t woken = read(wake[0], bytes, sizeof bytes);
        wakes += woken > 0 ? (uint64_t)woken : 0;
        size_t n = inferscope_ring_drain(&ring, batch, 256);
        for (size_t j = 0; j < n; j++) {
            inferscope_record *r = &batch[j];
            if (r->key >= PRODUCERS || r->wall_ns != r->start_ns * 3 + r->key || r->counters[3] != -r->start_ns) {
                fprintf(stderr, "torn or corrupt record: key=%u start=%lld\n", r->key, (long long)r->start_ns);
                failures++;
                continue;
            }
            if (r->start_ns <= last[r->key]) {
                fprintf(stderr, "producer %u out of order: %lld after %lld\n", r->key, (long long)r->start_ns,
                        (long long)last[r->key]);
                failures++;
            }
            last[r->key] = r->start_ns;
            received[r->key]++;
        }
        if (done && n == 0 && inferscope_ring_len(&ring) == 0) {
            break;
        }
    }
    for (int i = 0; i < PRODUCERS; i++) {
        pthread_join(threads[i], NULL);
    }
    uint64_t total_received = 0, total_accepted = 0;
    for (int i = 0; i < PRODUCERS; i++) {
        if (received[i] != atomic_load(&accepted[i])) {
            fprintf(stderr, "producer %d: %llu accepted but %llu received\n", i,
                    (unsigned long long)atomic_load(&accepted[i]), (unsigned long long)received[i]);
            failures++;
        }
        total_received += received[i];
        total_accepted += atomic_load(&accepted[i]);
    }
    uint64_t dropped = atomic_load(&ring.dropped);
    if (dropped > 0 && wakes == 0) {
        fprintf(stderr, "the ring filled up but never woke its consumer\n");
        failures++;
    }
    close(wake[0]);
    close(wake[1]);
    if (total_accepted + dropped != (uint64_t)PRODUCERS * PER_PRODUCER) {
        fprintf(stderr, "accepted %llu + dropped %llu != pushed %llu\n", (unsigned long long)total_accepted,
                (unsigned long long)dropped, (unsigned long long)PRODUCERS * PER_PRODUCER);
        failures++;
    }
    printf("received=%llu dropped=%llu wakes=%llu failures=%d\n", (unsigned long long)total_received,
           (unsigned long long)dropped, (unsigned long long)wakes, failures);
    inferscope_ring_free(&ring);
    return failures == 0 ? 0 : 1;
}
