//! `imgbuild-install`: the live installer, run as PID 1 (`rdinit=/imgbuild-install`) in
//! the initramfs the builder makes for ISO and PXE boots. See [`imginstall::live`].

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "imgbuild-install runs as PID 1 of the imgbuild installer initramfs; to write an image from a running system use `imgbuild flash`"
        );
        std::process::exit(2);
    }
    imginstall::live::main_pid1()
}
