/* clockshift: step the wall clock of one process, as NTP does, for tests.
 *
 * LD_PRELOAD=clockshift.so CLOCKSHIFT_FILE=/path/file  program
 *
 * The file holds "<offset seconds> <synchronised 0|1>", e.g. "-259200 0" for a
 * clock three days behind and not yet synchronised. The wall clock
 * (clock_gettime of CLOCK_REALTIME and its variants, gettimeofday, time) reads
 * the real time plus the offset; adjtimex/ntp_adjtime/clock_adjtime with no
 * mode bits (a read) report STA_UNSYNC and TIME_ERROR unless synchronised,
 * with STA_PLL set as an NTP client that has not synchronised yet leaves it.
 * Monotonic clocks, sleeps and timeouts are untouched: unlike libfaketime
 * with DONT_FAKE_MONOTONIC=1, this leaves Python's time.sleep working. The
 * file is read again at most every 10 ms; write it with rename() to change
 * it atomically.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <time.h>
#include <unistd.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int (*real_gettimeofday)(struct timeval *, void *);
static int (*real_adjtimex)(struct timex *);
static int (*real_clock_adjtime)(clockid_t, struct timex *);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long long offset_ns;
static int synced = 1;
static long long checked_ns = -1;

static void init(void) {
    if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    if (!real_gettimeofday) real_gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
    if (!real_adjtimex) real_adjtimex = dlsym(RTLD_NEXT, "adjtimex");
    if (!real_clock_adjtime) real_clock_adjtime = dlsym(RTLD_NEXT, "clock_adjtime");
}

/* Re-read the file at most every 10 ms of monotonic time. */
static void refresh(void) {
    struct timespec now;
    init();
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    long long mono = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    pthread_mutex_lock(&lock);
    if (checked_ns >= 0 && mono - checked_ns < 10000000LL) {
        pthread_mutex_unlock(&lock);
        return;
    }
    checked_ns = mono;
    const char *path = getenv("CLOCKSHIFT_FILE");
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd >= 0) {
        char buf[128];
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n > 0) {
            buf[n] = 0;
            double seconds = 0;
            int flag = 1;
            if (sscanf(buf, "%lf %d", &seconds, &flag) >= 1) {
                offset_ns = (long long)(seconds * 1e9);
                synced = flag;
            }
        }
    }
    pthread_mutex_unlock(&lock);
}

static int is_wall(clockid_t id) {
    return id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE
#ifdef CLOCK_REALTIME_ALARM
           || id == CLOCK_REALTIME_ALARM
#endif
#ifdef CLOCK_TAI
           || id == CLOCK_TAI
#endif
        ;
}

static void shift(struct timespec *ts) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += 1000000000LL;
        ts->tv_sec -= 1;
    }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    init();
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && is_wall(id)) {
        refresh();
        shift(ts);
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    init();
    int rc = real_gettimeofday(tv, tz);
    if (rc == 0) {
        refresh();
        struct timespec ts = {tv->tv_sec, (long)tv->tv_usec * 1000};
        shift(&ts);
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}

static int report(struct timex *tx, int rc) {
    if (rc < 0 || tx->modes != 0) return rc;
    refresh();
    if (synced) {
        tx->status &= ~STA_UNSYNC;
        return rc == TIME_ERROR ? TIME_OK : rc;
    }
    tx->status |= STA_UNSYNC | STA_PLL; /* an NTP client is at work, not synchronised yet */
    return TIME_ERROR;
}

int adjtimex(struct timex *tx) {
    init();
    return report(tx, real_adjtimex(tx));
}

int ntp_adjtime(struct timex *tx) { return adjtimex(tx); }

int clock_adjtime(clockid_t id, struct timex *tx) {
    init();
    int rc = real_clock_adjtime(id, tx);
    return is_wall(id) ? report(tx, rc) : rc;
}
