//! Metrics (placeholder).
