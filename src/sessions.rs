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
//! [`VERIFIED_CAPACITY`] digests, a few hundred kilobytes), and of the tokens revoked lately.
//!
//! - **Revocations reach every worker at once** ([`crate::revocations`]): a logout deletes the
//!   session and publishes its digest in one Lua script; every worker of every instance is
//!   subscribed and refuses the token as soon as the message arrives (one round trip after the
//!   logout, with Redis up). A logout through this worker is refused here even before.
//! - **Local trust, only while revocations can be heard** (`HERDSMAN_SESSION_RECHECK`, default
//!   10 s): a session this worker verified in Redis less than that long ago is accepted without
//!   asking Redis again, so a `/cache` request costs no session round trip — but only while the
//!   worker's subscription is live and was live since that verification (its epoch). While it is
//!   down, connecting or reconnecting, every request asks Redis, as with 0, so no revocation is
//!   missed in the gap. A session in use is re-checked in the background once half the interval
//!   has passed, so its requests do not wait for Redis either. The interval is only the backstop
//!   for what does not go through the channel (a session key deleted in Redis by hand, a message
//!   lost), which is why it can be longer than the 1 s it was when it was the only way a logout
//!   reached the other workers. `0` asks Redis on every request.
//! - **A Redis that does not answer in time**: a session check is one round trip bounded by the
//!   cache's fitted deadline ([`crate::cache`]); when it runs out (or Redis is away) the outage
//!   policy below answers, so no request waits longer than that deadline for its session.
//! - **During a Redis outage** (`HERDSMAN_SESSION_OUTAGE_TRUST`, default 30 s): while Redis cannot
//!   be asked, a remembered session keeps working until its own expiry or until the outage trust
//!   after this worker last verified it in Redis, whichever is first; past it, and for an unknown
//!   token, the answer is `503` with `Retry-After` (it may be valid, nobody can tell). 30 s rides
//!   out a failover or a restart (typically seconds) without logging users out, and bounds how
//!   long a token revoked meanwhile keeps working in a worker cut off from Redis (and from the
//!   channel). `0` trusts nothing in an outage.
//!
//! Without `REDIS_URL` there are no sessions at all: every check is refused with a message that
//! says so.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use quick_cache::sync::{Cache as MemoryCache, EntryAction, EntryResult};
use sha2::{Digest, Sha256};

use crate::cache::{CacheError, DurableStore, Script};
use crate::revocations::{stamp, Revocations};

/// Redis key prefix of sessions; the rest of the key is the token's SHA-256, in hex.
pub const SESSION_PREFIX: &str = "herdsman:session:";

/// How long a worker remembers a digest at all: a verified session after its last check, a
/// revoked token after its revocation. `HERDSMAN_SESSION_RECHECK` and
/// `HERDSMAN_SESSION_OUTAGE_TRUST` are at most this, since nothing is trusted longer than it is
/// remembered.
pub const REMEMBERED_FOR: Duration = crate::config::MAX_SESSION_RECHECK;

/// Sessions (and revoked tokens) a worker remembers (about 100 bytes each).
pub const VERIFIED_CAPACITY: usize = 10_000;

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// Ends a session and tells every worker, in one step: `KEYS[1]` is the session's key,
/// `ARGV[1]` the length of its prefix. 1 if there was a session, else 0 (nothing to tell).
const REVOKE_SCRIPT: &str = r"
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('PUBLISH', 'herdsman:revoked', string.sub(KEYS[1], tonumber(ARGV[1]) + 1))
return 1
";

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
    /// Redis is away and this worker has not verified the token recently enough to trust it.
    #[error("session store unavailable, retry later")]
    Unavailable,
}

/// What a worker remembers of a token's digest.
#[derive(Clone)]
enum Known {
    /// Redis vouched for it.
    Verified(Arc<Verified>),
    /// Revoked (here, or heard on the revocation channel) at `since`: refused without asking
    /// Redis, and never trusted again by a check that was in flight during the revocation.
    Revoked { since: Instant },
}

/// A session Redis vouched for. A new check of the same session updates it in place, so that
/// a busy session costs no insert per request.
struct Verified {
    username: Arc<str>,
    /// When Redis last vouched for it, as a [`stamp`].
    checked: AtomicU64,
    /// When it expires, as a [`stamp`].
    expires: AtomicU64,
    /// The revocation subscription's epoch before that check was sent; 0 when none was live.
    epoch: AtomicU64,
    /// Set while a background re-check of this session runs: one at a time.
    rechecking: AtomicBool,
}

impl Verified {
    fn new(username: Arc<str>, now: Instant, expires_in: Duration, epoch: Option<u64>) -> Verified {
        let verified = Verified {
            username,
            checked: AtomicU64::new(0),
            expires: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            rechecking: AtomicBool::new(false),
        };
        verified.checked_again(now, expires_in, epoch);
        verified
    }

    fn checked_again(&self, now: Instant, expires_in: Duration, epoch: Option<u64>) {
        self.expires.store(stamp(now + expires_in), Ordering::Release);
        self.epoch.store(epoch.unwrap_or(0), Ordering::Release);
        self.checked.store(stamp(now), Ordering::Release);
    }

    /// How long ago Redis last vouched for it.
    fn age(&self, now: Instant) -> Duration {
        Duration::from_nanos(stamp(now).saturating_sub(self.checked.load(Ordering::Acquire)))
    }

    fn expires_in(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.expires.load(Ordering::Acquire).saturating_sub(stamp(now)))
    }

    fn session(&self, now: Instant) -> Session {
        Session { username: self.username.clone(), expires_in: self.expires_in(now) }
    }
}

impl Known {
    /// Whether it was noted less than [`REMEMBERED_FOR`] ago.
    fn is_recent(&self, now: Instant) -> bool {
        match self {
            Known::Verified(verified) => verified.age(now) < REMEMBERED_FOR,
            Known::Revoked { since } => now.saturating_duration_since(*since) < REMEMBERED_FOR,
        }
    }
}

/// The session store of one worker. Cheap to clone: every clone shares the same state.
#[derive(Clone)]
pub struct Sessions {
    store: Option<DurableStore>,
    ttl: Duration,
    /// How long a session verified in Redis is trusted without asking again (revocations live).
    recheck: Duration,
    /// How long after its last check a session is still accepted while Redis cannot be asked.
    outage_trust: Duration,
    /// Digests verified in Redis lately, or revoked (see the module doc).
    known: Arc<MemoryCache<[u8; 32], Known>>,
    revocations: Revocations,
    revoke_script: Arc<Script>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl", &self.ttl)
            .field("recheck", &self.recheck)
            .field("outage_trust", &self.outage_trust)
            .field("revocations", &self.revocations)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// `store` is `None` without `REDIS_URL`; `ttl` is `HERDSMAN_SESSION_TTL`. The local trust
    /// and the outage trust are their settings' defaults until [`with_recheck`](Self::with_recheck)
    /// and [`with_outage_trust`](Self::with_outage_trust); no revocation is heard until
    /// [`with_revocations`](Self::with_revocations), so nothing is trusted locally.
    pub fn new(store: Option<DurableStore>, ttl: Duration) -> Sessions {
        let defaults = crate::config::Config::default();
        Sessions {
            store,
            ttl,
            recheck: defaults.session_recheck,
            outage_trust: defaults.session_outage_trust,
            known: Arc::new(MemoryCache::new(VERIFIED_CAPACITY)),
            revocations: Revocations::new(None),
            revoke_script: Arc::new(Script::new(REVOKE_SCRIPT)),
        }
    }

    /// Trusts a session verified in Redis for `recheck` without asking again, while revocations
    /// are heard (zero: ask on every request). See the module doc for what this trades.
    pub fn with_recheck(mut self, recheck: Duration) -> Sessions {
        self.recheck = recheck;
        self
    }

    /// Accepts a session for `trust` after its last check in Redis while Redis cannot be asked
    /// (zero: 503 in every outage).
    pub fn with_outage_trust(mut self, trust: Duration) -> Sessions {
        self.outage_trust = trust;
        self
    }

    /// Hears revocations through `revocations` (started by [`listen`](Self::listen) or the
    /// first session check).
    pub fn with_revocations(mut self, revocations: Revocations) -> Sessions {
        self.revocations = revocations;
        self
    }

    /// Starts hearing revocations, once; inside the runtime.
    pub fn listen(&self) {
        self.revocations.start(|| {
            let known = self.known.clone();
            Arc::new(move |digest| {
                known.insert(digest, Known::Revoked { since: Instant::now() });
            })
        });
    }

    /// Whether this worker hears revocations now: only then does it trust a session without
    /// asking Redis.
    pub fn hears_revocations(&self) -> bool {
        self.revocations.live_epoch().is_some()
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
        self.listen();
        let token = new_token();
        let digest = digest(&token.0);
        let epoch = self.revocations.live_epoch();
        store.set_ex(&session_key(&digest), username.as_bytes(), self.ttl).await?;
        self.remember(digest, username.into(), self.ttl, epoch);
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
    /// else (Redis away or late) from this worker's memory of it within the outage trust.
    pub async fn verify(&self, token: &str) -> Result<Session, SessionError> {
        let store = self.store()?;
        self.listen();
        let digest = digest(token);
        let now = Instant::now();
        let known = self.recall(&digest, now);
        match &known {
            Some(Known::Revoked { .. }) => return Err(SessionError::Invalid),
            Some(Known::Verified(verified)) if self.trusted_locally(store, verified, now) => {
                if verified.age(now) >= self.recheck / 2 {
                    self.recheck_in_background(digest, verified);
                }
                return Ok(verified.session(now));
            }
            _ => {}
        }
        if store.is_available() {
            match self.ask_redis(store, digest).await {
                Ok(found) => return found,
                // The breaker has logged the outage; memory answers below.
                Err(err) => tracing::debug!(error = %err, "session check fell back to memory"),
            }
        }
        match known {
            Some(Known::Verified(verified)) if verified.expires_in(now).is_zero() => Err(SessionError::Invalid),
            Some(Known::Verified(verified)) if verified.age(now) < self.outage_trust => Ok(verified.session(now)),
            Some(Known::Revoked { .. }) => Err(SessionError::Invalid),
            _ => Err(SessionError::Unavailable),
        }
    }

    /// Whether `verified` may be accepted without asking Redis: unexpired, checked less than
    /// the recheck interval ago, with Redis up and revocations heard since that check.
    fn trusted_locally(&self, store: &DurableStore, verified: &Verified, now: Instant) -> bool {
        !verified.expires_in(now).is_zero()
            && verified.age(now) < self.recheck
            && store.is_available()
            && self.revocations.live_epoch().is_some_and(|epoch| epoch == verified.epoch.load(Ordering::Acquire))
    }

    /// One round trip to Redis, bounded by the cache's fitted deadline; what Redis said is
    /// remembered. `Err` when Redis did not answer in time or is away.
    async fn ask_redis(
        &self,
        store: &DurableStore,
        digest: [u8; 32],
    ) -> Result<Result<Session, SessionError>, CacheError> {
        // The epoch before asking: a revocation published after it is heard, one published
        // before it is in Redis's answer.
        let epoch = self.revocations.live_epoch();
        match store.get_with_ttl(&session_key(&digest)).await? {
            Some((username, ttl)) => {
                let username: Arc<str> = String::from_utf8_lossy(&username).into();
                let expires_in = ttl.unwrap_or(self.ttl).min(self.ttl);
                self.remember(digest, username.clone(), expires_in, epoch);
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
    fn recheck_in_background(&self, digest: [u8; 32], verified: &Arc<Verified>) {
        let Some(store) = self.store.clone() else { return };
        if verified.rechecking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (sessions, verified) = (self.clone(), verified.clone());
        tokio::spawn(async move {
            if store.is_available() {
                if let Err(err) = sessions.ask_redis(&store, digest).await {
                    // Late or away: the trust runs out, and the next check is the request's own.
                    tracing::debug!(error = %err, "background session check failed");
                }
            }
            verified.rechecking.store(false, Ordering::Release);
        });
    }

    /// What this worker remembers of `digest`, unless it was noted [`REMEMBERED_FOR`] ago or more.
    fn recall(&self, digest: &[u8; 32], now: Instant) -> Option<Known> {
        self.known.get(digest).filter(|known| known.is_recent(now))
    }

    /// Notes a session Redis just vouched for (`epoch`: the subscription's before asking),
    /// unless the token was revoked meanwhile.
    fn remember(&self, digest: [u8; 32], username: Arc<str>, expires_in: Duration, epoch: Option<u64>) {
        let now = Instant::now();
        // Look and write under the one lock: a revocation between the two must win.
        let vacant = self.known.entry(&digest, None, |_, current| {
            match current {
                Known::Revoked { .. } if current.is_recent(now) => {}
                Known::Verified(verified) if verified.username == username => {
                    verified.checked_again(now, expires_in, epoch);
                }
                _ => *current = Known::Verified(Arc::new(Verified::new(username.clone(), now, expires_in, epoch))),
            }
            EntryAction::Retain(())
        });
        if let EntryResult::Vacant(slot) = vacant {
            let _ = slot.insert(Known::Verified(Arc::new(Verified::new(username, now, expires_in, epoch))));
        }
    }

    /// Forgets a session Redis no longer has; a revoked mark stays.
    fn forget_unless_revoked(&self, digest: [u8; 32]) {
        self.known.remove_if(&digest, |known| matches!(known, Known::Verified(_)));
    }

    /// Ends the session of `token`: `Invalid` if there was none. Deleting it and telling every
    /// worker ([`crate::revocations`]) are one script. This worker refuses it from now on, even
    /// when Redis cannot be reached (then `Unavailable`: the client must retry for the other
    /// workers' sake).
    pub async fn revoke(&self, token: &str) -> Result<(), SessionError> {
        let store = self.store()?;
        let digest = digest(token);
        self.known.insert(digest, Known::Revoked { since: Instant::now() });
        let prefix = i64::try_from(SESSION_PREFIX.len()).unwrap_or(i64::MAX);
        match store.eval::<i64>(&self.revoke_script, &[session_key(&digest)], &[prefix]).await {
            Ok(1) => Ok(()),
            Ok(_) => Err(SessionError::Invalid),
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
    fn a_check_in_flight_does_not_bring_back_a_revoked_token() {
        let sessions = Sessions::new(None, Duration::from_secs(60));
        let digest = digest("token");
        let minute = Duration::from_secs(60);
        sessions.known.insert(digest, Known::Revoked { since: Instant::now() });
        // Redis vouched for it just before the revocation reached it: the revocation wins.
        sessions.remember(digest, "alice".into(), minute, Some(1));
        assert!(matches!(sessions.recall(&digest, Instant::now()), Some(Known::Revoked { .. })));
        sessions.forget_unless_revoked(digest);
        assert!(matches!(sessions.recall(&digest, Instant::now()), Some(Known::Revoked { .. })));

        // A mark older than REMEMBERED_FOR is forgotten, and what Redis says next is kept.
        let Some(long_ago) = Instant::now().checked_sub(REMEMBERED_FOR) else { return };
        sessions.known.insert(digest, Known::Revoked { since: long_ago });
        assert!(sessions.recall(&digest, Instant::now()).is_none());
        sessions.remember(digest, "alice".into(), minute, Some(1));
        let Some(Known::Verified(verified)) = sessions.recall(&digest, Instant::now()) else { panic!("verified") };
        // Checked again: updated in place, with the new epoch.
        sessions.remember(digest, "alice".into(), minute, Some(2));
        assert_eq!(verified.epoch.load(Ordering::Acquire), 2);
        sessions.forget_unless_revoked(digest);
        assert!(sessions.recall(&digest, Instant::now()).is_none());
    }

    #[test]
    fn the_revocation_script_publishes_on_the_channel_the_workers_hear() {
        assert!(REVOKE_SCRIPT.contains(&format!("'{}'", crate::revocations::CHANNEL)));
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
