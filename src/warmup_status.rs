//! The states of a worker's warm-up tasks: fed by the tasks as they run (see [`crate::warmup`]),
//! read by `/ready`, `/health` and the diagnostics of an aborted worker. Kept apart from the
//! tasks themselves so that what reads the states needs nothing of what produces them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Ok { duration_ms: u64 },
    Failed { duration_ms: u64, reason: String },
    TimedOut { after_ms: u64 },
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Entry {
    #[serde(flatten)]
    pub(crate) state: TaskState,
    pub(crate) required: bool,
    /// Attempts started so far: more than one only for a required task that was retried.
    pub(crate) attempts: u32,
}

/// The states of a worker's warm-up tasks, by name. Cheap to clone; clones share the states.
#[derive(Clone, Default)]
pub struct WarmupStatus {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
}

impl WarmupStatus {
    /// Changes a task's entry, creating it as `pending` if it does not exist yet.
    pub(crate) fn update(&self, name: &str, required: bool, change: impl FnOnce(&mut Entry)) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry =
            entries.entry(name.to_string()).or_insert(Entry { state: TaskState::Pending, required, attempts: 0 });
        change(entry);
    }

    /// The state of one task, if it exists.
    pub fn state(&self, name: &str) -> Option<TaskState> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(name).map(|e| e.state.clone())
    }

    /// Every task's state, as shown under `checks` in `/health`.
    pub fn snapshot(&self) -> serde_json::Map<String, serde_json::Value> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().map(|(name, entry)| (name.clone(), serde_json::to_value(entry).unwrap_or_default())).collect()
    }

    /// The tasks still running, if any, for the diagnostics of an aborted worker.
    pub fn pending(&self) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let pending: Vec<&str> =
            entries.iter().filter(|(_, e)| e.state == TaskState::Pending).map(|(name, _)| name.as_str()).collect();
        (!pending.is_empty()).then(|| pending.join(", "))
    }

    /// Why this worker is not ready yet: the required tasks that have not succeeded.
    pub fn not_ready_reason(&self) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let waiting: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.required && !matches!(e.state, TaskState::Ok { .. }))
            .map(|(name, e)| match &e.state {
                TaskState::Failed { reason, .. } => format!("{name} (failed: {reason})"),
                state => format!("{name} ({})", state_word(state)),
            })
            .collect();
        (!waiting.is_empty()).then(|| format!("waiting for required warm-up: {}", waiting.join(", ")))
    }
}

fn state_word(state: &TaskState) -> &'static str {
    match state {
        TaskState::Pending => "pending",
        TaskState::Ok { .. } => "ok",
        TaskState::Failed { .. } => "failed",
        TaskState::TimedOut { .. } => "timed out",
    }
}
