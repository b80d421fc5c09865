//! [`InFlight`]: a worker-wide budget of cache values held for clients at once, uploads being
//! read and answers being sent, and each user's bounded share of it.
//!
//! The cache bounds what it *stores* (`HERDSMAN_CACHE_MAX_BYTES`), but a value also lives in the
//! worker while it travels: a `PUT`'s body until it is stored, a `GET`'s answer until the client
//! has read it. A client that does not read, over many HTTP/2 streams, kept one copy of a 1 MB
//! value alive per request for as long as it liked: 64 streams of one connection, a few
//! kilobytes of requests, held 62 MB of the worker (measured, tests/memory_flood.rs). Each such
//! request now takes its value's size from this budget first; when the budget is spent it is
//! answered `503` with `Retry-After`, and the worker's memory stays put.
//!
//! # Each user's share
//! A budget for the whole worker alone lets one user's unread streams take all of it, and every
//! other user's request is then 503. So each user may hold at most a quarter of the budget at
//! once (and never less than one value of the largest size allowed, so that any user can always
//! move any value they may store): at least four users get their whole share however the others
//! behave, and a user past their share is `503` with `Retry-After` like a request past the
//! budget. Holdings are counted by username; a user's entry goes when their last share does,
//! so the ledger never has more entries than values in transit.
//!
//! An answer keeps its share until hyper has taken its last piece: [`BudgetedBody`] hands the
//! value over in [`CHUNK_BYTES`] pieces, and hyper asks for the next only once it can send it,
//! so the share is held for as long as the value is.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The budget is counted in these units, so that an empty value still costs its request one.
const UNIT_BYTES: u64 = 1024;

/// The pieces an answer is handed to hyper in.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The part of the budget one user may hold: one in this many.
pub const USER_SHARE_DIVISOR: u64 = 4;

/// How many bytes of values a worker's requests may hold at once, and each user's part of it;
/// a clone is the same budget.
#[derive(Clone, Debug)]
pub struct InFlight {
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    /// Units the whole worker may hold.
    total: u64,
    /// Units one user may hold.
    per_user: u64,
    ledger: Mutex<Ledger>,
}

/// Units held now, in all and by user (only users holding some).
#[derive(Debug, Default)]
struct Ledger {
    held: u64,
    by_user: HashMap<Arc<str>, u64>,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<Budget>,
    user: Arc<str>,
    units: u64,
}

impl InFlight {
    /// A budget of `bytes`, and at least `at_least_one` (the largest value allowed can always
    /// travel when nothing else does); each user may hold a [`USER_SHARE_DIVISOR`]th of it, and
    /// at least `at_least_one` too.
    pub fn new(bytes: u64, at_least_one: usize) -> InFlight {
        let one = units_of(at_least_one);
        let total = bytes.div_ceil(UNIT_BYTES).max(one);
        let per_user = (total / USER_SHARE_DIVISOR).max(one).min(total);
        InFlight { budget: Arc::new(Budget { total, per_user, ledger: Mutex::default() }) }
    }

    /// A share of `bytes` for `user`, or `None` when the budget, or this user's part of it,
    /// has not that much left now.
    pub fn try_take(&self, user: &Arc<str>, bytes: usize) -> Option<Share> {
        let units = units_of(bytes);
        let budget = &self.budget;
        let mut ledger = budget.lock();
        let mine = ledger.by_user.get(user).copied().unwrap_or(0);
        if ledger.held + units > budget.total || mine + units > budget.per_user {
            return None;
        }
        ledger.held += units;
        *ledger.by_user.entry(user.clone()).or_insert(0) += units;
        Some(Share { budget: budget.clone(), user: user.clone(), units })
    }
}

impl Budget {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Every update under this lock is a few additions that cannot panic halfway.
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut ledger = self.budget.lock();
        ledger.held = ledger.held.saturating_sub(self.units);
        if let Some(mine) = ledger.by_user.get_mut(&self.user) {
            *mine = mine.saturating_sub(self.units);
            if *mine == 0 {
                ledger.by_user.remove(&self.user);
            }
        }
    }
}

/// Whole units for `bytes`, at least one (an empty value still costs its request something).
fn units_of(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX).div_ceil(UNIT_BYTES).max(1)
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

    fn user(name: &str) -> Arc<str> {
        name.into()
    }

    #[test]
    fn shares_come_out_of_one_budget_and_go_back_when_dropped() {
        let budget = InFlight::new(4 * 1024 * 1024, 1024 * 1024);
        let shares: Vec<Share> =
            ["a", "b", "c", "d"].map(|name| budget.try_take(&user(name), 1_000_000).expect("within the budget")).into();
        assert!(budget.try_take(&user("e"), 1_000_000).is_none(), "the fifth megabyte is over");
        let small = budget.clone().try_take(&user("e"), 100_000);
        assert!(small.is_some(), "a clone is the same budget, with room for a small one");
        drop((shares, small));
        assert!(budget.budget.lock().by_user.is_empty(), "no holdings, no entries");
        assert!(budget.try_take(&user("a"), 1024 * 1024).is_some(), "all of it back");
        // The largest value always fits an idle budget, however small it was set.
        assert!(InFlight::new(0, 1_000_000).try_take(&user("a"), 1_000_000).is_some());
    }

    #[test]
    fn one_user_holds_at_most_a_quarter_and_never_less_than_the_largest_value() {
        let budget = InFlight::new(16 * 1024 * 1024, 1024 * 1024);
        let (alice, bob) = (user("alice"), user("bob"));
        let held: Vec<Share> = (0..4).map(|_| budget.try_take(&alice, 1024 * 1024).expect("her share")).collect();
        assert!(budget.try_take(&alice, 1).is_none(), "past her quarter");
        assert!(budget.try_take(&bob, 1024 * 1024).is_some(), "bob's share is his own");
        drop(held);
        assert!(budget.try_take(&alice, 4 * 1024 * 1024).is_some(), "hers again once given back");
        // A budget of two values: a quarter would be less than one, so one value each.
        let small = InFlight::new(2 * 1024 * 1024, 1024 * 1024);
        let _one = small.try_take(&alice, 1024 * 1024).expect("one value");
        assert!(small.try_take(&alice, 1024 * 1024).is_none());
        assert!(small.try_take(&bob, 1024 * 1024).is_some());
    }

    #[tokio::test]
    async fn an_answer_keeps_its_share_until_its_last_piece_is_taken() {
        let budget = InFlight::new(1024 * 1024, 1024 * 1024);
        let value = Bytes::from(vec![7u8; 150 * 1024]);
        let mut body = BudgetedBody::new(value.clone(), budget.try_take(&"a".into(), value.len()).expect("share"));
        assert_eq!(body.size_hint().exact(), Some(150 * 1024));
        let mut sent = Vec::new();
        for _ in 0..2 {
            let frame = body.frame().await.expect("a piece").expect("infallible");
            assert_eq!(frame.data_ref().map(Bytes::len), Some(CHUNK_BYTES));
            sent.extend_from_slice(frame.data_ref().expect("data"));
            assert!(budget.try_take(&"b".into(), 1024 * 1024).is_none(), "still held while pieces remain");
        }
        let last = body.frame().await.expect("the last piece").expect("infallible");
        sent.extend_from_slice(last.data_ref().expect("data"));
        assert_eq!(sent, value);
        assert!(body.is_end_stream());
        assert!(budget.try_take(&"b".into(), 1024 * 1024).is_some(), "given back with the last piece");
    }
}
