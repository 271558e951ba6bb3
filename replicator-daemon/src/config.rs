//! The resource configuration file (DESIGN.md §2): parsing and validation.
//!
//! Owns the TOML schema, its defaults and every check on it. Each error names
//! the file, the key as a dotted path (`nodes.alpha.io_engine`) and what is
//! wrong, in one sentence. It must not open disks, sockets or anything else:
//! it only reads the config file itself.
//!
//! Keys per node: `disk` and `nbd` are always required. `replication` is
//! required once the resource has two nodes, and so is the top-level
//! `secret`. `meta` (default `"internal"`) is validated but used only once a
//! peer is configured: a one-node resource serves its whole backing disk,
//! like qemu-nbd. `control` defaults to `/run/replicator/RESOURCE-NODE.sock`.
//!
//! `resync_rate` is bytes per second: an integer, or a string of digits with
//! an optional binary suffix `K`, `M` or `G` (`"100M"` = 100 MiB/s).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Longest accepted config file; anything larger is refused unread.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;
/// Longest resource or node name (they appear in socket paths and export names).
pub const MAX_NAME_BYTES: usize = 64;
/// A resource has one node (unreplicated) or two (primary and secondary).
pub const MAX_NODES: usize = 2;
/// Default out-of-sync bitmap granularity.
pub const DEFAULT_BITMAP_BLOCK_BYTES: u64 = 4096;
/// Smallest bitmap granularity (one sector).
pub const MIN_BITMAP_BLOCK_BYTES: u64 = 512;
/// Largest bitmap granularity.
pub const MAX_BITMAP_BLOCK_BYTES: u64 = 1024 * 1024;
/// Default activity-log size in extents (DRBD's default).
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
/// Accepted activity-log sizes in extents (DRBD's range).
pub const AL_EXTENTS_RANGE: std::ops::RangeInclusive<u32> = 7..=65534;
/// Default of `timeout_ms`: a peer link silent this long is declared lost.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 5_000;
/// Allowed `timeout_ms`: above the engine's 1 s ping interval with margin,
/// and at most the engine's own 6 s silence limit.
pub const PEER_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 2_000..=6_000;

/// Replication protocol: when a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// When it is queued for sending.
    A,
    /// When the peer received it.
    B,
    /// When both disks completed it.
    C,
}

/// Which disk engine does the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngineKind {
    /// io_uring, driven from the daemon's runtime thread; falls back to
    /// `Sync` if the ring cannot be set up.
    Uring,
    /// pread/pwrite on tokio's blocking pool.
    Sync,
}

/// What to do when both nodes wrote independently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitBrainPolicy {
    Disconnect,
    DiscardZeroChanges,
    DiscardYoungerPrimary,
    DiscardLeastChanges,
}

/// A `HOST:PORT` pair; the host is an IP literal (IPv6 in brackets) or a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where the NBD export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp(HostPort),
    Unix(PathBuf),
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Tcp(hp) => hp.fmt(f),
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Where a node keeps its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing disk.
    Internal,
    /// In a separate file or device.
    External(PathBuf),
}

/// Keys settable at top level and overridable per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    pub io_engine: IoEngineKind,
    pub direct: bool,
    pub bitmap_block_bytes: u64,
    pub al_extents: u32,
    /// `None` = unlimited.
    pub resync_rate_bytes_per_s: Option<u64>,
    pub split_brain: SplitBrainPolicy,
    pub read_only: bool,
    /// `timeout_ms`: a peer link on which nothing arrived this long is lost.
    pub peer_timeout_ms: u64,
    /// `busy_poll_us`: the most the daemon polls for events before its
    /// thread sleeps (see `busy_poll`); 0: never.
    pub busy_poll_us: u64,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            io_engine: IoEngineKind::Uring,
            direct: false,
            bitmap_block_bytes: DEFAULT_BITMAP_BLOCK_BYTES,
            al_extents: DEFAULT_AL_EXTENTS,
            resync_rate_bytes_per_s: None,
            split_brain: SplitBrainPolicy::Disconnect,
            read_only: false,
            peer_timeout_ms: DEFAULT_PEER_TIMEOUT_MS,
            busy_poll_us: crate::busy_poll::DEFAULT_BUSY_POLL_US,
        }
    }
}

/// One `[nodes.NAME]` section, with the top-level options applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    /// Required with two nodes; `None` for a one-node resource that omits it.
    pub replication: Option<HostPort>,
    pub nbd: NbdAddress,
    pub control: PathBuf,
    pub disk: PathBuf,
    pub meta: MetaLocation,
    pub options: NodeOptions,
}

/// A whole, validated resource file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this was read from (for messages).
    pub path: PathBuf,
    pub resource: String,
    pub protocol: Protocol,
    pub secret: Option<String>,
    pub nodes: BTreeMap<String, NodeConfig>,
}

impl Config {
    /// The section of `--node NAME`, or an error listing the nodes present.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .get(name)
            .ok_or_else(|| ConfigError::UnknownNode {
                file: self.path.clone(),
                node: name.to_owned(),
                present: self.nodes.keys().cloned().collect(),
            })
    }

    /// The other node of a two-node resource.
    pub fn peer_of(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.values().find(|n| n.name != name)
    }
}

/// What is wrong with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    UnknownKey,
    Missing,
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    BadValue {
        value: String,
        expected: String,
    },
    BadAddress {
        value: String,
        reason: String,
    },
    BadBitmapBlockSize(i64),
    OutOfRange {
        value: i64,
        range: String,
    },
    Duplicate {
        value: String,
        other_key: String,
    },
    /// A value that cannot go with another key's value of the node.
    Clash(Box<Clash>),
}

/// Two keys of a node whose values cannot go together, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clash {
    pub value: String,
    pub other_key: String,
    pub other_value: String,
    pub why: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownKey => write!(f, "is not a known key"),
            Problem::Missing => write!(f, "is required but missing"),
            Problem::WrongType { expected, found } => {
                write!(f, "must be {expected}, found {found}")
            }
            Problem::BadValue { value, expected } => {
                write!(f, "has value {value:?}, expected {expected}")
            }
            Problem::BadAddress { value, reason } => {
                write!(f, "has address {value:?}, which is invalid: {reason}")
            }
            Problem::BadBitmapBlockSize(v) => write!(
                f,
                "is {v}, expected a power of two from {MIN_BITMAP_BLOCK_BYTES} to {MAX_BITMAP_BLOCK_BYTES}"
            ),
            Problem::OutOfRange { value, range } => {
                write!(f, "is {value}, expected a value in {range}")
            }
            Problem::Duplicate { value, other_key } => {
                write!(f, "is {value:?}, the same as `{other_key}`; each node needs its own")
            }
            Problem::Clash(c) => write!(
                f,
                "is {:?} and `{}` is {:?}; {}",
                c.value, c.other_key, c.other_value, c.why
            ),
        }
    }
}

/// Why external metadata may not be the disk itself.
pub const META_IS_DISK: &str =
    "external metadata needs a file or device of its own (or meta = \"internal\", at the end of the disk)";

/// Whether two listening addresses of one node would take the same port:
/// the same host, or either one every address of the host.
fn listen_overlap(a: &HostPort, b: &HostPort) -> bool {
    let any = |h: &str| {
        h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
    };
    a.port == b.port && (a.host == b.host || any(&a.host) || any(&b.host))
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the config file is larger than {MAX_CONFIG_FILE_BYTES} bytes", file.display())]
    TooLarge { file: PathBuf },
    #[error("{}:{line}:{column}: TOML syntax error: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: key `{key}` {problem}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        problem: Problem,
    },
    #[error("{}: node {node:?} is not in the config; nodes present: {}", file.display(), present.join(", "))]
    UnknownNode {
        file: PathBuf,
        node: String,
        present: Vec<String>,
    },
}

impl ConfigError {
    /// The dotted key this error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The problem with the key, if this error is about one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    use std::io::Read;
    let read_err = |source| ConfigError::Read {
        file: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            file: path.to_owned(),
        });
    }
    parse(path, &text)
}

/// Parses and validates config text; `path` is used only in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let table: Table = text.parse::<Table>().map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        ConfigError::Syntax {
            file: path.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    Parser { file: path }.config(table)
}

/// 1-based line and byte column of a byte offset (never panics).
fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..byte.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

const NODE_OPTION_KEYS: [&str; 9] = [
    "io_engine",
    "direct",
    "bitmap_block_bytes",
    "al_extents",
    "resync_rate",
    "split_brain",
    "read_only",
    "timeout_ms",
    "busy_poll_us",
];

struct Parser<'a> {
    file: &'a Path,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

impl Parser<'_> {
    fn err(&self, key: String, problem: Problem) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            key,
            problem,
        }
    }

    fn wrong_type(&self, key: String, expected: &'static str, v: &Value) -> ConfigError {
        self.err(
            key,
            Problem::WrongType {
                expected,
                found: type_name(v),
            },
        )
    }

    fn reject_unknown(&self, prefix: &str, t: &Table, known: &[&str]) -> Result<(), ConfigError> {
        match t.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(self.err(join(prefix, k), Problem::UnknownKey)),
            None => Ok(()),
        }
    }

    fn string(&self, prefix: &str, t: &Table, key: &str) -> Result<Option<String>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong_type(join(prefix, key), "a string", v)),
        }
    }

    fn required_string(&self, prefix: &str, t: &Table, key: &str) -> Result<String, ConfigError> {
        self.string(prefix, t, key)?
            .ok_or_else(|| self.err(join(prefix, key), Problem::Missing))
    }

    fn bool(&self, prefix: &str, t: &Table, key: &str) -> Result<Option<bool>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(join(prefix, key), "a boolean", v)),
        }
    }

    fn int(&self, prefix: &str, t: &Table, key: &str) -> Result<Option<i64>, ConfigError> {
        match t.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(*i)),
            Some(v) => Err(self.wrong_type(join(prefix, key), "an integer", v)),
        }
    }

    /// An integer key that must lie in `range` (`unit` follows the range
    /// in the error, e.g. " milliseconds").
    fn int_in(
        &self,
        prefix: &str,
        t: &Table,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
        unit: &str,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(v) = self.int(prefix, t, key)? else {
            return Ok(None);
        };
        match u64::try_from(v) {
            Ok(u) if range.contains(&u) => Ok(Some(u)),
            _ => Err(self.err(
                join(prefix, key),
                Problem::OutOfRange {
                    value: v,
                    range: format!("{}..={}{unit}", range.start(), range.end()),
                },
            )),
        }
    }

    fn choice<T: Copy>(
        &self,
        prefix: &str,
        t: &Table,
        key: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, ConfigError> {
        let Some(s) = self.string(prefix, t, key)? else {
            return Ok(None);
        };
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(Some(*v)),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                Err(self.err(
                    join(prefix, key),
                    Problem::BadValue {
                        value: s,
                        expected: format!("one of {}", names.join(", ")),
                    },
                ))
            }
        }
    }

    fn name(&self, key: String, value: &str) -> Result<(), ConfigError> {
        let ok = !value.is_empty()
            && value.len() <= MAX_NAME_BYTES
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && !value.starts_with('.');
        if ok {
            Ok(())
        } else {
            Err(self.err(
                key,
                Problem::BadValue {
                    value: value.to_owned(),
                    expected: format!(
                        "1 to {MAX_NAME_BYTES} characters of letters, digits, '-', '_' or '.', not starting with '.'"
                    ),
                },
            ))
        }
    }

    fn config(&self, mut top: Table) -> Result<Config, ConfigError> {
        let mut known = vec!["resource", "protocol", "secret", "nodes"];
        known.extend_from_slice(&NODE_OPTION_KEYS);
        self.reject_unknown("", &top, &known)?;

        let resource = self.required_string("", &top, "resource")?;
        self.name("resource".into(), &resource)?;
        let protocol = self
            .choice(
                "",
                &top,
                "protocol",
                &[("A", Protocol::A), ("B", Protocol::B), ("C", Protocol::C)],
            )?
            .unwrap_or(Protocol::C);
        let secret = self.string("", &top, "secret")?;
        if secret.as_deref() == Some("") {
            return Err(self.err(
                "secret".into(),
                Problem::BadValue {
                    value: String::new(),
                    expected: "a non-empty shared secret".into(),
                },
            ));
        }
        let defaults = self.options("", &top, &NodeOptions::default())?;

        let nodes_table = match top.remove("nodes") {
            None => return Err(self.err("nodes".into(), Problem::Missing)),
            Some(Value::Table(t)) => t,
            Some(v) => return Err(self.wrong_type("nodes".into(), "a table of node sections", &v)),
        };
        if nodes_table.is_empty() {
            return Err(self.err(
                "nodes".into(),
                Problem::BadValue {
                    value: "{}".into(),
                    expected: "one or two [nodes.NAME] sections".into(),
                },
            ));
        }
        if nodes_table.len() > MAX_NODES {
            let names: Vec<&str> = nodes_table.keys().map(String::as_str).collect();
            return Err(self.err(
                "nodes".into(),
                Problem::BadValue {
                    value: names.join(", "),
                    expected: format!("at most {MAX_NODES} nodes"),
                },
            ));
        }
        let replicated = nodes_table.len() > 1;
        let mut nodes = BTreeMap::new();
        for (name, value) in nodes_table {
            let prefix = format!("nodes.{name}");
            self.name(prefix.clone(), &name)?;
            let Value::Table(t) = value else {
                return Err(self.wrong_type(prefix, "a table", &value));
            };
            let node = self.node(&prefix, &name, &resource, &t, &defaults, replicated)?;
            nodes.insert(name, node);
        }

        if replicated {
            if secret.is_none() {
                return Err(self.err("secret".into(), Problem::Missing));
            }
            let v: Vec<&NodeConfig> = nodes.values().collect();
            if v[0].replication == v[1].replication {
                let addr = v[1].replication.as_ref().map(ToString::to_string);
                return Err(self.err(
                    format!("nodes.{}.replication", v[1].name),
                    Problem::Duplicate {
                        value: addr.unwrap_or_default(),
                        other_key: format!("nodes.{}.replication", v[0].name),
                    },
                ));
            }
        }

        Ok(Config {
            path: self.file.to_owned(),
            resource,
            protocol,
            secret,
            nodes,
        })
    }

    fn node(
        &self,
        prefix: &str,
        name: &str,
        resource: &str,
        t: &Table,
        defaults: &NodeOptions,
        replicated: bool,
    ) -> Result<NodeConfig, ConfigError> {
        let mut known = vec!["replication", "nbd", "control", "disk", "meta"];
        known.extend_from_slice(&NODE_OPTION_KEYS);
        self.reject_unknown(prefix, t, &known)?;

        let replication = match self.string(prefix, t, "replication")? {
            Some(s) => Some(
                parse_host_port(&s)
                    .map_err(|reason| self.bad_address(join(prefix, "replication"), &s, reason))?,
            ),
            None if replicated => {
                return Err(self.err(join(prefix, "replication"), Problem::Missing));
            }
            None => None,
        };
        let nbd_s = self.required_string(prefix, t, "nbd")?;
        let nbd = parse_nbd_address(&nbd_s)
            .map_err(|reason| self.bad_address(join(prefix, "nbd"), &nbd_s, reason))?;
        let control = match self.string(prefix, t, "control")? {
            Some(s) if s.is_empty() => {
                return Err(self.err(
                    join(prefix, "control"),
                    Problem::BadValue {
                        value: s,
                        expected: "a socket path".into(),
                    },
                ))
            }
            Some(s) => PathBuf::from(s),
            None => PathBuf::from(format!("/run/replicator/{resource}-{name}.sock")),
        };
        let disk = self.required_string(prefix, t, "disk")?;
        if disk.is_empty() {
            return Err(self.err(
                join(prefix, "disk"),
                Problem::BadValue {
                    value: disk,
                    expected: "a block device or file path".into(),
                },
            ));
        }
        let meta = match self.string(prefix, t, "meta")?.as_deref() {
            None | Some("internal") => MetaLocation::Internal,
            Some("") => {
                return Err(self.err(
                    join(prefix, "meta"),
                    Problem::BadValue {
                        value: String::new(),
                        expected: "\"internal\" or a path".into(),
                    },
                ))
            }
            Some(p) => MetaLocation::External(PathBuf::from(p)),
        };
        let options = self.options(prefix, t, defaults)?;
        let disk = PathBuf::from(disk);
        let clash = |key: &str, value: String, other_key: &str, other_value: String, why| {
            self.err(
                join(prefix, key),
                Problem::Clash(Box::new(Clash {
                    value,
                    other_key: join(prefix, other_key),
                    other_value,
                    why,
                })),
            )
        };
        if let MetaLocation::External(path) = &meta {
            if *path == disk {
                // create-md would write the metadata over the disk's start.
                let (m, d) = (path.display().to_string(), disk.display().to_string());
                return Err(clash("meta", m, "disk", d, META_IS_DISK));
            }
        }
        if let (NbdAddress::Tcp(n), Some(r)) = (&nbd, &replication) {
            if listen_overlap(n, r) {
                let why = "the NBD export and the peer link cannot listen on one port";
                return Err(clash(
                    "nbd",
                    n.to_string(),
                    "replication",
                    r.to_string(),
                    why,
                ));
            }
        }
        Ok(NodeConfig {
            name: name.to_owned(),
            replication,
            nbd,
            control,
            disk,
            meta,
            options,
        })
    }

    fn bad_address(&self, key: String, value: &str, reason: String) -> ConfigError {
        self.err(
            key,
            Problem::BadAddress {
                value: value.to_owned(),
                reason,
            },
        )
    }

    fn options(
        &self,
        prefix: &str,
        t: &Table,
        base: &NodeOptions,
    ) -> Result<NodeOptions, ConfigError> {
        let mut o = base.clone();
        if let Some(v) = self.choice(
            prefix,
            t,
            "io_engine",
            &[("uring", IoEngineKind::Uring), ("sync", IoEngineKind::Sync)],
        )? {
            o.io_engine = v;
        }
        if let Some(v) = self.bool(prefix, t, "direct")? {
            o.direct = v;
        }
        if let Some(v) = self.int(prefix, t, "bitmap_block_bytes")? {
            let ok = v >= MIN_BITMAP_BLOCK_BYTES as i64
                && v <= MAX_BITMAP_BLOCK_BYTES as i64
                && (v as u64).is_power_of_two();
            if !ok {
                return Err(self.err(
                    join(prefix, "bitmap_block_bytes"),
                    Problem::BadBitmapBlockSize(v),
                ));
            }
            o.bitmap_block_bytes = v as u64;
        }
        let al = u64::from(*AL_EXTENTS_RANGE.start())..=u64::from(*AL_EXTENTS_RANGE.end());
        if let Some(v) = self.int_in(prefix, t, "al_extents", al, "")? {
            o.al_extents = v as u32;
        }
        if let Some(v) = t.get("resync_rate") {
            let key = join(prefix, "resync_rate");
            let rate = match v {
                Value::Integer(i) if *i > 0 => *i as u64,
                Value::Integer(i) => {
                    return Err(self.err(
                        key,
                        Problem::OutOfRange {
                            value: *i,
                            range: "1.. bytes per second".into(),
                        },
                    ))
                }
                Value::String(s) => parse_rate(s).ok_or_else(|| {
                    self.err(
                        key,
                        Problem::BadValue {
                            value: s.clone(),
                            expected: "a positive number of bytes per second, optionally with a K, M or G suffix (powers of 1024)".into(),
                        },
                    )
                })?,
                other => {
                    return Err(self.wrong_type(
                        key,
                        "an integer or a string like \"100M\"",
                        other,
                    ))
                }
            };
            o.resync_rate_bytes_per_s = Some(rate);
        }
        if let Some(v) = self.choice(
            prefix,
            t,
            "split_brain",
            &[
                ("disconnect", SplitBrainPolicy::Disconnect),
                ("discard-zero-changes", SplitBrainPolicy::DiscardZeroChanges),
                (
                    "discard-younger-primary",
                    SplitBrainPolicy::DiscardYoungerPrimary,
                ),
                (
                    "discard-least-changes",
                    SplitBrainPolicy::DiscardLeastChanges,
                ),
            ],
        )? {
            o.split_brain = v;
        }
        if let Some(v) = self.bool(prefix, t, "read_only")? {
            o.read_only = v;
        }
        if let Some(v) = self.int_in(
            prefix,
            t,
            "timeout_ms",
            PEER_TIMEOUT_MS_RANGE,
            " milliseconds",
        )? {
            o.peer_timeout_ms = v;
        }
        let busy = crate::busy_poll::BUSY_POLL_US_RANGE;
        if let Some(v) = self.int_in(prefix, t, "busy_poll_us", busy, " microseconds")? {
            o.busy_poll_us = v;
        }
        Ok(o)
    }
}

/// Parses `"100M"`-style rates: digits and an optional K/M/G suffix (×1024ⁿ).
fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(mult).filter(|&v| v > 0)
}

/// Parses `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| "an IPv6 address must be written [ADDR]:PORT".to_owned())?;
        h.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{h:?} is not an IPv6 address"))?;
        (h, p)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| "expected HOST:PORT".to_owned())?;
        if h.contains(':') {
            return Err("an IPv6 address must be written [ADDR]:PORT".into());
        }
        (h, p)
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
    {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number (0-65535)"))?;
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// Parses an `nbd` value: `HOST:PORT` or `unix:/absolute/path`.
pub fn parse_nbd_address(s: &str) -> Result<NbdAddress, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err("a unix socket path must be absolute (unix:/path)".into());
        }
        return Ok(NbdAddress::Unix(PathBuf::from(path)));
    }
    parse_host_port(s).map(NbdAddress::Tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_NODE: &str = r#"
resource = "vm1"

[nodes.alpha]
nbd  = "127.0.0.1:10809"
disk = "/var/tmp/vm1.img"
"#;

    const TWO_NODES: &str = r#"
resource = "vm1"
protocol = "B"
secret   = "change-me"
io_engine = "sync"
resync_rate = "100M"

[nodes.alpha]
replication = "10.0.0.1:7789"
nbd         = "0.0.0.0:10809"
control     = "/run/replicator/vm1-alpha.sock"
disk        = "/dev/vg0/vm1"
meta        = "internal"

[nodes.bravo]
replication = "10.0.0.2:7789"
nbd         = "unix:/run/replicator/vm1.nbd"
control     = "/run/replicator/vm1-bravo.sock"
disk        = "/dev/vg0/vm1"
meta        = "/dev/vg0/vm1-meta"
io_engine   = "uring"
direct      = true
"#;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/replicator/vm1.toml"), text)
    }

    /// Asserts the error names the file and the key, and returns it.
    fn expect_key_error(text: &str, key: &str) -> ConfigError {
        let err = parse_str(text).expect_err("config should be refused");
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/replicator/vm1.toml"),
            "no file in: {msg}"
        );
        assert!(msg.contains(&format!("`{key}`")), "no key {key} in: {msg}");
        assert_eq!(err.key(), Some(key), "{msg}");
        assert!(!msg.contains('\n'), "not one sentence: {msg}");
        err
    }

    #[test]
    fn one_node_config_parses_with_defaults() {
        // Proves the minimal one-node file parses and every default is applied.
        let c = parse_str(ONE_NODE).unwrap();
        assert_eq!(c.resource, "vm1");
        assert_eq!(c.protocol, Protocol::C);
        assert_eq!(c.secret, None);
        let a = c.node("alpha").unwrap();
        assert_eq!(a.options, NodeOptions::default());
        assert_eq!(a.options.io_engine, IoEngineKind::Uring);
        assert_eq!(a.options.bitmap_block_bytes, 4096);
        assert_eq!(a.meta, MetaLocation::Internal);
        assert_eq!(a.replication, None);
        assert_eq!(
            a.nbd,
            NbdAddress::Tcp(HostPort {
                host: "127.0.0.1".into(),
                port: 10809
            })
        );
        assert_eq!(a.control, PathBuf::from("/run/replicator/vm1-alpha.sock"));
    }

    #[test]
    fn two_node_config_parses_both_nodes_with_overrides() {
        // Proves both nodes of a replicated file are read with the same keys,
        // distinct addresses, and per-node overrides of top-level options.
        let c = parse_str(TWO_NODES).unwrap();
        assert_eq!(c.protocol, Protocol::B);
        assert_eq!(c.secret.as_deref(), Some("change-me"));
        assert_eq!(c.nodes.len(), 2);
        let a = c.node("alpha").unwrap();
        let b = c.node("bravo").unwrap();
        assert_ne!(a.replication, b.replication);
        assert_eq!(a.replication.as_ref().unwrap().to_string(), "10.0.0.1:7789");
        assert_eq!(a.options.io_engine, IoEngineKind::Sync);
        assert_eq!(b.options.io_engine, IoEngineKind::Uring);
        assert!(!a.options.direct);
        assert!(b.options.direct);
        assert_eq!(a.options.resync_rate_bytes_per_s, Some(100 << 20));
        assert_eq!(b.options.resync_rate_bytes_per_s, Some(100 << 20));
        assert_eq!(b.nbd, NbdAddress::Unix("/run/replicator/vm1.nbd".into()));
        assert_eq!(b.meta, MetaLocation::External("/dev/vg0/vm1-meta".into()));
        assert_eq!(c.peer_of("alpha").unwrap().name, "bravo");
        assert_eq!(c.peer_of("bravo").unwrap().name, "alpha");
    }

    #[test]
    fn unknown_top_level_key_is_refused_naming_it() {
        // Proves a misspelt top-level key is an error naming file and key.
        let text = format!("protocoll = \"C\"\n{ONE_NODE}");
        let e = expect_key_error(&text, "protocoll");
        assert_eq!(e.problem(), Some(&Problem::UnknownKey));
    }

    #[test]
    fn unknown_node_key_is_refused_with_dotted_path() {
        // Proves an unknown key inside a node section is reported with its full path.
        let text = ONE_NODE.replace("disk =", "dsik = \"x\"\ndisk =");
        let e = expect_key_error(&text, "nodes.alpha.dsik");
        assert_eq!(e.problem(), Some(&Problem::UnknownKey));
    }

    #[test]
    fn wrong_type_is_refused_naming_expected_type() {
        // Proves a value of the wrong TOML type names the key and both types.
        let text = ONE_NODE.replace("disk =", "direct = \"yes\"\ndisk =");
        let e = expect_key_error(&text, "nodes.alpha.direct");
        assert!(
            e.to_string().contains("must be a boolean, found a string"),
            "{e}"
        );
    }

    #[test]
    fn bad_enum_value_is_refused_listing_choices() {
        // Proves an unknown io_engine value is refused and the choices are listed.
        let text = ONE_NODE.replace("disk =", "io_engine = \"aio\"\ndisk =");
        let e = expect_key_error(&text, "nodes.alpha.io_engine");
        let msg = e.to_string();
        assert!(
            msg.contains("\"aio\"") && msg.contains("\"uring\", \"sync\""),
            "{msg}"
        );
        let text = format!("split_brain = \"random\"\n{ONE_NODE}");
        expect_key_error(&text, "split_brain");
        let text = format!("protocol = \"D\"\n{ONE_NODE}");
        expect_key_error(&text, "protocol");
    }

    #[test]
    fn bad_addresses_are_refused_with_reason() {
        // Proves malformed nbd and replication addresses name the key and the reason.
        for bad in [
            "127.0.0.1",
            "127.0.0.1:99999",
            ":10809",
            "unix:relative.sock",
            "::1:80",
        ] {
            let text = ONE_NODE.replace("127.0.0.1:10809", bad);
            let e = expect_key_error(&text, "nodes.alpha.nbd");
            assert!(
                matches!(e.problem(), Some(Problem::BadAddress { .. })),
                "{e}"
            );
        }
        let text = TWO_NODES.replace("10.0.0.2:7789", "10.0.0.2:port");
        expect_key_error(&text, "nodes.bravo.replication");
    }

    #[test]
    fn good_address_forms_are_accepted() {
        // Proves IPv4, bracketed IPv6, host names and unix paths are all accepted.
        assert_eq!(parse_host_port("[::1]:7789").unwrap().host, "::1");
        assert_eq!(
            parse_host_port("[::1]:7789").unwrap().to_string(),
            "[::1]:7789"
        );
        assert_eq!(parse_host_port("node-b.lan:7789").unwrap().port, 7789);
        assert_eq!(
            parse_nbd_address("unix:/run/x.sock").unwrap(),
            NbdAddress::Unix("/run/x.sock".into())
        );
    }

    #[test]
    fn missing_required_keys_are_refused() {
        // Proves missing disk, nbd, resource, nodes, and (with two nodes)
        // replication and secret are each reported by key.
        expect_key_error(
            &ONE_NODE.replace("disk = \"/var/tmp/vm1.img\"", ""),
            "nodes.alpha.disk",
        );
        expect_key_error(
            &ONE_NODE.replace("nbd  = \"127.0.0.1:10809\"", ""),
            "nodes.alpha.nbd",
        );
        expect_key_error(&ONE_NODE.replace("resource = \"vm1\"", ""), "resource");
        expect_key_error("resource = \"vm1\"\n", "nodes");
        let text = TWO_NODES.replace("replication = \"10.0.0.2:7789\"", "");
        expect_key_error(&text, "nodes.bravo.replication");
        let text = TWO_NODES.replace("secret   = \"change-me\"", "");
        let e = expect_key_error(&text, "secret");
        assert_eq!(e.problem(), Some(&Problem::Missing));
    }

    #[test]
    fn same_replication_address_on_both_nodes_is_refused() {
        // Proves two nodes cannot share one replication address.
        let text = TWO_NODES.replace("10.0.0.2:7789", "10.0.0.1:7789");
        let e = expect_key_error(&text, "nodes.bravo.replication");
        assert!(
            matches!(e.problem(), Some(Problem::Duplicate { .. })),
            "{e}"
        );
    }

    #[test]
    fn external_metadata_on_the_disk_itself_is_refused() {
        // Proves a meta path equal to the disk is refused before create-md
        // could write metadata over the start of the data.
        let text = TWO_NODES.replace(
            r#"meta        = "/dev/vg0/vm1-meta""#,
            r#"meta        = "/dev/vg0/vm1""#,
        );
        let e = expect_key_error(&text, "nodes.bravo.meta");
        assert!(matches!(e.problem(), Some(Problem::Clash(_))), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("`nodes.bravo.disk`") && msg.contains("internal"),
            "{msg}"
        );
    }

    #[test]
    fn nbd_on_the_replication_port_is_refused() {
        // Proves a node cannot listen for NBD where its peer link listens:
        // the same address, or a wildcard host on the same port.
        for nbd in ["10.0.0.1:7789", "0.0.0.0:7789", "[::]:7789"] {
            let text = TWO_NODES.replace("0.0.0.0:10809", nbd);
            let e = expect_key_error(&text, "nodes.alpha.nbd");
            assert!(matches!(e.problem(), Some(Problem::Clash(_))), "{nbd}: {e}");
            assert!(e.to_string().contains("`nodes.alpha.replication`"), "{e}");
        }
        // Another port, or another address of the host on the same port,
        // is fine.
        for nbd in ["10.0.0.1:7790", "127.0.0.1:7789"] {
            let text = TWO_NODES.replace("0.0.0.0:10809", nbd);
            parse_str(&text).unwrap_or_else(|e| panic!("{nbd}: {e}"));
        }
    }

    #[test]
    fn three_nodes_are_refused() {
        // Proves a resource is limited to two nodes.
        let text = format!("{TWO_NODES}\n[nodes.charlie]\nreplication = \"10.0.0.3:1\"\nnbd = \"1.2.3.4:1\"\ndisk = \"/x\"\n");
        expect_key_error(&text, "nodes");
    }

    #[test]
    fn unknown_node_is_refused_listing_nodes_present() {
        // Proves --node with a name not in the file lists the names that are.
        let c = parse_str(TWO_NODES).unwrap();
        let e = c.node("charlie").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/replicator/vm1.toml"), "{msg}");
        assert!(
            msg.contains("\"charlie\"") && msg.contains("alpha, bravo"),
            "{msg}"
        );
    }

    #[test]
    fn bad_bitmap_block_size_is_refused() {
        // Proves bitmap_block_bytes must be a power of two of at least 512.
        for bad in ["1000", "256", "0", "-4096", "2097152"] {
            let text = format!("bitmap_block_bytes = {bad}\n{ONE_NODE}");
            let e = expect_key_error(&text, "bitmap_block_bytes");
            assert!(
                matches!(e.problem(), Some(Problem::BadBitmapBlockSize(_))),
                "{e}"
            );
        }
        let text = format!("bitmap_block_bytes = 65536\n{ONE_NODE}");
        let c = parse_str(&text).unwrap();
        assert_eq!(c.node("alpha").unwrap().options.bitmap_block_bytes, 65536);
    }

    #[test]
    fn resync_rate_accepts_integers_and_suffixes_and_refuses_garbage() {
        // Proves the documented rate forms parse and others are refused by key.
        assert_eq!(parse_rate("100M"), Some(100 << 20));
        assert_eq!(parse_rate("4k"), Some(4096));
        assert_eq!(parse_rate("1G"), Some(1 << 30));
        assert_eq!(parse_rate("512"), Some(512));
        for bad in [
            "\"fast\"",
            "\"M\"",
            "\"0\"",
            "0",
            "-5",
            "1.5",
            "\"99999999999999999999G\"",
        ] {
            let text = format!("resync_rate = {bad}\n{ONE_NODE}");
            expect_key_error(&text, "resync_rate");
        }
    }

    #[test]
    fn al_extents_out_of_range_is_refused() {
        // Proves al_extents is bounded to DRBD's range.
        expect_key_error(&format!("al_extents = 3\n{ONE_NODE}"), "al_extents");
        expect_key_error(&format!("al_extents = 70000\n{ONE_NODE}"), "al_extents");
    }

    #[test]
    fn timeout_ms_defaults_overrides_per_node_and_is_bounded() {
        // Proves the peer timeout key: a few-second default, a top-level
        // value a node section may override, and out-of-range or mistyped
        // values refused naming the key.
        let c = parse_str(ONE_NODE).unwrap();
        assert_eq!(
            c.nodes["alpha"].options.peer_timeout_ms,
            DEFAULT_PEER_TIMEOUT_MS
        );
        let c = parse_str(&format!("timeout_ms = 3000\n{ONE_NODE}")).unwrap();
        assert_eq!(c.nodes["alpha"].options.peer_timeout_ms, 3000);
        let text = ONE_NODE.replace("[nodes.alpha]", "[nodes.alpha]\ntimeout_ms = 2500");
        let c = parse_str(&format!("timeout_ms = 3000\n{text}")).unwrap();
        assert_eq!(c.nodes["alpha"].options.peer_timeout_ms, 2500);
        for bad in ["100", "60000", "-1", "\"5s\""] {
            expect_key_error(&format!("timeout_ms = {bad}\n{ONE_NODE}"), "timeout_ms");
        }
    }

    #[test]
    fn busy_poll_us_defaults_overrides_per_node_and_is_bounded() {
        // Proves the busy-poll key: a default, 0 to turn it off, a per-node
        // override, and out-of-range or mistyped values refused naming the key.
        let c = parse_str(ONE_NODE).unwrap();
        assert_eq!(
            c.nodes["alpha"].options.busy_poll_us,
            crate::busy_poll::DEFAULT_BUSY_POLL_US
        );
        let c = parse_str(&format!("busy_poll_us = 0\n{ONE_NODE}")).unwrap();
        assert_eq!(c.nodes["alpha"].options.busy_poll_us, 0);
        let text = ONE_NODE.replace("[nodes.alpha]", "[nodes.alpha]\nbusy_poll_us = 50");
        let c = parse_str(&format!("busy_poll_us = 0\n{text}")).unwrap();
        assert_eq!(c.nodes["alpha"].options.busy_poll_us, 50);
        for bad in ["1001", "-1", "\"200us\"", "true"] {
            expect_key_error(&format!("busy_poll_us = {bad}\n{ONE_NODE}"), "busy_poll_us");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        // Proves resource and node names are restricted to safe characters.
        expect_key_error(&ONE_NODE.replace("\"vm1\"", "\"vm/1\""), "resource");
        let text = ONE_NODE.replace("[nodes.alpha]", "[nodes.\"al pha\"]");
        expect_key_error(&text, "nodes.al pha");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        // Proves malformed TOML is reported with the file and line number.
        let e = parse_str("resource = \"vm1\"\nprotocol = \n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/replicator/vm1.toml:2:"), "{msg}");
        assert!(matches!(e, ConfigError::Syntax { line: 2, .. }));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            // Proves any text is refused or accepted, never a panic.
            let _ = parse_str(&text);
        }

        #[test]
        fn mutated_valid_config_never_panics(pos in 0usize..400, junk in "[\\[\\]=\"a-z0-9.: \n]{0,12}") {
            // Proves near-valid configs (the likeliest typos) never panic and
            // any error is still one line.
            let mut text = TWO_NODES.to_owned();
            let mut at = pos.min(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.insert_str(at, &junk);
            if let Err(e) = parse_str(&text) {
                proptest::prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }
    }

    #[test]
    fn load_reports_missing_file() {
        // Proves a nonexistent config file is a read error naming it.
        let e = load(Path::new("/nonexistent/replicator.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/replicator.toml"));
    }
}
