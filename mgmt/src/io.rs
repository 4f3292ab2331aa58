//! Byte streams for `capnp-rpc`: it speaks the `futures` I/O traits, tokio sockets speak tokio's.
//! [`Stream`] adapts one half of a tokio socket (twenty lines instead of a `tokio-util`
//! dependency) and can record when bytes last moved, for the server's idle timeout.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

/// When bytes last moved on a connection, in either direction.
pub type Activity = Rc<Cell<Instant>>;

/// A tokio reader or writer seen through the `futures` I/O traits.
#[derive(Debug)]
pub struct Stream<T> {
    inner: T,
    activity: Option<Activity>,
}

impl<T> Stream<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            activity: None,
        }
    }

    /// Wraps `inner`, stamping `activity` whenever bytes are read or written.
    pub fn tracked(inner: T, activity: Activity) -> Self {
        Self {
            inner,
            activity: Some(activity),
        }
    }

    fn touch(&self, moved: usize) {
        if moved > 0 {
            if let Some(a) = &self.activity {
                a.set(Instant::now());
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> futures::io::AsyncRead for Stream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut read_buf = tokio::io::ReadBuf::new(buf);
        match Pin::new(&mut self.inner).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) => {
                let n = read_buf.filled().len();
                self.touch(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> futures::io::AsyncWrite for Stream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.touch(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
