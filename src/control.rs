//! The pipe from each worker to its master: how a worker proves it is alive.
//!
//! Each worker writes one-byte [`Message`]s to the pipe it inherits (see [`crate::contract`]); the master
//! reads the other end. Heartbeats are written by a task *inside the worker's async runtime*:
//! if that runtime is blocked (a handler that never yields, a deadlock), heartbeats stop, and the
//! master aborts the worker after `GUNICORN_TIMEOUT`. A side thread could keep writing while the
//! runtime is stuck, which is why no side thread ever writes here.
//!
//! The pipe also tells each side when the other is gone: the master reads end-of-file when a
//! worker dies, and a worker's write fails with `EPIPE` when its master died.

/// What a worker tells its master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// The worker accepts connections; the master may now retire an old worker it replaces.
    Ready,
    /// The worker's runtime is alive.
    Heartbeat,
    /// The worker answered its first request: it is useful, so a hang from now on is no longer
    /// a failed boot. Sent once.
    Served,
    /// The worker served its `MAX_REQUESTS`: start a replacement, then tell this one to drain.
    /// It keeps serving until then, so recycling drops no request.
    Recycle,
}

impl Message {
    pub fn to_byte(self) -> u8 {
        match self {
            Message::Ready => b'R',
            Message::Heartbeat => b'H',
            Message::Served => b'S',
            Message::Recycle => b'M',
        }
    }

    pub fn from_byte(byte: u8) -> Option<Message> {
        match byte {
            b'R' => Some(Message::Ready),
            b'H' => Some(Message::Heartbeat),
            b'S' => Some(Message::Served),
            b'M' => Some(Message::Recycle),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_the_pipe() {
        for m in [Message::Ready, Message::Heartbeat, Message::Served, Message::Recycle] {
            assert_eq!(Message::from_byte(m.to_byte()), Some(m));
        }
        assert_eq!(Message::from_byte(b'?'), None);
    }
}
