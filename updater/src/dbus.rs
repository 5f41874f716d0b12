//! D-Bus API (placeholder, filled below).
