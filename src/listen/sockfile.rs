//! Listening sockets on the file system: bound without following a path
//! anyone else can change, stale ones told from live ones, and removed only
//! when they are still the file qmpmux created.
//!
//! The socket's directory may be writable by others (`/tmp`, a group's
//! directory), who can then swap any name in it for a link between two
//! system calls. So the socket is bound in a private directory created
//! for the purpose (`mkdtemp`: mode 0700, owned by qmpmux) and reached
//! through the descriptor of that directory, never through its name; its
//! mode and owner are set there, where nobody else can add a link, and it
//! is renamed into place. (`fchmod`/`fchown` on the socket's own fd would
//! change the socket inode, not the file: no help on Linux.)

use crate::config::SocketPerms;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0} is in use by another running process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot tell whether {path} is in use, so refusing to replace it")]
    Unsure {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
    #[error("cannot set mode or owner of {path}")]
    Perms {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A socket file qmpmux created: its path and the inode it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Its device and inode.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Removes the file if it is still the socket qmpmux created (not one
    /// another process has put there since, nor anything else).
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What binding created on the file system, so that a failed start or a
/// rejected reload can take it back.
#[derive(Debug, Default)]
pub struct Created {
    pub sockets: Vec<SocketFile>,
    /// Directories created, parents first.
    pub dirs: Vec<PathBuf>,
}

impl Created {
    /// Removes the sockets (if still ours) and the directories (if empty).
    pub fn undo(self) {
        for s in &self.sockets {
            s.remove();
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }

    pub fn append(&mut self, other: Created) {
        self.sockets.extend(other.sockets);
        self.dirs.extend(other.dirs);
    }
}

/// Binds a unix listening socket at `path` with the given permissions,
/// creating parent directories (recorded in `created`, with the socket)
/// and replacing a stale socket file: one that refuses connections
/// (ECONNREFUSED). Any other answer, even an error, may be a live
/// listener: qmpmux then refuses to start rather than unlink it.
///
/// The socket is never reachable with looser permissions than `perms`.
pub async fn bind(path: &Path, perms: &SocketPerms, created: &mut Created) -> Result<UnixListener, BindError> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| BindError::Bind {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
    })?;
    create_dirs(dir, created)?;
    check_existing(path).await?;
    let private = Private::create(dir, name).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let listener = UnixListener::bind(private.entry()).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let perms_err = |source| BindError::Perms {
        path: path.to_owned(),
        source,
    };
    set_perms(&private.entry(), perms).map_err(perms_err)?;
    let meta = std::fs::symlink_metadata(private.entry()).map_err(perms_err)?;
    std::fs::rename(private.entry(), path).map_err(|source| BindError::Bind {
        path: path.to_owned(),
        source,
    })?;
    created.sockets.push(SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    });
    Ok(listener)
}

/// Creates `dir` and its missing parents, recording each one created.
fn create_dirs(dir: &Path, created: &mut Created) -> Result<(), BindError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err()) {
        missing.push(d.to_owned());
        at = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(&d) {
            Ok(()) => created.dirs.push(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(BindError::Dir { path: d, source }),
        }
    }
    Ok(())
}

/// A listening socket the previous qmpmux handed over for `path` (see
/// `handover`), whose socket file was `file` (device, inode): taken if
/// that file is still at `path` (connections made meanwhile wait in its
/// backlog); `None` otherwise, and the fd is closed (the caller binds
/// afresh). The file is recorded in `created` as if bound now.
pub fn adopt(path: &Path, fd: std::os::fd::OwnedFd, file: (u64, u64), created: &mut Created) -> Option<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    let same = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == file);
    if !same {
        info!(path = %path.display(), "the socket file handed over was replaced or removed; binding afresh");
        return None;
    }
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .ok()?;
    created.sockets.push(SocketFile {
        path: path.to_owned(),
        dev: file.0,
        ino: file.1,
    });
    Some(listener)
}

/// Fails unless nothing is at `path` or a stale socket is.
async fn check_existing(path: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(BindError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Replaced by the rename, atomically.
            info!(path = %path.display(), "replacing stale socket");
            Ok(())
        }
        // Removed meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // EAGAIN: a live listener with a full backlog; EACCES: one we may
        // not connect to; and so on.
        Err(source) => Err(BindError::Unsure {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A private directory (mode 0700, ours) beside the socket's final place,
/// held open: its entries are reached through `/proc/self/fd/N`, so
/// renaming the directory or putting a link in its place changes nothing.
/// Removed on drop.
struct Private {
    dir: File,
    path: PathBuf,
}

impl Private {
    fn create(parent: &Path, name: &std::ffi::OsStr) -> io::Result<Private> {
        let path = make_private_dir(parent, name)?;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&path);
        let dir = match opened {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                return Err(e);
            }
        };
        let private = Private { dir, path };
        // Between mkdtemp and open, someone able to write `parent` could
        // have put their own directory under that name.
        let meta = private.dir.metadata()?;
        if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the private directory for binding was replaced",
            ));
        }
        Ok(private)
    }

    /// The socket's name inside the directory, through its descriptor.
    fn entry(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/s", self.dir.as_raw_fd()))
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        // Left only if something failed before the rename.
        let _ = std::fs::remove_file(self.entry());
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .zip(self.dir.metadata().ok())
            .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino());
        if ours {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// `mkdtemp`: a new directory, mode 0700, under a name nobody had; mkdir
/// fails rather than follow anything already there.
fn make_private_dir(parent: &Path, name: &std::ffi::OsStr) -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for _ in 0..64 {
        let mut leaf = std::ffi::OsString::from(".");
        leaf.push(name);
        leaf.push(format!(".{:08x}", fastrand::u32(..)));
        let path = parent.join(leaf);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()))
}

/// Mode, then owner, of `entry`, which nobody else can replace (it is in
/// the private directory).
fn set_perms(entry: &Path, perms: &SocketPerms) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(entry, std::fs::Permissions::from_mode(perms.mode))?;
    if perms.uid.is_some() || perms.gid.is_some() {
        std::os::unix::fs::lchown(entry, perms.uid, perms.gid)?;
    }
    Ok(())
}
