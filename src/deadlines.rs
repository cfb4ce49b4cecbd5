//! Call deadlines on the serving threads without a tokio timer per call.
//!
//! Every proxied call has a deadline (the caller's `grpc-timeout`), and it almost never fires.
//! A tokio timer per call costs a self-wake: registering a timer earlier than the one the
//! runtime last slept for writes to the runtime's eventfd (tokio `time::Handle::reregister`),
//! so each call made the serving thread's next `epoll_wait` return at once, for nothing. At
//! concurrency 1 that was every call (the connection's other timers, keep-alive and max age,
//! are further away than a call's deadline).
//!
//! Here each serving thread keeps its calls' deadlines in one ordered table, and one sweeper
//! task sleeps until the earliest. A new call whose deadline is later than the sweeper's
//! alarm (the common case: deadlines are alike and calls arrive in order) touches no timer at
//! all; the alarm stays where it is even after the calls it was set for have ended, and fires
//! once, for nothing, per deadline's length at worst. Off the serving threads (tests, the
//! control runtime) it is plain `tokio::time::timeout_at`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

use crate::workers::current_shard;

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `future` until `deadline`: `Err(Elapsed)` if it has not finished by then.
pub fn timeout_at<F: Future>(deadline: Instant, future: F) -> Deadline<F> {
    let inner = if current_shard().is_some() {
        Inner::Table {
            future,
            deadline,
            key: None,
        }
    } else {
        Inner::Tokio {
            timeout: tokio::time::timeout_at(deadline, future),
        }
    };
    Deadline { inner }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout_at`].
    pub struct Deadline<F> {
        #[pin]
        inner: Inner<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner<F> {
        Table {
            #[pin]
            future: F,
            deadline: Instant,
            // Its entry in this thread's table, once it waits.
            key: Option<Key>,
        },
        Tokio {
            #[pin]
            timeout: tokio::time::Timeout<F>,
        },
    }

    impl<F> PinnedDrop for Inner<F> {
        fn drop(this: Pin<&mut Self>) {
            if let InnerProj::Table { key: Some(key), .. } = this.project() {
                let key = *key;
                // `try_with`: the table may be gone already when the thread ends.
                let _ = TABLE.try_with(|table| {
                    if let Ok(mut table) = table.try_borrow_mut() {
                        table.entries.remove(&key);
                    }
                });
            }
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            InnerProj::Tokio { timeout } => timeout.poll(cx).map_err(|_| Elapsed),
            InnerProj::Table {
                future,
                deadline,
                key,
            } => {
                if let Poll::Ready(output) = future.poll(cx) {
                    return Poll::Ready(Ok(output));
                }
                if Instant::now() >= *deadline {
                    return Poll::Ready(Err(Elapsed));
                }
                let sweeper =
                    TABLE.with(|table| table.borrow_mut().wait(*deadline, key, cx.waker()));
                if let Some(sweeper) = sweeper {
                    sweeper.wake();
                }
                Poll::Pending
            }
        }
    }
}

/// Entries are ordered by deadline; the number tells apart calls with the same one.
type Key = (Instant, u64);

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

#[derive(Default)]
struct Table {
    entries: BTreeMap<Key, Waker>,
    next: u64,
    /// When the sweeper's alarm goes off (`None`: not set).
    alarm: Option<Instant>,
    /// The sweeper's waker, taken to wake it.
    sweeper: Option<Waker>,
    sweeper_started: bool,
}

impl Table {
    /// Registers (or refreshes) a waiting call; returns the sweeper's waker when the sweeper
    /// must set its alarm earlier.
    fn wait(&mut self, deadline: Instant, key: &mut Option<Key>, waker: &Waker) -> Option<Waker> {
        match key.and_then(|k| self.entries.get_mut(&k)) {
            Some(registered) => {
                if !registered.will_wake(waker) {
                    registered.clone_from(waker);
                }
                return None;
            }
            None => {
                let new = (deadline, self.next);
                self.next = self.next.wrapping_add(1);
                self.entries.insert(new, waker.clone());
                *key = Some(new);
            }
        }
        if !self.sweeper_started {
            self.sweeper_started = true;
            tokio::spawn(sweeper());
        }
        // Only a deadline before the alarm needs the sweeper to set it again.
        if self.alarm.is_none_or(|alarm| deadline < alarm) {
            self.sweeper.take()
        } else {
            None
        }
    }

    /// Takes the wakers of every entry due at `now`, and sets the alarm for the next one.
    fn due(&mut self, now: Instant, woken: &mut Vec<Waker>) -> Option<Instant> {
        while let Some(entry) = self.entries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            woken.push(entry.remove());
        }
        self.entries.first_key_value().map(|((at, _), _)| *at)
    }
}

/// One per serving thread, for its lifetime: sleeps until the earliest deadline in the table
/// and wakes the calls whose deadline passed.
async fn sweeper() {
    let alarm = tokio::time::sleep_until(Instant::now());
    tokio::pin!(alarm);
    let mut woken = Vec::new();
    std::future::poll_fn(|cx| {
        loop {
            let fired = alarm.as_mut().poll(cx).is_ready();
            let next = TABLE.with(|table| {
                let mut table = table.borrow_mut();
                table.sweeper = Some(cx.waker().clone());
                if fired {
                    table.alarm = None;
                }
                let next = table.due(Instant::now(), &mut woken);
                match (next, table.alarm) {
                    // Moved earlier (or set again after firing); a later deadline leaves it.
                    (Some(next), alarm) if alarm.is_none_or(|alarm| next < alarm) => {
                        table.alarm = Some(next);
                        Some(next)
                    }
                    _ => None,
                }
            });
            for waker in woken.drain(..) {
                waker.wake();
            }
            match next {
                Some(next) => alarm.as_mut().reset(next),
                None => return Poll::<()>::Pending,
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// On a serving thread (the table) and off one (tokio's timer): a future that finishes
    /// in time gives its output, one that does not gives `Elapsed` at its deadline, and a
    /// call that ended leaves no entry behind.
    #[test]
    fn deadlines_fire_on_time_and_finished_calls_leave_nothing() {
        let workers = crate::workers::Workers::start("deadline-test", 1).expect("workers");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut set = tokio::task::JoinSet::new();
        let control = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        control.block_on(async {
            workers.spawn_connection(&mut set, async move {
                let start = Instant::now();
                let quick = timeout_at(start + Duration::from_secs(5), async { 7 }).await;
                let slow = timeout_at(
                    start + Duration::from_millis(200),
                    tokio::time::sleep(Duration::from_secs(5)),
                )
                .await;
                let slow_took = start.elapsed();
                // Many waiting at once, with deadlines in any order: each fires at its own.
                let mut fired = Vec::new();
                let mut waits = tokio::task::JoinSet::new();
                for ms in [300u64, 100, 250, 50, 400] {
                    waits.spawn(async move {
                        let r = timeout_at(
                            Instant::now() + Duration::from_millis(ms),
                            std::future::pending::<()>(),
                        )
                        .await;
                        (ms, r, Instant::now())
                    });
                }
                // A call that finishes before its deadline.
                let done = timeout_at(
                    Instant::now() + Duration::from_secs(30),
                    tokio::time::sleep(Duration::from_millis(20)),
                )
                .await;
                while let Some(Ok((ms, r, at))) = waits.join_next().await {
                    fired.push((ms, r, at.duration_since(start)));
                }
                let left = TABLE.with(|t| t.borrow().entries.len());
                let _ = tx.send((quick, slow, slow_took, fired, done, left));
            });
            while set.join_next().await.is_some() {}
        });
        let (quick, slow, slow_took, fired, done, left) = rx.recv().expect("result");
        assert_eq!(quick, Ok(7));
        assert_eq!(slow, Err(Elapsed));
        assert!(
            slow_took >= Duration::from_millis(200) && slow_took < Duration::from_secs(3),
            "{slow_took:?}"
        );
        assert_eq!(done, Ok(()));
        assert_eq!(fired.len(), 5);
        for (ms, result, _) in &fired {
            assert_eq!(*result, Err(Elapsed), "{ms} ms");
        }
        assert_eq!(left, 0, "entries left in the table");

        // Off the serving threads: tokio's timer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let now = Instant::now();
            assert_eq!(
                timeout_at(now + Duration::from_secs(1), async { 1 }).await,
                Ok(1)
            );
            assert_eq!(
                timeout_at(
                    now + Duration::from_millis(10),
                    std::future::pending::<()>()
                )
                .await,
                Err(Elapsed)
            );
        });
    }
}
