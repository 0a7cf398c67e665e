// Generates the gRPC services with protox; the messages come from tunenet-proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let services = root.join("tunenet/v1/services.proto");
    let console = root.join("tunenet/v1/console.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    // job.proto's messages come from tunenet-proto; the console's own messages are
    // generated here, since only gRPC carries them.
    let fds = protox::compile([&services, &console], [&root])?;
    tonic_prost_build::configure()
        .extern_path(".tunenet.v1.Offer", "::tunenet_proto::v1::Offer")
        .extern_path(
            ".tunenet.v1.BenchmarkChallenge",
            "::tunenet_proto::v1::BenchmarkChallenge",
        )
        .extern_path(
            ".tunenet.v1.BenchmarkCommitment",
            "::tunenet_proto::v1::BenchmarkCommitment",
        )
        .extern_path(
            ".tunenet.v1.BenchmarkReveal",
            "::tunenet_proto::v1::BenchmarkReveal",
        )
        .extern_path(
            ".tunenet.v1.BenchmarkOpening",
            "::tunenet_proto::v1::BenchmarkOpening",
        )
        .extern_path(
            ".tunenet.v1.HardwareInventory",
            "::tunenet_proto::v1::HardwareInventory",
        )
        .extern_path(".tunenet.v1.Decision", "::tunenet_proto::v1::Decision")
        .extern_path(".tunenet.v1.Assignment", "::tunenet_proto::v1::Assignment")
        .extern_path(
            ".tunenet.v1.AssignmentAck",
            "::tunenet_proto::v1::AssignmentAck",
        )
        .extern_path(".tunenet.v1.Commitment", "::tunenet_proto::v1::Commitment")
        .extern_path(".tunenet.v1.Receipt", "::tunenet_proto::v1::Receipt")
        .extern_path(
            ".tunenet.v1.ArtifactChunk",
            "::tunenet_proto::v1::ArtifactChunk",
        )
        .extern_path(
            ".tunenet.v1.UploadResult",
            "::tunenet_proto::v1::UploadResult",
        )
        .extern_path(
            ".tunenet.v1.BlobRequest",
            "::tunenet_proto::v1::BlobRequest",
        )
        .extern_path(".tunenet.v1.BlobChunk", "::tunenet_proto::v1::BlobChunk")
        .extern_path(
            ".tunenet.v1.StatusRequest",
            "::tunenet_proto::v1::StatusRequest",
        )
        .extern_path(
            ".tunenet.v1.MinerStatus",
            "::tunenet_proto::v1::MinerStatus",
        )
        .extern_path(
            ".tunenet.v1.LeaderboardRequest",
            "::tunenet_proto::v1::LeaderboardRequest",
        )
        .extern_path(
            ".tunenet.v1.Leaderboard",
            "::tunenet_proto::v1::Leaderboard",
        )
        .extern_path(
            ".tunenet.v1.LeaderboardRow",
            "::tunenet_proto::v1::LeaderboardRow",
        )
        .extern_path(
            ".tunenet.v1.HparamBounds",
            "::tunenet_proto::v1::HparamBounds",
        )
        .extern_path(
            ".tunenet.v1.UploadHeader",
            "::tunenet_proto::v1::UploadHeader",
        )
        .extern_path(".tunenet.v1.JobStatus", "::tunenet_proto::v1::JobStatus")
        .extern_path(".tunenet.v1.JobKind", "::tunenet_proto::v1::JobKind")
        .extern_path(".tunenet.v1.RejectCode", "::tunenet_proto::v1::RejectCode")
        .compile_fds(fds)?;
    Ok(())
}
