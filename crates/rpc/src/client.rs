//! Typed clients. Every call has a timeout; errors say which peer and what failed.

use crate::services::miner_service_client::MinerServiceClient;
use crate::services::validator_service_client::ValidatorServiceClient;
use crate::{CHUNK, MAX_MESSAGE};
use std::io::Read;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tunenet_proto::v1;
use tunenet_types as t;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The address is not a valid URL.
    #[error("`{0}` is not a valid gRPC address (expected e.g. http://127.0.0.1:7100)")]
    BadAddress(String),
    /// Could not connect.
    #[error("cannot reach {addr}: {reason}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("{addr} refused: {message} ({code:?})")]
    Refused {
        /// Where.
        addr: String,
        /// gRPC code.
        code: tonic::Code,
        /// The peer's message.
        message: String,
    },
    /// The peer's answer is malformed or wrong.
    #[error("{addr} sent a bad answer: {reason}")]
    BadAnswer {
        /// Where.
        addr: String,
        /// What was wrong.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error("local I/O: {0}")]
    Io(String),
}

/// An endpoint for `addr`; `https://` URLs use TLS, trusting the PEM CA named by the
/// `TUNENET_CA` environment variable.
pub fn endpoint(addr: &str) -> Result<Endpoint, RpcError> {
    let ca = match std::env::var("TUNENET_CA") {
        Ok(path) => Some(
            std::fs::read(&path).map_err(|e| RpcError::Io(format!("TUNENET_CA {path}: {e}")))?,
        ),
        Err(_) => None,
    };
    endpoint_with_ca(addr, ca.as_deref())
}

/// An endpoint for `addr`; `https://` URLs use TLS, trusting `ca` (PEM) when given.
pub fn endpoint_with_ca(addr: &str, ca: Option<&[u8]>) -> Result<Endpoint, RpcError> {
    let mut ep = Endpoint::from_shared(addr.to_string())
        .map_err(|_| RpcError::BadAddress(addr.to_string()))?;
    if addr.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(pem) = ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls).map_err(|e| RpcError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(ep)
}

/// How often a client pings its connection (HTTP/2 PING).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

async fn channel(addr: &str, timeout: Duration) -> Result<Channel, RpcError> {
    let ep = endpoint(addr)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .tcp_nodelay(true)
        // HTTP/2 pings: a call on a link that went dark fails within KEEPALIVE_TIMEOUT of
        // the last answered ping (and is retried), rather than at its own timeout, which
        // for an upload is long.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    ep.connect().await.map_err(|e| RpcError::Connect {
        addr: addr.to_string(),
        reason: format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        ),
    })
}

fn refused(addr: &str) -> impl FnOnce(tonic::Status) -> RpcError + '_ {
    move |s| RpcError::Refused {
        addr: addr.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

fn bad_answer(addr: &str, reason: impl ToString) -> RpcError {
    RpcError::BadAnswer {
        addr: addr.to_string(),
        reason: reason.to_string(),
    }
}

/// Calls a miner.
#[derive(Clone)]
pub struct MinerClient {
    addr: String,
    inner: MinerServiceClient<Channel>,
}

impl MinerClient {
    /// Connects to a miner at `addr` (`http://host:port`).
    pub async fn connect(addr: &str) -> Result<Self, RpcError> {
        let ch = channel(addr, Duration::from_secs(30)).await?;
        Ok(MinerClient {
            addr: addr.to_string(),
            inner: MinerServiceClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        })
    }

    /// Sends an offer; returns the decision.
    pub async fn offer(&mut self, o: t::Offer) -> Result<t::DecisionReply, RpcError> {
        let r = self
            .inner
            .offer(v1::Offer::from(o))
            .await
            .map_err(refused(&self.addr))?;
        t::DecisionReply::try_from(r.into_inner()).map_err(|e| bad_answer(&self.addr, e))
    }

    /// Sends an assignment.
    pub async fn assign(&mut self, a: t::Assignment) -> Result<(), RpcError> {
        self.inner
            .assign(v1::Assignment::from(a))
            .await
            .map_err(refused(&self.addr))?;
        Ok(())
    }

    /// Reads the miner's status.
    pub async fn status(&mut self) -> Result<v1::MinerStatus, RpcError> {
        Ok(self
            .inner
            .status(v1::StatusRequest {})
            .await
            .map_err(refused(&self.addr))?
            .into_inner())
    }

    /// Sends a benchmark challenge; returns the miner's commitment.
    pub async fn benchmark(
        &mut self,
        c: v1::BenchmarkChallenge,
    ) -> Result<v1::BenchmarkCommitment, RpcError> {
        Ok(self
            .inner
            .benchmark(c)
            .await
            .map_err(refused(&self.addr))?
            .into_inner())
    }

    /// Sends a benchmark reveal; returns the miner's opening.
    pub async fn benchmark_open(
        &mut self,
        r: v1::BenchmarkReveal,
    ) -> Result<v1::BenchmarkOpening, RpcError> {
        Ok(self
            .inner
            .benchmark_open(r)
            .await
            .map_err(refused(&self.addr))?
            .into_inner())
    }
}

/// Calls a validator.
#[derive(Clone)]
pub struct ValidatorClient {
    addr: String,
    inner: ValidatorServiceClient<Channel>,
}

impl ValidatorClient {
    /// Connects to a validator at `addr`.
    pub async fn connect(addr: &str) -> Result<Self, RpcError> {
        let ch = channel(addr, Duration::from_secs(3600)).await?;
        Ok(ValidatorClient {
            addr: addr.to_string(),
            inner: ValidatorServiceClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        })
    }

    /// Sends a commitment; returns the validator's receipt.
    pub async fn commit(&mut self, c: t::Commitment) -> Result<t::Receipt, RpcError> {
        let r = self
            .inner
            .commit(v1::Commitment::from(c))
            .await
            .map_err(refused(&self.addr))?;
        t::Receipt::try_from(r.into_inner()).map_err(|e| bad_answer(&self.addr, e))
    }

    /// Uploads an artifact file after its header, in chunks.
    pub async fn upload(
        &mut self,
        header: t::UploadHeader,
        file: &Path,
    ) -> Result<v1::UploadResult, RpcError> {
        let mut f = std::fs::File::open(file)
            .map_err(|e| RpcError::Io(format!("{}: {e}", file.display())))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<v1::ArtifactChunk>(4);
        let first = v1::ArtifactChunk {
            part: Some(v1::artifact_chunk::Part::Header(header.into())),
        };
        tx.send(first)
            .await
            .map_err(|_| RpcError::Io("upload channel closed".into()))?;
        let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = f.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                let chunk = v1::ArtifactChunk {
                    part: Some(v1::artifact_chunk::Part::Data(buf[..n].to_vec())),
                };
                if tx.blocking_send(chunk).is_err() {
                    return Ok(()); // the call ended; its status says why
                }
            }
        });
        let res = self
            .inner
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(refused(&self.addr));
        match reader.await {
            Ok(Err(e)) => return Err(RpcError::Io(e)),
            Err(e) => return Err(RpcError::Io(e.to_string())),
            Ok(Ok(())) => {}
        }
        Ok(res?.into_inner())
    }

    /// Downloads blob `id` from `offset`, handing each chunk to `sink` in order; stops
    /// with an error past `max_size`. Returns the blob's total size. The caller verifies
    /// the hash (it holds the whole stream).
    pub async fn download(
        &mut self,
        id: t::BlobId,
        offset: u64,
        max_size: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), String> + Send),
    ) -> Result<u64, RpcError> {
        let mut s = self
            .inner
            .download_blob(v1::BlobRequest {
                id: id.0.to_vec(),
                offset,
            })
            .await
            .map_err(refused(&self.addr))?
            .into_inner();
        let mut next = offset;
        let mut total = None;
        while let Some(chunk) = s.message().await.map_err(refused(&self.addr))? {
            if chunk.offset != next {
                return Err(bad_answer(
                    &self.addr,
                    format!("chunk at {} where {next} was expected", chunk.offset),
                ));
            }
            if chunk.total_size > max_size {
                return Err(bad_answer(
                    &self.addr,
                    format!(
                        "blob of {} bytes is over the limit {max_size}",
                        chunk.total_size
                    ),
                ));
            }
            total = Some(chunk.total_size);
            next += chunk.data.len() as u64;
            if next > chunk.total_size {
                return Err(bad_answer(&self.addr, "more bytes than the blob's size"));
            }
            sink(&chunk.data).map_err(RpcError::Io)?;
        }
        let total = total.unwrap_or(offset);
        if next != total {
            return Err(bad_answer(
                &self.addr,
                format!("stream ended at {next} of {total} bytes"),
            ));
        }
        Ok(total)
    }

    /// Reads a competition's leaderboard.
    pub async fn leaderboard(&mut self, competition: &str) -> Result<t::Leaderboard, RpcError> {
        let r = self
            .inner
            .get_leaderboard(v1::LeaderboardRequest {
                competition_id: competition.to_string(),
            })
            .await
            .map_err(refused(&self.addr))?;
        t::Leaderboard::try_from(r.into_inner()).map_err(|e| bad_answer(&self.addr, e))
    }
}
