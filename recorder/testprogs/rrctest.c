/* Test program for rrc-recorder's tests: one binary, one mode per first argument.
 * Compiled by the tests with `cc -O1 -pthread`. Everything it prints is what the recorder's
 * log must explain. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/uio.h>

static void hex(const unsigned char *b, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

static int do_getrandom(size_t n) {
    unsigned char buf[256];
    if (n > sizeof buf) n = sizeof buf;
    /* The raw syscall: glibc 2.36's wrapper is the same, newer ones may use the vDSO. */
    long r = syscall(SYS_getrandom, buf, n, 0);
    if (r != (long)n) return 1;
    hex(buf, n);
    return 0;
}

/* read FILE CHUNK: copy FILE to stdout through fd 100 in CHUNK-byte reads. */
static int do_read(const char *path, size_t chunk) {
    int fd = open(path, O_RDONLY);
    if (fd < 0 || dup2(fd, 100) < 0) return 1;
    close(fd);
    char *buf = malloc(chunk);
    ssize_t n;
    while ((n = read(100, buf, chunk)) > 0) {
        if (write(1, buf, n) != n) return 1;
    }
    return n < 0;
}

/* clock N: N vDSO clock_gettime(CLOCK_MONOTONIC) calls, then gettimeofday and time. */
static int do_clock(int n) {
    struct timespec ts[64];
    if (n > 64) n = 64;
    for (int i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &ts[i]);
    for (int i = 0; i < n; i++) printf("%lld %ld\n", (long long)ts[i].tv_sec, ts[i].tv_nsec);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    printf("tv %lld %ld\n", (long long)tv.tv_sec, (long)tv.tv_usec);
    printf("time %lld\n", (long long)time(NULL));
    return 0;
}

static void *thread_main(void *arg) {
    unsigned char buf[4];
    syscall(SYS_getrandom, buf, sizeof buf, 0);
    int fd = open("/dev/zero", O_RDONLY);
    char z[3];
    if (fd >= 0) { (void)!read(fd, z, sizeof z); close(fd); }
    unsigned char *out = arg;
    memcpy(out, buf, 4);
    return NULL;
}

/* threads: two threads, each getrandom(4) and a read of /dev/zero; prints both values. */
static int do_threads(void) {
    pthread_t t[2];
    unsigned char out[2][4];
    for (int i = 0; i < 2; i++)
        if (pthread_create(&t[i], NULL, thread_main, out[i])) return 1;
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 2; i++) hex(out[i], 4);
    return 0;
}

/* fork: the child prints getrandom(8) and exits 7; the parent reports the status. */
static int do_fork(void) {
    fflush(stdout);
    pid_t p = fork();
    if (p < 0) return 1;
    if (p == 0) {
        do_getrandom(8);
        fflush(stdout);
        _exit(7);
    }
    int st;
    if (waitpid(p, &st, 0) != p) return 1;
    printf("child exited %d\n", WEXITSTATUS(st));
    return 0;
}

static volatile sig_atomic_t got;
static void on_usr1(int s) { got = s; }

/* signal: a handled SIGUSR1. */
static int do_signal(void) {
    signal(SIGUSR1, on_usr1);
    raise(SIGUSR1);
    printf("got %d\n", (int)got);
    return 0;
}

/* rdtsc N: N rdtsc values, then one rdtscp. */
static int do_rdtsc(int n) {
    unsigned long long v[16];
    if (n > 16) n = 16;
    for (int i = 0; i < n; i++) v[i] = __rdtsc();
    unsigned int aux;
    unsigned long long p = __rdtscp(&aux);
    for (int i = 0; i < n; i++) printf("%llu\n", v[i]);
    printf("p %llu %u\n", p, aux);
    return 0;
}

/* readloop N: N one-byte reads of /dev/zero; prints the mean ns per read. */
static int do_readloop(long n) {
    int fd = open("/dev/zero", O_RDONLY);
    char c;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (read(fd, &c, 1) != 1) return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.0f\n", ns / n);
    return 0;
}

/* spin MS: three threads and main read the clock (vDSO) for MS milliseconds, then exit. */
static long spin_ms;
static void *spin_main(void *arg) {
    (void)arg;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do {
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while ((b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000 < spin_ms);
    return NULL;
}
static int do_spin(long ms) {
    spin_ms = ms;
    pthread_t t[3];
    for (int i = 0; i < 3; i++) pthread_create(&t[i], NULL, spin_main, NULL);
    spin_main(NULL);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    printf("spun\n");
    return 0;
}

/* mutex N: two threads increment a counter N times each under a contended mutex. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long counter, rounds;
static void *mutex_main(void *arg) {
    (void)arg;
    for (long i = 0; i < rounds; i++) {
        pthread_mutex_lock(&mu);
        counter++;
        if (i % 16 == 0) sched_yield();
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}
static int do_mutex(long n) {
    rounds = n;
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, mutex_main, NULL);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    printf("%ld\n", counter);
    return 0;
}

/* tcpserver PORT NCONN NBYTES [threads]: listen on 127.0.0.1:PORT, accept NCONN connections
 * (accept and accept4 in turn) and serve each until it has received NBYTES bytes (or end of
 * stream): read with read, recv, readv and recvmsg in turn (sizes varying, the vectored calls
 * over two iovecs), echo every byte back. Connections are served one after the other, or each
 * in a thread of its own with "threads". Prints "conn I BYTES" per connection at the end. */
struct tcpconn {
    int fd;
    long got;
};
static long tcp_nbytes;
static void *tcp_serve(void *arg) {
    struct tcpconn *c = arg;
    unsigned char buf[2048];
    long got = 0;
    for (int call = 0; got < tcp_nbytes; call++) {
        size_t want = 97 + ((size_t)call * 331) % 1900;
        size_t first = want / 3;
        struct iovec iov[2] = {{buf, first}, {buf + first, want - first}};
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = iov;
        m.msg_iovlen = 2;
        ssize_t n;
        switch (call % 4) {
        case 0: n = read(c->fd, buf, want); break;
        case 1: n = recv(c->fd, buf, want, 0); break;
        case 2: n = readv(c->fd, iov, 2); break;
        default: n = recvmsg(c->fd, &m, 0); break;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(c->fd, buf + off, n - off);
            if (w <= 0) goto out;
            off += w;
        }
        got += n;
    }
out:
    c->got = got;
    close(c->fd);
    return NULL;
}
static int do_tcpserver(int port, int nconn, long nbytes, int threaded) {
    struct tcpconn conns[16];
    pthread_t t[16];
    if (nconn > 16) nconn = 16;
    tcp_nbytes = nbytes;
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one)) return 1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) return 1;
    for (int i = 0; i < nconn; i++) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int fd = i % 2 == 0 ? accept(s, (struct sockaddr *)&peer, &len)
                            : accept4(s, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
        if (fd < 0) return 1;
        conns[i].fd = fd;
        conns[i].got = 0;
        if (!threaded) tcp_serve(&conns[i]);
        else if (pthread_create(&t[i], NULL, tcp_serve, &conns[i])) return 1;
    }
    if (threaded)
        for (int i = 0; i < nconn; i++) pthread_join(t[i], NULL);
    close(s);
    for (int i = 0; i < nconn; i++) printf("conn %d %ld\n", i, conns[i].got);
    return 0;
}

/* mintrace N FULL: the floor of the mechanism, for comparison in the same run. A minimal C
 * tracer (pinned with its tracee on CPU 0) runs `readloop N` in a child whose filter traces
 * read only: at each seccomp stop PTRACE_SYSCALL, at the exit stop PTRACE_CONT. With FULL=1 it
 * also does what the recorder must: PTRACE_GET_SYSCALL_INFO at both stops and a
 * process_vm_readv of the bytes read. Prints the child's ns per read. */
static int do_mintrace(const char *self, const char *n, int full) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    sched_setaffinity(0, sizeof set, &set);
    int out[2];
    if (pipe(out)) return 1;
    pid_t p = fork();
    if (p == 0) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {4, f};
        dup2(out[1], 1);
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) _exit(126);
        kill(getpid(), SIGSTOP);
        execl(self, self, "readloop", n, (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    int st;
    waitpid(p, &st, WUNTRACED);
    ptrace(PTRACE_SEIZE, p, 0, PTRACE_O_TRACESECCOMP | PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL);
    kill(p, SIGCONT);
    unsigned long long addr = 0;
    for (;;) {
        pid_t w = waitpid(-1, &st, __WALL);
        if (w < 0 || WIFEXITED(st) || WIFSIGNALED(st)) break;
        int sig = WSTOPSIG(st), ev = st >> 16, deliver = 0;
        if (ev == PTRACE_EVENT_SECCOMP) {
            if (full) {
                struct __ptrace_syscall_info info;
                ptrace(PTRACE_GET_SYSCALL_INFO, w, sizeof info, &info);
                addr = info.seccomp.args[1];
            }
            ptrace(PTRACE_SYSCALL, w, 0, 0);
            continue;
        }
        if (sig == (SIGTRAP | 0x80) && full) {
            struct __ptrace_syscall_info info;
            ptrace(PTRACE_GET_SYSCALL_INFO, w, sizeof info, &info);
            char buf[64];
            long len = info.exit.rval > 64 ? 64 : info.exit.rval;
            if (len > 0) {
                struct iovec l = {buf, len}, r = {(void *)addr, len};
                process_vm_readv(w, &l, 1, &r, 1, 0);
            }
        } else if (ev == 0 && sig != (SIGTRAP | 0x80)) {
            deliver = sig;
        }
        ptrace(PTRACE_CONT, w, 0, deliver);
    }
    char buf[64] = {0};
    ssize_t k = read(out[0], buf, sizeof buf - 1);
    if (k <= 0) return 1;
    printf("%s", buf);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    if (argc < 2) return 2;
    const char *m = argv[1];
    int rc = 2;
    if (!strcmp(m, "getrandom") && argc > 2) rc = do_getrandom(atoi(argv[2]));
    else if (!strcmp(m, "read") && argc > 3) rc = do_read(argv[2], atoi(argv[3]));
    else if (!strcmp(m, "clock") && argc > 2) rc = do_clock(atoi(argv[2]));
    else if (!strcmp(m, "threads")) rc = do_threads();
    else if (!strcmp(m, "fork")) rc = do_fork();
    else if (!strcmp(m, "signal")) rc = do_signal();
    else if (!strcmp(m, "rdtsc") && argc > 2) rc = do_rdtsc(atoi(argv[2]));
    else if (!strcmp(m, "readloop") && argc > 2) rc = do_readloop(atol(argv[2]));
    else if (!strcmp(m, "spin") && argc > 2) rc = do_spin(atol(argv[2]));
    else if (!strcmp(m, "mutex") && argc > 2) rc = do_mutex(atol(argv[2]));
    else if (!strcmp(m, "tcpserver") && argc > 4)
        rc = do_tcpserver(atoi(argv[2]), atoi(argv[3]), atol(argv[4]),
                          argc > 5 && !strcmp(argv[5], "threads"));
    else if (!strcmp(m, "mintrace") && argc > 3) rc = do_mintrace(argv[0], argv[2], atoi(argv[3]));
    else if (!strcmp(m, "exec") && argc > 2) {
        fflush(stdout);
        execv(argv[2], argv + 2);
        rc = 127;
    }
    fflush(stdout);
    return rc;
}
