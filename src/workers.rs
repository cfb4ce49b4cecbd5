//! Serving threads: one single-threaded tokio runtime per thread, each owning the client
//! connections handed to it and (through [`current_shard`]) its own upstream connections.
//!
//! Why not the multi-threaded runtime: a proxied call is a chain of small steps (client
//! connection, call, upstream connection, and back). On a work-stealing runtime each step can
//! land on another thread, and every hop is a futex wake-up and a context switch, which on a
//! small VM cost more than the proxy's actual work (measured in BENCHMARKS.md). Here a call
//! never leaves its thread; connections are spread over the threads (fewest open first).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

thread_local! {
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The serving thread this code runs on (0-based), or `None` elsewhere (the control runtime,
/// blocking threads, tests). Upstream pools use it so each thread gets its own connections.
pub fn current_shard() -> Option<usize> {
    SHARD.with(Cell::get)
}

struct Worker {
    handle: Handle,
    /// Connections it serves now.
    load: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct Workers {
    workers: Vec<Worker>,
}

/// How many serving threads by default: one per core.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Workers {
    /// Starts `count` serving threads named `{name}-{i}`.
    pub fn start(name: &str, count: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    SHARD.with(|shard| shard.set(Some(index)));
                    // Runs until told to stop (or the sender is dropped); tasks still on the
                    // runtime are dropped with it, which cancels their calls.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    /// Runs a connection's task on the least-loaded serving thread. The task must register its
    /// socket there (e.g. `TcpStream::from_std` at its start), so its I/O stays on that thread.
    pub fn spawn_connection<F>(&self, set: &mut JoinSet<()>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            return;
        };
        let load = worker.load.clone();
        load.fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard(load);
        set.spawn_on(
            async move {
                let _guard = guard;
                task.await;
            },
            &worker.handle,
        );
    }
}

struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                // Not from one of our own threads (a runtime cannot join itself).
                if thread.thread().id() != std::thread::current().id() {
                    let _ = thread.join();
                }
            }
        }
    }
}
