/* powercut: record what a process writes to some files, and when it syncs them,
 * so that the state of those files after a power cut at any instant can be
 * rebuilt afterwards (bench/powercut.py).
 *
 * LD_PRELOAD=powercut.so POWERCUT_PATH=/dir/gw.sqlite  program
 *
 * Tracked: POWERCUT_PATH itself and POWERCUT_PATH-wal and -journal (not -shm,
 * which SQLite rebuilds). The first time the process opens a tracked file,
 * its content is copied to <file>.base (what the disk held at start). Every
 * write(), pwrite(), pwrite64() and ftruncate() on it is appended to
 * <file>.journal, and so is a mark for every fsync() or fdatasync() once the
 * real call has returned. Replaying a file's journal from its base up to its
 * last mark gives exactly what was synced; what comes after the mark is what
 * a power cut may lose, in any part. Reads are untouched: the process sees its
 * files as they are.
 *
 * Journal records: 'W' <offset i64> <length u32> <bytes>, 'T' <size i64>, 'S'.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define NFILES 3
#define MAXFD 4096

static const char *suffixes[NFILES] = {"", "-wal", "-journal"};
static char paths[NFILES][4096];
static int journals[NFILES] = {-1, -1, -1};
static signed char fd_file[MAXFD]; /* fd -> tracked file index + 1, or 0 */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int ready;

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

static void init(void) {
    if (ready) return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_close = dlsym(RTLD_NEXT, "close");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    const char *base = getenv("POWERCUT_PATH");
    for (int i = 0; i < NFILES; i++)
        snprintf(paths[i], sizeof paths[i], "%s%s", base ? base : "", suffixes[i]);
    if (!base) paths[0][0] = 0;
    ready = 1;
}

static void put(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = real_write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            abort(); /* a journal that misses a write would prove nothing */
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Copy the file as it is now to <file>.base (once), open <file>.journal. */
static void track(int i) {
    char name[4200];
    if (journals[i] >= 0) return;
    snprintf(name, sizeof name, "%s.base", paths[i]);
    if (access(name, F_OK) != 0) {
        int out = real_open(name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        int in = real_open(paths[i], O_RDONLY | O_CLOEXEC);
        if (in >= 0) {
            char buf[65536];
            ssize_t n;
            while ((n = read(in, buf, sizeof buf)) > 0) put(out, buf, (size_t)n);
            real_close(in);
        }
        real_close(out);
    }
    snprintf(name, sizeof name, "%s.journal", paths[i]);
    journals[i] = real_open(name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static int which(const char *path) {
    if (!path || !paths[0][0]) return -1;
    for (int i = 0; i < NFILES; i++)
        if (strcmp(path, paths[i]) == 0) return i;
    return -1;
}

static int opened(const char *path, int fd) {
    if (fd < 0 || fd >= MAXFD) return fd;
    pthread_mutex_lock(&lock);
    int i = which(path);
    fd_file[fd] = (signed char)(i + 1);
    if (i >= 0) track(i);
    pthread_mutex_unlock(&lock);
    return fd;
}

static int file_of(int fd) { return fd >= 0 && fd < MAXFD ? fd_file[fd] - 1 : -1; }

static void record_write(int i, int64_t offset, const void *buf, ssize_t n) {
    if (n <= 0) return;
    uint32_t len = (uint32_t)n;
    pthread_mutex_lock(&lock);
    put(journals[i], "W", 1);
    put(journals[i], &offset, 8);
    put(journals[i], &len, 4);
    put(journals[i], buf, len);
    pthread_mutex_unlock(&lock);
}

static void record(int i, char kind, int64_t value) {
    pthread_mutex_lock(&lock);
    put(journals[i], &kind, 1);
    if (kind == 'T') put(journals[i], &value, 8);
    pthread_mutex_unlock(&lock);
}

int open(const char *path, int flags, ...) {
    init();
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    int i = which(path);
    if (i >= 0 && (flags & O_TRUNC)) {
        pthread_mutex_lock(&lock);
        track(i);
        pthread_mutex_unlock(&lock);
        record(i, 'T', 0);
    }
    return opened(path, real_open(path, flags, mode));
}

int open64(const char *path, int flags, ...) {
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return open(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
    init();
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    if (path[0] == '/') return open(path, flags, mode);
    return real_openat(dirfd, path, flags, mode); /* relative: never a tracked path */
}

int openat64(int dirfd, const char *path, int flags, ...) {
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return openat(dirfd, path, flags, mode);
}

int close(int fd) {
    init();
    if (fd >= 0 && fd < MAXFD) fd_file[fd] = 0;
    return real_close(fd);
}

ssize_t write(int fd, const void *buf, size_t n) {
    init();
    int i = file_of(fd);
    if (i < 0) return real_write(fd, buf, n);
    off_t at = lseek(fd, 0, SEEK_CUR);
    ssize_t w = real_write(fd, buf, n);
    record_write(i, (int64_t)at, buf, w);
    return w;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t at) {
    init();
    ssize_t w = real_pwrite(fd, buf, n, at);
    int i = file_of(fd);
    if (i >= 0) record_write(i, (int64_t)at, buf, w);
    return w;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t at) {
    init();
    ssize_t w = real_pwrite64(fd, buf, n, at);
    int i = file_of(fd);
    if (i >= 0) record_write(i, (int64_t)at, buf, w);
    return w;
}

int ftruncate(int fd, off_t size) {
    init();
    int rc = real_ftruncate(fd, size);
    int i = file_of(fd);
    if (rc == 0 && i >= 0) record(i, 'T', (int64_t)size);
    return rc;
}

int ftruncate64(int fd, off64_t size) {
    init();
    int rc = real_ftruncate64(fd, size);
    int i = file_of(fd);
    if (rc == 0 && i >= 0) record(i, 'T', (int64_t)size);
    return rc;
}

int fsync(int fd) {
    init();
    int rc = real_fsync(fd);
    int i = file_of(fd);
    if (rc == 0 && i >= 0) record(i, 'S', 0);
    return rc;
}

int fdatasync(int fd) {
    init();
    int rc = real_fdatasync(fd);
    int i = file_of(fd);
    if (rc == 0 && i >= 0) record(i, 'S', 0);
    return rc;
}
