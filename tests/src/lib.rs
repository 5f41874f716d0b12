//! Shared helpers for the end-to-end tests (build once, boot, read serial logs).
