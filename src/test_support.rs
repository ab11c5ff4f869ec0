//! Helpers for the crate's own unit tests (compiled only for them).

use crate::engine::Registry;
use crate::model::{Precision, SamVariant};
use crate::settings::{ModelSettings, Settings};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A panic hook: true (and one fewer left) while `counter` is above zero. Each hook site keeps
/// its own counter, set by the one test that uses it.
pub fn take_injected_panic(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// Panics a test injects into the threads of one model, by its id: tests running beside it, with
/// models of their own, are not hit.
pub struct InjectedPanics(std::sync::Mutex<Vec<(String, u32)>>);

impl InjectedPanics {
    pub const fn new() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }

    /// The next `n` hook calls for `model` panic.
    pub fn set(&self, model: &str, n: u32) {
        let mut v = self.0.lock().unwrap();
        v.retain(|(m, _)| m != model);
        v.push((model.to_owned(), n));
    }

    /// A panic hook: true (and one fewer left) while `model` has injected panics left.
    pub fn take(&self, model: &str) -> bool {
        let mut v = self.0.lock().unwrap();
        match v.iter_mut().find(|(m, n)| m == model && *n > 0) {
            Some((_, n)) => {
                *n -= 1;
                true
            }
            None => false,
        }
    }
}

/// A registry over `settings` (its configured models dropped) hosting the tiny test model as
/// `id` on the CPU, once it is ready.
pub async fn registry_with_tiny_model(mut settings: Settings, id: &str) -> Registry {
    settings.models.clear();
    let registry = Registry::new(settings);
    registry
        .load(ModelSettings {
            id: id.into(),
            variant: SamVariant::Tiny,
            checkpoint: Some("tests/fixtures/golden/sam_tiny.pth".into()),
            device: Some("cpu".into()),
            precision: Precision::Fp32,
            decoders: None,
        })
        .unwrap();
    for _ in 0..600 {
        if registry.any_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    registry
}
