//! A future that is polled only after it has asked to be.
//!
//! `select!` polls every branch on every pass that finds none ready. A
//! client's loop wakes once per reply or event it delivers, and its rarely
//! ready branches (the stop signals) were polled each time it went back to
//! sleep; a cancellation token's poll takes two locks. [`Quiet`] gives the
//! inner future a waker of its own and polls it again only once that waker
//! has been used, so wake-ups meant for the other branches pass it by.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

struct Flag {
    /// The inner future asked to be polled (or was never polled yet).
    woken: AtomicBool,
    /// The task polling the [`Quiet`].
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls `inner` only on its first poll and after it has woken its waker.
pub struct Quiet<'a, F: ?Sized> {
    inner: Pin<&'a mut F>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<'a, F: Future + ?Sized> Quiet<'a, F> {
    pub fn new(inner: Pin<&'a mut F>) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Quiet { inner, flag, waker }
    }
}

impl<F: Future + ?Sized> Future for Quiet<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Register before looking at the flag: a wake in between then
        // either sets the flag first or wakes this task after.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.as_mut().poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// Counts its polls and keeps the waker it was given.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        waker: Mutex<Option<Waker>>,
        ready: AtomicBool,
    }

    struct ProbeFuture<'a>(&'a Probe);

    impl Future for ProbeFuture<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.0.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polled_once_then_only_after_its_own_wake() {
        let probe = Probe::default();
        let inner = ProbeFuture(&probe);
        let inner = std::pin::pin!(inner);
        let mut quiet = Quiet::new(inner);
        let outer = Arc::new(CountingWaker::default());
        let outer_waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&outer_waker);

        assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        assert_eq!(
            probe.polls.load(Ordering::SeqCst),
            1,
            "the first poll reaches the inner future"
        );
        // Wake-ups for something else: the inner future is left alone.
        for _ in 0..5 {
            assert!(Pin::new(&mut quiet).poll(&mut cx).is_pending());
        }
        assert_eq!(probe.polls.load(Ordering::SeqCst), 1);

        // Its own wake-up reaches the task and lets the next poll through.
        probe.ready.store(true, Ordering::SeqCst);
        probe.waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(outer.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(Pin::new(&mut quiet).poll(&mut cx).is_ready());
        assert_eq!(probe.polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancellation_token_still_ends_the_wait() {
        let token = tokio_util::sync::CancellationToken::new();
        let cancelled = token.cancelled();
        let cancelled = std::pin::pin!(cancelled);
        let quiet = Quiet::new(cancelled);
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            t.cancel();
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), quiet)
            .await
            .expect("the cancellation reaches the waiting task");
    }
}
