//! `imgbuild`: build signed, bootable A/B disk images for Kubernetes nodes from a recipe.
//!
//! The binary is thin: `main.rs` parses arguments and calls one function per verb.

pub mod agent;
pub mod artifacts;
pub mod build;
pub mod cli;
pub mod cluster;
pub mod compose;
pub mod delta;
pub mod disk;
pub mod doctor;
pub mod filesystem;
pub mod flash;
pub mod installer;
pub mod iso;
pub mod progress;
pub mod publish;
pub mod pxe;
pub mod recipe;
pub mod run;
