//! Blob throughput on loopback: libp2p blob fetch (TCP+noise+yamux and QUIC) and the
//! validator's gRPC blob download against a raw TCP copy of the same file and against
//! hashing it (blake3 in-process, and `b3sum` when `TUNENET_B3SUM` names it), as MB/s,
//! ratios and CPU seconds per GiB. Every transfer ends with the blob verified, written
//! and fsynced in a blob store (the raw TCP copy: written and fsynced, not verified).
//! `TUNENET_BENCH_FILE` names an existing file to move, else `TUNENET_BENCH_MIB` sets the
//! size of a generated one (default 1024), `TUNENET_BENCH_PARALLEL` the streams in
//! flight (default: the config's). Run via `scripts/bench-p2p.sh`.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunenet_p2p::{Multiaddr, P2pConfig};
use tunenet_proto::v1;
use tunenet_rpc::{Status, UploadSink, ValidatorBackend, ValidatorClient};
use tunenet_store::BlobStore;
use tunenet_types::{self as t, BlobId, Identity};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn write_file(path: &Path, size: u64) -> Res<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

fn hash_file(path: &Path) -> Res<Duration> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    std::hint::black_box(h.finalize());
    Ok(t.elapsed())
}

/// A file sent over one plain TCP connection and written to disk on the other side.
async fn raw_tcp(src: &Path, dst: &Path) -> Res<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let src = src.to_path_buf();
    let sender = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut f = tokio::fs::File::open(&src).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).await?;
        }
        sock.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let t = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let mut out = tokio::fs::File::create(dst).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await?;
    }
    out.sync_all().await?;
    let elapsed = t.elapsed();
    sender.await??;
    Ok(elapsed)
}

/// Time and CPU seconds of one fetch between two nodes in this process.
async fn libp2p_fetch(src: &Path, root: &Path, listen: &str) -> Res<(Duration, f64)> {
    let listen: Multiaddr = listen.parse()?;
    let parallel = std::env::var("TUNENET_BENCH_PARALLEL")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(P2pConfig::default().blob_parallel);
    let config = P2pConfig {
        listen: vec![listen],
        mdns: false,
        blob_parallel: parallel,
        ..P2pConfig::default()
    };
    let store_a = BlobStore::open(&root.join("a"))?;
    let id = store_a.put_file(src)?;
    let a = Identity::generate();
    let (client_a, _events_a, loop_a) = tunenet_p2p::new(a.keypair(), config.clone(), store_a)?;
    tokio::spawn(loop_a.run());
    let addr = client_a.listen_addrs().await?[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(client_a.local_peer_id()));
    client_a.provide(id).await?;
    let b = Identity::generate();
    let store_b = BlobStore::open(&root.join("b"))?;
    let config_b = P2pConfig {
        bootstrap: vec![addr],
        ..config
    };
    let (client_b, _events_b, loop_b) = tunenet_p2p::new(b.keypair(), config_b, store_b.clone())?;
    tokio::spawn(loop_b.run());
    // Let B connect and learn the provider record before timing.
    client_b.providers(id).await?;
    let (t, c) = (Instant::now(), cpu_secs());
    let size = client_b.fetch_blob(id, u64::MAX).await?;
    let (elapsed, cpu) = (t.elapsed(), cpu_secs() - c);
    assert_eq!(size, std::fs::metadata(src)?.len());
    Ok((elapsed, cpu))
}

/// A validator backend that only serves blobs from a store.
struct BlobsOnly(BlobStore);

#[tonic::async_trait]
impl ValidatorBackend for BlobsOnly {
    async fn commit(&self, _: t::Commitment) -> Result<t::Receipt, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn begin_upload(&self, _: t::UploadHeader) -> Result<Box<dyn UploadSink>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn end_upload(&self, _: v1::UploadResult, _: t::UploadHeader) -> Result<(), Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn open_blob(&self, id: BlobId) -> Result<(u64, std::fs::File), Status> {
        let path = self.0.path(&id);
        let f = std::fs::File::open(&path).map_err(|e| Status::not_found(e.to_string()))?;
        let size = f
            .metadata()
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        Ok((size, f))
    }
    async fn leaderboard(&self, _: String) -> Result<t::Leaderboard, Status> {
        Err(Status::unimplemented("bench"))
    }
}

/// Time and CPU seconds of one gRPC download (plain HTTP/2, no TLS) into a blob store:
/// hashed as it streams in, written, fsynced and checked against the id.
async fn grpc_download(src: &Path, root: &Path) -> Res<(Duration, f64)> {
    let served = BlobStore::open(&root.join("a"))?;
    let id = served.put_file(src)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = tunenet_rpc::validator_server(Arc::new(BlobsOnly(served)));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = ValidatorClient::connect(&format!("http://{addr}")).await?;
    let store = BlobStore::open(&root.join("b"))?;
    let (t, c) = (Instant::now(), cpu_secs());
    let mut writer = store.writer(None)?;
    let size = client
        .download(id, 0, u64::MAX, &mut |data| {
            writer.write_chunk(data).map_err(|e| e.to_string())
        })
        .await?;
    let got = tokio::task::spawn_blocking(move || writer.finish(Some(id))).await??;
    let (elapsed, cpu) = (t.elapsed(), cpu_secs() - c);
    assert_eq!(got, id);
    assert_eq!(size, std::fs::metadata(src)?.len());
    server.abort();
    Ok((elapsed, cpu))
}

/// Time and CPU seconds (its own, from its rusage) of `b3sum` on the file, if named.
fn b3sum(path: &Path, threads: Option<usize>) -> Res<Option<(Duration, f64)>> {
    let Some(bin) = std::env::var_os("TUNENET_B3SUM").filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    let mut cmd = std::process::Command::new(bin);
    if let Some(n) = threads {
        cmd.arg("--num-threads").arg(n.to_string());
    }
    let c = child_cpu_secs();
    let t = Instant::now();
    let out = cmd.arg(path).output()?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        return Err(format!("b3sum failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(Some((elapsed, child_cpu_secs() - c)))
}

/// Fields of /proc/self/stat after the command name, as numbers.
fn stat_fields() -> Vec<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect()
}

/// CPU seconds (user + system) this process has used so far, from /proc (0 elsewhere).
fn cpu_secs() -> f64 {
    // utime and stime are the 12th and 13th fields after the command name.
    stat_fields().iter().skip(11).take(2).sum::<f64>() / 100.0
}

/// CPU seconds used by waited-for children (cutime + cstime).
fn child_cpu_secs() -> f64 {
    stat_fields().iter().skip(13).take(2).sum::<f64>() / 100.0
}

fn mbps(size: u64, d: Duration) -> f64 {
    size as f64 / 1e6 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Res<()> {
    let mib: u64 = std::env::var("TUNENET_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let dir = tempfile::tempdir()?;
    let src = match std::env::var_os("TUNENET_BENCH_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let p = dir.path().join("src.bin");
            write_file(&p, size)?;
            p
        }
    };
    let size = std::fs::metadata(&src)?.len();
    let mib = size >> 20;
    // Warm the page cache so that every contender reads from memory.
    hash_file(&src)?;

    let c0 = cpu_secs();
    let hash = hash_file(&src)?;
    let c1 = cpu_secs();
    let tcp = raw_tcp(&src, &dir.path().join("tcp.bin")).await?;
    let c2 = cpu_secs();
    std::fs::remove_file(dir.path().join("tcp.bin"))?;
    let (p2p_tcp, cpu_tcp) =
        libp2p_fetch(&src, &dir.path().join("p2p-tcp"), "/ip4/127.0.0.1/tcp/0").await?;
    std::fs::remove_dir_all(dir.path().join("p2p-tcp"))?;
    let (p2p_quic, cpu_quic) = libp2p_fetch(
        &src,
        &dir.path().join("p2p-quic"),
        "/ip4/127.0.0.1/udp/0/quic-v1",
    )
    .await?;
    std::fs::remove_dir_all(dir.path().join("p2p-quic"))?;
    let (grpc, cpu_grpc) = grpc_download(&src, &dir.path().join("grpc")).await?;
    std::fs::remove_dir_all(dir.path().join("grpc"))?;
    let b3 = b3sum(&src, None)?;
    let b3_one = b3sum(&src, Some(1))?;

    println!(
        "size: {mib} MiB, cores: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<36} {:>8} {:>11} {:>9} {:>10} {:>11}",
        "contender", "MB/s", "vs raw TCP", "vs b3sum", "CPU s/GiB", "CPU vs TCP"
    );
    let gib = size as f64 / (1u64 << 30) as f64;
    let tcp_cpu = c2 - c1;
    let mut rows = vec![
        ("blake3 (1 thread, from page cache)", hash, c1 - c0),
        ("raw TCP copy to disk", tcp, tcp_cpu),
        ("libp2p blob fetch, TCP+noise+yamux", p2p_tcp, cpu_tcp),
        ("libp2p blob fetch, QUIC", p2p_quic, cpu_quic),
        ("gRPC download (HTTP/2, no TLS)", grpc, cpu_grpc),
    ];
    if let Some((d, cpu)) = b3 {
        rows.push(("b3sum (default: mmap, all cores)", d, cpu));
    }
    if let Some((d, cpu)) = b3_one {
        rows.push(("b3sum --num-threads 1", d, cpu));
    }
    for (name, d, cpu) in rows {
        let vs_b3 = b3.map_or(String::from("-"), |(b, _)| {
            format!("{:.2}", b.as_secs_f64() / d.as_secs_f64())
        });
        println!(
            "{name:<36} {:>8.0} {:>11.2} {:>9} {:>10.2} {:>11.2}",
            mbps(size, d),
            tcp.as_secs_f64() / d.as_secs_f64(),
            vs_b3,
            cpu / gib,
            cpu / tcp_cpu.max(0.01),
        );
    }
    println!("(CPU s/GiB: CPU seconds per GiB, both ends together; b3sum: its own)");
    Ok(())
}
