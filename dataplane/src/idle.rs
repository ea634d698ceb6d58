//! Bodies that fail when they stop moving. A volume push may stream for hours, so a total
//! timeout would be wrong; what must not happen is a peer that stops sending (or reading)
//! holding a volume lock, a converge and a connection forever. (The client side of the same
//! rule, for requests we send, is `flocker_client::progress`.)

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// A request body as the API hands it to the agent: the connection's body with an idle
/// timeout.
pub type RequestBody = IdleTimeout<hyper::body::Incoming>;

/// Errors of an [`IdleTimeout`] body.
#[derive(Debug, thiserror::Error)]
pub enum IdleError {
    #[error("the sender sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("{0}")]
    Body(String),
}

/// Wraps a body; a frame that takes longer than `idle` to arrive (counted while someone is
/// waiting for it, not while the reader applies back-pressure) ends the body with
/// [`IdleError::Stalled`].
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = IdleError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(|e| IdleError::Body(e.to_string()))))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    this.sleep.as_mut().reset(Instant::now() + this.idle);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(IdleError::Stalled(this.idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
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
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn a_body_that_stops_sending_fails_and_a_moving_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        // Steps a tenth of the timeout apart: the margin keeps a loaded machine from
        // turning a step into a stall.
        let idle = Duration::from_secs(1);
        let mut body = IdleTimeout::new(StreamBody::new(Box::pin(stream)), idle);
        // Slower in total than `idle`, but never idle that long.
        let sender = tokio::spawn(async move {
            for _ in 0..15 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
            // Then silence, holding the sender open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        for _ in 0..15 {
            let frame = body.frame().await.expect("frame").expect("data");
            assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"x")));
        }
        let err = body.frame().await.expect("end").expect_err("stalled");
        assert!(matches!(err, IdleError::Stalled(d) if d == idle), "{err}");
        sender.abort();
    }
}
