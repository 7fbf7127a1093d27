//! A request stream may send the relay at most [`BEFORE_RESPONSE`] bytes before the relay
//! answers it.
//!
//! h3 buffers a HEADERS frame (and any unknown frame before it) whole, whatever length its
//! header announces, so one authenticated client could grow the relay's memory without bound
//! by announcing 2^40 bytes and sending them. A request is a CONNECT and a few fields; what a
//! client may send before the answer is its first capsules (a COMPRESSION_ASSIGN). This wraps
//! h3-quinn's connection so that each request stream counts what it delivers to h3 until the
//! relay first sends on it; past the budget the stream is stopped (`H3_EXCESSIVE_LOAD`) and h3
//! sees it end with an error, freeing what it buffered.

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// Bytes a request stream may deliver before the relay answers it.
pub(crate) const BEFORE_RESPONSE: usize = 64 << 10;
/// `H3_EXCESSIVE_LOAD` (RFC 9114 §8.1).
const EXCESSIVE_LOAD: u64 = 0x107;

/// h3-quinn's connection, with budgeted request streams.
pub(crate) struct Connection(pub(crate) h3_quinn::Connection);

/// h3-quinn's stream opener, handing out budgeted streams too (the types must match).
pub(crate) struct Opener(h3_quinn::OpenStreams);

/// A stream (or one half of it) and its budget.
pub(crate) struct Budgeted<S> {
    inner: S,
    received: usize,
    /// Set once the relay sent on the stream: from then on nothing is counted.
    answered: Arc<AtomicBool>,
}

impl<S> Budgeted<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            received: 0,
            answered: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl quic::Connection<Bytes> for Connection {
    type RecvStream = h3_quinn::RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_recv(&mut self.0, cx)
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        quic::Connection::<Bytes>::poll_accept_bidi(&mut self.0, cx).map_ok(Budgeted::new)
    }

    fn opener(&self) -> Self::OpenStreams {
        Opener(quic::Connection::<Bytes>::opener(&self.0))
    }
}

/// The same stream opening for the connection and its opener (the trait wants both), over
/// their h3-quinn counterparts in `.0`.
macro_rules! budgeted_opener {
    ($ty:ty) => {
        impl quic::OpenStreams<Bytes> for $ty {
            type BidiStream = Budgeted<h3_quinn::BidiStream<Bytes>>;
            type SendStream = h3_quinn::SendStream<Bytes>;

            fn poll_open_bidi(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
                quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.0, cx).map_ok(Budgeted::new)
            }

            fn poll_open_send(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
                quic::OpenStreams::<Bytes>::poll_open_send(&mut self.0, cx)
            }

            fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
                quic::OpenStreams::<Bytes>::close(&mut self.0, code, reason);
            }
        }
    };
}

budgeted_opener!(Connection);
budgeted_opener!(Opener);

impl<S: quic::RecvStream> quic::RecvStream for Budgeted<S> {
    type Buf = S::Buf;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        let polled = self.inner.poll_data(cx);
        if let Poll::Ready(Ok(Some(buf))) = &polled
            && !self.answered.load(Ordering::Relaxed)
        {
            self.received = self.received.saturating_add(buf.remaining());
            if self.received > BEFORE_RESPONSE {
                self.inner.stop_sending(EXCESSIVE_LOAD);
                return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                    error_code: EXCESSIVE_LOAD,
                }));
            }
        }
        polled
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<S: quic::SendStream<Bytes>> quic::SendStream<Bytes> for Budgeted<S> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.answered.store(true, Ordering::Relaxed);
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

impl<S: quic::BidiStream<Bytes>> quic::BidiStream<Bytes> for Budgeted<S> {
    type SendStream = Budgeted<S::SendStream>;
    type RecvStream = Budgeted<S::RecvStream>;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        let (send, recv) = self.inner.split();
        (
            Budgeted {
                inner: send,
                received: self.received,
                answered: self.answered.clone(),
            },
            Budgeted {
                inner: recv,
                received: self.received,
                answered: self.answered,
            },
        )
    }
}
