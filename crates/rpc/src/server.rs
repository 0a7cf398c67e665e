//! Server side: tonic service impls that check and convert wire messages, then call the
//! node's backend. Conversion errors become `InvalidArgument` naming the field.

use crate::services::miner_service_server::{MinerService, MinerServiceServer};
use crate::services::validator_service_server::{ValidatorService, ValidatorServiceServer};
use crate::{CHUNK, MAX_MESSAGE};
use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tunenet_proto::v1;
use tunenet_types as t;

fn bad(e: tunenet_proto::ConvertError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// What a miner daemon does with calls.
#[tonic::async_trait]
pub trait MinerBackend: Send + Sync + 'static {
    /// Decide on an offer.
    async fn offer(&self, offer: t::Offer) -> Result<t::DecisionReply, Status>;
    /// Take an assignment.
    async fn assign(&self, a: t::Assignment) -> Result<(), Status>;
    /// Report status.
    async fn status(&self) -> Result<v1::MinerStatus, Status>;
    /// Compute a benchmark challenge and commit to the products.
    async fn benchmark(
        &self,
        _c: v1::BenchmarkChallenge,
    ) -> Result<v1::BenchmarkCommitment, Status> {
        Err(Status::unimplemented("this miner runs no benchmarks"))
    }
    /// Open a computed benchmark after the validator's reveal.
    async fn benchmark_open(
        &self,
        _r: v1::BenchmarkReveal,
    ) -> Result<v1::BenchmarkOpening, Status> {
        Err(Status::unimplemented("this miner runs no benchmarks"))
    }
}

/// Receives an upload's bytes; `finish` verifies and stores them.
pub trait UploadSink: Send {
    /// Appends bytes.
    fn write(&mut self, data: &[u8]) -> Result<(), Status>;
    /// Ends the upload.
    fn finish(self: Box<Self>) -> Result<v1::UploadResult, Status>;
}

/// The rules of an `UploadArtifact` stream, apart from its transport: the header first,
/// then only data, never more bytes than the header declared, and exactly that many by the
/// end.
#[derive(Debug)]
pub struct UploadReceiver {
    header: t::UploadHeader,
    received: u64,
}

impl UploadReceiver {
    /// Takes the stream's first message, which must be the header.
    pub fn start(first: Option<v1::ArtifactChunk>) -> Result<Self, Status> {
        match first {
            Some(v1::ArtifactChunk {
                part: Some(v1::artifact_chunk::Part::Header(h)),
            }) => Ok(UploadReceiver {
                header: t::UploadHeader::try_from(h).map_err(bad)?,
                received: 0,
            }),
            _ => Err(Status::invalid_argument(
                "an upload must start with its header",
            )),
        }
    }

    /// The upload's header.
    pub fn header(&self) -> &t::UploadHeader {
        &self.header
    }

    /// The header, once the upload is over.
    pub fn into_header(self) -> t::UploadHeader {
        self.header
    }

    /// Takes a message after the header: its data, if it keeps within the declared size.
    pub fn data(&mut self, msg: v1::ArtifactChunk) -> Result<Vec<u8>, Status> {
        match msg.part {
            Some(v1::artifact_chunk::Part::Data(d)) => {
                self.received += d.len() as u64;
                if self.received > self.header.size {
                    return Err(Status::invalid_argument(format!(
                        "upload sent more than the {} bytes its header declared",
                        self.header.size
                    )));
                }
                Ok(d)
            }
            _ => Err(Status::invalid_argument("a second header in one upload")),
        }
    }

    /// The stream ended: every declared byte must have come.
    pub fn end(&self) -> Result<(), Status> {
        if self.received != self.header.size {
            return Err(Status::invalid_argument(format!(
                "upload ended after {} of the {} bytes its header declared",
                self.received, self.header.size
            )));
        }
        Ok(())
    }
}

/// What a validator daemon does with calls.
#[tonic::async_trait]
pub trait ValidatorBackend: Send + Sync + 'static {
    /// Take a commitment and return the signed receipt.
    async fn commit(&self, c: t::Commitment) -> Result<t::Receipt, Status>;
    /// Check an upload header and open a sink for the bytes.
    async fn begin_upload(&self, h: t::UploadHeader) -> Result<Box<dyn UploadSink>, Status>;
    /// Hand over a finished upload.
    async fn end_upload(&self, result: v1::UploadResult, h: t::UploadHeader) -> Result<(), Status>;
    /// Open a blob for download: its size and a reader.
    async fn open_blob(&self, id: t::BlobId) -> Result<(u64, std::fs::File), Status>;
    /// The leaderboard of a competition (empty id: the default one).
    async fn leaderboard(&self, competition: String) -> Result<t::Leaderboard, Status>;
}

struct MinerSvc<B>(Arc<B>);

#[tonic::async_trait]
impl<B: MinerBackend> MinerService for MinerSvc<B> {
    async fn offer(&self, req: Request<v1::Offer>) -> Result<Response<v1::Decision>, Status> {
        let offer = t::Offer::try_from(req.into_inner()).map_err(bad)?;
        Ok(Response::new(self.0.offer(offer).await?.into()))
    }

    async fn assign(
        &self,
        req: Request<v1::Assignment>,
    ) -> Result<Response<v1::AssignmentAck>, Status> {
        let a = t::Assignment::try_from(req.into_inner()).map_err(bad)?;
        let job_id = a.job_id.to_string();
        self.0.assign(a).await?;
        Ok(Response::new(v1::AssignmentAck { job_id }))
    }

    async fn status(
        &self,
        _req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::MinerStatus>, Status> {
        Ok(Response::new(self.0.status().await?))
    }

    async fn benchmark(
        &self,
        req: Request<v1::BenchmarkChallenge>,
    ) -> Result<Response<v1::BenchmarkCommitment>, Status> {
        Ok(Response::new(self.0.benchmark(req.into_inner()).await?))
    }

    async fn benchmark_open(
        &self,
        req: Request<v1::BenchmarkReveal>,
    ) -> Result<Response<v1::BenchmarkOpening>, Status> {
        Ok(Response::new(
            self.0.benchmark_open(req.into_inner()).await?,
        ))
    }
}

/// The tonic service for a miner backend.
pub fn miner_server<B: MinerBackend>(backend: Arc<B>) -> MinerServiceServer<impl MinerService> {
    MinerServiceServer::new(MinerSvc(backend))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

struct ValidatorSvc<B>(Arc<B>);

type BlobStream = Pin<Box<dyn Stream<Item = Result<v1::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl<B: ValidatorBackend> ValidatorService for ValidatorSvc<B> {
    async fn commit(&self, req: Request<v1::Commitment>) -> Result<Response<v1::Receipt>, Status> {
        let c = t::Commitment::try_from(req.into_inner()).map_err(bad)?;
        Ok(Response::new(self.0.commit(c).await?.into()))
    }

    async fn upload_artifact(
        &self,
        req: Request<Streaming<v1::ArtifactChunk>>,
    ) -> Result<Response<v1::UploadResult>, Status> {
        let mut stream = req.into_inner();
        let mut upload = UploadReceiver::start(stream.message().await?)?;
        let mut sink = self.0.begin_upload(upload.header().clone()).await?;
        while let Some(msg) = stream.message().await? {
            sink.write(&upload.data(msg)?)?;
        }
        upload.end()?;
        let result = sink.finish()?;
        self.0
            .end_upload(result.clone(), upload.into_header())
            .await?;
        Ok(Response::new(result))
    }

    type DownloadBlobStream = BlobStream;

    async fn download_blob(
        &self,
        req: Request<v1::BlobRequest>,
    ) -> Result<Response<BlobStream>, Status> {
        let req = req.into_inner();
        let id = t::BlobId::from_slice(&req.id)
            .map_err(|_| Status::invalid_argument("field `id`: expected 32 bytes"))?;
        let (size, mut file) = self.0.open_blob(id).await?;
        if req.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the blob's {size} bytes",
                req.offset
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::BlobChunk, Status>>(4);
        let mut offset = req.offset;
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(Status::internal(format!("seek: {e}"))));
                return;
            }
            while offset < size {
                let want = ((size - offset) as usize).min(CHUNK);
                // Read straight into the message's buffer: no copy per chunk.
                let mut data = vec![0u8; want];
                if let Err(e) = file.read_exact(&mut data) {
                    let _ = tx.blocking_send(Err(Status::internal(format!("read: {e}"))));
                    return;
                }
                let chunk = v1::BlobChunk {
                    offset,
                    total_size: size,
                    data,
                };
                offset += want as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return; // client went away
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_leaderboard(
        &self,
        req: Request<v1::LeaderboardRequest>,
    ) -> Result<Response<v1::Leaderboard>, Status> {
        let lb = self.0.leaderboard(req.into_inner().competition_id).await?;
        Ok(Response::new(lb.into()))
    }
}

/// The tonic service for a validator backend.
pub fn validator_server<B: ValidatorBackend>(
    backend: Arc<B>,
) -> ValidatorServiceServer<impl ValidatorService> {
    ValidatorServiceServer::new(ValidatorSvc(backend))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}
