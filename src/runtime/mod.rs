//! Runtime helpers: where VMs run, and how their tasks wait.
//! - [`shards`]: the threads VMs run on, one VM wholly on one thread.
//! - [`quiet`]: futures polled again only once their own waker fired.
//! - [`sock`]: unix sockets that wake their thread only to be read.
//! - [`fanout`]: one buffer to many sockets in one system call.
//! - [`background`]: a low-priority thread for taps.

pub mod background;
pub mod fanout;
pub mod quiet;
pub mod shards;
pub mod sock;
