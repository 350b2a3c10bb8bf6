/*
 * corral-agent: PID 1 of every Corral microVM.
 *
 * Boots the guest (modules, disks, switch to the template's rootfs, cgroups),
 * then serves the host with the framed protocol in docs/microvm.md: exec with
 * streamed output, stdin, env, cwd and timeouts, file put/get, health, clock
 * set, stats. The transport is chosen on the kernel command line: virtio-serial
 * ports (QEMU; the default), or with `corral.vsock=PORT` an AF_VSOCK listener
 * where every accepted connection is a port of its own (Firecracker, Cloud
 * Hypervisor). Each port carries one request at a time. A port whose host side
 * goes away (client gone, VM restored elsewhere) kills its request; a virtio
 * port then waits for the next HELLO, a vsock connection is closed.
 *
 * `corral-agent --host DIR CMDLINE` is a test mode, never used in a VM: no
 * boot, no cgroups, no clock; it runs as an ordinary (unprivileged) host
 * process, serves the vsock port named in CMDLINE as the unix socket
 * DIR/vsock-PORT.sock, and treats DIR as the guest's root for the paths of
 * file requests and exec's cwd. Tests run it as a simulated guest behind
 * stand-in VMMs. Built static (gcc -static), no dependencies.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <grp.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <sys/un.h>

#define MAX_PORTS 32
#define MAX_FRAME (1u << 20)
#define CHUNK 65536
#define OUT_HIGH (256u << 10)
#define CG "/sys/fs/cgroup/sandbox"
static const char HELLO_MAGIC[8] = {'C', 'O', 'R', 'R', 'A', 'L', 1, 0};
static const char *host_root;   /* host mode: the simulated guest's root directory */

/* -- small helpers ------------------------------------------------------ */

static void logmsg(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    int fd = host_root ? dup(2) : open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, "corral-agent: ", 14) < 0 || write(fd, buf, n) < 0) { /* nothing to do */ }
        close(fd);
    }
}

static void die(const char *what) {
    logmsg("fatal: %s: %s", what, strerror(errno));
    if (host_root) exit(1);
    sleep(1);
    syscall(SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, NULL); /* power off */
    _exit(1);
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

static ssize_t read_file(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return n;
}

static long long keyed(const char *path, const char *key) {
    char buf[4096];
    if (read_file(path, buf, sizeof buf) < 0) return -1;
    size_t klen = strlen(key);
    for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, key, klen) == 0 && (line[klen] == ' ' || line[klen] == ':'))
            return strtoll(line + klen + 1, NULL, 10);
    }
    return -1;
}

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* -- byte buffers -------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

static void buf_add(buf_t *b, const void *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) die("realloc");
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void buf_drop(buf_t *b, size_t n) {
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void buf_free(buf_t *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* A cursor over a request's payload; fails soft (ok = 0) on short input. */
typedef struct {
    const unsigned char *p;
    size_t left;
    int ok;
} rd_t;

static uint32_t rd_u32(rd_t *r) {
    if (r->left < 4) { r->ok = 0; return 0; }
    uint32_t v = (uint32_t)r->p[0] << 24 | (uint32_t)r->p[1] << 16 | (uint32_t)r->p[2] << 8 | r->p[3];
    r->p += 4;
    r->left -= 4;
    return v;
}

static uint64_t rd_u64(rd_t *r) {
    uint64_t hi = rd_u32(r);
    return hi << 32 | rd_u32(r);
}

static char *rd_str(rd_t *r) { /* malloc'd, NUL-terminated */
    uint32_t n = rd_u32(r);
    if (!r->ok || n > r->left) { r->ok = 0; return NULL; }
    char *s = malloc(n + 1);
    if (!s) die("malloc");
    memcpy(s, r->p, n);
    s[n] = 0;
    r->p += n;
    r->left -= n;
    return s;
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* -- sessions: one request on one port ------------------------------------ */

enum { S_IDLE, S_EXEC, S_PUT, S_GET };

typedef struct {
    int kind;
    pid_t pid;
    int out_fd, err_fd, in_fd, errpipe; /* -1 when closed */
    buf_t in;         /* stdin not yet written */
    int in_eof;       /* host closed stdin */
    int status, reaped, exec_errno, errpipe_done;
    int timed_out, killed;
    double deadline;  /* 0: none */
    double started;
    char cgroup[96];
    char *argv0;
    int file_fd, file_err; /* put/get */
    uint32_t file_mode;
} session_t;

typedef struct {
    char name[32];
    char dev[64];
    int fd;
    int conn;     /* an accepted vsock (or host-mode unix) connection, not a virtio port */
    int up;       /* host connected */
    int resync;   /* discard input until a HELLO */
    buf_t in, out;
    session_t s;
} port_t;

static port_t ports[MAX_PORTS];
static int nports;
static int listener = -1;       /* vsock mode: the listening socket */
static unsigned exec_counter;
static char lingering[64][96];
static int nlingering;

static void send_frame(port_t *p, char type, const void *payload, size_t len) {
    if (!p->up) return;
    unsigned char hdr[5];
    put_u32(hdr, (uint32_t)len + 1);
    hdr[4] = (unsigned char)type;
    buf_add(&p->out, hdr, 5);
    if (len) buf_add(&p->out, payload, len);
}

static void send_result(port_t *p, int err, const char *message) {
    unsigned char code[4];
    put_u32(code, (uint32_t)err);
    buf_t b = {0};
    buf_add(&b, code, 4);
    if (message) buf_add(&b, message, strlen(message));
    send_frame(p, 'R', b.data, b.len);
    buf_free(&b);
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void kill_cgroup(const char *cgroup) {
    if (!cgroup[0]) return; /* host mode: no cgroups */
    char path[128];
    snprintf(path, sizeof path, "%s/cgroup.kill", cgroup);
    write_file(path, "1");
}

static void forget_cgroup(const char *cgroup) {
    if (!cgroup[0] || rmdir(cgroup) == 0 || errno == ENOENT) return;
    if (nlingering < 64) snprintf(lingering[nlingering++], 96, "%s", cgroup);
}

static void retry_lingering(void) {
    for (int i = 0; i < nlingering;) {
        if (rmdir(lingering[i]) == 0 || errno == ENOENT) {
            memmove(lingering[i], lingering[nlingering - 1], 96);
            nlingering--;
        } else {
            i++;
        }
    }
}

static void session_init(session_t *s) {
    memset(s, 0, sizeof *s);
    s->out_fd = s->err_fd = s->in_fd = s->errpipe = s->file_fd = -1;
}

static void session_reset(session_t *s) {
    close_fd(&s->out_fd);
    close_fd(&s->err_fd);
    close_fd(&s->in_fd);
    close_fd(&s->errpipe);
    close_fd(&s->file_fd);
    buf_free(&s->in);
    free(s->argv0);
    session_init(s);
}

/* The request on this port ends now: kill what it runs, keep nothing. */
static void session_abort(session_t *s) {
    if (s->kind == S_EXEC) {
        kill_cgroup(s->cgroup);
        if (!s->reaped && s->pid > 0) {
            kill(-s->pid, SIGKILL);
            kill(s->pid, SIGKILL);
            /* The reaper (SIGCHLD) finds no session for it and just reaps it. */
        }
        forget_cgroup(s->cgroup);
    }
    session_reset(s);
}

/* Host mode: an absolute guest path lives under the simulated guest's root. */
static const char *guest_path(const char *path, char *buf, size_t size) {
    if (!host_root || path[0] != '/') return path;
    snprintf(buf, size, "%s%s", host_root, path);
    return buf;
}

/* -- exec ---------------------------------------------------------------- */

static void start_exec(port_t *p, rd_t *r) {
    session_t *s = &p->s;
    uint32_t timeout_ms = rd_u32(r), uid = rd_u32(r), gid = rd_u32(r), has_stdin = rd_u32(r);
    char *cwd = rd_str(r);
    uint32_t argc = rd_u32(r);
    if (!r->ok || argc == 0 || argc > 100000) {
        free(cwd);
        send_result(p, EINVAL, "malformed exec request");
        return;
    }
    char **argv = calloc(argc + 1, sizeof *argv);
    for (uint32_t i = 0; i < argc && r->ok; i++) argv[i] = rd_str(r);
    uint32_t envc = rd_u32(r);
    char **envp = calloc((r->ok ? envc : 0) + 1, sizeof *envp);
    for (uint32_t i = 0; r->ok && i < envc; i++) envp[i] = rd_str(r);
    if (!r->ok) {
        send_result(p, EINVAL, "malformed exec request");
        goto out;
    }
    if (!host_root) snprintf(s->cgroup, sizeof s->cgroup, CG "/x%u", ++exec_counter);
    if (s->cgroup[0] && mkdir(s->cgroup, 0755) < 0 && errno != EEXIST) {
        send_result(p, errno, "cannot create the command's cgroup");
        goto out;
    }
    int out[2], err[2], in[2] = {-1, -1}, ep[2];
    if (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) || pipe2(ep, O_CLOEXEC) ||
        (has_stdin && pipe2(in, O_CLOEXEC))) {
        send_result(p, errno, "pipe");
        goto out;
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
        /* Host mode stays in the stand-in VMM's session, so killing it kills the guest. */
        if (host_root) setpgid(0, 0); else setsid();
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        if (!host_root) {
            char procs[128];
            snprintf(procs, sizeof procs, "%s/cgroup.procs", s->cgroup);
            write_file(procs, "0");
            write_file("/proc/self/oom_score_adj", "0");
        }
        int nul = open("/dev/null", O_RDWR);
        dup2(has_stdin ? in[0] : nul, 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        struct rlimit core = {0, 0};
        setrlimit(RLIMIT_CORE, &core);
        int e = 0;
        char where[1024];
        /* Host mode runs unprivileged: it can only run commands as itself. */
        if (host_root && (uid != getuid() || gid != getgid())) e = EPERM;
        else if (!host_root && (setgroups(0, NULL) || setgid(gid) || setuid(uid))) e = errno;
        if (!e && cwd[0] && chdir(guest_path(cwd, where, sizeof where))) e = errno;
        if (!e) {
            environ = envp;
            execvp(argv[0], argv);
            e = errno;
        }
        if (write(ep[1], &e, sizeof e) < 0) { /* the parent sees EOF */ }
        _exit(127);
    }
    close(out[1]);
    close(err[1]);
    close(ep[1]);
    if (has_stdin) close(in[0]);
    if (pid < 0) {
        int e = errno;
        close(out[0]); close(err[0]); close(ep[0]);
        if (has_stdin) close(in[1]);
        send_result(p, e, "fork");
        goto out;
    }
    s->kind = S_EXEC;
    s->pid = pid;
    s->out_fd = out[0];
    s->err_fd = err[0];
    s->errpipe = ep[0];
    s->in_fd = has_stdin ? in[1] : -1;
    if (s->in_fd >= 0) fcntl(s->in_fd, F_SETFL, O_NONBLOCK);
    s->started = now_mono();
    s->deadline = timeout_ms ? s->started + timeout_ms / 1000.0 : 0;
    s->argv0 = strdup(argv[0]);
    send_result(p, 0, NULL); /* started */
out:
    free(cwd);
    for (uint32_t i = 0; i < argc; i++) free(argv[i]);
    free(argv);
    for (uint32_t i = 0; envp && envp[i]; i++) free(envp[i]);
    free(envp);
}

static void maybe_finish_exec(port_t *p) {
    session_t *s = &p->s;
    if (s->kind != S_EXEC || !s->reaped || !s->errpipe_done || s->out_fd >= 0 || s->err_fd >= 0)
        return;
    char reason[256] = "";
    int code, oom = 0;
    char events[160];
    snprintf(events, sizeof events, "%s/memory.events", s->cgroup);
    long long oom_kills = keyed(events, "oom_kill");
    if (s->exec_errno) {
        code = s->exec_errno == ENOENT ? 127 : 126;
        snprintf(reason, sizeof reason, "%s: %s", s->argv0,
                 s->exec_errno == ENOENT ? "command not found" : strerror(s->exec_errno));
    } else if (s->timed_out) {
        code = 124;
        snprintf(reason, sizeof reason, "timed out: the command and its processes were killed");
    } else if (WIFSIGNALED(s->status)) {
        int sig = WTERMSIG(s->status);
        code = 128 + sig;
        if (sig == SIGKILL && oom_kills > 0) {
            oom = 1;
            snprintf(reason, sizeof reason, "killed: out of memory (the VM's memory limit)");
        } else {
            snprintf(reason, sizeof reason, "killed by signal %d (%s)", sig, strsignal(sig));
        }
    } else {
        code = WEXITSTATUS(s->status);
    }
    unsigned char head[8];
    put_u32(head, (uint32_t)code);
    put_u32(head + 4, (uint32_t)(s->timed_out | oom << 1));
    buf_t b = {0};
    buf_add(&b, head, 8);
    buf_add(&b, reason, strlen(reason));
    send_frame(p, 'X', b.data, b.len);
    buf_free(&b);
    /* Background processes the command left (daemons) live on, unless it was ended. */
    if (s->timed_out || s->killed) kill_cgroup(s->cgroup);
    forget_cgroup(s->cgroup);
    session_reset(s);
}

/* -- files --------------------------------------------------------------- */

static int open_as(const char *path, int flags, mode_t mode, uint32_t uid, uint32_t gid) {
    char where[1024];
    path = guest_path(path, where, sizeof where);
    setfsgid(gid);
    setfsuid(uid);
    int fd = open(path, flags | O_CLOEXEC | O_NOCTTY, mode);
    int saved = errno;
    setfsuid(0);
    setfsgid(0);
    errno = saved;
    return fd;
}

static void start_put(port_t *p, rd_t *r) {
    session_t *s = &p->s;
    uint32_t mode = rd_u32(r), uid = rd_u32(r), gid = rd_u32(r);
    char *path = rd_str(r);
    s->kind = S_PUT;
    s->file_mode = mode & 0777;
    if (!r->ok) {
        s->file_err = EINVAL;
    } else {
        s->file_fd = open_as(path, O_WRONLY | O_CREAT | O_TRUNC, 0600, uid, gid);
        if (s->file_fd < 0) s->file_err = errno;
    }
    free(path);
}

static void put_data(port_t *p, const unsigned char *data, size_t len) {
    session_t *s = &p->s;
    while (len && s->file_fd >= 0 && !s->file_err) {
        ssize_t n = write(s->file_fd, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            s->file_err = errno;
            break;
        }
        data += n;
        len -= (size_t)n;
    }
}

static void finish_put(port_t *p) {
    session_t *s = &p->s;
    if (s->file_fd >= 0 && !s->file_err && fchmod(s->file_fd, s->file_mode)) s->file_err = errno;
    if (s->file_fd >= 0 && close(s->file_fd) && !s->file_err) s->file_err = errno;
    s->file_fd = -1;
    send_result(p, s->file_err, s->file_err ? strerror(s->file_err) : NULL);
    session_reset(s);
}

static void start_get(port_t *p, rd_t *r) {
    session_t *s = &p->s;
    uint64_t max = rd_u64(r);
    uint32_t uid = rd_u32(r), gid = rd_u32(r);
    char *path = rd_str(r);
    if (!r->ok) {
        free(path);
        send_result(p, EINVAL, "malformed get request");
        return;
    }
    int fd = open_as(path, O_RDONLY | O_NONBLOCK, 0, uid, gid);
    free(path);
    struct stat st;
    if (fd < 0) {
        send_result(p, errno, strerror(errno));
        return;
    }
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        send_result(p, EISDIR, "not a regular file");
        return;
    }
    if ((uint64_t)st.st_size > max) {
        close(fd);
        char msg[64];
        snprintf(msg, sizeof msg, "%lld", (long long)st.st_size);
        send_result(p, EFBIG, msg);
        return;
    }
    fcntl(fd, F_SETFL, 0);
    send_result(p, 0, NULL);
    s->kind = S_GET;
    s->file_fd = fd;
}

static void pump_get(port_t *p) { /* called when the port's output has room */
    session_t *s = &p->s;
    char chunk[CHUNK];
    ssize_t n = read(s->file_fd, chunk, sizeof chunk);
    if (n > 0) {
        send_frame(p, 'D', chunk, (size_t)n);
        return;
    }
    send_frame(p, 'd', NULL, 0);
    session_reset(s);
}

/* -- stats, clock -------------------------------------------------------- */

static void send_stats(port_t *p) {
    char text[1024];
    long long usage = keyed(CG "/cpu.stat", "usage_usec");
    char cur[64] = "0", pmax[64] = "max", pcur[64] = "0";
    read_file(CG "/memory.current", cur, sizeof cur);
    read_file(CG "/pids.max", pmax, sizeof pmax);
    read_file(CG "/pids.current", pcur, sizeof pcur);
    int n = snprintf(text, sizeof text,
                     "mem_total_kib %lld\nmem_available_kib %lld\nsandbox_memory %lld\n"
                     "pids %lld\npids_max %s\noom_kills %lld\ncpu_usec %lld\n",
                     keyed("/proc/meminfo", "MemTotal"), keyed("/proc/meminfo", "MemAvailable"),
                     atoll(cur), atoll(pcur), strtok(pmax, "\n") ? pmax : "max",
                     keyed(CG "/memory.events", "oom_kill") > 0 ? keyed(CG "/memory.events", "oom_kill") : 0,
                     usage > 0 ? usage : 0);
    send_frame(p, 'S', text, (size_t)n);
}

/* Mix the host's seed into the guest's RNG and reseed it at once: VMs restored
 * from one snapshot would otherwise share their kernel RNG's state. */
static int reseed(const unsigned char *seed, size_t len) {
    struct {
        int entropy_count;
        int buf_size;
        unsigned char buf[64];
    } entropy;
    if (len > sizeof entropy.buf) len = sizeof entropy.buf;
    entropy.entropy_count = (int)len * 8;
    entropy.buf_size = (int)len;
    memcpy(entropy.buf, seed, len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ioctl(fd, RNDADDENTROPY, &entropy);
    if (rc == 0) rc = ioctl(fd, RNDRESEEDCRNG);
    close(fd);
    return rc;
}

static void set_clock(port_t *p, rd_t *r) {
    uint64_t sec = rd_u64(r);
    uint32_t nsec = rd_u32(r);
    struct timespec ts = {(time_t)sec, (long)nsec};
    if (!r->ok) {
        send_result(p, EINVAL, "malformed clock request");
    } else if (host_root) {
        send_result(p, 0, NULL); /* a host process keeps the host's clock and RNG */
    } else if (clock_settime(CLOCK_REALTIME, &ts)) {
        send_result(p, errno, strerror(errno));
    } else if (r->left && reseed(r->p, r->left)) {
        send_result(p, errno, "reseeding the RNG failed");
    } else {
        send_result(p, 0, NULL);
    }
}

static void mount_request(port_t *p, rd_t *r);

/* -- the port protocol --------------------------------------------------- */

static void handle_frame(port_t *p, char type, const unsigned char *data, size_t len) {
    rd_t r = {data, len, 1};
    session_t *s = &p->s;
    switch (type) {
    case 'H': /* HELLO: magic + nonce; a new client, whatever came before */
        if (len == 16 && memcmp(data, HELLO_MAGIC, 8) == 0) {
            session_abort(s);
            send_frame(p, 'H', data + 8, 8);
        }
        return;
    case 'E':
        if (s->kind == S_IDLE) start_exec(p, &r); else send_result(p, EBUSY, "port busy");
        return;
    case 'I':
        if (s->kind == S_EXEC && s->in_fd >= 0) buf_add(&s->in, data, len);
        else if (s->kind == S_PUT) put_data(p, data, len);
        return;
    case 'i':
        if (s->kind == S_EXEC) s->in_eof = 1;
        else if (s->kind == S_PUT) finish_put(p);
        return;
    case 'K':
        if (s->kind == S_EXEC) { s->killed = 1; kill_cgroup(s->cgroup); }
        return;
    case 'P':
        if (s->kind == S_IDLE) start_put(p, &r); else send_result(p, EBUSY, "port busy");
        return;
    case 'G':
        if (s->kind == S_IDLE) start_get(p, &r); else send_result(p, EBUSY, "port busy");
        return;
    case 'S':
        send_stats(p);
        return;
    case 'T':
        set_clock(p, &r);
        return;
    case 'Q': /* ping */
        send_frame(p, 'Q', NULL, 0);
        return;
    case 'M':
        mount_request(p, &r);
        return;
    case 'F': /* flush: write the guest's dirty pages out (a pet's volume, before a kill) */
        sync();
        send_result(p, 0, NULL);
        return;
    default:
        p->resync = 1;
    }
}

static int find_hello(port_t *p) {
    /* A HELLO frame is 00 00 00 11 'H' + magic: find it, drop what precedes it. */
    static const unsigned char head[5] = {0, 0, 0, 17, 'H'};
    for (size_t i = 0; i + 13 <= p->in.len; i++) {
        if (memcmp(p->in.data + i, head, 5) == 0 && memcmp(p->in.data + i + 5, HELLO_MAGIC, 8) == 0) {
            buf_drop(&p->in, i);
            p->resync = 0;
            return 1;
        }
    }
    if (p->in.len > 12) buf_drop(&p->in, p->in.len - 12);
    return 0;
}

static void parse_input(port_t *p) {
    while (p->in.len >= 5) {
        if (p->resync && !find_hello(p)) return;
        const unsigned char *d = (const unsigned char *)p->in.data;
        uint32_t len = (uint32_t)d[0] << 24 | (uint32_t)d[1] << 16 | (uint32_t)d[2] << 8 | d[3];
        if (len == 0 || len > MAX_FRAME + 64) {
            p->resync = 1;
            continue;
        }
        if (p->in.len < 4 + (size_t)len) return;
        handle_frame(p, (char)d[4], d + 5, len - 1);
        buf_drop(&p->in, 4 + len);
    }
}

static void port_down(port_t *p) {
    p->up = 0;
    p->resync = 1;
    session_abort(&p->s);
    buf_free(&p->in);
    buf_free(&p->out);
    if (p->conn) { /* a connection is not reused: its slot is free again */
        close_fd(&p->fd);
        p->conn = 0;
    }
}

static void check_port(port_t *p) {
    struct pollfd pfd = {p->fd, POLLIN, 0};
    poll(&pfd, 1, 0);
    int up = !(pfd.revents & POLLHUP);
    if (!up && p->up) port_down(p);
    if (up && !p->up) {
        p->up = 1;
        p->resync = 1;
    }
}

/* -- boot ----------------------------------------------------------------- */

static char cmdline[4096];

static void load_modules(const char *order) {
    FILE *f = fopen(order, "re");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0]) continue;
        int fd = open(line, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) && errno != EEXIST))
            logmsg("module %s: %s", line, strerror(errno));
        if (fd >= 0) close(fd);
    }
    fclose(f);
}

/* /dev/vdX whose virtio serial is `serial`, waiting for it to appear. */
static int disk_by_serial(const char *serial, char *dev, size_t size) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        DIR *d = opendir("/sys/block");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (strncmp(e->d_name, "vd", 2)) continue;
            char path[300], value[128];
            snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
            if (read_file(path, value, sizeof value) > 0 && strcmp(strtok(value, "\n") ? value : "", serial) == 0) {
                /* An empty disk is a volume slot not filled yet (it grows on attach). */
                snprintf(path, sizeof path, "/sys/block/%s/size", e->d_name);
                if (read_file(path, value, sizeof value) <= 0 || atoll(value) == 0) continue;
                snprintf(dev, size, "/dev/%s", e->d_name);
                closedir(d);
                return 0;
            }
        }
        if (d) closedir(d);
        usleep(10000);
    }
    return -1;
}

/* Mount a disk filled after boot (a pet's volume given to a running VM, after its
 * size grew from 0): u32 read_only, str serial, str fstype, str target. */
static void mount_request(port_t *p, rd_t *r) {
    uint32_t read_only = rd_u32(r);
    char *serial = rd_str(r), *fstype = rd_str(r), *target = rd_str(r), dev[64];
    if (!r->ok || target[0] != '/') {
        send_result(p, EINVAL, "malformed mount request");
    } else if (disk_by_serial(serial, dev, sizeof dev)) {
        send_result(p, ENODEV, "no such disk");
    } else {
        mkdir(target, 0755);
        unsigned long flags = MS_NODEV | MS_NOSUID | (read_only ? MS_RDONLY : 0);
        if (mount(dev, target, fstype, flags, NULL)) send_result(p, errno, strerror(errno));
        else send_result(p, 0, NULL);
    }
    free(serial);
    free(fstype);
    free(target);
}

/* corral.mount=SERIAL|/dev/PATH:FSTYPE:TARGET:ro|rw and corral.bind=SOURCE:TARGET, in order. */
static void mount_disks(void) {
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", cmdline);
    char *save = NULL;
    for (char *tok = strtok_r(copy, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
        char target[512], dev[64];
        if (strncmp(tok, "corral.mount=", 13) == 0) {
            char *serial = tok + 13, *fstype = strchr(serial, ':');
            if (!fstype) continue;
            *fstype++ = 0;
            char *where = strchr(fstype, ':');
            if (!where) continue;
            *where++ = 0;
            char *mode = strrchr(where, ':');
            if (!mode) continue;
            *mode++ = 0;
            snprintf(target, sizeof target, "/newroot%s", strcmp(where, "/") ? where : "");
            if (serial[0] == '/') { /* a device path (Firecracker's disks have no serial) */
                struct stat st;
                for (int attempt = 0; attempt < 1000 && stat(serial, &st); attempt++) usleep(10000);
                snprintf(dev, sizeof dev, "%s", serial);
            } else if (disk_by_serial(serial, dev, sizeof dev)) {
                die(serial);
            }
            unsigned long flags = strcmp(mode, "ro") == 0 ? MS_RDONLY : 0;
            flags |= MS_NODEV | MS_NOSUID;
            if (!(flags & MS_RDONLY)) mkdir(target, 0755); /* a volume under a writable dir */
            if (mount(dev, target, fstype, flags, NULL)) die(target);
        } else if (strncmp(tok, "corral.bind=", 12) == 0) {
            char *source = tok + 12, *where = strchr(source, ':');
            if (!where) continue;
            *where++ = 0;
            char from[512];
            snprintf(from, sizeof from, "/newroot%s", source);
            snprintf(target, sizeof target, "/newroot%s", where);
            if (mount(from, target, NULL, MS_BIND, NULL)) die(target);
        }
    }
}

static long long param(const char *name, long long fallback) {
    char key[64];
    snprintf(key, sizeof key, " %s=", name);
    char *at = strstr(cmdline, key);
    return at ? atoll(at + strlen(key)) : fallback;
}

static void setup_cgroups(void) {
    if (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        die("cgroup2");
    write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids +cpu");
    mkdir(CG, 0755);
    write_file(CG "/cgroup.subtree_control", "+memory +pids +cpu");
    char value[64];
    snprintf(value, sizeof value, "%lld", param("corral.pids", 256));
    write_file(CG "/pids.max", value);
    /* What the booted guest has left, less a reserve for the agent and the kernel's
     * own growth: an OOM then stays inside the sandbox's cgroup. */
    long long available_kib = keyed("/proc/meminfo", "MemAvailable");
    long long reserve_kib = param("corral.reserve_kib", 8192);
    if (available_kib > reserve_kib * 2) {
        snprintf(value, sizeof value, "%lld", (available_kib - reserve_kib) * 1024);
        write_file(CG "/memory.max", value);
        write_file(CG "/memory.swap.max", "0");
    }
}

static void loopback_up(void) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "lo");
    if (fd >= 0 && ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    if (fd >= 0) close(fd);
}

static long long param(const char *name, long long fallback);

static void open_ports(void) {
    int expected = (int)param("corral.ports", 1), found = 0;
    for (int attempt = 0; attempt < 1000 && found < expected; attempt++) {
        found = 0;
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char path[300], name[64];
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            if (read_file(path, name, sizeof name) <= 0 || strncmp(name, "corral.", 7)) continue;
            int index = atoi(name + 7);
            if (index < 0 || index >= MAX_PORTS) continue;
            port_t *p = &ports[index];
            snprintf(p->name, sizeof p->name, "%s", strtok(name, "\n"));
            snprintf(p->dev, sizeof p->dev, "/dev/%s", e->d_name);
            if (index + 1 > nports) nports = index + 1;
            found++;
        }
        if (d) closedir(d);
        if (found < expected) usleep(10000);
    }
    for (int i = 0; i < nports; i++) {
        port_t *p = &ports[i];
        session_init(&p->s);
        p->fd = -1;
        for (int attempt = 0; p->dev[0] && attempt < 500 && p->fd < 0; attempt++) {
            p->fd = open(p->dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
            if (p->fd < 0) usleep(10000);
        }
        if (p->fd < 0) continue;
        fcntl(p->fd, F_SETOWN, getpid());
        fcntl(p->fd, F_SETFL, O_RDWR | O_NONBLOCK | O_ASYNC);
        p->resync = 1;
        check_port(p);
    }
}

/* corral.vsock=PORT: listen on AF_VSOCK, or (host mode) on SOCKDIR/vsock-PORT.sock. */
static int listen_vsock(const char *sockdir) {
    long long port = param("corral.vsock", 0);
    if (port <= 0 || port > 0xffffffffLL) return 0;
    for (int i = 0; i < MAX_PORTS; i++) {
        session_init(&ports[i].s);
        ports[i].fd = -1;
    }
    int fd = -1;
    if (sockdir) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s/vsock-%lld.sock", sockdir, port);
        unlink(sa.sun_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 64)) die(sa.sun_path);
    } else {
        struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                 .svm_port = (unsigned)port};
        for (int attempt = 0; attempt < 500 && fd < 0; attempt++) { /* the device probes late */
            fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd >= 0 && (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 64))) {
                close(fd);
                fd = -1;
            }
            if (fd < 0) usleep(10000);
        }
        if (fd < 0) die("vsock listener");
    }
    listener = fd;
    return 1;
}

/* Every connection the host makes is a port of its own, greeted by HELLO like one. */
static void accept_conns(void) {
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int slot = -1;
        for (int i = 0; i < MAX_PORTS && slot < 0; i++) if (ports[i].fd < 0) slot = i;
        if (slot < 0) { close(fd); continue; } /* all busy: the host tries again */
        port_t *p = &ports[slot];
        session_init(&p->s);
        snprintf(p->name, sizeof p->name, "conn.%d", slot);
        p->fd = fd;
        p->conn = 1;
        p->up = 1;
        p->resync = 1;
        if (slot + 1 > nports) nports = slot + 1;
    }
}

static void boot(void) {
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    read_file("/proc/cmdline", cmdline + 1, sizeof cmdline - 1);
    cmdline[0] = ' ';
    load_modules("/modules.order");
    if (param("corral.vsock", 0) > 0) load_modules("/vmm-modules.order");
    mount_disks();
    if (mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) die("proc");
    if (mount("sysfs", "/newroot/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) die("sys");
    if (mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL)) die("dev");
    umount2("/proc", MNT_DETACH);
    umount2("/sys", MNT_DETACH);
    if (chdir("/newroot") || mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") || chdir("/"))
        die("switch root");
    mkdir("/dev/pts", 0755);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666");
    mkdir("/dev/shm", 01777);
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777");
    setup_cgroups();
    loopback_up();
    sethostname("corral", 6);
    write_file("/proc/self/oom_score_adj", "-1000");
    if (listen_vsock(NULL)) logmsg("ready (vsock port %lld)", param("corral.vsock", 0));
    else { open_ports(); logmsg("ready (%d ports)", nports); }
}

/* -- main loop ------------------------------------------------------------- */

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < nports; i++) {
            session_t *s = &ports[i].s;
            if (s->kind == S_EXEC && s->pid == pid && !s->reaped) {
                s->reaped = 1;
                s->status = status;
            }
        }
    }
}

static void drain_pipe(port_t *p, int *fd, char type) {
    char chunk[CHUNK];
    ssize_t n = read(*fd, chunk, sizeof chunk);
    if (n > 0) send_frame(p, type, chunk, (size_t)n);
    else if (n == 0 || (errno != EAGAIN && errno != EINTR)) close_fd(fd);
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "--host") == 0) { /* the simulated guest of the tests */
        host_root = argv[2];
        snprintf(cmdline, sizeof cmdline, " %s ", argv[4]);
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* the guest ends with its (stand-in) VMM */
        if (!listen_vsock(argv[3])) {
            fprintf(stderr, "corral-agent --host: no corral.vsock=PORT in the command line\n");
            return 2;
        }
        logmsg("ready (host mode, vsock port %lld)", param("corral.vsock", 0));
    } else if (getpid() != 1) {
        fprintf(stderr, "corral-agent runs as PID 1 of a Corral microVM\n");
        return 2;
    } else {
        boot();
    }
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGIO);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
    double next_check = 0;
    for (;;) {
        struct pollfd pfds[2 + MAX_PORTS * 6];
        struct { port_t *p; int *fd; char what; } refs[2 + MAX_PORTS * 6];
        int n = 0;
        pfds[n] = (struct pollfd){sfd, POLLIN, 0};
        refs[n++] = (typeof(refs[0])){NULL, NULL, 's'};
        if (listener >= 0) {
            pfds[n] = (struct pollfd){listener, POLLIN, 0};
            refs[n++] = (typeof(refs[0])){NULL, NULL, 'l'};
        }
        double now = now_mono(), wait = 0.2;
        int any_down = 0;
        for (int i = 0; i < nports; i++) {
            port_t *p = &ports[i];
            session_t *s = &p->s;
            if (p->fd < 0) continue;
            if (!p->up) { any_down = 1; continue; }
            if (s->kind == S_EXEC && s->deadline && !s->timed_out && now >= s->deadline) {
                s->timed_out = 1;
                kill_cgroup(s->cgroup);
                kill(-s->pid, SIGKILL);
            }
            if (s->kind == S_EXEC && s->deadline && !s->timed_out && s->deadline - now < wait)
                wait = s->deadline - now;
            short ev = (s->in.len > OUT_HIGH * 4) ? 0 : POLLIN;
            if (p->out.len) ev |= POLLOUT;
            pfds[n] = (struct pollfd){p->fd, ev, 0};
            refs[n++] = (typeof(refs[0])){p, &p->fd, 'p'};
            int room = p->out.len < OUT_HIGH;
            if (s->kind == S_EXEC) {
                if (room && s->out_fd >= 0) {
                    pfds[n] = (struct pollfd){s->out_fd, POLLIN, 0};
                    refs[n++] = (typeof(refs[0])){p, &s->out_fd, 'O'};
                }
                if (room && s->err_fd >= 0) {
                    pfds[n] = (struct pollfd){s->err_fd, POLLIN, 0};
                    refs[n++] = (typeof(refs[0])){p, &s->err_fd, 'e'};
                }
                if (s->errpipe >= 0) {
                    pfds[n] = (struct pollfd){s->errpipe, POLLIN, 0};
                    refs[n++] = (typeof(refs[0])){p, &s->errpipe, 'x'};
                }
                if (s->in_fd >= 0 && (s->in.len || s->in_eof)) {
                    pfds[n] = (struct pollfd){s->in_fd, POLLOUT, 0};
                    refs[n++] = (typeof(refs[0])){p, &s->in_fd, 'i'};
                }
            } else if (s->kind == S_GET && room) {
                wait = 0; /* keep the file flowing */
            }
        }
        if (any_down && wait > 0.05) wait = 0.05;
        poll(pfds, (nfds_t)n, (int)(wait * 1000) + (wait > 0));
        for (int k = 0; k < n; k++) {
            if (!pfds[k].revents) continue;
            port_t *p = refs[k].p;
            if (refs[k].what == 's') {
                struct signalfd_siginfo si;
                int io = 0;
                while (read(sfd, &si, sizeof si) == sizeof si) io |= si.ssi_signo == SIGIO;
                reap();
                if (io) for (int i = 0; i < nports; i++) if (ports[i].fd >= 0) check_port(&ports[i]);
                continue;
            }
            if (refs[k].what == 'l') {
                accept_conns();
                continue;
            }
            if (!p->up) continue;
            session_t *s = &p->s;
            switch (refs[k].what) {
            case 'p':
                if (pfds[k].revents & POLLHUP) { port_down(p); break; }
                if (pfds[k].revents & POLLIN) {
                    char chunk[CHUNK];
                    ssize_t got = read(p->fd, chunk, sizeof chunk);
                    if (got > 0) { buf_add(&p->in, chunk, (size_t)got); parse_input(p); }
                    else if (p->conn && (got == 0 || (errno != EAGAIN && errno != EINTR))) {
                        port_down(p); /* the host closed the connection */
                        break;
                    }
                }
                if (p->up && (pfds[k].revents & POLLOUT) && p->out.len) {
                    ssize_t put = write(p->fd, p->out.data, p->out.len);
                    if (put > 0) buf_drop(&p->out, (size_t)put);
                }
                break;
            case 'O': drain_pipe(p, &s->out_fd, 'O'); break;
            case 'e': drain_pipe(p, &s->err_fd, 'E'); break;
            case 'x': {
                int e = 0;
                ssize_t got = read(s->errpipe, &e, sizeof e);
                if (got == sizeof e) s->exec_errno = e;
                if (got <= 0 || got == sizeof e) { close_fd(&s->errpipe); s->errpipe_done = 1; }
                break;
            }
            case 'i':
                if (s->in.len) {
                    ssize_t put = write(s->in_fd, s->in.data, s->in.len);
                    if (put > 0) buf_drop(&s->in, (size_t)put);
                    else if (put < 0 && errno != EAGAIN) { buf_free(&s->in); close_fd(&s->in_fd); }
                }
                if (s->in_fd >= 0 && !s->in.len && s->in_eof) close_fd(&s->in_fd);
                break;
            }
        }
        reap();
        for (int i = 0; i < nports; i++) {
            port_t *p = &ports[i];
            if (p->up && p->s.kind == S_GET && p->out.len < OUT_HIGH) pump_get(p);
            if (p->up && p->s.kind == S_EXEC) maybe_finish_exec(p);
            if (p->up && p->out.len) { /* flush eagerly: most frames fit at once */
                ssize_t put = write(p->fd, p->out.data, p->out.len);
                if (put > 0) buf_drop(&p->out, (size_t)put);
            }
        }
        now = now_mono();
        if (now >= next_check) {
            next_check = now + 0.05;
            for (int i = 0; i < nports; i++) if (ports[i].fd >= 0 && !ports[i].up) check_port(&ports[i]);
            retry_lingering();
        }
    }
}
