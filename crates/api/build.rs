// Generates the gRPC code with protox (a Rust protobuf compiler): no system protoc needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/smesh.proto");
    let descriptors = protox::compile(["smesh.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".smesh.v1.ConfigSnapshot")
        .compile_fds(descriptors)?;
    Ok(())
}
