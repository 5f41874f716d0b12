fn main() {
    println!("imgbuild");
}
