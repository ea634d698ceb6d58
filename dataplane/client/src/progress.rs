//! Progress tracking for requests that may run for hours: a volume push is bounded by how
//! long it goes without moving, not by its total time. [`Activity`] remembers when
//! something last moved; [`Tracked`] bodies record every byte that moves in either
//! direction.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// When something last moved on a connection, for watchdogs that fail a request only when
/// it stops making progress.
#[derive(Clone)]
pub struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Activity {
    /// Something moved just now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Runs `fut` until it finishes, or until nothing moved for `idle` (then `None`).
    pub async fn watch<F: Future>(&self, idle: Duration, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        self.touch();
        loop {
            let deadline = self.last() + idle;
            tokio::select! {
                out = &mut fut => return Some(out),
                () = tokio::time::sleep_until(deadline) => {
                    if self.last() + idle <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

/// A body that records in an [`Activity`] every time the connection asks it for data (the
/// peer is taking what we send) or it yields a frame.
pub struct Tracked<B> {
    inner: B,
    activity: Activity,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, activity: Activity) -> Self {
        Tracked { inner, activity }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.activity.touch();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            self.activity.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watch_gives_up_only_without_progress() {
        let activity = Activity::default();
        let idle = Duration::from_secs(1);
        let a = activity.clone();
        let moving = async move {
            for _ in 0..15 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                a.touch();
            }
            "done"
        };
        assert_eq!(activity.watch(idle, moving).await, Some("done"));
        let silent = tokio::time::sleep(Duration::from_secs(3600));
        assert_eq!(activity.watch(idle, silent).await, None);
    }
}
