//! The QMP wire protocol: framing, QEMU-style JSON, requests and replies.

pub mod extensions;
pub mod framing;
pub mod incoming;
pub mod json;
mod measure;
pub mod outgoing;
pub mod request;
