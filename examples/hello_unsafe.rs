// The main job's program: std only, with `unsafe` (raw pointers and an FFI call
// into libc), built and run inside a Corral sandbox.
use std::ffi::CStr;
use std::os::raw::{c_char, c_long};

extern "C" {
    fn getuid() -> u32;
    fn gethostname(name: *mut c_char, len: usize) -> i32;
    fn sysconf(name: i32) -> c_long;
}

fn sum_raw(values: &[u64]) -> u64 {
    let mut total = 0;
    let base = values.as_ptr();
    for i in 0..values.len() {
        // SAFETY: i < len, so base.add(i) stays inside the slice.
        total += unsafe { *base.add(i) };
    }
    total
}

fn main() {
    let values: Vec<u64> = (1..=1000).collect();
    let mut host = [0 as c_char; 64];
    // SAFETY: the buffer is 64 bytes and gethostname writes at most len bytes.
    let (uid, name, cpus) = unsafe {
        gethostname(host.as_mut_ptr(), host.len());
        (getuid(), CStr::from_ptr(host.as_ptr()).to_string_lossy().into_owned(), sysconf(84))
    };
    println!("hello from a Corral sandbox: host={name} uid={uid} cpus={cpus}");
    println!("sum of 1..=1000 through raw pointers = {}", sum_raw(&values));
}
