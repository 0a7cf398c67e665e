//! A small local hub for tests: serves a directory tree as model and dataset repositories.
//!
//! Layout under `root` (see [`add_commit`] and [`set_ref`] to build it):
//!
//! ```text
//! root/models/<owner>/<name>/<commit>/<files...>     one directory per commit (40 hex)
//! root/models/<owner>/<name>/refs.json               {"main": "<commit>", ...}
//! root/datasets/<owner>/<name>/...                   the same for datasets
//! ```
//!
//! The tree is read on every request, so a test may change files or move refs while the
//! server runs (to play a branch moving, or a server that lies about a commit). It answers,
//! as the hub's client needs:
//!
//! - `GET /api/{models|datasets}/{owner}/{name}/revision/{rev}`: JSON
//!   `{"id", "sha", "siblings": [{"rfilename"}]}`;
//! - `GET|HEAD /{owner}/{name}/resolve/{rev}/{path}` (models) and
//!   `/datasets/{owner}/{name}/resolve/{rev}/{path}`: the file, with `x-repo-commit`,
//!   `etag` (the blake3 of the bytes, quoted), `accept-ranges`, and for a `Range: bytes=…`
//!   request a `206` with `content-range: bytes start-end/size`;
//! - `404` with an `x-error-code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) for
//!   anything unknown, and `401` for every request without `Authorization: Bearer <token>`
//!   when started with [`serve_with_token`].
//!
//! `{rev}` is a ref name from `refs.json` (with `/` escaped as `%2F`) or a commit. Every
//! request is recorded ([`TestServer::requests`]). The server runs on its own thread and
//! runtime, so it works from plain and async tests alike, and stops when dropped. If an
//! HTTP proxy is configured in the environment, exempt `127.0.0.1` through `NO_PROXY`.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;

use crate::RepoKind;
use crate::id::is_commit_hash;

/// A request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path as sent (still percent-encoded).
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

/// A running test server; stops when dropped.
pub struct TestServer {
    endpoint: String,
    state: Arc<ServerState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct ServerState {
    root: PathBuf,
    token: Option<String>,
    requests: Mutex<Vec<SeenRequest>>,
}

/// Serves `root` (see the [module docs](self)) on `127.0.0.1` at a free port. Returns the
/// endpoint (`http://127.0.0.1:PORT`) and the server handle.
///
/// # Panics
/// If no local port can be bound or the server thread cannot start (this is test support).
pub fn serve(root: PathBuf) -> (String, TestServer) {
    start(root, None)
}

/// As [`serve`], but every request must carry `Authorization: Bearer <token>`; others get
/// `401`.
pub fn serve_with_token(root: PathBuf, token: &str) -> (String, TestServer) {
    start(root, Some(token.to_string()))
}

fn start(root: PathBuf, token: Option<String>) -> (String, TestServer) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    listener
        .set_nonblocking(true)
        .expect("make the listener non-blocking");
    let endpoint = format!(
        "http://{}",
        listener.local_addr().expect("listener address")
    );
    let state = Arc::new(ServerState {
        root,
        token,
        requests: Mutex::new(Vec::new()),
    });
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = Router::new()
        .fallback(handle)
        .with_state(Arc::clone(&state));
    let thread = std::thread::Builder::new()
        .name("hub-testserver".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("test server runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("register the listener");
                tokio::select! {
                    _ = axum::serve(listener, app).into_future() => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here cancels open connections.
        })
        .expect("spawn the test server thread");
    let server = TestServer {
        endpoint: endpoint.clone(),
        state,
        shutdown: Some(shutdown),
        thread: Some(thread),
    };
    (endpoint, server)
}

impl TestServer {
    /// The endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The directory being served.
    pub fn root(&self) -> &Path {
        &self.state.root
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The directory of a repository under a served root: `root/<kind>s/<owner>/<name>`.
pub fn repo_dir(root: &Path, kind: RepoKind, repo: &str) -> PathBuf {
    root.join(kind.plural()).join(repo)
}

/// Writes `files` (repository path → bytes) as commit `commit` of `repo` (`owner/name`).
/// Existing files of that commit are overwritten, others kept.
pub fn add_commit(
    root: &Path,
    kind: RepoKind,
    repo: &str,
    commit: &str,
    files: &[(&str, &[u8])],
) -> io::Result<()> {
    let dir = repo_dir(root, kind, repo).join(commit);
    for (path, bytes) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    std::fs::create_dir_all(dir)
}

/// Points `revision` of `repo` at `commit` in its `refs.json`.
pub fn set_ref(
    root: &Path,
    kind: RepoKind,
    repo: &str,
    revision: &str,
    commit: &str,
) -> io::Result<()> {
    let dir = repo_dir(root, kind, repo);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("refs.json");
    let mut refs = read_refs(&path);
    refs.insert(revision.to_string(), commit.to_string());
    let json = serde_json::to_vec_pretty(&refs).map_err(io::Error::other)?;
    std::fs::write(path, json)
}

/// A deterministic 40-hex commit id derived from `seed`, for building test repositories.
pub fn commit_id(seed: &str) -> String {
    blake3::hash(seed.as_bytes()).to_hex()[..40].to_string()
}

fn read_refs(path: &Path) -> BTreeMap<String, String> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let header_str = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let authorization = header_str(header::AUTHORIZATION);
    let range = header_str(header::RANGE);
    state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(SeenRequest {
            method: method.to_string(),
            path: uri.path().to_string(),
            authorization: authorization.clone(),
            range: range.clone(),
        });

    if let Some(token) = &state.token
        && authorization.as_deref() != Some(format!("Bearer {token}").as_str())
    {
        return error(StatusCode::UNAUTHORIZED, "", "Invalid credentials");
    }
    if method != Method::GET && method != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "", "Only GET and HEAD");
    }
    let Some(segments) = uri
        .path()
        .strip_prefix('/')
        .unwrap_or_default()
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<String>>>()
    else {
        return not_found("", "Bad path encoding");
    };
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["api", plural, owner, name, "revision", rev @ ..] if !rev.is_empty() => {
            let kind = match *plural {
                "models" => RepoKind::Model,
                "datasets" => RepoKind::Dataset,
                _ => return not_found("RepoNotFound", "Unknown repository type"),
            };
            state.info(kind, owner, name, &rev.join("/"))
        }
        ["datasets", owner, name, "resolve", rev, path @ ..] if !path.is_empty() => {
            state.file(RepoKind::Dataset, owner, name, rev, path, range.as_deref())
        }
        [owner, name, "resolve", rev, path @ ..] if !path.is_empty() => {
            state.file(RepoKind::Model, owner, name, rev, path, range.as_deref())
        }
        _ => not_found("", "Not found"),
    }
}

impl ServerState {
    /// The commit directory and hash that `rev` names in a repository, or the 404's
    /// `x-error-code`.
    fn resolve(
        &self,
        kind: RepoKind,
        owner: &str,
        name: &str,
        rev: &str,
    ) -> Result<(PathBuf, String), &'static str> {
        if !safe_segment(owner) || !safe_segment(name) {
            return Err("RepoNotFound");
        }
        let dir = repo_dir(&self.root, kind, &format!("{owner}/{name}"));
        if !dir.is_dir() {
            return Err("RepoNotFound");
        }
        let commit = if is_commit_hash(rev) && dir.join(rev).is_dir() {
            rev.to_string()
        } else {
            match read_refs(&dir.join("refs.json")).remove(rev) {
                Some(commit) if is_commit_hash(&commit) => commit,
                _ => return Err("RevisionNotFound"),
            }
        };
        let commit_dir = dir.join(&commit);
        if !commit_dir.is_dir() {
            return Err("RevisionNotFound");
        }
        Ok((commit_dir, commit))
    }

    fn info(&self, kind: RepoKind, owner: &str, name: &str, rev: &str) -> Response {
        let (dir, commit) = match self.resolve(kind, owner, name, rev) {
            Ok(found) => found,
            Err(code) => return not_found(code, "Repository or revision not found"),
        };
        let mut files = Vec::new();
        list(&dir, "", &mut files);
        files.sort();
        let body = serde_json::json!({
            "id": format!("{owner}/{name}"),
            "sha": commit,
            "siblings": files
                .iter()
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect::<Vec<_>>(),
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap_or_else(|_| internal())
    }

    fn file(
        &self,
        kind: RepoKind,
        owner: &str,
        name: &str,
        rev: &str,
        path: &[&str],
        range: Option<&str>,
    ) -> Response {
        let (dir, commit) = match self.resolve(kind, owner, name, rev) {
            Ok(found) => found,
            Err(code) => return not_found(code, "Repository or revision not found"),
        };
        if !path.iter().all(|seg| safe_segment(seg)) {
            return not_found("EntryNotFound", "Entry not found");
        }
        let file = path.iter().fold(dir, |p, seg| p.join(seg));
        let bytes = match std::fs::read(&file) {
            Ok(bytes) if file.is_file() => bytes,
            _ => return not_found("EntryNotFound", "Entry not found"),
        };
        let size = bytes.len();
        let etag = format!("\"{}\"", blake3::hash(&bytes).to_hex());
        let builder = Response::builder()
            .header("x-repo-commit", &commit)
            .header(header::ETAG, etag)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CONTENT_TYPE, "application/octet-stream");
        let response = match range.map(|r| parse_range(r, size)) {
            Some(RangeAnswer::Bytes(start, end)) => builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
                .body(Body::from(bytes[start..=end].to_vec())),
            Some(RangeAnswer::Unsatisfiable) => builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty()),
            // An empty file has no satisfiable range; answer it whole, with its size.
            Some(RangeAnswer::Empty) => builder
                .status(StatusCode::OK)
                .header(header::CONTENT_RANGE, "bytes */0")
                .body(Body::empty()),
            Some(RangeAnswer::Ignore) | None => {
                builder.status(StatusCode::OK).body(Body::from(bytes))
            }
        };
        response.unwrap_or_else(|_| internal())
    }
}

/// How to answer a `Range` header.
#[derive(Debug, PartialEq, Eq)]
enum RangeAnswer {
    /// Send bytes `start..=end`.
    Bytes(usize, usize),
    /// `416`.
    Unsatisfiable,
    /// Not a single byte range this server understands: send the whole file.
    Ignore,
    /// The file is empty: send it (nothing) whole, with its size in `content-range`.
    Empty,
}

/// Parses `bytes=start-end`, `bytes=start-` and `bytes=-suffix` against a file of `size`.
fn parse_range(range: &str, size: usize) -> RangeAnswer {
    if size == 0 {
        return RangeAnswer::Empty;
    }
    let Some((start, end)) = range
        .trim()
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
    else {
        return RangeAnswer::Ignore;
    };
    let (start, end) = (start.trim(), end.trim());
    let last = size - 1;
    match (start.parse::<usize>(), end.parse::<usize>()) {
        _ if start.is_empty() && end.is_empty() => RangeAnswer::Ignore,
        (Err(_), Ok(suffix)) if start.is_empty() => {
            if suffix == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Bytes(size.saturating_sub(suffix), last)
            }
        }
        (Ok(start), _) if start > last => RangeAnswer::Unsatisfiable,
        (Ok(start), Ok(end)) if end >= start => RangeAnswer::Bytes(start, end.min(last)),
        (Ok(start), Err(_)) if end.is_empty() => RangeAnswer::Bytes(start, last),
        _ => RangeAnswer::Ignore,
    }
}

/// Lists the files under `dir` as `/`-separated relative paths.
fn list(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() {
            list(&path, &format!("{prefix}{name}/"), out);
        } else if path.is_file() {
            out.push(format!("{prefix}{name}"));
        }
    }
}

/// A path segment that stays inside its directory.
fn safe_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::json!({ "error": message }).to_string(),
        ))
        .unwrap_or_else(|_| internal());
    if let Ok(code) = HeaderValue::from_str(code)
        && !code.is_empty()
    {
        response.headers_mut().insert("x-error-code", code);
    }
    response
}

fn not_found(code: &str, message: &str) -> Response {
    error(StatusCode::NOT_FOUND, code, message)
}

fn internal() -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(parse_range("bytes=0-0", 10), Bytes(0, 0));
        assert_eq!(parse_range("bytes=3-", 10), Bytes(3, 9));
        assert_eq!(parse_range("bytes=3-100", 10), Bytes(3, 9));
        assert_eq!(parse_range("bytes=-4", 10), Bytes(6, 9));
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 10), Ignore);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), Ignore);
        assert_eq!(parse_range("items=0-1", 10), Ignore);
        assert_eq!(parse_range("bytes=0-0", 0), Empty);
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("refs%2Fpr%2F5").unwrap(), "refs/pr/5");
        assert_eq!(percent_decode("a%2").as_deref(), None);
        assert_eq!(percent_decode("plain").unwrap(), "plain");
    }
}
