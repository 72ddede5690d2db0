/* Per-thread hardware and OS counters read around every inference and stage.
 *
 * Each counter set bit costs system calls on the hot path, so the sets are chosen to need as few
 * as possible (docs/counters.md has the measured cost of each):
 *   COUNTER_THREAD_CPU  clock_gettime(CLOCK_THREAD_CPUTIME_ID)           1 call per read
 *   COUNTER_RUSAGE      getrusage(RUSAGE_THREAD): switches and faults    1 call per read
 *   COUNTER_PERF        one read() of this thread's perf event group     1 call per read; the group
 *                       leads with task-clock, the thread's CPU time in ns, so a set with perf
 *                       needs no separate CPU clock read
 *   COUNTER_RSS         pread() of /proc/self/statm, every RSS_SAMPLE_EVERY-th entry only
 *   COUNTER_PY_HEAP     tracemalloc, through a Python callable (ringbuf.c)
 *   COUNTER_CUDA_MEMORY torch.cuda's allocator statistics, through a Python callable, around
 *                       inferences only (ringbuf.c)
 *
 * perf event groups are opened lazily, once per thread, and closed by a thread-specific-data
 * destructor when the thread exits; after fork() the child's first read sees a new generation and
 * reopens them, because the inherited descriptors still count the parent's thread.
 */
#ifndef INFERSCOPE_COUNTERS_H
#define INFERSCOPE_COUNTERS_H

#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define COUNTER_THREAD_CPU 1
#define COUNTER_RUSAGE 2
#define COUNTER_PERF 4
#define COUNTER_RSS 8
#define COUNTER_PY_HEAP 16
#define COUNTER_CUDA_MEMORY 32 /* inferences only; read through a Python callable (torch.cuda) */

/* Slots of inferscope_record.counters; must match _records.py. */
#define SLOT_VOLUNTARY_SWITCHES 0
#define SLOT_INVOLUNTARY_SWITCHES 1
#define SLOT_MINOR_FAULTS 2
#define SLOT_MAJOR_FAULTS 3
#define SLOT_PERF 4 /* four slots: 4..7 */
#define SLOT_RSS_DELTA 8
#define SLOT_RSS_SAMPLES 9
#define SLOT_PY_HEAP_DELTA 10
#define SLOT_CUDA_ALLOCATED_DELTA 11
#define SLOT_CUDA_PEAK 12 /* the peak allocation above the allocation at entry */
#define PERF_EVENTS 4     /* the events after the task-clock leader, into SLOT_PERF.. */
#define PERF_GROUP (1 + PERF_EVENTS)
#define RSS_SAMPLE_EVERY 16

/* Which perf events the group holds; decided once per process by perf_probe(). */
#define PERF_MODE_UNKNOWN 0
#define PERF_MODE_HARDWARE 1
#define PERF_MODE_SOFTWARE 2
#define PERF_MODE_NONE 3

/* After the task-clock leader: hardware events where a PMU is exposed, else software ones. */
static const uint64_t perf_hardware_events[PERF_EVENTS] = {
    PERF_COUNT_HW_INSTRUCTIONS, PERF_COUNT_HW_CPU_CYCLES, PERF_COUNT_HW_CACHE_MISSES, PERF_COUNT_HW_BRANCH_MISSES};
static const uint64_t perf_software_events[PERF_EVENTS] = {
    PERF_COUNT_SW_CPU_MIGRATIONS, PERF_COUNT_SW_PAGE_FAULTS, PERF_COUNT_SW_CONTEXT_SWITCHES, PERF_COUNT_SW_ALIGNMENT_FAULTS};

static int perf_mode = PERF_MODE_UNKNOWN;
static int perf_errno = 0;
/* Bumped in a forked child: per-thread descriptors of an older generation are reopened. */
static uint64_t counters_generation = 0;

typedef struct {
    int fds[PERF_GROUP]; /* fds[0] is the task-clock group leader; -1 when closed */
    int opened;           /* 1 open, -1 failed for this thread, 0 not tried */
    uint64_t generation;
    uint32_t rss_tick; /* xorshift state for RSS sampling */
} ThreadCounters;

static __thread ThreadCounters thread_counters = {{-1, -1, -1, -1, -1}, 0, 0, 0};
static pthread_key_t thread_counters_key;
static pthread_once_t thread_counters_once = PTHREAD_ONCE_INIT;

static void perf_close_thread(ThreadCounters *tc)
{
    for (int i = PERF_GROUP - 1; i >= 0; i--) {
        if (tc->fds[i] >= 0) {
            close(tc->fds[i]);
            tc->fds[i] = -1;
        }
    }
    tc->opened = 0;
}

static void thread_counters_destructor(void *value)
{
    perf_close_thread((ThreadCounters *)value);
}

static void thread_counters_make_key(void)
{
    pthread_key_create(&thread_counters_key, thread_counters_destructor);
}

/* Counting kernel-mode events (context switches happen there) needs perf_event_paranoid <= 1 or
 * CAP_PERFMON; the probe falls back to user-space-only counting when that is refused. */
static int perf_exclude_kernel = 0;

static int perf_open_event(uint64_t type, uint64_t config, int group_fd)
{
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.size = sizeof(attr);
    attr.type = (uint32_t)type;
    attr.config = config;
    attr.read_format = PERF_FORMAT_GROUP;
    attr.disabled = 0;
    attr.exclude_kernel = perf_exclude_kernel;
    attr.exclude_hv = 1;
    return (int)syscall(SYS_perf_event_open, &attr, 0 /* this thread */, -1 /* any CPU */, group_fd,
                        PERF_FLAG_FD_CLOEXEC);
}

/* Opens a group of `mode` events for the calling thread. Returns 0, or an errno. */
static int perf_open_group(ThreadCounters *tc, int mode)
{
    const uint64_t *events = mode == PERF_MODE_HARDWARE ? perf_hardware_events : perf_software_events;
    uint64_t type = mode == PERF_MODE_HARDWARE ? PERF_TYPE_HARDWARE : PERF_TYPE_SOFTWARE;
    for (int i = 0; i < PERF_GROUP; i++) {
        int fd = i == 0 ? perf_open_event(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK, -1)
                        : perf_open_event(type, events[i - 1], tc->fds[0]);
        if (fd < 0) {
            int err = errno;
            perf_close_thread(tc);
            return err ? err : EINVAL;
        }
        tc->fds[i] = fd;
    }
    return 0;
}

/* Decides the process-wide perf mode: hardware events where a PMU is exposed, else software
 * events, else none. Returns the mode; perf_errno keeps why hardware (or everything) failed. */
static int perf_probe(void)
{
    if (perf_mode != PERF_MODE_UNKNOWN) {
        return perf_mode;
    }
    ThreadCounters probe = {{-1, -1, -1, -1, -1}, 0, 0, 0};
    if (perf_open_group(&probe, PERF_MODE_SOFTWARE) != 0) {
        perf_exclude_kernel = 1;
    }
    else {
        perf_close_thread(&probe);
    }
    int err = perf_open_group(&probe, PERF_MODE_HARDWARE);
    if (err == 0) {
        perf_close_thread(&probe);
        perf_mode = PERF_MODE_HARDWARE;
        return perf_mode;
    }
    perf_errno = err;
    if (perf_open_group(&probe, PERF_MODE_SOFTWARE) == 0) {
        perf_close_thread(&probe);
        perf_mode = PERF_MODE_SOFTWARE;
        return perf_mode;
    }
    perf_mode = PERF_MODE_NONE;
    return perf_mode;
}

/* Reads this thread's group: the task-clock into *task_clock_ns and the other events into
 * out[0..3]. Returns 0 (and leaves zeros / -1) when perf is unavailable to this thread. */
static inline int perf_read(int64_t *task_clock_ns, int64_t *out)
{
    ThreadCounters *tc = &thread_counters;
    if (tc->generation != counters_generation) {
        /* fork(): these descriptors belong to the parent's thread. */
        perf_close_thread(tc);
        tc->generation = counters_generation;
    }
    if (tc->opened == 0) {
        int mode = perf_probe();
        tc->opened = -1;
        if (mode == PERF_MODE_HARDWARE || mode == PERF_MODE_SOFTWARE) {
            pthread_once(&thread_counters_once, thread_counters_make_key);
            if (perf_open_group(tc, mode) == 0) {
                tc->opened = 1;
                pthread_setspecific(thread_counters_key, tc);
            }
        }
    }
    if (tc->opened == 1) {
        uint64_t buf[1 + PERF_GROUP];
        if (read(tc->fds[0], buf, sizeof(buf)) == (ssize_t)sizeof(buf) && buf[0] == PERF_GROUP) {
            *task_clock_ns = (int64_t)buf[1];
            for (int i = 0; i < PERF_EVENTS; i++) {
                out[i] = (int64_t)buf[2 + i];
            }
            return 1;
        }
    }
    for (int i = 0; i < PERF_EVENTS; i++) {
        out[i] = 0;
    }
    return 0;
}

/* -- RSS from /proc/self/statm ------------------------------------------------------------------ */

static int statm_fd = -1;
static uint64_t statm_generation = 0;
static long page_size = 0;

/* Resident set size in bytes, or -1. */
static int64_t read_rss_bytes(void)
{
    if (statm_fd < 0 || statm_generation != counters_generation) {
        if (statm_fd >= 0) {
            close(statm_fd); /* opened by the parent: /proc/self resolved to its pid */
        }
        statm_fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
        statm_generation = counters_generation;
        page_size = sysconf(_SC_PAGESIZE);
        if (statm_fd < 0) {
            return -1;
        }
    }
    char buf[96];
    ssize_t n = pread(statm_fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0) {
        return -1;
    }
    buf[n] = '\0';
    const char *p = buf;
    while (*p && *p != ' ') { /* skip the total program size */
        p++;
    }
    int64_t pages = 0;
    while (*p == ' ') {
        p++;
    }
    while (*p >= '0' && *p <= '9') {
        pages = pages * 10 + (*p - '0');
        p++;
    }
    return pages * page_size;
}

/* -- the hot-path entry points ------------------------------------------------------------------ */

/* Reads the rusage and perf counters of `mask` into counters[] (other slots untouched). With perf
 * on and no separate CPU clock asked for, the group's task-clock is the thread CPU time (*cpu).
 * (getrusage's own CPU times are not used: on many kernels they advance in scheduler ticks.) */
static inline void counters_read(int mask, int64_t *cpu, int64_t *counters)
{
    if (mask & COUNTER_RUSAGE) {
        struct rusage ru;
        getrusage(RUSAGE_THREAD, &ru);
        counters[SLOT_VOLUNTARY_SWITCHES] = ru.ru_nvcsw;
        counters[SLOT_INVOLUNTARY_SWITCHES] = ru.ru_nivcsw;
        counters[SLOT_MINOR_FAULTS] = ru.ru_minflt;
        counters[SLOT_MAJOR_FAULTS] = ru.ru_majflt;
    }
    if (mask & COUNTER_PERF) {
        int64_t task_clock = -1;
        if (perf_read(&task_clock, &counters[SLOT_PERF]) && !(mask & COUNTER_THREAD_CPU)) {
            *cpu = task_clock;
        }
    }
}

/* The RSS at the start of an entry, or -1 when this entry is not one of the sampled ones: one
 * entry in RSS_SAMPLE_EVERY, chosen at random (a per-thread xorshift), pays for the pread. Random,
 * not every n-th, because a pipeline repeats a fixed pattern of entries: every 16th entry of a
 * call with 4 stages would always be the same stage. */
static inline int64_t rss_sample_start(void)
{
    ThreadCounters *tc = &thread_counters;
    uint32_t x = tc->rss_tick;
    if (x == 0) {
        x = (uint32_t)(uintptr_t)tc ^ 0x9e3779b9u; /* a per-thread seed */
    }
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    tc->rss_tick = x;
    return (x % RSS_SAMPLE_EVERY) == 0 ? read_rss_bytes() : -1;
}

#endif
