//! What the end-to-end test binaries share: the real binary as a daemon, free ports.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tunenet");

/// The repository root at run time (cargo sets `CARGO_MANIFEST_DIR`), the compiled-in path
/// only as a fallback: a build cache shared between two checkouts can run a binary built in
/// the other.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A `tunenet` child process with its output in a log file; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `tunenet ARGS`, logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> Daemon {
        Daemon::start_env(args, log, &[])
    }

    /// Starts `tunenet ARGS` with extra environment variables, logging to `log`.
    pub fn start_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Daemon {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port.
pub fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tiny model (seeded) and a demo dataset of `records` records under `root`.
pub fn tiny_model_and_data(
    root: &Path,
    model_seed: u64,
    records: usize,
    data_seed: u64,
) -> (PathBuf, PathBuf) {
    let model = root.join("model");
    tunenet_ml::init_tiny(&model, model_seed).unwrap();
    let data = root.join("data.jsonl");
    std::fs::write(
        &data,
        tunenet_ml::to_jsonl(&tunenet_ml::demo_dataset(records, data_seed)),
    )
    .unwrap();
    (model, data)
}

/// Runs `tunenet validator --config CONF init` and returns the first admin token it prints.
pub fn admin_token(conf: &Path) -> String {
    tunenet_node::wire_redteam::admin_token(Path::new(BIN), conf).unwrap()
}

/// A small tmpfs mounted at a directory, unmounted when dropped: a disk a test can fill.
/// Mounting needs root; the error says why it could not.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    /// Writes a file until the disk is full; remove it to free the space.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write(&[7u8; 4096]).map(|n| n > 0).unwrap_or(false) {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Starts a miner daemon named `name` under `root` (its data dir, config and log there) on
/// a free port, with `training` as its `[training]` table's lines. Returns the daemon and
/// its gRPC URL.
pub fn miner_daemon(root: &Path, name: &str, training: &str) -> (Daemon, String) {
    let p = port();
    let conf = root.join(format!("{name}.toml"));
    std::fs::write(
        &conf,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{p}\"\n[training]\n{training}",
            root.join(name)
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &["miner", "--config", conf.to_str().unwrap()],
        &root.join(format!("{name}.log")),
    );
    (d, format!("http://127.0.0.1:{p}"))
}

/// Writes validator config `text` as `root/name.toml`, issues its first admin token (before
/// the daemon holds the store) and starts the daemon, logging to `root/name.log`.
pub fn validator_daemon(root: &Path, name: &str, text: &str) -> (Daemon, String) {
    let conf = root.join(format!("{name}.toml"));
    std::fs::write(&conf, text).unwrap();
    let admin = admin_token(&conf);
    let d = Daemon::start(
        &["validator", "--config", conf.to_str().unwrap()],
        &root.join(format!("{name}.log")),
    );
    (d, admin)
}

/// Loads `url` in headless Chromium and returns the rendered DOM, saving a screenshot as
/// `web-screenshots/<name>.png` under cargo's test scratch directory. Without Chromium
/// it says so and returns None, unless `TUNENET_REQUIRE_BROWSER` is set (CI sets it where
/// Chromium is installed), where it fails.
pub fn browser_dom(url: &str, name: &str) -> Option<String> {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(bin) = bin else {
        assert!(
            std::env::var_os("TUNENET_REQUIRE_BROWSER").is_none(),
            "TUNENET_REQUIRE_BROWSER is set but no chromium is installed"
        );
        eprintln!("skipped the browser checks: no chromium (Debian: apt-get install chromium)");
        return None;
    };
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        "--timeout=10000",
    ];
    let shot = Command::new(bin)
        .args(common)
        .arg(format!(
            "--screenshot={}",
            shots.join(format!("{name}.png")).display()
        ))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "chromium could not screenshot {url}: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let out = Command::new(bin)
        .args(common)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium could not load {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8(out.stdout).unwrap();
    assert!(dom.contains("</main>"), "{url} rendered no page: {dom}");
    Some(dom)
}
