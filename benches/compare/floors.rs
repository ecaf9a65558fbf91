//! Floors: the least any proxy must do, as separate processes like qmpmux
//! (this binary run again in a child mode, on one single-threaded runtime).

use crate::common::fake::GREETING;
use crate::common::process::guard_child;
use crate::common::STEP;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};

/// A floor process: `--child-relay LISTEN UPSTREAM` copies bytes both ways
/// between each client and its own upstream connection (one task per
/// client, tokio's `copy_bidirectional`); `--child-sendloop LISTEN
/// UPSTREAM` reads lines from one upstream connection and writes each to
/// every client in turn, one blocking `write` per client and nothing else
/// (after a fake greeting and negotiation, on a thread of their own).
/// Also socat as a relay, and a process that only keeps a CPU busy.
/// Killed when dropped.
pub struct Floor {
    child: Child,
}

impl Floor {
    /// This binary in child mode `mode`, once it listens on `listen`.
    pub fn start(mode: &str, listen: &Path, upstream: &Path) -> Floor {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.arg(mode).arg(listen).arg(upstream);
        Floor::spawn(cmd, Some(listen), mode)
    }

    /// `socat UNIX-LISTEN:LISTEN,fork UNIX-CONNECT:UPSTREAM`: the relay most
    /// operators would reach for (a process per connection).
    pub fn socat(listen: &Path, upstream: &Path) -> Floor {
        let mut cmd = Command::new("socat");
        cmd.arg(format!("UNIX-LISTEN:{},fork", listen.display()))
            .arg(format!("UNIX-CONNECT:{}", upstream.display()));
        Floor::spawn(cmd, Some(listen), "socat (apt-get install socat)")
    }

    /// A process that keeps one CPU busy.
    pub fn spinner() -> Floor {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.arg("--child-spin");
        let spinner = Floor::spawn(cmd, None, "spinner");
        // Let it get going.
        std::thread::sleep(Duration::from_millis(50));
        spinner
    }

    fn spawn(mut cmd: Command, listen: Option<&Path>, what: &str) -> Floor {
        if let Some(listen) = listen {
            let _ = std::fs::remove_file(listen);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        guard_child(&mut cmd, None);
        let f = Floor {
            child: cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}")),
        };
        let deadline = Instant::now() + STEP;
        while listen.is_some_and(|l| !l.exists()) {
            assert!(Instant::now() < deadline, "{what} did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        f
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a child mode if asked to; returns whether it did.
pub fn child_mode(args: &[String]) -> bool {
    let Some(i) = args.iter().position(|a| a.starts_with("--child-")) else {
        return false;
    };
    if args[i] == "--child-spin" {
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    let (mode, listen, upstream) = (
        args[i].clone(),
        PathBuf::from(&args[i + 1]),
        PathBuf::from(&args[i + 2]),
    );
    if let Some(uring) = match mode.as_str() {
        "--child-sendloop" => Some(false),
        "--child-uring-sendloop" => Some(true),
        _ => None,
    } {
        send_loop(&listen, &upstream, uring);
        return true;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = UnixListener::bind(&listen).expect("bind");
        match mode.as_str() {
            "--child-relay" => {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut up = UnixStream::connect(&upstream).await.expect("relay upstream");
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    });
                }
            }
            other => panic!("unknown child mode {other}"),
        }
    });
    true
}

/// The least a broadcaster can do: per line, one `write` to each client,
/// blocking sockets, no event loop. With `uring`, a line's writes to all
/// clients go to the kernel in one `io_uring_enter` (non-blocking sends):
/// what batching the system calls themselves would save.
fn send_loop(listen: &Path, upstream: &Path, uring: bool) {
    use std::io::{BufRead, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::{Arc, Mutex};
    let listener = UnixListener::bind(listen).expect("bind");
    let up = loop {
        match UnixStream::connect(upstream) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let clients: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let joined = clients.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            // Greeting, then one message (the negotiation) answered.
            let mut depth = 0;
            let mut byte = [0u8];
            let ok = stream.write_all(format!("{GREETING}\r\n").as_bytes()).is_ok()
                && loop {
                    match stream.read(&mut byte) {
                        Ok(1) if byte[0] == b'{' => depth += 1,
                        Ok(1) if byte[0] == b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break true;
                            }
                        }
                        Ok(1) => {}
                        _ => break false,
                    }
                }
                && stream.write_all(b"{\"return\": {}}\r\n").is_ok();
            if ok {
                joined.lock().unwrap().push(stream);
            }
        }
    });
    let mut ring = uring.then(|| io_uring::IoUring::new(1024).expect("io_uring (the io_uring floor)"));
    let mut lines = std::io::BufReader::new(up);
    let _greeting = lines.read_line(&mut String::new());
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = format!("{}\r\n", line.trim_end());
        let mut clients = clients.lock().unwrap();
        match ring.as_mut() {
            None => clients.retain_mut(|c| c.write_all(line.as_bytes()).is_ok()),
            Some(ring) => uring_send_all(ring, &mut clients, line.as_bytes()),
        }
    }
}

/// One send of `line` to each client, submitted together.
fn uring_send_all(ring: &mut io_uring::IoUring, clients: &mut Vec<std::os::unix::net::UnixStream>, line: &[u8]) {
    use io_uring::{opcode, types};
    use std::os::fd::AsRawFd;
    let mut failed = Vec::new();
    let per_batch = ring.params().sq_entries() as usize;
    for (b, batch) in clients.chunks(per_batch).enumerate() {
        for (i, c) in batch.iter().enumerate() {
            let send = opcode::Send::new(types::Fd(c.as_raw_fd()), line.as_ptr(), line.len() as u32)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data((b * per_batch + i) as u64);
            // SAFETY: `line` outlives the batch: every entry's completion
            // is waited for below, before it goes.
            unsafe { ring.submission().push(&send).expect("room for the batch") };
        }
        ring.submit_and_wait(batch.len()).expect("io_uring_enter");
        // A full socket (EAGAIN) only misses this line; other errors end
        // the client.
        failed.extend(
            ring.completion()
                .filter(|c| c.result() < 0 && c.result() != -libc::EAGAIN)
                .map(|c| c.user_data() as usize),
        );
    }
    failed.sort_unstable();
    for i in failed.into_iter().rev() {
        clients.remove(i);
    }
}
