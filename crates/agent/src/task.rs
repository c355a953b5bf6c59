//! A spawned task told to stop through a watch flag: the shape of every
//! part of the agent that runs until asked (a supervisor, the stats
//! reporter, the agent proper under a joined node's fence).
//!
//! The handle owns the task: [`Stoppable::stop`] asks and waits, and a
//! handle dropped without `stop` still asks, so the task winds down (an
//! instance is stopped gracefully) instead of running with no owner.

use std::future::Future;

use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};

/// A running task and its stop flag.
#[derive(Debug)]
pub struct Stoppable<T> {
    stop: watch::Sender<bool>,
    /// `None` once its end was taken.
    task: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Stoppable<T> {
    /// Spawn `body`, given the flag that turns true when it should stop.
    pub fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        Self {
            stop,
            task: Some(tokio::spawn(body(rx))),
        }
    }

    /// Ask the task to stop and wait for its end: what it returned, or how
    /// it failed (a panic). `None` if its end was already taken by
    /// [`Stoppable::ended`].
    pub async fn stop(mut self) -> Option<Result<T, JoinError>> {
        self.stop.send_replace(true);
        match self.task.take() {
            Some(task) => Some(task.await),
            None => None,
        }
    }

    /// The task's end, without asking it to stop; pending forever once
    /// taken. Cancel-safe.
    pub async fn ended(&mut self) -> Result<T, JoinError> {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let r = task.await;
        self.task = None;
        r
    }
}

impl<T> Drop for Stoppable<T> {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_asks_and_waits_drop_asks() {
        let t = Stoppable::spawn(|mut rx| async move {
            let _ = rx.wait_for(|s| *s).await;
            7
        });
        assert_eq!(t.stop().await.unwrap().unwrap(), 7);

        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let t = Stoppable::spawn(|mut rx| async move {
            let _ = rx.wait_for(|s| *s).await;
            let _ = done_tx.send(());
        });
        drop(t);
        tokio::time::timeout(std::time::Duration::from_secs(5), done_rx)
            .await
            .expect("a dropped handle asks its task to stop")
            .unwrap();
    }

    #[tokio::test]
    async fn ended_sees_a_task_that_ends_by_itself() {
        let mut t = Stoppable::spawn(|_rx| async { "done" });
        assert_eq!(t.ended().await.unwrap(), "done");
        assert!(t.stop().await.is_none());
    }
}
