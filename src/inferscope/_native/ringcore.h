/* The record ring: a bounded multi-producer, single-consumer queue in plain C11.
 *
 * This header has no Python dependency so that tests/c/ring_stress.c can run it with pthread
 * producers under ThreadSanitizer. The algorithm is Dmitry Vyukov's bounded queue: every slot
 * carries a sequence number that says whose turn it is.
 *
 *   slot.seq == pos          the slot is free for the producer that claims position `pos`
 *   slot.seq == pos + 1      the record at `pos` is published and may be read
 *   slot.seq == pos + size   the consumer has read it; free for the next lap
 *
 * Why this is safe without the GIL: a producer owns a slot only after winning the CAS on `tail`,
 * writes the record with plain stores, and publishes it with a release store of `seq`. The consumer
 * reads the record only after an acquire load of `seq` shows it published, so the plain record
 * stores happen-before the plain record loads. The consumer hands the slot back with another
 * release store, which the next producer's acquire load pairs with. No producer ever waits for
 * another: a full ring is reported, counted and the record dropped.
 */
#ifndef INFERSCOPE_RINGCORE_H
#define INFERSCOPE_RINGCORE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define INFERSCOPE_COUNTER_SLOTS 13

typedef struct {
    uint32_t key;
    uint16_t error;
    uint16_t flags;
    int64_t start_ns;
    int64_t wall_ns;
    int64_t cpu_ns;
    int64_t counters[INFERSCOPE_COUNTER_SLOTS];
    /* Trace linkage, filled only while tracing is on (flags has FLAG_TRACED); 0 otherwise. */
    uint64_t trace_hi;
    uint64_t trace_lo;
    uint64_t span_id;
    uint64_t parent_id; /* 0 for a root span */
    uint64_t root_id;   /* span id of the outermost traced entry of its frame: the sampling unit */
} inferscope_record;

/* Must match RECORD_DTYPE in _records.py. */
_Static_assert(sizeof(inferscope_record) == 176, "record layout changed: update _records.py");
_Static_assert(offsetof(inferscope_record, trace_hi) == 136, "record layout changed: update _records.py");
_Static_assert(offsetof(inferscope_record, start_ns) == 8, "record layout changed: update _records.py");
_Static_assert(offsetof(inferscope_record, counters) == 32, "record layout changed: update _records.py");

/* A slot is padded to a whole number of 64-byte cache lines (192 bytes): a producer writing one
 * slot never shares a line with the slot next to it, and capacity * sizeof(slot) is a multiple of
 * 64, which aligned_alloc requires of its size (C11 7.22.3.1; ASan aborts on anything else). */
typedef struct {
    _Alignas(64) _Atomic uint64_t seq;
    inferscope_record rec;
} inferscope_slot;

_Static_assert(sizeof(inferscope_slot) % 64 == 0, "a slot must fill whole cache lines");

typedef struct {
    /* Producers hammer `tail`; the consumer owns `head`. Separate cache lines avoid false sharing. */
    _Alignas(64) _Atomic uint64_t tail;
    _Alignas(64) _Atomic uint64_t head;
    _Atomic int consumer_busy;
    _Atomic uint64_t dropped;
    uint64_t mask;
    /* Waking the consumer: once the ring is half full, a producer writes one byte to `wake_fd` (a
     * non-blocking pipe the consumer polls; -1: nobody to wake). Producers look only at every
     * `wake_check_mask + 1`-th position, and `wake_sent` keeps it to one byte per drain. */
    _Atomic int wake_fd;
    _Atomic int wake_sent;
    uint64_t wake_check_mask;
    inferscope_slot *slots;
} inferscope_ring;

static inline void inferscope_ring_clear(inferscope_ring *r)
{
    for (uint64_t i = 0; i <= r->mask; i++) {
        atomic_store_explicit(&r->slots[i].seq, i, memory_order_relaxed);
    }
    atomic_store_explicit(&r->tail, 0, memory_order_relaxed);
    atomic_store_explicit(&r->head, 0, memory_order_relaxed);
    atomic_store_explicit(&r->dropped, 0, memory_order_relaxed);
    atomic_store_explicit(&r->wake_fd, -1, memory_order_relaxed);
    atomic_store_explicit(&r->wake_sent, 0, memory_order_relaxed);
    atomic_store_explicit(&r->consumer_busy, 0, memory_order_release);
}

/* capacity must be a power of two >= 2. Returns 0 on allocation failure. */
static inline int inferscope_ring_init(inferscope_ring *r, uint64_t capacity)
{
    r->slots = aligned_alloc(64, capacity * sizeof(inferscope_slot));
    if (r->slots == NULL) {
        return 0;
    }
    memset(r->slots, 0, capacity * sizeof(inferscope_slot));
    r->mask = capacity - 1;
    r->wake_check_mask = capacity >= 8 ? capacity / 8 - 1 : 0;
    inferscope_ring_clear(r);
    return 1;
}

/* After the record at `pos` was published: wake the consumer if the ring is at least half full
 * and no byte was sent since the last drain. A full pipe already means a wake-up is pending. */
static inline void inferscope_ring_maybe_wake(inferscope_ring *r, uint64_t pos)
{
    int fd = atomic_load_explicit(&r->wake_fd, memory_order_relaxed);
    if (fd < 0) {
        return;
    }
    int64_t held = (int64_t)(pos + 1 - atomic_load_explicit(&r->head, memory_order_relaxed));
    if (held < (int64_t)((r->mask + 1) / 2) || atomic_exchange_explicit(&r->wake_sent, 1, memory_order_relaxed)) {
        return;
    }
    char byte = 1;
    ssize_t written = write(fd, &byte, 1);
    (void)written;
}

static inline void inferscope_ring_free(inferscope_ring *r)
{
    free(r->slots);
    r->slots = NULL;
}

/* Returns 1 if the record was queued, 0 if the ring was full (the drop is counted). Never blocks. */
static inline int inferscope_ring_push(inferscope_ring *r, const inferscope_record *rec)
{
    uint64_t pos = atomic_load_explicit(&r->tail, memory_order_relaxed);
    for (;;) {
        inferscope_slot *slot = &r->slots[pos & r->mask];
        uint64_t seq = atomic_load_explicit(&slot->seq, memory_order_acquire);
        int64_t turn = (int64_t)(seq - pos);
        if (turn == 0) {
            /* On failure the CAS reloads `pos`; retry with the new position. */
            if (atomic_compare_exchange_weak_explicit(&r->tail, &pos, pos + 1, memory_order_relaxed,
                                                      memory_order_relaxed)) {
                slot->rec = *rec;
                atomic_store_explicit(&slot->seq, pos + 1, memory_order_release);
                if ((pos & r->wake_check_mask) == 0) {
                    inferscope_ring_maybe_wake(r, pos);
                }
                return 1;
            }
        }
        else if (turn < 0) {
            /* The slot still holds last lap's record: the ring is full. */
            atomic_fetch_add_explicit(&r->dropped, 1, memory_order_relaxed);
            return 0;
        }
        else {
            /* Another producer claimed `pos` already; catch up. */
            pos = atomic_load_explicit(&r->tail, memory_order_relaxed);
        }
    }
}

/* Reads up to `max` published records where they lie, oldest first: `visit(ctx, record, i)` for the
 * i-th, after which its slot goes back to the producers at once. One pass over the slots, so each
 * record's cache lines are loaded once (the slots of the next few are prefetched). Returns how many
 * were read. Single consumer: a second concurrent caller gets 0 instead of corrupting the queue.
 * Stops at the first slot that is claimed but not yet published; that record is read next time.
 * `visit` must not keep the pointer: the slot may be rewritten as soon as it returns. */
typedef void (*inferscope_ring_visit)(void *ctx, const inferscope_record *rec, size_t i);

static inline size_t inferscope_ring_consume(inferscope_ring *r, size_t max, inferscope_ring_visit visit,
                                             void *ctx)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong_explicit(&r->consumer_busy, &expected, 1, memory_order_acquire,
                                                 memory_order_relaxed)) {
        return 0;
    }
    uint64_t pos = atomic_load_explicit(&r->head, memory_order_relaxed);
    size_t n = 0;
    for (; n < max; n++, pos++) {
        inferscope_slot *slot = &r->slots[pos & r->mask];
        uint64_t seq = atomic_load_explicit(&slot->seq, memory_order_acquire);
        if ((int64_t)(seq - (pos + 1)) < 0) {
            break;
        }
        const char *ahead = (const char *)&r->slots[(pos + 8) & r->mask];
        __builtin_prefetch(ahead);
        __builtin_prefetch(ahead + 64);
        __builtin_prefetch(ahead + 128);
        visit(ctx, &slot->rec, n);
        atomic_store_explicit(&slot->seq, pos + r->mask + 1, memory_order_release);
    }
    atomic_store_explicit(&r->head, pos, memory_order_relaxed);
    atomic_store_explicit(&r->wake_sent, 0, memory_order_relaxed);
    atomic_store_explicit(&r->consumer_busy, 0, memory_order_release);
    return n;
}

static inline void inferscope_ring_copy_out(void *out, const inferscope_record *rec, size_t i)
{
    ((inferscope_record *)out)[i] = *rec;
}

/* Copies up to `max` published records into `out`, oldest first (inferscope_ring_consume). */
static inline size_t inferscope_ring_drain(inferscope_ring *r, inferscope_record *out, size_t max)
{
    return inferscope_ring_consume(r, max, inferscope_ring_copy_out, out);
}

/* Records claimed but not yet drained (approximate while producers run). */
static inline uint64_t inferscope_ring_len(inferscope_ring *r)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    return tail > head ? tail - head : 0;
}

#endif
