//! Runtime helpers: where VMs run, and how their tasks wait.
//! - [`shards`]: the threads VMs run on, one VM wholly on one thread.
//! - [`quiet`]: futures polled again only once their own waker fired.
//! - [`sock`]: unix sockets that wake their thread only to be read.

pub mod quiet;
pub mod shards;
pub mod sock;
