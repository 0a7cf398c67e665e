//! Deployment files that cannot rot. Every file in `deploy/` (the Dockerfile, compose,
//! Kubernetes, Akash, DeepSquare, the systemd units and the shell blocks of
//! `deploy/README.md`) is parsed, and each `tunenet` subcommand and flag it runs is
//! checked against the binary's own `--help` tree, each config it carries against the
//! config structs (unknown keys are refused), each environment variable against the
//! binary's `[env: ...]` names, each port against the ports its role's configs listen on,
//! and the probes and scrape annotations against the health endpoints. A rename in the
//! binary breaks this test, not a provider's deployment.

use crate::common::{BIN, Daemon, port};
use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tunenet_node::config::{CompetitionConfig, MinerConfig, ValidatorConfig};

/// Variables the deployment files may set that `tunenet` does not read, and who does.
const OTHER_ENV: &[(&str, &str)] = &[
    ("NVIDIA_VISIBLE_DEVICES", "the NVIDIA container toolkit"),
    ("NVIDIA_DRIVER_CAPABILITIES", "the NVIDIA container toolkit"),
    (
        "CUDA_COMPUTE_CAP",
        "candle's kernel build (scripts/cuda-check.sh)",
    ),
    ("RUSTUP_HOME", "the Rust toolchain in the CUDA build stage"),
    ("CARGO_HOME", "the Rust toolchain in the CUDA build stage"),
    ("PATH", "the shell"),
];

/// The peer id the deployment files carry where the validator's goes (a real one, so
/// that the addresses parse; deploy/README.md says to replace it).
const PLACEHOLDER_PEER: &str = "12D3KooWN67N1PcZsTN5t1vz357DH56QyH5Ra7on1gx4XumYmAoR";

// ---- the binary's command tree ---------------------------------------------------------------

/// One `tunenet ... --help` page.
#[derive(Debug, Default)]
struct HelpPage {
    subcommands: BTreeSet<String>,
    /// Long flag name -> whether it takes a value.
    flags: BTreeMap<String, bool>,
    positionals: bool,
    needs_subcommand: bool,
}

/// Every page of the binary's help, walked from the root, and every `[env: NAME]`.
struct Cli {
    pages: BTreeMap<Vec<String>, HelpPage>,
    env: BTreeSet<String>,
}

impl Cli {
    fn load() -> Cli {
        let mut cli = Cli {
            pages: BTreeMap::new(),
            env: BTreeSet::new(),
        };
        let mut todo = vec![Vec::<String>::new()];
        while let Some(path) = todo.pop() {
            let out = Command::new(BIN)
                .args(&path)
                .arg("--help")
                .output()
                .unwrap();
            assert!(out.status.success(), "tunenet {path:?} --help failed");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let page = parse_help(&text, &mut cli.env);
            for s in &page.subcommands {
                if s != "help" {
                    let mut p = path.clone();
                    p.push(s.clone());
                    todo.push(p);
                }
            }
            cli.pages.insert(path, page);
        }
        cli
    }

    /// Checks one invocation: `argv[0]` is `tunenet`; each subcommand must exist, each
    /// long flag must exist on the command it is given to, and the command must be one
    /// that runs (not a group that needs a subcommand).
    fn check(&self, argv: &[String]) -> Result<(), String> {
        let mut path: Vec<String> = Vec::new();
        let mut i = 1;
        let shown = || argv.join(" ");
        while i < argv.len() {
            let t = &argv[i];
            let page = &self.pages[&path];
            if t == "--" {
                break;
            } else if let Some(flag) = t.strip_prefix("--") {
                let name = flag.split('=').next().unwrap_or_default();
                match page.flags.get(name) {
                    None => {
                        return Err(format!(
                            "`{}`: `tunenet {}` has no flag --{name}",
                            shown(),
                            path.join(" ")
                        ));
                    }
                    Some(true) if !flag.contains('=') => i += 1,
                    Some(_) => {}
                }
            } else if t.starts_with('-') && t.len() == 2 {
                // -h, -V: clap's own.
            } else if page.subcommands.contains(t.as_str()) {
                path.push(t.clone());
            } else if !page.positionals {
                return Err(format!(
                    "`{}`: `tunenet {}` has no subcommand `{t}` (it has {:?})",
                    shown(),
                    path.join(" "),
                    page.subcommands
                ));
            }
            i += 1;
        }
        if self.pages[&path].needs_subcommand {
            return Err(format!(
                "`{}`: `tunenet {}` needs a subcommand",
                shown(),
                path.join(" ")
            ));
        }
        Ok(())
    }
}

/// Reads clap's help layout: `Usage:`, `Commands:`, `Arguments:`, `Options:` and every
/// `[env: NAME=...]`.
fn parse_help(text: &str, env: &mut BTreeSet<String>) -> HelpPage {
    let mut page = HelpPage::default();
    let mut section = "";
    for line in text.lines() {
        if let Some(u) = line.strip_prefix("Usage: ") {
            page.needs_subcommand = u.contains("<COMMAND>");
            continue;
        }
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            let name: String = rest[at + 6..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            env.insert(name);
            rest = &rest[at + 6..];
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match section {
            "Commands:" if indent == 2 => {
                if let Some(name) = trimmed.split_whitespace().next() {
                    page.subcommands.insert(name.to_string());
                }
            }
            "Arguments:" if indent == 2 => page.positionals = true,
            "Options:" => {
                let opt = trimmed
                    .strip_prefix("-")
                    .and_then(|s| s.get(3..))
                    .filter(|_| trimmed.as_bytes().get(2) == Some(&b','))
                    .unwrap_or(trimmed);
                if let Some(long) = opt.strip_prefix("--") {
                    let mut words = long.split_whitespace();
                    let name = words.next().unwrap_or_default().to_string();
                    let takes = words.next().is_some_and(|w| w.starts_with('<'));
                    page.flags.insert(name, takes);
                }
            }
            _ => {}
        }
    }
    page
}

// ---- shell text ----------------------------------------------------------------------------

/// A shell script's `tunenet` invocations and its heredocs (target file -> body).
#[derive(Default)]
struct Script {
    invocations: Vec<Vec<String>>,
    heredocs: Vec<(String, String)>,
}

/// Splits a script into simple commands (on newlines, `;`, `&&`, `||`, `|`, braces) of
/// words with quotes removed, comments dropped and heredoc bodies taken out.
fn shell(text: &str) -> Script {
    let mut script = Script::default();
    let mut lines = text.lines().peekable();
    let mut joined = String::new();
    while let Some(line) = lines.next() {
        // Heredocs: `cat > FILE <<'EOF'` ... `EOF`.
        if let Some(at) = line.find("<<") {
            let marker: String = line[at + 2..]
                .trim_start_matches('-')
                .trim()
                .trim_matches(|c| c == '\'' || c == '"')
                .to_string();
            let target = line[..at]
                .split('>')
                .nth(1)
                .map(|t| t.trim().to_string())
                .unwrap_or_default();
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.trim() == marker {
                    break;
                }
                body.push_str(l.trim_start());
                body.push('\n');
            }
            script.heredocs.push((target, body));
            joined.push_str(&line[..at]);
            joined.push('\n');
            continue;
        }
        match line.strip_suffix('\\') {
            Some(l) => joined.push_str(l),
            None => {
                joined.push_str(line);
                joined.push('\n');
            }
        }
    }
    let mut words: Vec<String> = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = joined.chars().peekable();
    let flush = |words: &mut Vec<String>, word: &mut Option<String>, script: &mut Script| {
        if let Some(w) = word.take() {
            words.push(w);
        }
        if let Some(argv) = tunenet_argv(words) {
            script.invocations.push(argv);
        }
        words.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    w.push(q);
                }
            }
            '#' if word.is_none() => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
                flush(&mut words, &mut word, &mut script);
            }
            ' ' | '\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\n' | ';' | '|' | '&' | '{' | '}' | '(' | ')' => {
                flush(&mut words, &mut word, &mut script)
            }
            _ => word.get_or_insert_with(String::new).push(c),
        }
    }
    flush(&mut words, &mut word, &mut script);
    script
}

/// The `tunenet` argv of one simple command: `tunenet ...` in command position (after
/// `exec`, `sudo [-u U]`, `env` and `VAR=value` words, or after a `--` as in `kubectl exec
/// POD -- tunenet ...`), or the arguments of `docker compose ... run [--rm] SERVICE ...`,
/// whose entrypoint is `tunenet`.
fn tunenet_argv(words: &[String]) -> Option<Vec<String>> {
    let is_tunenet = |w: &str| w == "tunenet" || w.ends_with("/tunenet");
    if let Some(dash) = words.iter().position(|w| w == "--")
        && words.get(dash + 1).is_some_and(|w| is_tunenet(w))
    {
        return Some(words[dash + 1..].to_vec());
    }
    if words.first().is_some_and(|w| w == "docker")
        && words.get(1).is_some_and(|w| w == "compose")
        && let Some(verb) = words.iter().position(|w| w == "run" || w == "exec")
    {
        let mut i = verb + 1;
        while words.get(i).is_some_and(|w| w.starts_with('-')) {
            // -e NAME takes a value; --rm, -T do not.
            i += if words[i] == "-e" || words[i] == "--env" {
                2
            } else {
                1
            };
        }
        let rest = words.get(i + 1..)?;
        return match rest.first() {
            Some(w) if is_tunenet(w) => Some(rest.to_vec()),
            _ if words[verb] == "run" => {
                let mut argv = vec!["tunenet".to_string()];
                argv.extend(rest.iter().cloned());
                Some(argv)
            }
            _ => None,
        };
    }
    let mut i = 0;
    while let Some(w) = words.get(i) {
        if w == "exec" || w == "env" || (w.contains('=') && !w.starts_with('-')) {
            i += 1;
        } else if w == "sudo" {
            i += if words.get(i + 1).is_some_and(|u| u == "-u") {
                3
            } else {
                1
            };
        } else {
            break;
        }
    }
    words
        .get(i)
        .filter(|w| is_tunenet(w))
        .map(|_| words[i..].to_vec())
}

// ---- configs and ports -------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Miner,
    Validator,
}

fn role_of(name: &str) -> Option<Role> {
    if name.contains("miner") {
        Some(Role::Miner)
    } else if name.contains("validator") {
        Some(Role::Validator)
    } else {
        None
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` has no port"))
}

/// What a parsed config listens on.
#[derive(Debug, Default, Clone)]
struct Listens {
    grpc: u16,
    metrics: Option<u16>,
    p2p: BTreeSet<u16>,
    bootstrap: Vec<String>,
}

impl Listens {
    fn all(&self) -> BTreeSet<u16> {
        let mut s = self.p2p.clone();
        s.insert(self.grpc);
        s.extend(self.metrics);
        s
    }
}

fn p2p_ports(p: Option<&tunenet_p2p::P2pConfig>) -> (BTreeSet<u16>, Vec<String>) {
    let Some(p) = p else {
        return (BTreeSet::new(), Vec::new());
    };
    let mut ports = BTreeSet::new();
    for a in &p.listen {
        let parts: Vec<String> = a.to_string().split('/').map(str::to_string).collect();
        for w in parts.windows(2) {
            if (w[0] == "tcp" || w[0] == "udp")
                && let Ok(n) = w[1].parse::<u16>()
                && n != 0
            {
                ports.insert(n);
            }
        }
    }
    (ports, p.bootstrap.iter().map(|a| a.to_string()).collect())
}

/// Parses a config of `role` with the daemon's own parser (unknown keys refused).
fn parse_config(role: Role, origin: &str, text: &str) -> Listens {
    let path = Path::new(origin);
    match role {
        Role::Miner => {
            let c: MinerConfig =
                tunenet_node::config::parse(path, text).unwrap_or_else(|e| panic!("{origin}: {e}"));
            let (p2p, bootstrap) = p2p_ports(c.p2p.as_ref());
            Listens {
                grpc: port_of(&c.listen),
                metrics: c.metrics_listen.as_deref().map(port_of),
                p2p,
                bootstrap,
            }
        }
        Role::Validator => {
            let c: ValidatorConfig =
                tunenet_node::config::parse(path, text).unwrap_or_else(|e| panic!("{origin}: {e}"));
            let (p2p, bootstrap) = p2p_ports(c.p2p.as_ref());
            if let Some(a) = &c.advertise {
                assert_eq!(
                    port_of(a),
                    port_of(&c.listen),
                    "{origin}: `advertise` names another port than `listen`"
                );
            }
            Listens {
                grpc: port_of(&c.listen),
                metrics: c.metrics_listen.as_deref().map(port_of),
                p2p,
                bootstrap,
            }
        }
    }
}

/// Every commented-out `key = value` and `[table]` line of an example config, uncommented
/// (the placeholder peer id `12D3KooW...` made a real one): the documented keys must parse
/// too.
fn uncommented(text: &str) -> String {
    let mut out = String::new();
    let text = text.replace("12D3KooW...", PLACEHOLDER_PEER);
    for line in text.lines() {
        let t = line.trim_start();
        let body = t.strip_prefix('#').map(str::trim_start);
        let key_like = body.is_some_and(|b| {
            let head: String = b
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '=')
                .collect();
            (b.starts_with('[') && b.contains(']'))
                || (!head.is_empty()
                    && head
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
                    && b[head.len()..].trim_start().starts_with('='))
        });
        match body {
            Some(b) if key_like => out.push_str(b),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

// ---- what the files use ------------------------------------------------------------------

/// Everything one deployment (a set of files that run together) uses.
#[derive(Default)]
struct Uses {
    invocations: Vec<(String, Vec<String>)>,
    env: Vec<(String, String)>,
    /// (origin, role, port)
    ports: Vec<(String, Option<Role>, u16)>,
    configs: Vec<(Role, Listens)>,
    /// Paths where a config file is put (image, mounts, heredocs).
    config_paths: BTreeSet<String>,
    /// (origin, role, path, port) of each HTTP probe.
    probes: Vec<(String, Option<Role>, String, u16)>,
    /// (origin, role, port) of each Prometheus scrape annotation.
    scrapes: Vec<(String, Option<Role>, u16)>,
}

impl Uses {
    fn script(&mut self, origin: &str, role: Option<Role>, text: &str) {
        let s = shell(text);
        for argv in s.invocations {
            self.invocations.push((origin.to_string(), argv));
        }
        for (target, body) in s.heredocs {
            let r = role_of(&target)
                .or(role)
                .unwrap_or_else(|| panic!("{origin}: whose config is {target}?"));
            let l = parse_config(r, &format!("{origin} ({target})"), &body);
            self.configs.push((r, l));
            self.config_paths.insert(target);
        }
    }

    fn argv(&mut self, origin: &str, role: Option<Role>, argv: &[String]) {
        let first = argv.first().map(String::as_str).unwrap_or_default();
        if (first.ends_with("sh")) && argv.get(1).is_some_and(|a| a == "-c") {
            if let Some(script) = argv.get(2) {
                self.script(origin, role, script);
            }
        } else if first == "tunenet" || first.ends_with("/tunenet") {
            self.invocations.push((origin.to_string(), argv.to_vec()));
        }
    }

    /// Walks a YAML tree for commands, variables, ports, probes and scrape annotations.
    fn yaml(&mut self, origin: &str, role: Option<Role>, v: &Value) {
        match v {
            Value::Mapping(m) => {
                let get = |k: &str| m.get(k);
                let strings = |v: Option<&Value>| -> Vec<String> {
                    match v {
                        Some(Value::Sequence(s)) => s
                            .iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect(),
                        _ => Vec::new(),
                    }
                };
                match get("command") {
                    Some(Value::Sequence(_)) => {
                        let mut argv = strings(get("command"));
                        argv.extend(strings(get("args")));
                        self.argv(origin, role, &argv);
                    }
                    Some(Value::String(s)) => self.script(origin, role, s),
                    _ => {}
                }
                if let Some(Value::Sequence(env)) = get("env") {
                    for e in env {
                        let name = match e {
                            Value::String(s) => s.split('=').next().map(str::to_string),
                            Value::Mapping(m) => m
                                .get("name")
                                .or_else(|| m.get("key"))
                                .and_then(Value::as_str)
                                .map(str::to_string),
                            _ => None,
                        };
                        self.env
                            .push((origin.to_string(), name.unwrap_or_default()));
                    }
                }
                for k in ["containerPort", "hostPort", "port", "targetPort"] {
                    if let Some(p) = get(k).and_then(Value::as_u64) {
                        self.ports.push((format!("{origin} ({k})"), role, p as u16));
                    }
                }
                if let Some(Value::Mapping(h)) = get("httpGet") {
                    let path = h.get("path").and_then(Value::as_str).unwrap_or_default();
                    let port = h.get("port").and_then(Value::as_u64).unwrap_or(0) as u16;
                    self.probes
                        .push((origin.to_string(), role, path.to_string(), port));
                }
                if let Some(Value::Mapping(a)) = get("annotations")
                    && a.get("prometheus.io/scrape").and_then(Value::as_str) == Some("true")
                {
                    let port = a
                        .get("prometheus.io/port")
                        .and_then(Value::as_str)
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    assert_eq!(
                        a.get("prometheus.io/path").and_then(Value::as_str),
                        Some(tunenet_node::metrics::METRICS_PATH),
                        "{origin}: scrape path"
                    );
                    self.scrapes.push((origin.to_string(), role, port));
                }
                for (k, child) in m {
                    // Inside a file of no one role, a key names whose part it is.
                    let r = role.or_else(|| k.as_str().and_then(role_of));
                    self.yaml(origin, r, child);
                }
            }
            Value::Sequence(s) => {
                for x in s {
                    self.yaml(origin, role, x);
                }
            }
            _ => {}
        }
    }

    /// Checks everything collected against the binary and the configs.
    fn check(&self, deployment: &str, cli: &Cli, errors: &mut Vec<String>) {
        eprintln!(
            "{deployment}: {} tunenet commands, {} configs, {} ports, {} variables, {} probes, {} scrapes",
            self.invocations.len(),
            self.configs.len(),
            self.ports.len(),
            self.env.len(),
            self.probes.len(),
            self.scrapes.len()
        );
        for (origin, argv) in &self.invocations {
            if let Err(e) = cli.check(argv) {
                errors.push(format!("{origin}: {e}"));
            }
            if let Some(at) = argv.iter().position(|a| a == "--config") {
                let path = argv.get(at + 1).cloned().unwrap_or_default();
                if !self.config_paths.contains(&path) {
                    errors.push(format!(
                        "{origin}: `--config {path}`: no config is put there in {deployment} (only {:?})",
                        self.config_paths
                    ));
                }
            }
        }
        for (origin, name) in &self.env {
            if !cli.env.contains(name) && !OTHER_ENV.iter().any(|(n, _)| n == name) {
                errors.push(format!(
                    "{origin}: `{name}` is not read by tunenet (its variables: {:?})",
                    cli.env
                ));
            }
        }
        let listens = |role: Option<Role>| -> BTreeSet<u16> {
            self.configs
                .iter()
                .filter(|(r, _)| role.is_none() || Some(*r) == role)
                .flat_map(|(_, l)| l.all())
                .collect()
        };
        for (origin, role, p) in &self.ports {
            if !listens(*role).contains(p) {
                errors.push(format!(
                    "{origin}: port {p} is not one the {role:?} configs of {deployment} listen on ({:?})",
                    listens(*role)
                ));
            }
        }
        let metrics = |role: Option<Role>| -> BTreeSet<u16> {
            self.configs
                .iter()
                .filter(|(r, _)| Some(*r) == role)
                .filter_map(|(_, l)| l.metrics)
                .collect()
        };
        for (origin, role, path, port) in &self.probes {
            if path != tunenet_node::metrics::LIVENESS_PATH
                && path != tunenet_node::metrics::READINESS_PATH
            {
                errors.push(format!("{origin}: probe path {path} is not served"));
            }
            if !metrics(*role).contains(port) {
                errors.push(format!(
                    "{origin}: probe port {port} is not `metrics_listen` of the {role:?} config"
                ));
            }
        }
        for (origin, role, port) in &self.scrapes {
            if !metrics(*role).contains(port) {
                errors.push(format!(
                    "{origin}: scrape port {port} is not `metrics_listen` of the {role:?} config"
                ));
            }
        }
    }
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(root: &Path, rel: &str) -> Vec<Value> {
    let text = read(root, rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}"));
            // Twice: a merged mapping may itself hold a merge key (compose's x-miner
            // merges x-image), which the first pass copies in unresolved.
            for _ in 0..2 {
                v.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
            }
            v
        })
        .collect()
}

/// The Dockerfile: its ENTRYPOINT + CMD, ENV, EXPOSE, COPY sources, cargo features; and
/// where it puts the configs.
fn dockerfile(root: &Path, uses: &mut Uses, errors: &mut Vec<String>) {
    let origin = "deploy/docker/Dockerfile";
    let text = read(root, origin).replace("\\\n", " ");
    let cargo = read(root, "Cargo.toml");
    let features: BTreeSet<String> = cargo
        .split("[features]")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split('=').next())
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    let mut entry = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (instr, rest) = line.split_once(' ').unwrap_or((line, ""));
        let json = |s: &str| -> Vec<String> { serde_json::from_str(s).unwrap_or_default() };
        match instr {
            "ENTRYPOINT" => entry = json(rest),
            "CMD" => {
                let mut argv = entry.clone();
                argv.extend(json(rest));
                uses.argv(origin, None, &argv);
            }
            "ENV" => {
                for kv in rest.split_whitespace() {
                    if let Some((k, _)) = kv.split_once('=') {
                        uses.env.push((origin.into(), k.to_string()));
                    }
                }
            }
            "EXPOSE" => {
                for p in rest.split_whitespace() {
                    let n = p.split('/').next().unwrap_or_default().parse().unwrap();
                    uses.ports.push((format!("{origin} (EXPOSE)"), None, n));
                }
            }
            "COPY" if !rest.starts_with("--from") => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                let (dest, srcs) = parts.split_last().unwrap();
                for s in srcs.iter().filter(|s| **s != ".") {
                    if !root.join(s).exists() {
                        errors.push(format!("{origin}: COPY {s}: no such file"));
                    }
                    if dest.ends_with('/') {
                        let name = Path::new(s).file_name().unwrap().to_string_lossy();
                        uses.config_paths.insert(format!("{dest}{name}"));
                    }
                }
            }
            "RUN" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                for w in words.windows(2) {
                    if w[0] == "--features" && !features.contains(w[1]) {
                        errors.push(format!("{origin}: cargo feature `{}` does not exist", w[1]));
                    }
                    if w[0] == "--bin" && w[1] != "tunenet" {
                        errors.push(format!("{origin}: no binary `{}`", w[1]));
                    }
                }
            }
            _ => {}
        }
    }
}

#[test]
fn deploy_files_use_only_commands_flags_keys_ports_and_variables_that_exist() {
    let root = &crate::common::repo_root();
    let cli = Cli::load();
    assert!(
        cli.pages.len() > 20 && cli.env.contains("TUNENET_CONFIG"),
        "the help tree was not read: {:?}",
        cli.pages.keys().collect::<Vec<_>>()
    );
    let mut errors = Vec::new();

    // The example configs, with every commented-out key switched on.
    for (rel, role) in [
        ("deploy/miner.toml", Role::Miner),
        ("deploy/validator.toml", Role::Validator),
    ] {
        let text = read(root, rel);
        parse_config(role, rel, &text);
        parse_config(
            role,
            &format!("{rel} (commented keys on)"),
            &uncommented(&text),
        );
    }

    // The image: its Dockerfile and the configs it carries.
    let mut image = Uses::default();
    dockerfile(root, &mut image, &mut errors);
    for (rel, role) in [
        ("deploy/docker/miner.toml", Role::Miner),
        ("deploy/docker/validator.toml", Role::Validator),
    ] {
        image
            .configs
            .push((role, parse_config(role, rel, &read(root, rel))));
    }
    image.check("the image", &cli, &mut errors);

    // Compose: the image's configs, the compose file's own, each service by its name.
    let mut compose = Uses {
        configs: image.configs.clone(),
        config_paths: image.config_paths.clone(),
        ..Default::default()
    };
    let origin = "deploy/compose.yaml";
    let doc = &yaml_docs(root, origin)[0];
    let targets: BTreeMap<String, String> = doc["services"]
        .as_mapping()
        .unwrap()
        .values()
        .flat_map(|s| {
            s.get("configs")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| {
            Some((
                c.get("source")?.as_str()?.to_string(),
                c.get("target")?.as_str()?.to_string(),
            ))
        })
        .collect();
    for (name, c) in doc["configs"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let text = c["content"].as_str().unwrap();
        let target = targets.get(name).cloned().unwrap_or_default();
        match role_of(name) {
            Some(role) => compose.configs.push((
                role,
                parse_config(role, &format!("{origin} configs.{name}"), text),
            )),
            None => {
                let _: CompetitionConfig = tunenet_node::config::parse(Path::new(origin), text)
                    .unwrap_or_else(|e| panic!("{origin} configs.{name}: {e}"));
            }
        }
        compose.config_paths.insert(target);
    }
    for (name, s) in doc["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let role = role_of(name);
        let at = format!("{origin} services.{name}");
        let list = |k: &str| -> Option<Vec<String>> {
            s.get(k)?.as_sequence().map(|v| {
                v.iter()
                    .map(|x| match x {
                        Value::Number(n) => n.to_string(),
                        _ => x.as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
        };
        let mut argv = list("entrypoint").unwrap_or_else(|| vec!["tunenet".into()]);
        argv.extend(list("command").unwrap_or_default());
        compose.argv(&at, role, &argv);
        for p in list("expose").unwrap_or_default() {
            compose
                .ports
                .push((format!("{at} expose"), role, p.parse().unwrap()));
        }
        for p in list("ports").unwrap_or_default() {
            let container = p.rsplit(':').next().unwrap().split('/').next().unwrap();
            compose
                .ports
                .push((format!("{at} ports"), role, container.parse().unwrap()));
        }
        if let Some(env) = s.get("environment").and_then(Value::as_mapping) {
            for k in env.keys() {
                compose
                    .env
                    .push((at.clone(), k.as_str().unwrap().to_string()));
            }
        }
    }
    compose.check("compose", &cli, &mut errors);

    // Kubernetes: the ConfigMap's configs, the workloads by their names.
    let mut k8s = Uses::default();
    let mut p2p_service: Option<(String, BTreeSet<u16>)> = None;
    for rel in [
        "deploy/k8s/kustomization.yaml",
        "deploy/k8s/namespace.yaml",
        "deploy/k8s/config.yaml",
        "deploy/k8s/validator.yaml",
        "deploy/k8s/miner.yaml",
        "deploy/k8s/console-job.yaml",
    ] {
        for doc in yaml_docs(root, rel) {
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if kind == "ConfigMap" {
                for (k, v) in doc["data"].as_mapping().unwrap() {
                    let k = k.as_str().unwrap();
                    let role = role_of(k).unwrap_or_else(|| panic!("{rel}: whose config is {k}?"));
                    let l = parse_config(role, &format!("{rel} data.{k}"), v.as_str().unwrap());
                    k8s.configs.push((role, l));
                }
                continue;
            }
            if kind == "Service"
                && name.ends_with("-p2p")
                && let Some(ip) = doc["spec"]["clusterIP"].as_str()
            {
                let ports = doc["spec"]["ports"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter_map(|p| p["port"].as_u64().map(|n| n as u16))
                    .collect();
                p2p_service = Some((ip.to_string(), ports));
            }
            collect_mounts(&doc, &mut k8s.config_paths);
            k8s.yaml(rel, role_of(&name), &doc);
        }
    }
    // The miners' bootstrap address is the validator's p2p Service.
    let (ip, ports) = p2p_service.expect("deploy/k8s: a Service `*-p2p` with a fixed clusterIP");
    for (role, l) in &k8s.configs {
        for b in &l.bootstrap {
            let parts: Vec<&str> = b.split('/').collect();
            if parts.get(2) != Some(&ip.as_str())
                || !parts
                    .get(4)
                    .and_then(|p| p.parse().ok())
                    .is_some_and(|p: u16| ports.contains(&p))
            {
                errors.push(format!(
                    "deploy/k8s {role:?} bootstrap {b} is not the validator's p2p Service {ip}:{ports:?}"
                ));
            }
        }
    }
    k8s.check("Kubernetes", &cli, &mut errors);

    // Akash and DeepSquare: a miner each, its config in a heredoc.
    for rel in ["deploy/akash/miner.yaml", "deploy/deepsquare/miner.yaml"] {
        let mut uses = Uses::default();
        for doc in yaml_docs(root, rel) {
            uses.yaml(rel, Some(Role::Miner), &doc);
        }
        assert!(
            !uses.invocations.is_empty() && !uses.configs.is_empty(),
            "{rel}: no tunenet command or config found"
        );
        uses.check(rel, &cli, &mut errors);
    }
    let akash = &yaml_docs(root, "deploy/akash/miner.yaml")[0];
    let models: BTreeSet<&str> =
        akash["profiles"]["compute"]["miner"]["resources"]["gpu"]["attributes"]["vendor"]["nvidia"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|m| m["model"].as_str())
            .collect();
    assert_eq!(
        models,
        BTreeSet::from(["a100", "h100", "v100"]),
        "Akash GPU models"
    );

    // systemd units.
    for rel in [
        "deploy/tunenet-miner.service",
        "deploy/tunenet-validator.service",
    ] {
        let mut uses = Uses::default();
        for line in read(root, rel).lines() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                uses.script(rel, None, cmd);
            }
            if let Some(kv) = line.strip_prefix("Environment=") {
                uses.env
                    .push((rel.into(), kv.split('=').next().unwrap().to_string()));
            }
        }
        uses.config_paths.insert(format!(
            "/etc/tunenet/{}.toml",
            if rel.contains("miner") {
                "miner"
            } else {
                "validator"
            }
        ));
        uses.check(rel, &cli, &mut errors);
    }

    // Every command of the walk-through.
    let readme = read(root, "deploy/README.md");
    let mut walk = Uses::default();
    let mut in_block = false;
    let mut block = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            if in_block {
                walk.script("deploy/README.md", None, &block);
                block.clear();
            }
            in_block = !in_block && (line == "```bash" || line == "```sh");
            continue;
        }
        if in_block {
            block.push_str(line);
            block.push('\n');
        }
    }
    assert!(
        walk.invocations.len() >= 10,
        "deploy/README.md: too few tunenet commands found ({})",
        walk.invocations.len()
    );
    for (origin, argv) in &walk.invocations {
        if let Err(e) = cli.check(argv) {
            errors.push(format!("{origin}: {e}"));
        }
    }

    assert!(
        errors.is_empty(),
        "deployment files out of step with the binary:\n  {}",
        errors.join("\n  ")
    );
}

/// Paths at which a ConfigMap's items are mounted: each volumeMount's mountPath joined
/// with each item path of the volume it names.
fn collect_mounts(doc: &Value, out: &mut BTreeSet<String>) {
    let mut items: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut mounts: Vec<(String, String)> = Vec::new();
    fn walk(
        v: &Value,
        items: &mut BTreeMap<String, Vec<String>>,
        mounts: &mut Vec<(String, String)>,
    ) {
        match v {
            Value::Mapping(m) => {
                if let (Some(name), Some(cm)) =
                    (m.get("name").and_then(Value::as_str), m.get("configMap"))
                {
                    let paths = cm
                        .get("items")
                        .and_then(Value::as_sequence)
                        .map(|s| {
                            s.iter()
                                .filter_map(|i| i["path"].as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    items.insert(name.to_string(), paths);
                }
                if let (Some(name), Some(at)) = (
                    m.get("name").and_then(Value::as_str),
                    m.get("mountPath").and_then(Value::as_str),
                ) {
                    mounts.push((name.to_string(), at.to_string()));
                }
                for c in m.values() {
                    walk(c, items, mounts);
                }
            }
            Value::Sequence(s) => s.iter().for_each(|c| walk(c, items, mounts)),
            _ => {}
        }
    }
    walk(doc, &mut items, &mut mounts);
    for (name, at) in mounts {
        for p in items.get(&name).into_iter().flatten() {
            out.insert(format!("{at}/{p}"));
        }
    }
}

/// The probes and the scrape in deploy/ hit a real daemon: a miner started on the image's
/// config (ports moved to free ones) answers /readyz, /healthz and /metrics.
#[test]
fn deploy_probes_answer_on_a_real_miner() {
    let root = &crate::common::repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let (grpc, metrics, p2p) = (port(), port(), port());
    let text = read(root, "deploy/docker/miner.toml")
        .replace(
            "/var/lib/tunenet",
            &tmp.path().join("data").display().to_string(),
        )
        .replace("0.0.0.0:7101", &format!("127.0.0.1:{grpc}"))
        .replace("0.0.0.0:9101", &format!("127.0.0.1:{metrics}"))
        .replace(
            "/ip4/0.0.0.0/tcp/7200",
            &format!("/ip4/127.0.0.1/tcp/{p2p}"),
        )
        .replace(
            "/ip4/0.0.0.0/udp/7200/quic-v1",
            &format!("/ip4/127.0.0.1/udp/{p2p}/quic-v1"),
        )
        .replace("mdns = true", "mdns = false");
    let conf: PathBuf = tmp.path().join("miner.toml");
    std::fs::write(&conf, text).unwrap();
    let miner = Daemon::start(
        &["miner", "--config", conf.to_str().unwrap()],
        &tmp.path().join("miner.log"),
    );
    let get = |path: &str| -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some((out.split_whitespace().nth(1)?.parse().ok()?, out))
    };
    let start = Instant::now();
    loop {
        if let Some((200, _)) = get(tunenet_node::metrics::READINESS_PATH) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the miner never became ready: {}",
            miner.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = get(tunenet_node::metrics::LIVENESS_PATH).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.ends_with("ok\n"), "the main loop turns: {body}");
    let (code, body) = get(tunenet_node::metrics::METRICS_PATH).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("text/plain"), "{body}");
    drop(miner);
}
