//! Floors: the least any proxy must do, as separate processes like qmpmux
//! (this binary run again in a child mode, on one single-threaded runtime).

use crate::common::fake::GREETING;
use crate::common::process::guard_child;
use crate::common::STEP;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// A floor process: `--child-relay LISTEN UPSTREAM` copies bytes both ways
/// between each client and its own upstream connection (one task per
/// client, tokio's `copy_bidirectional`); `--child-broadcast LISTEN
/// UPSTREAM` reads lines from one upstream connection and writes each to
/// every client (after a fake greeting and negotiation).
pub struct Floor {
    child: Child,
}

impl Floor {
    pub fn start(mode: &str, listen: &Path, upstream: &Path) -> Floor {
        let _ = std::fs::remove_file(listen);
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.arg(mode)
            .arg(listen)
            .arg(upstream)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        guard_child(&mut cmd, None);
        let f = Floor {
            child: cmd.spawn().expect("spawn floor process"),
        };
        let deadline = Instant::now() + STEP;
        while !listen.exists() {
            assert!(Instant::now() < deadline, "{mode} did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        f
    }
}

impl Floor {
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
    let (mode, listen, upstream) = (
        args[i].clone(),
        PathBuf::from(&args[i + 1]),
        PathBuf::from(&args[i + 2]),
    );
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
            "--child-broadcast" => broadcast(listener, &upstream).await,
            other => panic!("unknown child mode {other}"),
        }
    });
    true
}

async fn broadcast(listener: UnixListener, upstream: &Path) {
    let up = loop {
        match UnixStream::connect(upstream).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut lines = BufReader::new(up).lines();
    let _greeting = lines.next_line().await;
    let (join_tx, mut joined) = mpsc::unbounded_channel::<OwnedWriteHalf>();
    tokio::spawn(async move {
        let greeting = format!("{GREETING}\r\n");
        while let Ok((stream, _)) = listener.accept().await {
            let (join_tx, greeting) = (join_tx.clone(), greeting.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut rd = BufReader::new(rd);
                let mut req = Vec::new();
                if wr.write_all(greeting.as_bytes()).await.is_err()
                    || rd.read_until(b'}', &mut req).await.is_err()
                    || wr.write_all(b"{\"return\": {}}\r\n").await.is_err()
                {
                    return;
                }
                let _ = join_tx.send(wr);
                // Keep the read half until the client leaves.
                let _ = rd.read_to_end(&mut req).await;
            });
        }
    });
    let mut clients: Vec<OwnedWriteHalf> = Vec::new();
    loop {
        tokio::select! {
            Some(wr) = joined.recv() => clients.push(wr),
            line = lines.next_line() => {
                let Ok(Some(mut line)) = line else { return };
                line.push_str("\r\n");
                let mut kept = Vec::with_capacity(clients.len());
                for mut wr in clients.drain(..) {
                    if wr.write_all(line.as_bytes()).await.is_ok() {
                        kept.push(wr);
                    }
                }
                clients = kept;
            }
        }
    }
}
