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
//! # During a Redis outage
//! The cache promises that an outage never makes a request wait or fail needlessly, so each
//! worker remembers the sessions it verified in Redis (at most [`VERIFIED_CAPACITY`] digests, a
//! few hundred kilobytes). While Redis cannot be asked, a remembered session keeps working until
//! its own expiry or until [`OUTAGE_GRACE`] after this worker last verified it in Redis (give or
//! take [`REFRESH_EVERY`]), whichever is first; an unknown token is `503` with `Retry-After` (it
//! may be valid, nobody can tell). The price: a session revoked elsewhere (another worker's
//! logout) just before or during an outage keeps working in this worker for up to
//! [`OUTAGE_GRACE`]. While Redis answers, every request is checked there, and a logout takes
//! effect at once everywhere.
//!
//! Without `REDIS_URL` there are no sessions at all: every check is refused with a message that
//! says so.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use moka::future::Cache as MemoryCache;
use sha2::{Digest, Sha256};

use crate::cache::{CacheError, DurableStore};

/// Redis key prefix of sessions; the rest of the key is the token's SHA-256, in hex.
pub const SESSION_PREFIX: &str = "herdsman:session:";

/// How long after its last check in Redis a worker still trusts a session while Redis is away:
/// long enough to ride out a failover or a restart (seconds to a couple of minutes on the
/// platforms' Redis offers), short enough that a revocation is not outlived by much.
pub const OUTAGE_GRACE: Duration = Duration::from_secs(300);

/// Verified sessions a worker remembers for outages (about 100 bytes each).
pub const VERIFIED_CAPACITY: u64 = 10_000;

/// A remembered session is refreshed at most this often: an insert costs more than a read, and
/// a busy session is verified many times a second. So [`OUTAGE_GRACE`] counts from a moment at
/// most this long before the last verification.
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

#[derive(Clone)]
struct Verified {
    username: Arc<str>,
    expires_at: Instant,
    /// When it was last written to the memory of verified sessions.
    refreshed_at: Instant,
}

/// The session store of one worker. Cheap to clone: every clone shares the same state.
#[derive(Clone)]
pub struct Sessions {
    store: Option<DurableStore>,
    ttl: Duration,
    /// Digests verified in Redis lately, for outages only (see the module doc).
    verified: MemoryCache<[u8; 32], Verified>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl Sessions {
    /// `store` is `None` without `REDIS_URL`; `ttl` is `HERDSMAN_SESSION_TTL`.
    pub fn new(store: Option<DurableStore>, ttl: Duration) -> Sessions {
        let verified = MemoryCache::builder().max_capacity(VERIFIED_CAPACITY).time_to_live(OUTAGE_GRACE).build();
        Sessions { store, ttl, verified }
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
        let now = Instant::now();
        let verified = Verified { username: username.into(), expires_at: now + self.ttl, refreshed_at: now };
        self.verified.insert(digest, verified).await;
        Ok(token)
    }

    /// The session of the request's `Authorization: Bearer` token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Session, SessionError> {
        // Without Redis no token can ever be right: say so rather than ask for one.
        self.store()?;
        let token = bearer_token(headers)?;
        self.verify(token).await
    }

    /// Whose `token` is: asked of Redis, or during an outage of this worker's memory of it.
    pub async fn verify(&self, token: &str) -> Result<Session, SessionError> {
        let store = self.store()?;
        let digest = digest(token);
        if store.is_available() {
            match store.get_with_ttl(&session_key(&digest)).await {
                Ok(Some((username, ttl))) => {
                    let username: Arc<str> = String::from_utf8_lossy(&username).into();
                    let expires_in = ttl.unwrap_or(self.ttl).min(self.ttl);
                    self.remember(digest, &username, expires_in).await;
                    return Ok(Session { username, expires_in });
                }
                Ok(None) => {
                    self.verified.invalidate(&digest).await;
                    return Err(SessionError::Invalid);
                }
                // The breaker has logged the outage; memory answers below.
                Err(err) => tracing::debug!(error = %err, "session check fell back to memory"),
            }
        }
        let now = Instant::now();
        match self.verified.get(&digest).await {
            Some(known) if known.expires_at > now => {
                Ok(Session { username: known.username, expires_in: known.expires_at - now })
            }
            Some(_) => Err(SessionError::Invalid),
            None => Err(SessionError::Unavailable),
        }
    }

    /// Notes a session Redis just vouched for, unless it was noted lately for the same user.
    async fn remember(&self, digest: [u8; 32], username: &Arc<str>, expires_in: Duration) {
        let now = Instant::now();
        let fresh = self.verified.get(&digest).await.is_some_and(|known| {
            known.username == *username && now.saturating_duration_since(known.refreshed_at) < REFRESH_EVERY
        });
        if !fresh {
            let verified = Verified { username: username.clone(), expires_at: now + expires_in, refreshed_at: now };
            self.verified.insert(digest, verified).await;
        }
    }

    /// Ends the session of `token`: `Invalid` if there was none. This worker forgets it at
    /// once, even when Redis cannot be reached (then `Unavailable`: the client must retry for
    /// the other workers' sake).
    pub async fn revoke(&self, token: &str) -> Result<(), SessionError> {
        let store = self.store()?;
        let digest = digest(token);
        self.verified.invalidate(&digest).await;
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
