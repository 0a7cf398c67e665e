//! `tunenet-linkem`: a user-space link emulator for tunenet's multi-host tests.
//!
//! Where the kernel has no `netem` qdisc (nor the `gact` action or `iptables` that could
//! drop packets), `scripts/netns-net.sh` still needs wide-area links between its network
//! namespaces. This program is the switch between them: it creates one TAP device per
//! node (the script moves each into its node's namespace), forwards Ethernet frames
//! between them like a learning switch, and shapes each node's link in both directions
//! as netem would: a fixed delay, random loss, a rate (frames queue behind each other at
//! the link's speed) and a queue limit in frames. A frame from node A to node B crosses
//! A's link and then B's, so a path's one-way delay is the sum of both links' delays.
//!
//! A link is cut while the file `<control>/<name>.down` exists: every frame to or from it
//! is dropped in the middle of the path, as with a cable pulled between two hosts (the
//! nodes' own interfaces stay up and learn of it only by silence).
//!
//! ```text
//! tunenet-linkem [--delay 25ms] [--loss 0.5] [--rate 100mbit] [--limit 1000] [--seed N]
//!                [--control DIR] [--ready FILE] [--stats FILE] NAME[,rate=R][,delay=D][,loss=P]...
//! ```
//!
//! It writes the TAP names to `--ready` once they exist, runs until SIGINT or SIGTERM,
//! then writes per-link counters (frames and bytes each way, frames lost at random,
//! dropped by a cut or a full queue) to `--stats` and to standard error.

#[cfg(target_os = "linux")]
fn main() {
    if let Err(e) = linux::run(std::env::args().skip(1).collect()) {
        eprintln!("tunenet-linkem: {e}");
        std::process::exit(2);
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("tunenet-linkem: TAP devices and network namespaces are Linux only");
    std::process::exit(2);
}

/// Link settings and their parsing: plain code, tested on every platform.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
mod spec {
    use std::time::Duration;

    #[derive(Clone, Debug, PartialEq)]
    pub struct Shape {
        pub delay: Duration,
        /// Probability in [0, 1] that a frame is lost on this link, each direction.
        pub loss: f64,
        /// Bits per second; 0: unlimited.
        pub rate_bps: u64,
        /// Frames queued or in flight on the link, each direction, past which it drops.
        pub limit: usize,
    }

    impl Default for Shape {
        fn default() -> Shape {
            Shape {
                delay: Duration::ZERO,
                loss: 0.0,
                rate_bps: 0,
                limit: 1000,
            }
        }
    }

    impl Shape {
        /// How long `bytes` take to leave at the link's rate.
        pub fn serialise(&self, bytes: usize) -> Duration {
            if self.rate_bps == 0 {
                return Duration::ZERO;
            }
            Duration::from_nanos((bytes as u128 * 8 * 1_000_000_000 / self.rate_bps as u128) as u64)
        }

        /// Applies one `key=value` setting.
        pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
            match key {
                "delay" => self.delay = duration(value)?,
                "loss" => self.loss = percent(value)?,
                "rate" => self.rate_bps = rate(value)?,
                "limit" => {
                    self.limit = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("limit {value:?}: expected a number of frames > 0")
                    })?
                }
                _ => {
                    return Err(format!(
                        "unknown link setting {key:?} (known: delay, loss, rate, limit)"
                    ));
                }
            }
            Ok(())
        }
    }

    /// `25ms`, `1.5s`, `800us`, `0`.
    pub fn duration(s: &str) -> Result<Duration, String> {
        let bad = || format!("duration {s:?}: expected e.g. 25ms, 1.5s or 800us");
        let (num, unit) = split_unit(s);
        let v: f64 = num.parse().map_err(|_| bad())?;
        let secs = match unit {
            "s" => v,
            "ms" => v / 1e3,
            "us" => v / 1e6,
            "" if v == 0.0 => 0.0,
            _ => return Err(bad()),
        };
        if !(0.0..=3600.0).contains(&secs) {
            return Err(bad());
        }
        Ok(Duration::from_secs_f64(secs))
    }

    /// `1` or `1%` (percent), `0.5`.
    pub fn percent(s: &str) -> Result<f64, String> {
        let v: f64 = s
            .trim_end_matches('%')
            .parse()
            .map_err(|_| format!("loss {s:?}: expected a percentage such as 1 or 0.5%"))?;
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("loss {s:?}: a percentage is between 0 and 100"));
        }
        Ok(v / 100.0)
    }

    /// `100mbit`, `1mbit`, `512kbit`, `1gbit`, `9600bit`, `0` (unlimited).
    pub fn rate(s: &str) -> Result<u64, String> {
        let bad = || format!("rate {s:?}: expected e.g. 100mbit, 512kbit or 1gbit");
        let (num, unit) = split_unit(s);
        let v: f64 = num.parse().map_err(|_| bad())?;
        let scale = match unit {
            "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "" if v == 0.0 => 0.0,
            _ => return Err(bad()),
        };
        if !(0.0..=1e12).contains(&(v * scale)) || (v > 0.0 && v * scale < 1.0) {
            return Err(bad());
        }
        Ok((v * scale) as u64)
    }

    fn split_unit(s: &str) -> (&str, &str) {
        let at = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        s.split_at(at)
    }

    #[derive(Debug, PartialEq)]
    pub struct Args {
        pub links: Vec<(String, Shape)>,
        pub control: Option<String>,
        pub ready: Option<String>,
        pub stats: Option<String>,
        pub seed: u64,
    }

    pub fn parse(args: Vec<String>) -> Result<Args, String> {
        let mut base = Shape::default();
        let mut names: Vec<String> = Vec::new();
        let (mut control, mut ready, mut stats, mut seed) = (None, None, None, 0x7E57_11E4);
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| it.next().ok_or_else(|| format!("{flag} needs a value"));
            match a.as_str() {
                "--delay" => base.set("delay", &value("--delay")?)?,
                "--loss" => base.set("loss", &value("--loss")?)?,
                "--rate" => base.set("rate", &value("--rate")?)?,
                "--limit" => base.set("limit", &value("--limit")?)?,
                "--control" => control = Some(value("--control")?),
                "--ready" => ready = Some(value("--ready")?),
                "--stats" => stats = Some(value("--stats")?),
                "--seed" => {
                    let v = value("--seed")?;
                    seed = v
                        .parse()
                        .map_err(|_| format!("--seed {v:?}: expected an integer"))?
                }
                flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}")),
                _ => names.push(a),
            }
        }
        if names.len() < 2 {
            return Err("give at least two links (TAP names) to join".into());
        }
        let mut links = Vec::new();
        for spec in names {
            let mut parts = spec.split(',');
            let name = parts.next().unwrap_or_default().to_string();
            if name.is_empty() || name.len() > 15 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "link name {name:?}: an interface name is 1-15 printable characters"
                ));
            }
            if links.iter().any(|(n, _)| *n == name) {
                return Err(format!("link {name} is named twice"));
            }
            let mut shape = base.clone();
            for kv in parts {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("{spec}: settings are key=value, got {kv:?}"))?;
                shape.set(k, v).map_err(|e| format!("{name}: {e}"))?;
            }
            links.push((name, shape));
        }
        Ok(Args {
            links,
            control,
            ready,
            stats,
            seed,
        })
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::spec::{self, Shape};
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    static STOP: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }

    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    /// How often the control directory is looked at.
    const CONTROL_EVERY: Duration = Duration::from_millis(50);

    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }

    fn open_tap(name: &str) -> Result<File, String> {
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(format!(
                "cannot open /dev/net/tun: {} (root and the tun module are needed)",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd was just opened and is owned by the File from here on.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(format!(
                "cannot create TAP device {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(file)
    }

    /// One direction of one link: frames queue at its rate, then travel its delay.
    #[derive(Default)]
    struct Dir {
        /// When the last frame queued finishes leaving.
        free: Option<Instant>,
        /// Frames queued or travelling.
        queued: usize,
        frames: u64,
        bytes: u64,
        lost: u64,
        cut: u64,
        full: u64,
    }

    impl Dir {
        /// When a frame entering at `at` arrives at the far end, or None if it is dropped.
        fn admit(
            &mut self,
            shape: &Shape,
            at: Instant,
            len: usize,
            rng: &mut Rng,
            cut: bool,
        ) -> Option<Instant> {
            if cut {
                self.cut += 1;
                return None;
            }
            if shape.loss > 0.0 && rng.unit() < shape.loss {
                self.lost += 1;
                return None;
            }
            if self.queued >= shape.limit {
                self.full += 1;
                return None;
            }
            let start = self.free.map_or(at, |f| f.max(at));
            let left = start + shape.serialise(len);
            self.free = Some(left);
            self.queued += 1;
            self.frames += 1;
            self.bytes += len as u64;
            Some(left + shape.delay)
        }
    }

    struct Link {
        name: String,
        shape: Shape,
        tap: File,
        down_file: Option<PathBuf>,
        cut: bool,
        /// From the node to the switch, and from the switch to the node.
        up: Dir,
        down: Dir,
    }

    /// xorshift64*: reproducible loss for a given seed.
    struct Rng(u64);

    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    enum Step {
        /// A frame from link `from` reaches the switch.
        AtSwitch { from: usize },
        /// A frame reaches link `to`'s node.
        AtNode { to: usize },
    }

    struct Event {
        at: Instant,
        seq: u64,
        step: Step,
        frame: Vec<u8>,
    }

    impl PartialEq for Event {
        fn eq(&self, o: &Event) -> bool {
            (self.at, self.seq) == (o.at, o.seq)
        }
    }
    impl Eq for Event {}
    impl PartialOrd for Event {
        fn partial_cmp(&self, o: &Event) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Event {
        fn cmp(&self, o: &Event) -> std::cmp::Ordering {
            (self.at, self.seq).cmp(&(o.at, o.seq))
        }
    }

    pub fn run(args: Vec<String>) -> Result<(), String> {
        let args = spec::parse(args)?;
        let mut links = Vec::new();
        for (name, shape) in &args.links {
            links.push(Link {
                name: name.clone(),
                shape: shape.clone(),
                tap: open_tap(name)?,
                down_file: args
                    .control
                    .as_ref()
                    .map(|d| PathBuf::from(d).join(format!("{name}.down"))),
                cut: false,
                up: Dir::default(),
                down: Dir::default(),
            });
        }
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
        if let Some(path) = &args.ready {
            let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
            std::fs::write(path, names.join("\n") + "\n")
                .map_err(|e| format!("cannot write {path}: {e}"))?;
        }
        for l in &links {
            eprintln!(
                "tunenet-linkem: {} delay {:?} loss {}% rate {} limit {}",
                l.name,
                l.shape.delay,
                l.shape.loss * 100.0,
                if l.shape.rate_bps == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{} bit/s", l.shape.rate_bps)
                },
                l.shape.limit
            );
        }
        let mut rng = Rng(args.seed | 1);
        let mut macs: HashMap<[u8; 6], usize> = HashMap::new();
        let mut queue: BinaryHeap<Reverse<Event>> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut buf = vec![0u8; 65536];
        let mut looked = Instant::now() - CONTROL_EVERY;
        let mut fds: Vec<libc::pollfd> = links
            .iter()
            .map(|l| libc::pollfd {
                fd: l.tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !STOP.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now.duration_since(looked) >= CONTROL_EVERY {
                looked = now;
                for l in links.iter_mut() {
                    let cut = l.down_file.as_ref().is_some_and(|f| f.exists());
                    if cut != l.cut {
                        eprintln!(
                            "tunenet-linkem: {} {}",
                            l.name,
                            if cut { "cut" } else { "restored" }
                        );
                        l.cut = cut;
                    }
                }
            }
            // Everything due, in time order (a step may queue another that is due too).
            while queue.peek().is_some_and(|Reverse(e)| e.at <= now) {
                let Some(Reverse(e)) = queue.pop() else { break };
                match e.step {
                    Step::AtSwitch { from } => {
                        links[from].up.queued -= 1;
                        if e.frame.len() < 14 {
                            continue;
                        }
                        let dst: [u8; 6] = e.frame[0..6].try_into().unwrap_or_default();
                        let src: [u8; 6] = e.frame[6..12].try_into().unwrap_or_default();
                        if src[0] & 1 == 0 {
                            macs.insert(src, from);
                        }
                        let to: Vec<usize> = match macs.get(&dst) {
                            Some(&t) if dst[0] & 1 == 0 => vec![t],
                            _ => (0..links.len()).collect(),
                        };
                        for t in to.into_iter().filter(|&t| t != from) {
                            let l = &mut links[t];
                            let cut = l.cut;
                            if let Some(at) =
                                l.down.admit(&l.shape, e.at, e.frame.len(), &mut rng, cut)
                            {
                                seq += 1;
                                queue.push(Reverse(Event {
                                    at,
                                    seq,
                                    step: Step::AtNode { to: t },
                                    frame: e.frame.clone(),
                                }));
                            }
                        }
                    }
                    Step::AtNode { to } => {
                        let l = &mut links[to];
                        l.down.queued -= 1;
                        if l.cut {
                            l.down.cut += 1;
                            continue;
                        }
                        // A node whose interface is down (EIO) loses the frame, as a wire would.
                        let _ = l.tap.write(&e.frame);
                    }
                }
            }
            let wait = queue
                .peek()
                .map_or(CONTROL_EVERY, |Reverse(e)| {
                    e.at.saturating_duration_since(Instant::now())
                })
                .min(CONTROL_EVERY);
            let ts = libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            };
            // SAFETY: fds is a valid array of pollfd for its length.
            let n = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            let now = Instant::now();
            for (i, p) in fds.iter_mut().enumerate() {
                if p.revents == 0 {
                    continue;
                }
                p.revents = 0;
                loop {
                    let l = &mut links[i];
                    let len = match l.tap.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        // EIO while the interface is down, for one.
                        Err(_) => break,
                    };
                    let cut = l.cut;
                    if let Some(at) = l.up.admit(&l.shape, now, len, &mut rng, cut) {
                        seq += 1;
                        queue.push(Reverse(Event {
                            at,
                            seq,
                            step: Step::AtSwitch { from: i },
                            frame: buf[..len].to_vec(),
                        }));
                    }
                }
            }
        }
        let mut report = String::new();
        for l in &links {
            for (dir, d) in [("out", &l.up), ("in", &l.down)] {
                report += &format!(
                    "tunenet-linkem: {} {dir} frames={} bytes={} lost={} cut={} queue_full={}\n",
                    l.name, d.frames, d.bytes, d.lost, d.cut, d.full
                );
            }
        }
        eprint!("{report}");
        if let Some(path) = &args.stats {
            std::fs::write(path, &report).map_err(|e| format!("cannot write {path}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::spec::*;
    use std::time::Duration;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn links_take_the_defaults_and_their_own_settings() {
        let a = parse(args(
            "--delay 25ms --loss 0.5 --rate 100mbit --control /tmp/c a b,rate=1mbit,delay=1s c,loss=2%",
        ))
        .unwrap();
        assert_eq!(a.links.len(), 3);
        let (ref name, ref s) = a.links[0];
        assert_eq!(name, "a");
        assert_eq!(s.delay, Duration::from_millis(25));
        assert_eq!(s.loss, 0.005);
        assert_eq!(s.rate_bps, 100_000_000);
        assert_eq!(a.links[1].1.rate_bps, 1_000_000);
        assert_eq!(a.links[1].1.delay, Duration::from_secs(1));
        assert_eq!(a.links[2].1.loss, 0.02);
        assert_eq!(a.links[2].1.rate_bps, 100_000_000);
        assert_eq!(a.control.as_deref(), Some("/tmp/c"));
        // 1500 bytes at 1 Mbit/s take 12 ms.
        assert_eq!(a.links[1].1.serialise(1500), Duration::from_millis(12));
        assert_eq!(Shape::default().serialise(1500), Duration::ZERO);
    }

    #[test]
    fn bad_settings_say_what_was_wrong() {
        for (line, says) in [
            ("a", "at least two"),
            ("a a", "named twice"),
            ("--delay 5 a b", "duration \"5\""),
            ("--loss 120 a b", "between 0 and 100"),
            ("--rate fast a b", "rate \"fast\""),
            ("a b,speed=1", "unknown link setting \"speed\""),
            ("a b,rate", "key=value"),
            ("--limit 0 a b", "limit"),
            ("--jitter 1ms a b", "unknown flag --jitter"),
            ("--seed a b", "expected an integer"),
            ("a waytoolongname16 b", "1-15"),
        ] {
            let e = parse(args(line)).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        }
    }
}
