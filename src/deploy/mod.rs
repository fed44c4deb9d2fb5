//! What is deployed, as read from disk: each version's `worker.config.json` ([`config`]), its compiled proxy
//! [`rules`], and the [`registry`] of apps and versions that requests resolve against. Nothing here knows HTTP
//! responses: the request path turns these errors into answers.

pub mod config;
pub mod registry;
pub mod rules;
