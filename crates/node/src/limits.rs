//! Abuse limits on a daemon's gRPC server, per remote address: connections open at once,
//! requests a second (a token bucket), HTTP/2 streams and header sizes, and failed console
//! logins. Each refusal says which limit was crossed; honest peers at other addresses are
//! served as before. Message sizes are bounded by `tunenet_rpc::MAX_MESSAGE`.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tower_service::Service;

/// `[limits]` in a miner's or validator's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// gRPC requests one remote address may make a second, on average (0: no limit).
    pub requests_per_sec: f64,
    /// Requests one address may make in a burst above that average.
    pub burst: u32,
    /// Connections one address may hold open at once (0: no limit).
    pub connections_per_addr: u32,
    /// Connections open at once from everyone (0: no limit).
    pub connections: u32,
    /// Calls in flight at once on one connection (HTTP/2 streams).
    pub streams_per_connection: u32,
    /// Largest request header block, bytes.
    pub max_header_bytes: u32,
    /// Failed console logins (bad or missing token) one address may make in
    /// `login_window_secs` before it is refused until the window has passed.
    pub failed_logins: u32,
    /// The window for `failed_logins`, seconds.
    pub login_window_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests_per_sec: 500.0,
            burst: 1000,
            connections_per_addr: 64,
            connections: 4096,
            streams_per_connection: 128,
            max_header_bytes: 16 * 1024,
            failed_logins: 10,
            login_window_secs: 60,
        }
    }
}

impl Limits {
    /// No per-address limits (for load benchmarks and in-process test servers); header
    /// and stream bounds stay.
    pub fn none() -> Self {
        Limits {
            requests_per_sec: 0.0,
            connections_per_addr: 0,
            connections: 0,
            failed_logins: 0,
            ..Limits::default()
        }
    }

    /// A server builder with this config's HTTP/2 bounds.
    pub fn builder(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.streams_per_connection.max(1)))
            .http2_max_header_list_size(Some(self.max_header_bytes.max(1024)))
    }
}

/// A daemon's gRPC server builder with TLS when both `cert` and `key` (PEM files) are set:
/// the key must be the owner's alone, and the pair must load.
pub fn with_tls(
    builder: tonic::transport::Server,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<tonic::transport::Server, crate::error::NodeError> {
    use crate::error::NodeError;
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => return Ok(builder),
        _ => {
            return Err(NodeError::Other(
                "set both `tls_cert` and `tls_key`, or neither".into(),
            ));
        }
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| NodeError::Other(format!("cannot read TLS file {}: {e}", p.display())))
    };
    // The TLS private key, like the node key, must be the owner's alone.
    crate::keys::check_private(key)?;
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    builder
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .map_err(|e| {
            NodeError::Other(format!(
                "`tls_cert`/`tls_key` are not a usable PEM pair: {e}"
            ))
        })
}

/// Addresses a login throttle remembers at most; past it, idle ones are forgotten.
const MAX_TRACKED: usize = 65_536;

/// A token bucket per remote address (see [`tunenet_p2p::RateBuckets`]).
pub type RequestBuckets = tunenet_p2p::RateBuckets<IpAddr>;

/// The request buckets for `limits`, shared by a server's services; none when its rate
/// is 0.
pub fn request_buckets(limits: &Limits) -> Option<Arc<RequestBuckets>> {
    RequestBuckets::new(limits.requests_per_sec, limits.burst).map(Arc::new)
}

/// The remote address of a request, over plain TCP or TLS.
pub fn remote_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let plain = req
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr());
    let tls = || {
        req.extensions()
            .get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
    };
    plain.or_else(tls).map(|a| a.ip())
}

/// A gRPC service whose callers are held to a request rate per address.
#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    buckets: Option<Arc<RequestBuckets>>,
}

/// Wraps `svc` so that each remote address is held to `buckets` (shared by every service
/// of a server, so the limit is per address, not per service).
pub fn rate_limited<S>(svc: S, buckets: &Option<Arc<RequestBuckets>>) -> RateLimited<S> {
    RateLimited {
        inner: svc,
        buckets: buckets.clone(),
    }
}

impl<S: NamedService> NamedService for RateLimited<S> {
    const NAME: &'static str = S::NAME;
}

type Body = tonic::body::Body;

impl<S> Service<http::Request<Body>> for RateLimited<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<Body>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if let (Some(b), Some(ip)) = (&self.buckets, remote_ip(&req))
            && !b.allow(&ip)
        {
            metrics::counter!("tunenet_requests_refused_total", "limit" => "rate").increment(1);
            tracing::debug!(%ip, "request refused: over the rate limit");
            let status = tonic::Status::resource_exhausted(format!(
                "{ip} is over this node's limit of {} requests a second (burst {}); slow down",
                b.rate(),
                b.burst()
            ));
            return futures::future::Either::Right(std::future::ready(Ok(status.into_http())));
        }
        futures::future::Either::Left(self.inner.call(req))
    }
}

/// Open connections, per address and in all.
#[derive(Default)]
struct ConnCounts {
    by_ip: HashMap<IpAddr, u32>,
    total: u32,
}

/// An accepted connection, counted until it closes.
pub struct Counted {
    inner: tokio::net::TcpStream,
    ip: IpAddr,
    counts: Arc<Mutex<ConnCounts>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connections a server takes: TCP_NODELAY and keepalive on each (tonic applies its
/// own `tcp_nodelay` only to listeners it binds itself: without it a small answer waits
/// on the peer's delayed ACK, a ~40 ms tail), and closed at once past the per-address or
/// total limit.
pub fn incoming(
    listener: tokio::net::TcpListener,
    limits: &Limits,
) -> impl futures::Stream<Item = std::io::Result<Counted>> + Send + 'static {
    use futures::StreamExt;
    let accepted = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let counts: Arc<Mutex<ConnCounts>> = Default::default();
    let (per_ip, total) = (limits.connections_per_addr, limits.connections);
    accepted.filter_map(move |s| {
        let counts = counts.clone();
        async move {
            let s = match s {
                Ok(s) => s,
                // An accept error (out of file descriptors, say) is not the server's end.
                Err(e) => {
                    tracing::warn!(error = %e, "could not accept a connection");
                    return None;
                }
            };
            let ip = s.peer_addr().map(|a| a.ip()).ok()?;
            {
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                let mine = c.by_ip.get(&ip).copied().unwrap_or(0);
                if (total > 0 && c.total >= total) || (per_ip > 0 && mine >= per_ip) {
                    metrics::counter!("tunenet_connections_refused_total").increment(1);
                    tracing::debug!(%ip, open = mine, "connection refused: over the limit");
                    return None;
                }
                c.total += 1;
                *c.by_ip.entry(ip).or_default() += 1;
            }
            Some(Ok(Counted {
                inner: s,
                ip,
                counts,
            }))
        }
    })
}

/// Failed console logins per address, to refuse an address that guesses tokens.
pub struct LoginThrottle {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl LoginThrottle {
    /// A throttle for `limits` (none when `failed_logins` is 0).
    pub fn new(limits: &Limits) -> Option<Arc<Self>> {
        (limits.failed_logins > 0).then(|| {
            Arc::new(LoginThrottle {
                max: limits.failed_logins,
                window: Duration::from_secs(limits.login_window_secs.max(1)),
                failures: Mutex::new(HashMap::new()),
            })
        })
    }

    fn recent(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = m.get_mut(&ip) else { return 0 };
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            q.pop_front();
        }
        let n = q.len() as u32;
        if n == 0 {
            m.remove(&ip);
        }
        n
    }

    /// Refuses `ip` while it has used up its failed logins; says for how long.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let now = Instant::now();
        if self.recent(ip, now) < self.max {
            return Ok(());
        }
        let m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let wait = m
            .get(&ip)
            .and_then(|q| q.front())
            .map(|t| self.window.saturating_sub(now.duration_since(*t)))
            .unwrap_or(self.window);
        Err(format!(
            "{ip} made {} failed logins within {} s; try again in {} s",
            self.max,
            self.window.as_secs(),
            wait.as_secs().max(1)
        ))
    }

    /// Counts a failed login from `ip`; returns whether this one used up its allowance.
    pub fn failed(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let n = self.recent(ip, now);
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_TRACKED && !m.contains_key(&ip) {
            let window = self.window;
            m.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) <= window));
        }
        m.entry(ip).or_default().push_back(now);
        n + 1 == self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let b = request_buckets(&Limits {
            requests_per_sec: 50.0,
            burst: 5,
            ..Limits::default()
        })
        .unwrap();
        let (a, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!((0..5).filter(|_| b.allow(&a)).count(), 5);
        assert!(!b.allow(&a));
        assert!(b.allow(&other), "another address has its own bucket");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(&a), "refilled at 50 a second");
        assert!(request_buckets(&Limits::none()).is_none());
    }

    #[test]
    fn failed_logins_lock_an_address_out_for_the_window() {
        let t = LoginThrottle::new(&Limits {
            failed_logins: 3,
            login_window_secs: 1,
            ..Limits::default()
        })
        .unwrap();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(!t.failed(ip));
        assert!(!t.failed(ip));
        assert!(t.check(ip).is_ok());
        assert!(t.failed(ip), "the third uses up the allowance");
        let e = t.check(ip).unwrap_err();
        assert!(e.contains("3 failed logins within 1 s"), "{e}");
        assert!(t.check("10.0.0.8".parse().unwrap()).is_ok());
        std::thread::sleep(Duration::from_millis(1100));
        assert!(t.check(ip).is_ok(), "the window passed");
    }
}
