//! The p2p-only wire messages (generated from `proto/tunenet/p2p/v1/p2p.proto`) and the
//! typed envelopes that carry the shared job messages of `tunenet_proto::v1`.

/// Generated prost code for `tunenet.p2p.v1`; the job messages inside are `tunenet_proto::v1`'s.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tunenet.p2p.v1.rs"));
}

use crate::codec::WireMessage;
use tunenet_proto::v1;

pub use pb::{CompetitionAnnouncement, MinerAdvert};

/// A request on `/tunenet/job/1`: the same messages the gRPC services take.
#[derive(Clone, Debug, PartialEq)]
pub enum JobRequest {
    /// A validator offers a job; the miner answers with a [`JobResponse::Decision`].
    Offer(v1::Offer),
    /// A validator assigns an accepted job; answered with [`JobResponse::AssignmentAck`].
    Assignment(v1::Assignment),
    /// A miner commits to an artifact; answered with [`JobResponse::Receipt`].
    Commitment(v1::Commitment),
    /// After the deadline a miner reveals its artifact id and salt; the validator fetches
    /// the artifact blob from it ([`crate::Client::fetch_blob_from`]) and answers with
    /// [`JobResponse::UploadResult`].
    Reveal(v1::UploadHeader),
    /// A validator's benchmark challenge; answered with [`JobResponse::BenchmarkCommitment`].
    Benchmark(v1::BenchmarkChallenge),
    /// The validator's reveal after the commitment; answered with
    /// [`JobResponse::BenchmarkOpening`].
    BenchmarkReveal(v1::BenchmarkReveal),
}

/// A response on `/tunenet/job/1`.
#[derive(Clone, Debug, PartialEq)]
pub enum JobResponse {
    /// The miner's answer to an offer.
    Decision(v1::Decision),
    /// The miner took the assignment.
    AssignmentAck(v1::AssignmentAck),
    /// The validator's signed receipt for a commitment.
    Receipt(v1::Receipt),
    /// The validator has the revealed artifact.
    UploadResult(v1::UploadResult),
    /// The miner's signed commitment to a benchmark's products.
    BenchmarkCommitment(v1::BenchmarkCommitment),
    /// The miner's opening of a benchmark.
    BenchmarkOpening(v1::BenchmarkOpening),
    /// The request was not handled, with the reason in words.
    Refused(String),
}

impl WireMessage for JobRequest {
    type Pb = pb::JobRequest;

    fn into_pb(self) -> pb::JobRequest {
        use pb::job_request::Body;
        let body = match self {
            JobRequest::Offer(m) => Body::Offer(m),
            JobRequest::Assignment(m) => Body::Assignment(m),
            JobRequest::Commitment(m) => Body::Commitment(m),
            JobRequest::Reveal(m) => Body::Reveal(m),
            JobRequest::Benchmark(m) => Body::Benchmark(m),
            JobRequest::BenchmarkReveal(m) => Body::BenchmarkReveal(m),
        };
        pb::JobRequest { body: Some(body) }
    }

    fn from_pb(pb: pb::JobRequest) -> Result<Self, String> {
        use pb::job_request::Body;
        match pb.body {
            Some(Body::Offer(m)) => Ok(JobRequest::Offer(m)),
            Some(Body::Assignment(m)) => Ok(JobRequest::Assignment(m)),
            Some(Body::Commitment(m)) => Ok(JobRequest::Commitment(m)),
            Some(Body::Reveal(m)) => Ok(JobRequest::Reveal(m)),
            Some(Body::Benchmark(m)) => Ok(JobRequest::Benchmark(m)),
            Some(Body::BenchmarkReveal(m)) => Ok(JobRequest::BenchmarkReveal(m)),
            None => Err("job request carries no message".into()),
        }
    }
}

impl WireMessage for JobResponse {
    type Pb = pb::JobResponse;

    fn into_pb(self) -> pb::JobResponse {
        use pb::job_response::Body;
        let body = match self {
            JobResponse::Decision(m) => Body::Decision(m),
            JobResponse::AssignmentAck(m) => Body::AssignmentAck(m),
            JobResponse::Receipt(m) => Body::Receipt(m),
            JobResponse::UploadResult(m) => Body::UploadResult(m),
            JobResponse::BenchmarkCommitment(m) => Body::BenchmarkCommitment(m),
            JobResponse::BenchmarkOpening(m) => Body::BenchmarkOpening(m),
            JobResponse::Refused(r) => Body::Refused(r),
        };
        pb::JobResponse { body: Some(body) }
    }

    fn from_pb(pb: pb::JobResponse) -> Result<Self, String> {
        use pb::job_response::Body;
        match pb.body {
            Some(Body::Decision(m)) => Ok(JobResponse::Decision(m)),
            Some(Body::AssignmentAck(m)) => Ok(JobResponse::AssignmentAck(m)),
            Some(Body::Receipt(m)) => Ok(JobResponse::Receipt(m)),
            Some(Body::UploadResult(m)) => Ok(JobResponse::UploadResult(m)),
            Some(Body::BenchmarkCommitment(m)) => Ok(JobResponse::BenchmarkCommitment(m)),
            Some(Body::BenchmarkOpening(m)) => Ok(JobResponse::BenchmarkOpening(m)),
            Some(Body::Refused(r)) => Ok(JobResponse::Refused(r)),
            None => Err("job response carries no message".into()),
        }
    }
}

impl WireMessage for pb::BlobRequest {
    type Pb = pb::BlobRequest;
    fn into_pb(self) -> Self {
        self
    }
    fn from_pb(pb: Self) -> Result<Self, String> {
        Ok(pb)
    }
}

impl WireMessage for pb::BlobResponse {
    type Pb = pb::BlobResponse;
    fn into_pb(self) -> Self {
        self
    }
    fn from_pb(pb: Self) -> Result<Self, String> {
        Ok(pb)
    }
}
