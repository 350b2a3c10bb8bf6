//! Hostile workloads for Corral's sandbox tests: one binary, one mode per behaviour.
//!
//! std only; raw syscalls go through `std::arch::asm!` so that no libc wrapper
//! (or its fallbacks) stands between the workload and the kernel or gVisor's sentry.
//! Every mode prints `key=value` lines that tests/test_hostile.py parses.
//! Keep it compiling with rustc 1.63 (Debian's): no let-else, no newer std APIs.

use std::arch::asm;
use std::env;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process;
use std::thread;
use std::time::{Duration, Instant};

// x86_64 syscall numbers.
const SYS_WRITE: usize = 1;
const SYS_CLOSE: usize = 3;
const SYS_SOCKET: usize = 41;
const SYS_CONNECT: usize = 42;
const SYS_GETPID: usize = 39;
const SYS_FORK: usize = 57;
const SYS_GETUID: usize = 102;
const SYS_GETGID: usize = 104;
const SYS_SETUID: usize = 105;
const SYS_GETEUID: usize = 107;
const SYS_GETPPID: usize = 110;
const SYS_SETSID: usize = 112;
const SYS_CHROOT: usize = 161;
const SYS_MOUNT: usize = 165;
const SYS_SCHED_YIELD: usize = 24;
const SYS_UNSHARE: usize = 272;
const SYS_SETNS: usize = 308;
const SYS_PTRACE: usize = 101;

const CLONE_NEWNS: usize = 0x0002_0000;
const CLONE_NEWUSER: usize = 0x1000_0000;
const CLONE_NEWNET: usize = 0x4000_0000;

const AF_UNIX: usize = 1;
const SOCK_STREAM: usize = 1;

const EAGAIN: isize = 11;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the hostile workloads use x86_64 syscall numbers");

unsafe fn syscall0(nr: usize) -> isize {
    let ret: isize;
    asm!("syscall", inlateout("rax") nr as isize => ret,
         lateout("rcx") _, lateout("r11") _, options(nostack));
    ret
}

unsafe fn syscall1(nr: usize, a1: usize) -> isize {
    let ret: isize;
    asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1,
         lateout("rcx") _, lateout("r11") _, options(nostack));
    ret
}

unsafe fn syscall3(nr: usize, a1: usize, a2: usize, a3: usize) -> isize {
    let ret: isize;
    asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
         lateout("rcx") _, lateout("r11") _, options(nostack));
    ret
}

unsafe fn syscall5(nr: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize) -> isize {
    let ret: isize;
    asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
         in("r10") a4, in("r8") a5, lateout("rcx") _, lateout("r11") _, options(nostack));
    ret
}

/// Print one `key=value` line straight through write(2), so that forked
/// children never share a buffered stdout with their parent.
fn say(line: &str) {
    let text = format!("{}\n", line);
    let bytes = text.as_bytes();
    let mut done = 0;
    while done < bytes.len() {
        let n = unsafe {
            syscall3(SYS_WRITE, 1, bytes[done..].as_ptr() as usize, bytes.len() - done)
        };
        if n <= 0 {
            return;
        }
        done += n as usize;
    }
}

fn errno_name(ret: isize) -> String {
    match -ret {
        0 => "ok".to_string(),
        1 => "EPERM".to_string(),
        2 => "ENOENT".to_string(),
        11 => "EAGAIN".to_string(),
        12 => "ENOMEM".to_string(),
        13 => "EACCES".to_string(),
        22 => "EINVAL".to_string(),
        28 => "ENOSPC".to_string(),
        30 => "EROFS".to_string(),
        38 => "ENOSYS".to_string(),
        95 => "EOPNOTSUPP".to_string(),
        111 => "ECONNREFUSED".to_string(),
        113 => "EHOSTUNREACH".to_string(),
        101 => "ENETUNREACH".to_string(),
        n if n < 0 => "ok".to_string(),
        n => format!("errno{}", n),
    }
}

fn io_error_name(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => errno_name(-(code as isize)),
        None => format!("{:?}", err.kind()),
    }
}

fn arg(args: &[String], index: usize) -> &str {
    match args.get(index) {
        Some(value) => value.as_str(),
        None => {
            eprintln!("missing argument {}; usage: hostile MODE [ARGS]", index);
            process::exit(2);
        }
    }
}

fn number(text: &str) -> u64 {
    match text.parse() {
        Ok(value) => value,
        Err(_) => {
            eprintln!("not a number: {}", text);
            process::exit(2);
        }
    }
}

/// Fork forever with raw fork(2); every child does the same. The original
/// process keeps counting its successes and EAGAIN failures (the pids limit).
fn forkbomb() -> ! {
    let started = Instant::now();
    let mut forks: u64 = 0;
    let mut refused: u64 = 0;
    let mut other: u64 = 0;
    let mut last_report = Instant::now();
    loop {
        let pid = unsafe { syscall0(SYS_FORK) };
        if pid == 0 {
            // A child: fork forever, never exit.
            loop {
                unsafe {
                    if syscall0(SYS_FORK) < 0 {
                        syscall0(SYS_SCHED_YIELD);
                    }
                }
            }
        } else if pid > 0 {
            forks += 1;
        } else if pid == -EAGAIN {
            refused += 1;
            unsafe { syscall0(SYS_SCHED_YIELD) };
        } else {
            other += 1;
        }
        if last_report.elapsed() >= Duration::from_millis(200) {
            last_report = Instant::now();
            say(&format!(
                "forks={} eagain={} other={} elapsed={:.1}",
                forks,
                refused,
                other,
                started.elapsed().as_secs_f64()
            ));
        }
    }
}

/// Allocate and touch `mib` MiB, reporting progress after every 16 MiB.
fn memhog(mib: u64) {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for i in 1..=mib {
        let mut chunk = Vec::with_capacity(1 << 20);
        chunk.resize(1 << 20, 0xA5u8);
        held.push(chunk);
        if i % 16 == 0 {
            say(&format!("touched_mib={}", i));
        }
    }
    say(&format!("done_mib={}", held.len()));
}

/// Busy-loop `threads` threads for `seconds` of wall time.
fn spin(threads: u64, seconds: f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let mut spins: u64 = 0;
                while Instant::now() < deadline {
                    for _ in 0..10_000 {
                        spins = spins.wrapping_add(1);
                        unsafe { std::ptr::read_volatile(&spins) };
                    }
                }
                spins
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    say(&format!("spins={}", total));
}

/// Try a TCP connection; print whether it succeeded and the error if not.
fn connect(host: &str, port: &str) {
    let addr: SocketAddr = match format!("{}:{}", host, port).parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!("bad address {}:{}", host, port);
            process::exit(2);
        }
    };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(mut stream) => {
            let _ = stream.write_all(b"escaped\n");
            say("connect=ok");
        }
        Err(err) => say(&format!("connect=failed error={}", io_error_name(&err))),
    }
}

/// Connect to an abstract unix socket (`@name`) with raw socket(2)/connect(2).
/// Abstract sockets belong to the network namespace, so this is egress too.
fn connect_abstract(name: &str) {
    // struct sockaddr_un: sa_family_t (u16), then the path; a leading NUL makes it abstract.
    let mut addr: Vec<u8> = Vec::with_capacity(3 + name.len());
    addr.extend_from_slice(&(AF_UNIX as u16).to_ne_bytes());
    addr.push(0);
    addr.extend_from_slice(name.as_bytes());
    unsafe {
        let fd = syscall3(SYS_SOCKET, AF_UNIX, SOCK_STREAM, 0);
        if fd < 0 {
            say(&format!("connect=failed error={}", errno_name(fd)));
            return;
        }
        let ret = syscall3(SYS_CONNECT, fd as usize, addr.as_ptr() as usize, addr.len());
        if ret == 0 {
            let message = b"escaped\n";
            syscall3(SYS_WRITE, fd as usize, message.as_ptr() as usize, message.len());
            say("connect=ok");
        } else {
            say(&format!("connect=failed error={}", errno_name(ret)));
        }
        syscall1(SYS_CLOSE, fd as usize);
    }
}

fn read(path: &str) {
    match fs::read(path) {
        Ok(data) => {
            say(&format!("read=ok bytes={}", data.len()));
            let _ = std::io::stdout().write_all(&data);
        }
        Err(err) => say(&format!("read=failed error={}", io_error_name(&err))),
    }
}

fn write(path: &str) {
    match fs::write(path, b"hostile was here\n") {
        Ok(()) => say("write=ok"),
        Err(err) => say(&format!("write=failed error={}", io_error_name(&err))),
    }
}

/// Write 1 MiB chunks into `path` until `mib` MiB or the first error.
fn diskfill(path: &str, mib: u64) {
    let mut file = match fs::File::create(path) {
        Ok(file) => file,
        Err(err) => {
            say(&format!("open=failed error={}", io_error_name(&err)));
            return;
        }
    };
    let chunk = vec![0x5Au8; 1 << 20];
    let mut written: u64 = 0;
    let mut error = "none".to_string();
    'outer: for _ in 0..mib {
        let mut done = 0;
        while done < chunk.len() {
            match file.write(&chunk[done..]) {
                Ok(0) => {
                    error = "short".to_string();
                    break 'outer;
                }
                Ok(n) => {
                    done += n;
                    written += n as u64;
                }
                Err(err) => {
                    error = io_error_name(&err);
                    break 'outer;
                }
            }
        }
    }
    if error == "none" {
        if let Err(err) = file.sync_all() {
            error = io_error_name(&err);
        }
    }
    say(&format!("written={} error={}", written, error));
}

/// Identity and privilege probes through raw syscalls. The probes that need
/// privilege over the host's namespaces come first; unshare(2) comes last,
/// because where it succeeds it grants capabilities in the new namespace.
fn rawsyscalls() {
    let target = b"/tmp\0";
    let fstype = b"tmpfs\0";
    let root = b"/\0";
    unsafe {
        say(&format!("uid={}", syscall0(SYS_GETUID)));
        say(&format!("euid={}", syscall0(SYS_GETEUID)));
        say(&format!("gid={}", syscall0(SYS_GETGID)));
        say(&format!("pid={}", syscall0(SYS_GETPID)));
        say(&format!("ppid={}", syscall0(SYS_GETPPID)));
        say(&format!("setuid0={}", errno_name(syscall1(SYS_SETUID, 0))));
        let mounted = syscall5(
            SYS_MOUNT,
            fstype.as_ptr() as usize,
            target.as_ptr() as usize,
            fstype.as_ptr() as usize,
            0,
            0,
        );
        say(&format!("mount={}", errno_name(mounted)));
        say(&format!("chroot={}", errno_name(syscall1(SYS_CHROOT, root.as_ptr() as usize))));
        // PTRACE_ATTACH (16) to pid 1, the sandbox init.
        say(&format!("ptrace_init={}", errno_name(syscall3(SYS_PTRACE, 16, 1, 0))));
        let setns = match fs::File::open("/proc/1/ns/net") {
            Ok(file) => {
                use std::os::unix::io::AsRawFd;
                errno_name(syscall3(SYS_SETNS, file.as_raw_fd() as usize, 0, 0))
            }
            Err(err) => io_error_name(&err),
        };
        say(&format!("setns_init_net={}", setns));
        say(&format!("unshare_user={}", errno_name(syscall1(SYS_UNSHARE, CLONE_NEWUSER))));
        say(&format!("unshare_net={}", errno_name(syscall1(SYS_UNSHARE, CLONE_NEWNET))));
        say(&format!("unshare_mount={}", errno_name(syscall1(SYS_UNSHARE, CLONE_NEWNS))));
    }
}

/// setsid(2) into a session of our own, then sleep: a command that tries to
/// outlive its exec's timeout. Prints its pid first.
fn escape(seconds: u64) {
    let forked = unsafe { syscall0(SYS_FORK) };
    if forked < 0 {
        say(&format!("fork={}", errno_name(forked)));
        return;
    }
    if forked == 0 {
        let sid = unsafe { syscall0(SYS_SETSID) };
        say(&format!("escaped_pid={} setsid={}", unsafe { syscall0(SYS_GETPID) }, errno_name(sid)));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(seconds) {
            thread::sleep(Duration::from_millis(100));
            let _ = fs::write("/tmp/escape-heartbeat", format!("{}\n", started.elapsed().as_millis()));
        }
        process::exit(0);
    }
    thread::sleep(Duration::from_secs(seconds));
}

/// Every process this sandbox can see in /proc: `pid=N cmd=...`.
fn pids() {
    let mut found: Vec<(u64, String)> = Vec::new();
    let entries = match fs::read_dir("/proc") {
        Ok(entries) => entries,
        Err(err) => {
            say(&format!("proc=failed error={}", io_error_name(&err)));
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(pid) = name.parse::<u64>() {
            let cmdline = fs::read(format!("/proc/{}/cmdline", pid)).unwrap_or_default();
            let shown: String = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((pid, shown.trim().to_string()));
        }
    }
    found.sort();
    for (pid, cmd) in &found {
        say(&format!("pid={} cmd={}", pid, cmd));
    }
    say(&format!("count={}", found.len()));
}

fn main() {
    let args: Vec<String> = env::args().collect();
    match arg(&args, 1) {
        "forkbomb" => forkbomb(),
        "memhog" => memhog(number(arg(&args, 2))),
        "spin" => spin(number(arg(&args, 2)), number(arg(&args, 3)) as f64),
        "connect" => connect(arg(&args, 2), arg(&args, 3)),
        "connect-abstract" => connect_abstract(arg(&args, 2)),
        "read" => read(arg(&args, 2)),
        "write" => write(arg(&args, 2)),
        "diskfill" => diskfill(arg(&args, 2), number(arg(&args, 3))),
        "rawsyscalls" => rawsyscalls(),
        "escape" => escape(number(arg(&args, 2))),
        "pids" => pids(),
        other => {
            eprintln!("unknown mode {}", other);
            process::exit(2);
        }
    }
}
