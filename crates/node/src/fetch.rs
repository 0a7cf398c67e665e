//! Fetching blobs by blake3 from a validator: streamed into the blob store, resumed from
//! the last byte received when a connection breaks, and verified before it is kept.

use crate::error::NodeError;
use std::time::Duration;
use tunenet_rpc::ValidatorClient;
use tunenet_store::BlobStore;
use tunenet_types::BlobId;

/// How many times a broken download is resumed before giving up.
const ATTEMPTS: u32 = 5;

/// Makes sure `id` is in `blobs`, downloading it from `addr` if needed. Refuses blobs over
/// `max_size` bytes, and anything whose bytes do not hash to `id`.
pub async fn fetch_blob(
    blobs: &BlobStore,
    addr: &str,
    id: BlobId,
    max_size: u64,
) -> Result<u64, NodeError> {
    if blobs.contains(&id) && blobs.verify(&id).is_ok() {
        return blobs.size(&id).map_err(Into::into);
    }
    let mut writer = blobs.writer(Some(max_size))?;
    let mut last_err = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
            tracing::warn!(blob = %id, offset = writer.written(), attempt, "resuming blob download");
        }
        let mut client = match ValidatorClient::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                last_err = Some(NodeError::from(e));
                continue;
            }
        };
        let offset = writer.written();
        let mut write_err = None;
        let mut sink = |data: &[u8]| -> Result<(), String> {
            writer.write_chunk(data).map_err(|e| {
                let s = e.to_string();
                write_err = Some(e);
                s
            })
        };
        match client.download(id, offset, max_size, &mut sink).await {
            Ok(_) => {
                let size = writer.written();
                writer.finish(Some(id))?;
                metrics::counter!("tunenet_bytes_received_total", "what" => "blob").increment(size);
                return Ok(size);
            }
            Err(e) => {
                if let Some(we) = write_err {
                    return Err(we.into()); // too large or disk trouble: retrying will not help
                }
                if let tunenet_rpc::RpcError::Refused { code, .. } = &e
                    && matches!(
                        code,
                        tunenet_rpc::Code::NotFound
                            | tunenet_rpc::Code::PermissionDenied
                            | tunenet_rpc::Code::InvalidArgument
                    )
                {
                    return Err(e.into());
                }
                last_err = Some(e.into());
            }
        }
    }
    Err(last_err.unwrap_or_else(|| NodeError::Other(format!("could not fetch blob {id}"))))
}
