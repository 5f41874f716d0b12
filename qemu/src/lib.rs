//! `imgqemu`: boot one disk image, or a test cluster of them, under QEMU.
//!
//! Owns QEMU command lines, firmware copies, serial logs and process lifetimes. It must
//! never change the image it boots (writes go to `-snapshot` or an overlay).
