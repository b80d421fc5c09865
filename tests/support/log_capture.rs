//! Records the cache's WARN and INFO events in a test, to check that each transition is logged
//! once and not once per request.
//!
//! Include it with `#[path = "support/log_capture.rs"] mod log_capture;`.

use std::sync::{Arc, Mutex};

/// Records the cache's WARN and INFO events, to check each transition is
/// logged once and not once per request.
///
/// One global subscriber (installed once) writes into the capture of the
/// current thread. The tests run on current-thread runtimes, so the cache's
/// probe task logs on the test's own thread. (A per-test `set_default` is
/// not enough: tracing caches callsite interest process-wide.)
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<(tracing::Level, String)>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<LogCapture>> = const { std::cell::RefCell::new(None) };
}

impl LogCapture {
    pub fn install() -> LogCapture {
        use tracing_subscriber::layer::SubscriberExt;
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::registry().with(GlobalCapture);
            tracing::subscriber::set_global_default(subscriber).expect("global subscriber");
        });
        let capture = LogCapture::default();
        CAPTURE.with(|slot| *slot.borrow_mut() = Some(capture.clone()));
        capture
    }

    pub fn take(&self) -> Vec<(tracing::Level, String)> {
        std::mem::take(&mut *self.0.lock().expect("log capture"))
    }
}

struct GlobalCapture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for GlobalCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let meta = event.metadata();
        if !meta.target().starts_with("herdsman::cache") || *meta.level() > tracing::Level::INFO {
            return;
        }
        CAPTURE.with(|slot| {
            if let Some(capture) = slot.borrow().as_ref() {
                let mut message = Message(String::new());
                event.record(&mut message);
                capture.0.lock().expect("log capture").push((*meta.level(), message.0));
            }
        });
    }
}
