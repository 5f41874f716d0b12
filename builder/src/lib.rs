//! `imgbuild`: build signed, bootable A/B disk images for Kubernetes nodes from a recipe.
//!
//! The binary is thin: `main.rs` parses arguments and calls one function per verb.

pub mod delta;
