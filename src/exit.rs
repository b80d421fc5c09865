//! The exit statuses of a herdsman process, all of them. Platforms and scripts branch on
//! these, so each has one meaning:
//!
//! | status | [`Exit`]          | when                                                          |
//! |--------|-------------------|---------------------------------------------------------------|
//! | 0      | `Clean`           | a stop that finished its work; `check`; a healthy `healthcheck` |
//! | 1      | `Failure`         | a runtime error (cannot bind, a worker that cannot serve), a failed `healthcheck` |
//! | 2      | `BadUsage`        | a bad flag, setting or argument: nothing was started          |
//! | 3      | `NoWorkerBooted`  | no worker ever became ready and useful: a failed deploy, not a crash loop |

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Clean = 0,
    Failure = 1,
    BadUsage = 2,
    NoWorkerBooted = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}
