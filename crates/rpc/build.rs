// Generates the gRPC services with protox; the messages come from tunenet-proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("tunenet/v1/services.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .extern_path(".tunenet.v1", "::tunenet_proto::v1")
        .compile_fds(fds)?;
    Ok(())
}
