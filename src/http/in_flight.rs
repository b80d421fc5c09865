//! [`InFlight`]: a worker-wide budget of cache values held for clients at once, uploads being
//! read and answers being sent.
//!
//! The cache bounds what it *stores* (`HERDSMAN_CACHE_MAX_BYTES`), but a value also lives in the
//! worker while it travels: a `PUT`'s body until it is stored, a `GET`'s answer until the client
//! has read it. A client that does not read, over many HTTP/2 streams, kept one copy of a 1 MB
//! value alive per request for as long as it liked: 64 streams of one connection, a few
//! kilobytes of requests, held 62 MB of the worker (measured, tests/memory_flood.rs). Each such
//! request now takes its value's size from this budget first; when the budget is spent it is
//! answered `503` with `Retry-After`, and the worker's memory stays put.
//!
//! An answer keeps its share until hyper has taken its last piece: [`BudgetedBody`] hands the
//! value over in [`CHUNK_BYTES`] pieces, and hyper asks for the next only once it can send it,
//! so the share is held for as long as the value is.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is counted in these units (a semaphore's permits are `u32`s).
const UNIT_BYTES: usize = 1024;

/// The pieces an answer is handed to hyper in.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// How many bytes of values a worker's requests may hold at once; a clone is the same budget.
#[derive(Clone, Debug)]
pub struct InFlight {
    units: Arc<Semaphore>,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    _units: OwnedSemaphorePermit,
}

impl InFlight {
    /// A budget of `bytes`, and at least `at_least_one` (the largest value allowed can always
    /// travel when nothing else does).
    pub fn new(bytes: u64, at_least_one: usize) -> InFlight {
        let units = units_of(usize::try_from(bytes).unwrap_or(usize::MAX).max(at_least_one));
        InFlight { units: Arc::new(Semaphore::new(units as usize)) }
    }

    /// A share of `bytes`, or `None` when the budget has not that much left now.
    pub fn try_take(&self, bytes: usize) -> Option<Share> {
        self.units.clone().try_acquire_many_owned(units_of(bytes)).ok().map(|units| Share { _units: units })
    }
}

/// Whole units for `bytes`, at least one (an empty value still costs its request something).
fn units_of(bytes: usize) -> u32 {
    let units = bytes.div_ceil(UNIT_BYTES).clamp(1, Semaphore::MAX_PERMITS);
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// A response body that holds its [`Share`] until hyper has taken its last piece.
pub struct BudgetedBody {
    rest: Bytes,
    share: Option<Share>,
}

impl BudgetedBody {
    pub fn new(value: Bytes, share: Share) -> BudgetedBody {
        BudgetedBody { rest: value, share: Some(share) }
    }
}

impl Body for BudgetedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            self.share = None;
            return Poll::Ready(None);
        }
        let take = self.rest.len().min(CHUNK_BYTES);
        let piece = self.rest.split_to(take);
        if self.rest.is_empty() {
            self.share = None;
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn shares_come_out_of_one_budget_and_go_back_when_dropped() {
        let budget = InFlight::new(4 * 1024 * 1024, 1024 * 1024);
        let shares: Vec<Share> = (0..4).map(|_| budget.try_take(1_000_000).expect("within the budget")).collect();
        assert!(budget.try_take(1_000_000).is_none(), "the fifth megabyte is over");
        assert!(budget.clone().try_take(100_000).is_some(), "a clone is the same budget, with room for a small one");
        drop(shares);
        assert!(budget.try_take(4 * 1024 * 1024).is_some(), "all of it back");
        // The largest value always fits an idle budget, however small it was set.
        assert!(InFlight::new(0, 1_000_000).try_take(1_000_000).is_some());
    }

    #[tokio::test]
    async fn an_answer_keeps_its_share_until_its_last_piece_is_taken() {
        let budget = InFlight::new(1024 * 1024, 1);
        let value = Bytes::from(vec![7u8; 150 * 1024]);
        let mut body = BudgetedBody::new(value.clone(), budget.try_take(value.len()).expect("share"));
        assert_eq!(body.size_hint().exact(), Some(150 * 1024));
        let mut sent = Vec::new();
        for _ in 0..2 {
            let frame = body.frame().await.expect("a piece").expect("infallible");
            assert_eq!(frame.data_ref().map(Bytes::len), Some(CHUNK_BYTES));
            sent.extend_from_slice(frame.data_ref().expect("data"));
            assert!(budget.try_take(1024 * 1024).is_none(), "still held while pieces remain");
        }
        let last = body.frame().await.expect("the last piece").expect("infallible");
        sent.extend_from_slice(last.data_ref().expect("data"));
        assert_eq!(sent, value);
        assert!(body.is_end_stream());
        assert!(budget.try_take(1024 * 1024).is_some(), "given back with the last piece");
    }
}
