//! A future that is polled only after it has asked to be.
//!
//! `select!` polls every branch on every pass that finds none ready. A
//! client's loop wakes once per reply or event it delivers, and its rarely
//! ready branches (the stop signals) were polled each time it went back to
//! sleep; a cancellation token's poll takes two locks, and a socket's read
//! readiness one. [`Quiet`] gives the inner future or stream a waker of its
//! own and polls it again only once that waker has been used (or a stream
//! has just yielded an item), so wake-ups meant for the other branches pass
//! it by.

use futures_util::task::AtomicWaker;
use futures_util::Stream;
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

/// Polls `inner` only on its first poll and after it has woken its waker;
/// a stream, also right after each item (more may be buffered).
pub struct Quiet<T> {
    inner: T,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<T> Quiet<T> {
    pub fn new(inner: T) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Quiet { inner, flag, waker }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Whether the inner value is to be polled now.
    fn due(&self, cx: &Context<'_>) -> bool {
        // Register before looking at the flag: a wake in between then
        // either sets the flag first or wakes this task after.
        self.flag.task.register(cx.waker());
        self.flag.woken.swap(false, Ordering::AcqRel)
    }
}

impl<T: Future + Unpin> Future for Quiet<T> {
    type Output = T::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Output> {
        if !self.due(cx) {
            return Poll::Pending;
        }
        let this = &mut *self;
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

impl<T: Stream + Unpin> Stream for Quiet<T> {
    type Item = T::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T::Item>> {
        if !self.due(cx) {
            return Poll::Pending;
        }
        let this = &mut *self;
        let next = Pin::new(&mut this.inner).poll_next(&mut Context::from_waker(&this.waker));
        if next.is_ready() {
            this.flag.woken.store(true, Ordering::Release);
        }
        next
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

    #[test]
    fn a_stream_is_polled_again_after_each_item() {
        let mut quiet = Quiet::new(futures_util::stream::iter([1, 2]));
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        // No wake-up between the items: the first says more may be there.
        assert_eq!(Pin::new(&mut quiet).poll_next(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(Pin::new(&mut quiet).poll_next(&mut cx), Poll::Ready(Some(2)));
        assert_eq!(Pin::new(&mut quiet).poll_next(&mut cx), Poll::Ready(None));
    }

    #[tokio::test]
    async fn a_socket_read_after_a_quiet_spell_is_not_missed() {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut lines = Quiet::new(tokio_util::codec::FramedRead::new(
            a,
            tokio_util::codec::LinesCodec::new(),
        ));
        let writer = tokio::spawn(async move {
            for i in 0..50 {
                b.write_all(format!("{i}\n{i}\n").as_bytes()).await.unwrap();
                if i % 7 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        });
        for i in 0..50 {
            for _ in 0..2 {
                let line = tokio::time::timeout(std::time::Duration::from_secs(5), lines.next())
                    .await
                    .expect("a line written is read")
                    .unwrap()
                    .unwrap();
                assert_eq!(line, i.to_string());
            }
        }
        writer.await.unwrap();
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
