//! Login sessions: the credential of every `/cache` request and of `/auth/me` and
//! `/auth/logout`.
//!
//! # Tokens
//! A token is 32 bytes (256 bits) from `rand`'s thread-local CSPRNG (ChaCha12, seeded from the
//! operating system), sent as 64 hex digits in
//! `Authorization: Bearer`. Redis never sees it: the session lives at
//! `herdsman:session:{sha256(token)}` (value: the username) with `HERDSMAN_SESSION_TTL` as its
//! expiry, so a dump of Redis holds nothing a client could present. A lookup is by that digest,
//! never by comparing a secret byte by byte, so its timing can reveal at most something about a
//! digest, which does not help to find a token. Tokens never appear in a log line; [`Token`]'s
//! `Debug` hides them.
//!
//! # What a worker remembers of the sessions it verified
//! Each worker keeps one bounded memory of the sessions Redis vouched for lately (at most
//! [`VERIFIED_CAPACITY`] digests, a few hundred kilobytes), and of the tokens logged out through
//! it. It serves three purposes:
//!
//! - **Short local trust** (`HERDSMAN_SESSION_RECHECK`, default 1 s): a session this worker
//!   verified in Redis less than that long ago is accepted without asking Redis again, so a
//!   `/cache` request costs no session round trip, and a Redis that is slow but up does not slow
//!   every request by its latency. A session in use is re-checked in the background once half
//!   of that has passed (one re-check at a time per session), so its requests do not wait for
//!   Redis either; one used after the whole interval is checked before it is answered.
//!   **The price**: a session revoked through *another* worker (its logout, or its expiry being
//!   cut short) keeps working in this one for up to `HERDSMAN_SESSION_RECHECK` after this worker
//!   last verified it. A logout through *this* worker takes effect here at once: the token is
//!   remembered as revoked and refused without asking Redis. `HERDSMAN_SESSION_RECHECK=0` asks
//!   Redis on every request (every logout then reaches every worker at once, at the cost of a
//!   round trip per request).
//! - **A Redis that does not answer in time**: a session check is one round trip bounded by the
//!   cache's fitted deadline ([`crate::cache`]); when it runs out (or Redis is away) the outage
//!   policy below answers, so no request waits longer than that deadline for its session.
//! - **During a Redis outage**: the cache promises that an outage never makes a request wait or
//!   fail needlessly. While Redis cannot be asked, a remembered session keeps working until its
//!   own expiry or until [`OUTAGE_GRACE`] after this worker last verified it in Redis (give or
//!   take [`REFRESH_EVERY`] with `HERDSMAN_SESSION_RECHECK=0`), whichever is first; an unknown
//!   token is `503` with `Retry-After` (it may be valid, nobody can tell). The price: a session
//!   revoked elsewhere just before or during an outage keeps working in this worker for up to
//!   [`OUTAGE_GRACE`].
//!
//! Without `REDIS_URL` there are no sessions at all: every check is refused with a message that
//! says so.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use quick_cache::sync::{Cache as MemoryCache, EntryAction, EntryResult};
use sha2::{Digest, Sha256};

use crate::cache::{CacheError, DurableStore};

/// Redis key prefix of sessions; the rest of the key is the token's SHA-256, in hex.
pub const SESSION_PREFIX: &str = "herdsman:session:";

/// How long after its last check in Redis a worker still trusts a session while Redis is away:
/// long enough to ride out a failover or a restart (seconds to a couple of minutes on the
/// platforms' Redis offers), short enough that a revocation is not outlived by much. Also how
/// long a token logged out through this worker is remembered as revoked.
/// `HERDSMAN_SESSION_RECHECK` is at most this, since nothing is remembered longer.
pub const OUTAGE_GRACE: Duration = crate::config::MAX_SESSION_RECHECK;

/// Sessions (and revoked tokens) a worker remembers (about 100 bytes each).
pub const VERIFIED_CAPACITY: usize = 10_000;

/// With `HERDSMAN_SESSION_RECHECK=0` every request asks Redis, and the remembered session is
/// refreshed at most this often: an insert costs more than a read, and a busy session is
/// verified many times a second. So [`OUTAGE_GRACE`] counts from a moment at most this long
/// before the last verification. With a recheck interval every check refreshes it (there is at
/// most one a half-interval per session).
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// A session token as the client holds it. Its `Debug` never shows it.
pub struct Token(String);

impl Token {
    /// The value to hand to the client, once.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Whose a verified token is, and for how much longer.
#[derive(Debug, Clone)]
pub struct Session {
    pub username: Arc<str>,
    pub expires_in: Duration,
}

/// Why a request carries no usable session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("this route needs Authorization: Bearer <token> (POST /auth/login gives one)")]
    Missing,
    #[error("the Authorization header is not a Bearer token from /auth/login")]
    Malformed,
    #[error("unknown, expired or revoked token")]
    Invalid,
    /// No `REDIS_URL`: sessions cannot exist.
    #[error("sessions need Redis, and this server has no REDIS_URL")]
    NoRedis,
    /// Redis is away and this worker has not verified the token recently.
    #[error("session store unavailable, retry later")]
    Unavailable,
}

/// What a worker remembers of a token's digest.
#[derive(Clone)]
enum Known {
    /// Redis vouched for it.
    Verified(Verified),
    /// Logged out through this worker: refused here without asking Redis, and never trusted
    /// again by a check that was in flight during the logout.
    Revoked,
}

/// What a worker remembers of a digest, and since when: forgotten [`OUTAGE_GRACE`] after.
#[derive(Clone)]
struct Remembered {
    known: Known,
    since: Instant,
}

#[derive(Clone)]
struct Verified {
    username: Arc<str>,
    expires_at: Instant,
    /// When Redis last vouched for it (give or take [`REFRESH_EVERY`] without local trust).
    checked_at: Instant,
    /// Set while a background re-check of this session runs: one at a time.
    rechecking: Arc<AtomicBool>,
}

impl Verified {
    fn session(&self, now: Instant) -> Session {
        Session { username: self.username.clone(), expires_in: self.expires_at.saturating_duration_since(now) }
    }
}

fn is_recent(remembered: &Remembered, now: Instant) -> bool {
    now.saturating_duration_since(remembered.since) < OUTAGE_GRACE
}

/// The session store of one worker. Cheap to clone: every clone shares the same state.
#[derive(Clone)]
pub struct Sessions {
    store: Option<DurableStore>,
    ttl: Duration,
    /// How long a session verified in Redis is trusted without asking again.
    recheck: Duration,
    /// Digests verified in Redis lately, or logged out here (see the module doc).
    known: Arc<MemoryCache<[u8; 32], Remembered>>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions").field("ttl", &self.ttl).field("recheck", &self.recheck).finish_non_exhaustive()
    }
}

impl Sessions {
    /// `store` is `None` without `REDIS_URL`; `ttl` is `HERDSMAN_SESSION_TTL`. The local trust
    /// is `HERDSMAN_SESSION_RECHECK`'s default until [`with_recheck`](Self::with_recheck).
    pub fn new(store: Option<DurableStore>, ttl: Duration) -> Sessions {
        let known = Arc::new(MemoryCache::new(VERIFIED_CAPACITY));
        Sessions { store, ttl, recheck: crate::config::Config::default().session_recheck, known }
    }

    /// Trusts a session verified in Redis for `recheck` without asking again (zero: ask on
    /// every request). See the module doc for what this trades.
    pub fn with_recheck(mut self, recheck: Duration) -> Sessions {
        self.recheck = recheck;
        self
    }

    /// How long a new session lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn store(&self) -> Result<&DurableStore, SessionError> {
        self.store.as_ref().ok_or(SessionError::NoRedis)
    }

    /// Opens a session for `username` and returns its token. Fails when Redis cannot store it.
    pub async fn create(&self, username: &str) -> Result<Token, CacheError> {
        let Some(store) = &self.store else {
            return Err(CacheError::Unavailable("no REDIS_URL".to_string()));
        };
        let token = new_token();
        let digest = digest(&token.0);
        store.set_ex(&session_key(&digest), username.as_bytes(), self.ttl).await?;
        self.remember(digest, username.into(), self.ttl);
        Ok(token)
    }

    /// The session of the request's `Authorization: Bearer` token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Session, SessionError> {
        // Without Redis no token can ever be right: say so rather than ask for one.
        self.store()?;
        let token = bearer_token(headers)?;
        self.verify(token).await
    }

    /// Whose `token` is: from this worker's memory while it is trusted, else asked of Redis,
    /// else (Redis away or late) from this worker's memory of it.
    pub async fn verify(&self, token: &str) -> Result<Session, SessionError> {
        let store = self.store()?;
        let digest = digest(token);
        let now = Instant::now();
        let known = self.recall(&digest, now);
        match &known {
            Some(Known::Revoked) => return Err(SessionError::Invalid),
            Some(Known::Verified(verified)) if verified.expires_at > now => {
                let age = now.saturating_duration_since(verified.checked_at);
                if age < self.recheck {
                    if age >= self.recheck / 2 {
                        self.recheck_in_background(digest, verified);
                    }
                    return Ok(verified.session(now));
                }
            }
            _ => {}
        }
        if store.is_available() {
            match self.ask_redis(store, digest, known.as_ref()).await {
                Ok(found) => return found,
                // The breaker has logged the outage; memory answers below.
                Err(err) => tracing::debug!(error = %err, "session check fell back to memory"),
            }
        }
        match known {
            Some(Known::Verified(verified)) if verified.expires_at > now => Ok(verified.session(now)),
            Some(_) => Err(SessionError::Invalid),
            None => Err(SessionError::Unavailable),
        }
    }

    /// One round trip to Redis, bounded by the cache's fitted deadline; what Redis said is
    /// remembered (`seen`: what this worker knew before asking). `Err` when Redis did not
    /// answer in time or is away.
    async fn ask_redis(
        &self,
        store: &DurableStore,
        digest: [u8; 32],
        seen: Option<&Known>,
    ) -> Result<Result<Session, SessionError>, CacheError> {
        match store.get_with_ttl(&session_key(&digest)).await? {
            Some((username, ttl)) => {
                let username: Arc<str> = String::from_utf8_lossy(&username).into();
                let expires_in = ttl.unwrap_or(self.ttl).min(self.ttl);
                // Without local trust every request lands here: refresh the memory only now
                // and then (an insert costs more than the read that found it fresh).
                let fresh = |known: &Known| match known {
                    Known::Verified(known) => {
                        self.recheck.is_zero()
                            && known.username == username
                            && Instant::now().saturating_duration_since(known.checked_at) < REFRESH_EVERY
                    }
                    Known::Revoked => false,
                };
                if !seen.is_some_and(fresh) {
                    self.remember(digest, username.clone(), expires_in);
                }
                Ok(Ok(Session { username, expires_in }))
            }
            None => {
                self.forget_unless_revoked(digest);
                Ok(Err(SessionError::Invalid))
            }
        }
    }

    /// Starts a re-check of a trusted session in Redis, unless one is running: its requests
    /// keep being answered meanwhile, and a revoked session is forgotten when Redis says so.
    fn recheck_in_background(&self, digest: [u8; 32], verified: &Verified) {
        let Some(store) = self.store.clone() else { return };
        if verified.rechecking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (sessions, flag) = (self.clone(), verified.rechecking.clone());
        tokio::spawn(async move {
            if !store.is_available() {
                flag.store(false, Ordering::Release);
                return;
            }
            if let Err(err) = sessions.ask_redis(&store, digest, None).await {
                // Late or away: the trust runs out, and the next check is the request's own.
                tracing::debug!(error = %err, "background session check failed");
                flag.store(false, Ordering::Release);
            }
        });
    }

    /// What this worker remembers of `digest`, unless it was noted [`OUTAGE_GRACE`] ago or more.
    fn recall(&self, digest: &[u8; 32], now: Instant) -> Option<Known> {
        self.known.get(digest).filter(|remembered| is_recent(remembered, now)).map(|remembered| remembered.known)
    }

    /// Notes a session Redis just vouched for, unless the token was logged out here meanwhile.
    fn remember(&self, digest: [u8; 32], username: Arc<str>, expires_in: Duration) {
        let now = Instant::now();
        let verified = Remembered {
            known: Known::Verified(Verified {
                username,
                expires_at: now + expires_in,
                checked_at: now,
                rechecking: Arc::default(),
            }),
            since: now,
        };
        // Look and write under the one lock: a logout here between the two must win.
        let vacant = self.known.entry(&digest, None, |_, current| {
            if !(matches!(current.known, Known::Revoked) && is_recent(current, now)) {
                *current = verified.clone();
            }
            EntryAction::Retain(())
        });
        if let EntryResult::Vacant(slot) = vacant {
            let _ = slot.insert(verified);
        }
    }

    /// Forgets a session Redis no longer has; a revoked mark stays.
    fn forget_unless_revoked(&self, digest: [u8; 32]) {
        self.known.remove_if(&digest, |remembered| matches!(remembered.known, Known::Verified(_)));
    }

    /// Ends the session of `token`: `Invalid` if there was none. This worker refuses it from
    /// now on, even when Redis cannot be reached (then `Unavailable`: the client must retry for
    /// the other workers' sake).
    pub async fn revoke(&self, token: &str) -> Result<(), SessionError> {
        let store = self.store()?;
        let digest = digest(token);
        self.known.insert(digest, Remembered { known: Known::Revoked, since: Instant::now() });
        match store.delete(&session_key(&digest)).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(SessionError::Invalid),
            Err(_) => Err(SessionError::Unavailable),
        }
    }
}

/// The token of `Authorization: Bearer <token>`; anything else is `Missing` or `Malformed`,
/// never an error of ours.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, SessionError> {
    let value = headers.get(header::AUTHORIZATION).ok_or(SessionError::Missing)?;
    let value = value.to_str().map_err(|_| SessionError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(SessionError::Malformed)?;
    let token = token.trim();
    let well_formed = token.len() == 2 * TOKEN_BYTES && token.bytes().all(|b| b.is_ascii_hexdigit());
    match scheme.eq_ignore_ascii_case("bearer") && well_formed {
        true => Ok(token),
        false => Err(SessionError::Malformed),
    }
}

fn new_token() -> Token {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    Token(hex(&bytes))
}

fn digest(token: &str) -> [u8; 32] {
    // Tokens are issued in lower case; an upper-case copy is the same token.
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(token.to_ascii_lowercase().as_bytes()));
    out
}

fn session_key(digest: &[u8; 32]) -> String {
    format!("{SESSION_PREFIX}{}", hex(digest))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_check_in_flight_does_not_bring_back_a_token_logged_out_here() {
        let sessions = Sessions::new(None, Duration::from_secs(60));
        let digest = digest("token");
        sessions.known.insert(digest, Remembered { known: Known::Revoked, since: Instant::now() });
        // Redis vouched for it just before the logout reached it: the logout wins.
        sessions.remember(digest, "alice".into(), Duration::from_secs(60));
        assert!(matches!(sessions.recall(&digest, Instant::now()), Some(Known::Revoked)));
        sessions.forget_unless_revoked(digest);
        assert!(matches!(sessions.recall(&digest, Instant::now()), Some(Known::Revoked)));

        // A mark older than OUTAGE_GRACE is forgotten, and what Redis says next is kept.
        let Some(long_ago) = Instant::now().checked_sub(OUTAGE_GRACE) else { return };
        sessions.known.insert(digest, Remembered { known: Known::Revoked, since: long_ago });
        assert!(sessions.recall(&digest, Instant::now()).is_none());
        sessions.remember(digest, "alice".into(), Duration::from_secs(60));
        assert!(matches!(sessions.recall(&digest, Instant::now()), Some(Known::Verified(_))));
        sessions.forget_unless_revoked(digest);
        assert!(sessions.recall(&digest, Instant::now()).is_none());
    }

    fn with_authorization(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_bytes(value).expect("header"));
        headers
    }

    #[test]
    fn only_a_well_formed_bearer_token_is_read() {
        let token = "ab".repeat(32);
        assert_eq!(bearer_token(&with_authorization(format!("Bearer {token}").as_bytes())).ok(), Some(token.as_str()));
        assert_eq!(
            bearer_token(&with_authorization(format!("bearer  {token} ").as_bytes())).ok(),
            Some(token.as_str())
        );
        assert!(matches!(bearer_token(&HeaderMap::new()), Err(SessionError::Missing)));
        for bad in [
            format!("Basic {token}"),
            format!("Bearer {}", &token[1..]),
            format!("Bearer {token}00"),
            format!("Bearer {}", "zz".repeat(32)),
            "Bearer".to_string(),
            String::new(),
        ] {
            assert!(matches!(bearer_token(&with_authorization(bad.as_bytes())), Err(SessionError::Malformed)), "{bad}");
        }
        assert!(matches!(bearer_token(&with_authorization(b"Bearer \xff\xfe")), Err(SessionError::Malformed)));
    }

    #[test]
    fn tokens_are_64_hex_digits_read_back_as_bearer_and_differ() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a.reveal(), b.reveal());
        let header = with_authorization(format!("Bearer {}", a.reveal()).as_bytes());
        assert_eq!(bearer_token(&header).ok(), Some(a.reveal()));
    }

    #[test]
    fn a_token_is_stored_under_its_digest_only() {
        let token = "0f".repeat(32);
        let key = session_key(&digest(&token));
        assert!(key.starts_with(SESSION_PREFIX));
        assert!(!key.contains(&token));
        assert_eq!(key.len(), SESSION_PREFIX.len() + 64);
        assert_eq!(digest(&token), digest(&token.to_ascii_uppercase()));
    }

    #[tokio::test]
    async fn without_redis_there_are_no_sessions() {
        let sessions = Sessions::new(None, Duration::from_secs(60));
        assert!(matches!(sessions.verify(&"ab".repeat(32)).await, Err(SessionError::NoRedis)));
        assert!(sessions.create("alice").await.is_err());
        assert!(format!("{:?}", Token("secret".into())).find("secret").is_none());
    }
}
