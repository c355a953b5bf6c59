//! The response body type: either streamed from an instance (holding the
//! bulkhead slot, the backend's in-flight count and the connection until
//! the last byte), or a short body the router wrote itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::http::balance::{Picked, ServiceSlot};
use crate::http::upstream::UpBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

/// A response body the router sends.
pub enum RespBody {
    /// Streamed from an instance.
    Proxied(ProxiedBody),
    /// Written by the router.
    Local(Full<Bytes>),
}

/// An instance's response body and the counters it keeps busy.
pub struct ProxiedBody {
    /// Read from the instance's connection, which goes back to the pool
    /// once the body has ended and is closed if it is dropped before.
    pub(crate) inner: UpBody,
    pub(crate) _slot: Option<ServiceSlot>,
    pub(crate) _picked: Option<Picked>,
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            RespBody::Proxied(p) => Pin::new(&mut p.inner).poll_frame(cx),
            RespBody::Local(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Proxied(p) => p.inner.is_end_stream(),
            RespBody::Local(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Proxied(p) => p.inner.size_hint(),
            RespBody::Local(f) => f.size_hint(),
        }
    }
}
