//! A thread for work that must never slow the VMs (taps): its own
//! single-threaded runtime at the lowest CPU priority (nice 19), started
//! when first needed. When the CPUs are busy the kernel runs the VMs'
//! threads first, and a tap falls behind (and says how far) instead.

use std::sync::OnceLock;
use tokio::runtime::Handle;

/// The background runtime (started on the first call).
pub fn handle() -> std::io::Result<Handle> {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let handle = runtime.handle().clone();
    // Another caller may have won the race: its runtime serves, this one
    // is dropped unused.
    if HANDLE.set(handle).is_err() {
        return Ok(HANDLE.get().cloned().unwrap_or_else(|| runtime.handle().clone()));
    }
    // Runs for as long as the process does: its descriptors (its epoll)
    // are never closed under a re-execution's feet.
    std::thread::Builder::new().name("qmpmux-taps".into()).spawn(move || {
        lowest_priority();
        runtime.block_on(std::future::pending::<()>());
    })?;
    Ok(HANDLE.get().cloned().unwrap_or_else(Handle::current))
}

/// Lowers the calling thread to the lowest CPU priority there is
/// (SCHED_IDLE: it runs when a CPU has nothing else to run, and any other
/// thread that wakes takes the CPU from it at once), or nice 19 where that
/// is refused. Best effort.
pub fn lowest_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: both change a scheduling attribute of the calling thread
    // (pid 0; Linux: PRIO_PROCESS with a thread id is that thread alone);
    // `param` is a valid sched_param that outlives the call.
    #[allow(unsafe_code)]
    unsafe {
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, nix::unistd::gettid().as_raw() as libc::id_t, 19);
        }
    }
}
