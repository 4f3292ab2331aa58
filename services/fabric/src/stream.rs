//! A connection's two halves: plain TCP, or TLS over TCP on a listener that requires it. Reads
//! go through a buffered reader either way; the writer sends read data from the pool straight
//! to a plain socket (one `sendmsg` of many pieces) and through OpenSSL (a copy into records)
//! on a TLS one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// The read half of a connection.
#[derive(Debug)]
pub enum ReadHalf {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
    /// TLS.
    Tls(tokio::io::ReadHalf<SslStream<TcpStream>>),
}

/// The write half of a connection.
#[derive(Debug)]
pub enum WriteHalf {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
    /// TLS.
    Tls(tokio::io::WriteHalf<SslStream<TcpStream>>),
}

/// Splits a plain connection.
pub fn plain(s: TcpStream) -> (ReadHalf, WriteHalf) {
    let (r, w) = s.into_split();
    (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
}

/// Splits a TLS connection.
pub fn tls(s: SslStream<TcpStream>) -> (ReadHalf, WriteHalf) {
    let (r, w) = tokio::io::split(s);
    (ReadHalf::Tls(r), WriteHalf::Tls(w))
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Self::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Self::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(w) => Pin::new(w).poll_flush(cx),
            Self::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Self::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
