//! Noticing QEMU's monitor socket come back, so that reconnecting need not
//! wait out the backoff.
//!
//! While the session waits between attempts, an inotify watch on the
//! socket's directory reports a file created (or moved in) under the
//! socket's name: a restarted QEMU has bound its socket again. The backoff
//! timer still runs beside it, for everything a watch cannot see (a socket
//! reached through a symlink, a directory that does not exist yet, an
//! exhausted inotify limit), so the watch only ever makes a retry earlier.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;

/// Which file a path names: device, inode and change time (a file created
/// right after another was removed often gets its inode number). A
/// restarted QEMU binds a new socket file; the old one, left behind by a
/// QEMU that was killed, refuses connections but has the same name.
pub type Identity = Option<(u64, u64, i64, i64)>;

/// The file `path` names now, if any.
pub fn identity(path: &Path) -> Identity {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Why no watch could be set up (the session then relies on its timer).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the path has no file name")]
    NoFileName,
    #[error("cannot create an inotify instance (fs.inotify.max_user_instances reached?): {0}")]
    Init(nix::Error),
    #[error("cannot watch directory {dir}: {errno}")]
    AddWatch { dir: std::path::PathBuf, errno: nix::Error },
    #[error("cannot register the inotify descriptor: {0}")]
    Register(std::io::Error),
}

impl WatchError {
    /// The socket's directory does not exist (yet): usual before a VM's
    /// first start, unlike the other failures.
    pub fn is_missing_directory(&self) -> bool {
        matches!(
            self,
            WatchError::AddWatch {
                errno: nix::Error::ENOENT,
                ..
            }
        )
    }
}

/// A watch for a new socket file at one path.
pub struct SocketWatch {
    fd: AsyncFd<Fd>,
    name: OsString,
    /// The socket changed before the watch was in place.
    changed: bool,
}

impl SocketWatch {
    /// Watches for a new file at `path`, which was `seen` when the last
    /// connection attempt was made.
    pub fn new(path: &Path, seen: Identity) -> Result<SocketWatch, WatchError> {
        let name = path.file_name().ok_or(WatchError::NoFileName)?.to_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(WatchError::Init)?;
        inotify
            .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .map_err(|errno| WatchError::AddWatch {
                dir: dir.to_owned(),
                errno,
            })?;
        // SAFETY: `Fd` owns the inotify descriptor, which stays open until
        // the `AsyncFd` (and with it the `Fd`) is dropped, and `as_raw_fd`
        // always returns that same descriptor.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(Fd(inotify), tokio::io::Interest::READABLE) }
            .map_err(|e| WatchError::Register(e.into()))?;
        // Created between that attempt and now: no event will tell.
        let now = identity(path);
        let changed = now.is_some() && now != seen;
        Ok(SocketWatch { fd, name, changed })
    }

    /// Returns once a file has been created or moved in under the socket's
    /// name (at once if that happened before the watch was set up). Never
    /// returns if the watch fails.
    pub async fn created(&mut self) {
        if self.changed {
            return;
        }
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let events = ready.try_io(|fd| {
                fd.get_ref()
                    .0
                    .read_events()
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
            });
            match events {
                Ok(Ok(events)) => {
                    if events.iter().any(|e| e.name.as_ref() == Some(&self.name)) {
                        return;
                    }
                }
                Ok(Err(_)) => return std::future::pending().await,
                // Spurious readiness: wait again.
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn fires(w: &mut SocketWatch) -> bool {
        tokio::time::timeout(Duration::from_secs(5), w.created()).await.is_ok()
    }

    #[tokio::test]
    async fn a_socket_bound_again_at_the_path_is_noticed_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let old = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(old); // as a killed QEMU leaves it: the file stays
        let seen = identity(&path);
        let mut w = SocketWatch::new(&path, seen).unwrap();
        // Other names in the directory do not count.
        std::fs::write(dir.path().join("other"), "x").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), w.created())
                .await
                .is_err(),
            "fired for another file"
        );
        // A new QEMU removes the old file and binds its own.
        std::fs::remove_file(&path).unwrap();
        let _new = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(fires(&mut w).await);
    }

    #[tokio::test]
    async fn a_socket_replaced_before_the_watch_counts_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let old = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let seen = identity(&path);
        drop(old);
        std::fs::remove_file(&path).unwrap();
        let _new = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut w = SocketWatch::new(&path, seen).unwrap();
        assert!(fires(&mut w).await);
        // Unchanged since the attempt: nothing to report yet.
        let mut w = SocketWatch::new(&path, identity(&path)).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(100), w.created())
            .await
            .is_err());
    }

    #[test]
    fn no_watch_without_a_directory_and_the_error_says_so() {
        let Err(e) = SocketWatch::new(Path::new("/nonexistent-qmpmux-dir/qmp.sock"), None) else {
            panic!("a watch on a directory that does not exist");
        };
        assert!(e.is_missing_directory(), "{e:?}");
        assert!(e.to_string().contains("/nonexistent-qmpmux-dir"), "{e}");
    }
}
