/* Process CPU per inference, shared out by wall-time overlap: _process_cpu.py's ProcessCpuSharer
 * in plain C, for the native drainer (collector.h), which feeds it every inference record it drains
 * and samples the process CPU clock once per interval.
 *
 * The same rules, in the same order, as the Python sharer (see its docstring): time is cut into
 * intervals at each sample, each with the process CPU it used; each inference record adds its
 * overlap with each interval; once an interval is `horizon_ns` old, its CPU goes to the keys that
 * overlapped it in proportion to their overlap (an interval nobody overlapped keeps its CPU); a
 * record that reaches an interval already shared out is credited at that interval's rate; a record
 * that ended before the oldest interval kept is counted in `missed`. No Python dependency; the
 * caller serialises every call (the collector's mutex).
 */
#ifndef INFERSCOPE_SHARE_H
#define INFERSCOPE_SHARE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SHARE_MAX_INTERVALS 4096 /* _process_cpu._MAX_INTERVALS: kept after they are shared out */

typedef struct {
    uint32_t key;
    int64_t ns;
} share_overlap;

typedef struct {
    int64_t bound_ns; /* interval i is [bound of i, bound of i + 1]; the last one is open */
    double cpu;       /* CPU seconds, once closed */
    double rate;      /* CPU seconds per overlap ns, once shared out */
    share_overlap *overlaps; /* per key, in the order keys first overlapped it */
    uint32_t len, cap;
} share_interval;

typedef struct {
    share_interval *iv; /* iv[first .. first + count): one per bound, oldest first */
    size_t first, count, cap;
    size_t shared; /* intervals [0, shared) of those are shared out */
    int has_last;
    double last_cpu;
    int64_t horizon_ns;
    double *credits; /* per key since the last take; `credited` says which keys have one */
    uint8_t *credited;
    size_t credits_cap;
    uint64_t missed;
} share_state;

static void share_init(share_state *s, int64_t horizon_ns)
{
    memset(s, 0, sizeof *s);
    s->horizon_ns = horizon_ns;
}

static void share_free(share_state *s)
{
    for (size_t i = 0; i < s->count; i++) {
        free(s->iv[s->first + i].overlaps);
    }
    free(s->iv);
    free(s->credits);
    free(s->credited);
    share_init(s, s->horizon_ns);
}

static inline share_interval *share_at(share_state *s, size_t i)
{
    return &s->iv[s->first + i];
}

/* Returns 0 when out of memory (the credit is lost, and counted as missed by the caller). */
static int share_credit(share_state *s, uint32_t key, double seconds)
{
    if (key >= s->credits_cap) {
        size_t cap = s->credits_cap ? s->credits_cap : 64;
        while (cap <= key) {
            cap *= 2;
        }
        double *credits = realloc(s->credits, cap * sizeof *credits);
        if (credits == NULL) {
            return 0;
        }
        s->credits = credits;
        uint8_t *credited = realloc(s->credited, cap);
        if (credited == NULL) {
            return 0;
        }
        s->credited = credited;
        memset(s->credits + s->credits_cap, 0, (cap - s->credits_cap) * sizeof *credits);
        memset(s->credited + s->credits_cap, 0, cap - s->credits_cap);
        s->credits_cap = cap;
    }
    s->credits[key] = s->credited[key] ? s->credits[key] + seconds : seconds;
    s->credited[key] = 1;
    return 1;
}

static int share_add_overlap(share_state *s, size_t index, uint32_t key, int64_t ns)
{
    share_interval *iv = share_at(s, index);
    if (index < s->shared) {
        return share_credit(s, key, (double)ns * iv->rate);
    }
    for (uint32_t i = 0; i < iv->len; i++) {
        if (iv->overlaps[i].key == key) {
            iv->overlaps[i].ns += ns;
            return 1;
        }
    }
    if (iv->len == iv->cap) {
        uint32_t cap = iv->cap ? 2 * iv->cap : 4;
        share_overlap *grown = realloc(iv->overlaps, cap * sizeof *grown);
        if (grown == NULL) {
            return 0;
        }
        iv->overlaps = grown;
        iv->cap = cap;
    }
    iv->overlaps[iv->len++] = (share_overlap){key, ns};
    return 1;
}

static void share_until(share_state *s, int64_t until_ns)
{
    while (s->shared + 1 < s->count && share_at(s, s->shared + 1)->bound_ns <= until_ns) {
        share_interval *iv = share_at(s, s->shared);
        int64_t total = 0;
        for (uint32_t i = 0; i < iv->len; i++) {
            total += iv->overlaps[i].ns;
        }
        if (total > 0) {
            iv->rate = iv->cpu / (double)total;
            for (uint32_t i = 0; i < iv->len; i++) {
                share_credit(s, iv->overlaps[i].key, (double)iv->overlaps[i].ns * iv->rate);
            }
        }
        else {
            int64_t width = share_at(s, s->shared + 1)->bound_ns - iv->bound_ns;
            iv->rate = iv->cpu / (double)(width > 1 ? width : 1);
        }
        iv->len = 0;
        s->shared++;
    }
}

/* Close the open interval at `now_ns` with the process CPU clock's reading. Returns 0 when out of
 * memory (the sample is skipped: the open interval goes on). */
static int share_sample(share_state *s, int64_t now_ns, double process_cpu_seconds)
{
    if (s->has_last && now_ns <= share_at(s, s->count - 1)->bound_ns) {
        return 1;
    }
    if (s->first + s->count == s->cap) {
        if (s->first > 0) {
            memmove(s->iv, s->iv + s->first, s->count * sizeof *s->iv);
            s->first = 0;
        }
        else {
            size_t cap = s->cap ? 2 * s->cap : 64;
            share_interval *grown = realloc(s->iv, cap * sizeof *grown);
            if (grown == NULL) {
                return 0;
            }
            s->iv = grown;
            s->cap = cap;
        }
    }
    if (s->has_last) {
        double cpu = process_cpu_seconds - s->last_cpu;
        share_at(s, s->count - 1)->cpu = cpu > 0.0 ? cpu : 0.0;
    }
    s->last_cpu = process_cpu_seconds;
    s->iv[s->first + s->count] = (share_interval){.bound_ns = now_ns};
    s->count++;
    if (!s->has_last) {
        s->has_last = 1;
        return 1;
    }
    share_until(s, now_ns - s->horizon_ns);
    while (s->count - 1 > SHARE_MAX_INTERVALS && s->shared > 0) {
        free(share_at(s, 0)->overlaps);
        s->first++;
        s->count--;
        s->shared--;
    }
    return 1;
}

/* The last bound <= t (side="right" less one), or -1 when t is before every bound. */
static inline int64_t share_find(share_state *s, int64_t t)
{
    if (s->count > 0 && share_at(s, s->count - 1)->bound_ns <= t) {
        return (int64_t)s->count - 1; /* the common case: in the open interval */
    }
    size_t low = 0, high = s->count; /* first bound > t lies in [low, high] */
    while (low < high) {
        size_t mid = (low + high) / 2;
        if (share_at(s, mid)->bound_ns <= t) {
            low = mid + 1;
        }
        else {
            high = mid;
        }
    }
    return (int64_t)low - 1;
}

/* Add an inference's overlap with the intervals it ran in. Returns 0 when out of memory. */
static int share_add(share_state *s, uint32_t key, int64_t start_ns, int64_t wall_ns)
{
    if (!s->has_last) {
        return 1;
    }
    int64_t end_ns = start_ns + (wall_ns > 0 ? wall_ns : 0);
    int64_t first = share_find(s, start_ns), last = share_find(s, end_ns);
    if (last < 0) {
        s->missed++;
        return 1;
    }
    int ok = 1;
    for (int64_t index = first > 0 ? first : 0; index <= last; index++) {
        int64_t low = share_at(s, (size_t)index)->bound_ns;
        low = start_ns > low ? start_ns : low;
        int64_t high = end_ns;
        if ((size_t)index + 1 < s->count && share_at(s, (size_t)index + 1)->bound_ns < high) {
            high = share_at(s, (size_t)index + 1)->bound_ns;
        }
        if (high > low) {
            ok &= share_add_overlap(s, (size_t)index, key, high - low);
        }
    }
    return ok;
}

#endif
