//! Client slots: how many clients a VM serves at once, over all its
//! sockets (`[client] max_clients`); how many of those its extra listeners
//! may take together (all but `listen_reserved_clients`, kept for the main
//! `listen` socket); and how many each listener may take (its own
//! `max_clients`). A client holds one permit of each limit that applies to
//! it until it leaves, so one socket's users cannot lock out the others.

use crate::ops::metrics::Refusal;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of one VM, from which each socket's [`Slots`] are made.
#[derive(Debug, Clone)]
pub struct VmSlots {
    all: Arc<Semaphore>,
    max: usize,
    listeners: Arc<Semaphore>,
    share: usize,
}

/// The limits that apply to the clients of one socket.
#[derive(Debug, Clone)]
pub struct Slots {
    vm: Arc<Semaphore>,
    vm_max: usize,
    /// `None` for the main socket.
    listeners: Option<(Arc<Semaphore>, usize)>,
    own: Option<(Arc<Semaphore>, usize)>,
}

/// Which limit refused a client, and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The VM's `max_clients`.
    Vm(usize),
    /// The extra listeners' share of it (`max_clients` less
    /// `listen_reserved_clients`).
    Listeners(usize),
    /// The listener's own `max_clients`.
    Listener(usize),
}

/// A client's place: given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permits: Vec<OwnedSemaphorePermit>,
}

impl VmSlots {
    /// `max` clients in all, of which the extra listeners may take `share`.
    pub fn new(max: usize, share: usize) -> VmSlots {
        let share = share.min(max);
        VmSlots {
            all: Arc::new(Semaphore::new(max)),
            max,
            listeners: Arc::new(Semaphore::new(share)),
            share,
        }
    }

    /// For the main `listen` socket: only the VM's limit.
    pub fn main(&self) -> Slots {
        Slots {
            vm: self.all.clone(),
            vm_max: self.max,
            listeners: None,
            own: None,
        }
    }

    /// For an extra listener, with its own limit if it has one.
    pub fn listener(&self, own: Option<usize>) -> Slots {
        Slots {
            vm: self.all.clone(),
            vm_max: self.max,
            listeners: Some((self.listeners.clone(), self.share)),
            own: own.map(|n| (Arc::new(Semaphore::new(n)), n)),
        }
    }
}

impl Slots {
    /// A slot under every limit that applies, or the first that is full.
    pub fn try_take(&self) -> Result<Slot, Full> {
        let mut permits = Vec::with_capacity(3);
        if let Some((own, max)) = &self.own {
            permits.push(own.clone().try_acquire_owned().map_err(|_| Full::Listener(*max))?);
        }
        if let Some((share, max)) = &self.listeners {
            permits.push(share.clone().try_acquire_owned().map_err(|_| Full::Listeners(*max))?);
        }
        permits.push(self.vm.clone().try_acquire_owned().map_err(|_| Full::Vm(self.vm_max))?);
        Ok(Slot { _permits: permits })
    }
}

impl Full {
    /// Why the client was refused, for the audit log.
    pub fn reason(self) -> &'static str {
        match self {
            Full::Vm(_) => "client refused: the VM has its maximum number of clients",
            Full::Listeners(_) => {
                "client refused: the VM's extra listeners have all the clients they may have \
                 (the rest are kept for its main socket)"
            }
            Full::Listener(_) => "client refused: this listener has its maximum number of clients",
        }
    }

    /// The `reason` it is counted under in the metrics.
    pub fn refusal(self) -> Refusal {
        match self {
            Full::Vm(_) => Refusal::MaxClients,
            Full::Listeners(_) => Refusal::ReservedForMain,
            Full::Listener(_) => Refusal::ListenerMaxClients,
        }
    }

    pub fn max(self) -> usize {
        match self {
            Full::Vm(n) | Full::Listeners(n) | Full::Listener(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_cannot_take_the_reserved_slots() {
        let vm = VmSlots::new(4, 3);
        let (main, a, b) = (vm.main(), vm.listener(Some(2)), vm.listener(None));
        let a1 = a.try_take().unwrap();
        let _a2 = a.try_take().unwrap();
        assert_eq!(a.try_take().unwrap_err(), Full::Listener(2));
        let _b1 = b.try_take().unwrap();
        assert_eq!(b.try_take().unwrap_err(), Full::Listeners(3));
        let m1 = main.try_take().unwrap();
        assert_eq!(main.try_take().unwrap_err(), Full::Vm(4));
        drop(a1);
        // A freed listener slot goes to whoever asks first.
        let _m2 = main.try_take().unwrap();
        assert_eq!(b.try_take().unwrap_err(), Full::Vm(4));
        drop(m1);
        let _b2 = b.try_take().unwrap();
    }

    #[test]
    fn a_refused_client_holds_nothing() {
        let vm = VmSlots::new(1, 1);
        let (main, l) = (vm.main(), vm.listener(Some(1)));
        let m = main.try_take().unwrap();
        for _ in 0..3 {
            assert_eq!(l.try_take().unwrap_err(), Full::Vm(1));
        }
        drop(m);
        let _l = l
            .try_take()
            .expect("the listener's own and share permits were given back");
    }

    #[test]
    fn share_never_exceeds_max() {
        let vm = VmSlots::new(2, 5);
        let l = vm.listener(None);
        let _x = (l.try_take().unwrap(), l.try_take().unwrap());
        assert_eq!(l.try_take().unwrap_err(), Full::Listeners(2));
    }
}
