//! Events users can rely on: which events a client receives ([`filter`]),
//! the numbered history that lets a consumer resume without losing one
//! ([`history`]) and its crash-proof copy handed to the next qmpmux
//! ([`journal`]), and programs run when events happen ([`actions`]).
//! Pure code but for the action runner and the journal's memfd; the
//! session owns one history per VM and applies each client's filter as it
//! fans an event out.

pub mod actions;
pub mod filter;
pub mod history;
pub mod journal;

pub use filter::EventFilter;
pub use history::History;
