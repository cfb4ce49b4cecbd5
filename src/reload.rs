//! Reloading on file change and SIGHUP, shared by everything that can change without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Calls `reload` when any of `paths` changes (files are watched through their directories,
/// since editors and config managers replace files by rename) and on SIGHUP. A failed reload is
/// logged and leaves the previous state in force; `what` names the thing in log lines.
pub fn spawn_reloader<F>(what: &'static str, paths: Vec<PathBuf>, reload: F)
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    watch(what, paths, reload).detach();
}

/// A running reloader: dropping it stops the watching (for things that can themselves be
/// replaced at run time, such as an upstream's credentials).
pub struct Reloader {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    detached: bool,
}

impl Reloader {
    /// Keeps it running until the process ends.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        if !self.detached {
            for task in &self.tasks {
                task.abort();
            }
        }
    }
}

/// Like [`spawn_reloader`], until the returned [`Reloader`] is dropped.
pub fn watch<F>(what: &'static str, paths: Vec<PathBuf>, reload: F) -> Reloader
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    let mut tasks = Vec::new();
    let reload = Arc::new(reload);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let watcher_tx = tx.clone();
    let watched = paths.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = event.is_ok_and(|e| {
            !matches!(e.kind, notify::EventKind::Access(_))
                && e.paths.iter().any(|p| {
                    watched
                        .iter()
                        .any(|w| p.starts_with(w) || p == w || is_atomic_swap(p, w))
                })
        });
        if relevant {
            let _ = watcher_tx.try_send(());
        }
    });
    let watcher = match watcher {
        Ok(mut watcher) => {
            use notify::Watcher as _;
            for path in &paths {
                let target = if path.is_dir() {
                    path.as_path()
                } else {
                    path.parent().unwrap_or(path)
                };
                if let Err(e) = watcher.watch(target, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(what, path = %target.display(), error = %e, "cannot watch; SIGHUP still reloads");
                }
            }
            Some(watcher)
        }
        Err(e) => {
            tracing::warn!(what, error = %e, "file watching unavailable; SIGHUP still reloads");
            None
        }
    };
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tasks.push(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let _ = tx.send(()).await;
            }
        }));
    }
    tasks.push(tokio::spawn(async move {
        let _watcher = watcher;
        while rx.recv().await.is_some() {
            // Let a burst of events settle, then reload once.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            let reload = reload.clone();
            let outcome = tokio::task::spawn_blocking(move || reload()).await;
            crate::telemetry::record_reload(what, matches!(outcome, Ok(Ok(()))));
            match outcome {
                Ok(Ok(())) => tracing::info!(what, "reloaded"),
                Ok(Err(e)) => {
                    tracing::error!(what, error = %e, "reload rejected; the previous state stays in force")
                }
                Err(e) => {
                    tracing::error!(what, error = %e, "reload panicked; the previous state stays in force")
                }
            }
        }
    }));
    Reloader {
        tasks,
        detached: false,
    }
}

/// Kubernetes updates mounted Secrets and ConfigMaps by swapping a `..data` symlink next to the
/// files (which are themselves symlinks into it): the event names `..data`, not the file.
fn is_atomic_swap(event: &std::path::Path, watched: &std::path::Path) -> bool {
    event
        .parent()
        .is_some_and(|dir| Some(dir) == watched.parent())
        && event
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with(".."))
}
