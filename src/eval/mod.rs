//! Dataset evaluation: readers, the paper's prompt simulation, metrics, paired statistics, the
//! server-side runner and the reports the CLI writes.

pub mod client;
pub mod dataset;
pub mod prompts;
pub mod report;
pub mod runner;
pub mod scores;
pub mod stats;
