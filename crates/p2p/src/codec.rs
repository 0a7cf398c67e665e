//! A request-response codec for prost messages: a 4-byte big-endian length, then the
//! message. The length is checked against a limit before anything is allocated, and every
//! malformed frame becomes an `io::Error` (the stream is dropped), never a panic.

use async_trait::async_trait;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use std::io;
use std::marker::PhantomData;

/// A Rust type that travels as a prost message.
pub trait WireMessage: Send + Sized + 'static {
    /// The prost message on the wire.
    type Pb: prost::Message + Default + Send;
    /// To the wire form.
    fn into_pb(self) -> Self::Pb;
    /// From the wire form; an error says what is missing.
    fn from_pb(pb: Self::Pb) -> Result<Self, String>;
}

/// Length-prefixed prost frames with separate limits for requests and responses.
pub struct ProstCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ProstCodec<Req, Resp> {
    /// A codec that refuses requests over `max_request` and responses over `max_response` bytes.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        ProstCodec {
            max_request,
            max_response,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for ProstCodec<Req, Resp> {
    fn clone(&self) -> Self {
        ProstCodec::new(self.max_request, self.max_response)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one frame of at most `max` bytes and decodes it.
pub async fn read_frame<M, T>(io: &mut T, max: usize) -> io::Result<M>
where
    M: prost::Message + Default,
    T: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(invalid(format!(
            "message of {len} bytes is over the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    M::decode(prost::bytes::Bytes::from(buf))
        .map_err(|e| invalid(format!("message does not decode: {e}")))
}

/// Encodes `msg` and writes it as one frame, refusing to send more than `max` bytes.
pub async fn write_frame<M, T>(io: &mut T, msg: &M, max: usize) -> io::Result<()>
where
    M: prost::Message,
    T: AsyncWrite + Unpin + Send,
{
    let len = msg.encoded_len();
    if len > max || len > u32::MAX as usize {
        return Err(invalid(format!(
            "message of {len} bytes is over the limit of {max}"
        )));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf)
        .map_err(|e| invalid(format!("message does not encode: {e}")))?;
    io.write_all(&buf).await?;
    io.flush().await
}

#[async_trait]
impl<Req: WireMessage, Resp: WireMessage> request_response::Codec for ProstCodec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        let pb = read_frame::<Req::Pb, T>(io, self.max_request).await?;
        Req::from_pb(pb).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let pb = read_frame::<Resp::Pb, T>(io, self.max_response).await?;
        Resp::from_pb(pb).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.into_pb(), self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res.into_pb(), self.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{JobRequest, JobResponse};
    use futures::io::Cursor;
    use request_response::Codec;
    use tunenet_proto::v1;

    fn proto() -> StreamProtocol {
        StreamProtocol::new("/tunenet/job/1")
    }

    #[tokio::test]
    async fn job_messages_round_trip() {
        let mut codec = ProstCodec::<JobRequest, JobResponse>::new(1024, 1024);
        let offer = JobRequest::Offer(v1::Offer {
            job_id: "c-1".into(),
            base_params: 42,
            ..Default::default()
        });
        let mut wire = Cursor::new(Vec::new());
        codec
            .write_request(&proto(), &mut wire, offer.clone())
            .await
            .unwrap();
        let mut back = Cursor::new(wire.into_inner());
        let got = codec.read_request(&proto(), &mut back).await.unwrap();
        assert_eq!(got, offer);
    }

    #[tokio::test]
    async fn malformed_frames_are_errors_not_panics() {
        let mut codec = ProstCodec::<JobRequest, JobResponse>::new(64, 64);
        let cases: Vec<Vec<u8>> = vec![
            vec![],                             // nothing at all
            vec![0, 0],                         // half a length
            vec![0xff, 0xff, 0xff, 0xff],       // 4 GiB claimed: over the limit
            vec![0, 0, 0, 10, 1, 2],            // shorter than claimed
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff], // not protobuf
            vec![0, 0, 0, 0],                   // an empty envelope
            vec![0, 0, 0, 2, 0x0a, 0x05],       // truncated nested message
        ];
        for bytes in cases {
            let mut io = Cursor::new(bytes.clone());
            assert!(
                codec.read_request(&proto(), &mut io).await.is_err(),
                "{bytes:?} was accepted"
            );
        }
        // Oversized outgoing messages are refused before they are sent.
        let big = JobRequest::Offer(v1::Offer {
            job_id: "x".repeat(100),
            ..Default::default()
        });
        let mut wire = Cursor::new(Vec::new());
        assert!(codec.write_request(&proto(), &mut wire, big).await.is_err());
    }
}
