//! The client side: listening sockets and one task per connected client.

pub mod client;

use client::ClientContext;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0} is in use by another running process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds a unix listening socket at `path`, creating parent directories
/// and replacing a stale socket file that nothing listens on.
pub async fn bind(path: &Path) -> Result<UnixListener, BindError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| BindError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        match UnixStream::connect(path).await {
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "replacing stale socket");
                let _ = std::fs::remove_file(path);
            }
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Client ids are unique across the whole daemon, for logs.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Accepts clients until shutdown; each gets its own task.
pub async fn accept_loop(listener: UnixListener, ctx: ClientContext, tracker: TaskTracker) {
    // One permit per connected client: `max_clients` at most.
    let slots = Arc::new(Semaphore::new(ctx.opts.max_clients));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = ctx.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!(
                        max = ctx.opts.max_clients,
                        "VM has its maximum number of clients; refusing a new one"
                    );
                    drop(stream);
                    continue;
                };
                let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("client", id);
                let client = client::run(stream, id, ctx.clone());
                tracker.spawn(
                    async move {
                        client.await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // EMFILE/ENFILE/ENOBUFS: the pending connection stays queued,
                // so retrying at once would spin; wait for fds to free up.
                error!(error = %e, "cannot accept client; pausing accepts for 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => warn!(error = %e, "accept failed"),
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}
