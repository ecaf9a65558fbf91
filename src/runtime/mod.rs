//! Runtime helpers: where VMs run, and how their tasks wait.
//! - [`shards`]: the threads VMs run on, one VM wholly on one thread.
//! - [`quiet`]: futures polled again only once their own waker fired.

pub mod quiet;
pub mod shards;
