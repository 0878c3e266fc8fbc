//! Link options for the `smesh` binary.

fn main() {
    // Relative relocations packed as DT_RELR (glibc >= 2.36, binutils >= 2.38): the dynamic
    // loader reads a few KiB at start-up instead of ~450 KiB of .rela.dyn, which otherwise
    // stays resident (part of the idle RSS). The binary stays position-independent.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
