// Generates the p2p-only messages with protox (no system protoc); the shared job messages
// are not regenerated but referenced from tunenet-proto, so both transports share types.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let local = here.join("proto");
    let shared = here.join("../../proto");
    let file = local.join("tunenet/p2p/v1/p2p.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&local, &shared])?;
    prost_build::Config::new()
        .extern_path(".tunenet.v1", "::tunenet_proto::v1")
        // Chunk bytes are sliced out of the received frame instead of copied.
        .bytes([".tunenet.p2p.v1.BlobChunk.data"])
        .compile_fds(fds)?;
    Ok(())
}
