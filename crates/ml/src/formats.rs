//! Datasets in the formats real competitions use: JSONL, a JSON array, and CSV, with a
//! field mapping (`text`, or Alpaca's `system`/`instruction`/`input`/`output`, or a chat
//! `messages` list of role/content turns). A malformed file (bad JSON, a non-object record,
//! a CSV row of the wrong width, an unclosed quote) is refused whole, naming the line or
//! row; well-formed records that do not fit the mapping are counted and reported by line
//! or row, and a file none of whose records fit is refused.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::Turn;
use crate::data::Record;
use crate::error::MlError;

/// Which fields of a record hold what. Every field is optional; the defaults read
/// `text`, `prompt`/`instruction` (+ `input`), `response`/`output`, `system` and
/// `messages`, as tunenet's JSONL always has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMap {
    /// Plain text, trained on whole.
    pub text: Option<String>,
    /// A system prompt put before the instruction.
    pub system: Option<String>,
    /// The instruction (Alpaca's `instruction`, or a `prompt`).
    pub instruction: Option<String>,
    /// Extra input appended to the instruction (Alpaca's `input`).
    pub input: Option<String>,
    /// The response trained on (Alpaca's `output`, or a `response`).
    pub output: Option<String>,
    /// A list of `{"role", "content"}` turns; the assistant turns are trained on.
    pub messages: Option<String>,
}

/// A record that did not fit, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    /// 1-based line (JSONL, CSV: counting the header), array index + 1 (JSON) or row
    /// (Parquet).
    pub at: usize,
    pub problem: String,
}

/// What a dataset file gave.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetLoad {
    pub records: Vec<Record>,
    /// Records that did not fit the mapping (the first ones; `bad_count` counts them all).
    pub bad: Vec<BadRecord>,
    pub bad_count: usize,
    /// "jsonl", "json", "csv" or "parquet".
    pub format: &'static str,
}

impl DatasetLoad {
    /// What `BadRecord::at` counts: "record" (a JSON array's), "row" (Parquet's) or "line".
    pub fn unit(&self) -> &'static str {
        match self.format {
            "json" => "record",
            "parquet" => "row",
            _ => "line",
        }
    }
}

/// The rows of a Parquet file as JSON objects (nested lists and structs, such as chat
/// `messages`, become JSON arrays and objects). Err: the row (None: the whole file) and
/// what is wrong.
///
/// The parquet crate is read on a worker thread, under a deadline and with its panics
/// caught: some malformed files make it panic (a length in the file's metadata it
/// allocated from unchecked: `capacity overflow`, found by fuzzing) and some take it
/// seconds on a few hundred bytes (page headers it skips field by field; the input is in
/// fuzz/known/dataset/). A bad file must be an error, not the validator's crash or stall.
/// At the deadline the worker is told to stop: every read it makes of the file's bytes
/// fails from then on (the slow inputs read a byte at a time), so it ends within one read
/// instead of spending a core for as long as the file keeps it busy.
fn parquet_rows(bytes: &[u8]) -> Result<Vec<Row>, (Option<usize>, String)> {
    let stop = Arc::new(AtomicBool::new(false));
    let owned = Guarded {
        bytes: bytes::Bytes::copy_from_slice(bytes),
        stop: stop.clone(),
        pause: READ_PAUSE.with(|p| p.get()),
    };
    let deadline = parquet_deadline(bytes.len());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("parquet-reader".into())
        .spawn(move || {
            let _running = Running::start();
            let read = std::panic::catch_unwind(|| parquet_rows_unguarded(owned)).unwrap_or_else(
                |panic| {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "it panicked".into());
                    Err((
                        None,
                        format!(
                            "not a readable Parquet file: the Parquet reader failed on it ({why})"
                        ),
                    ))
                },
            );
            let _ = tx.send(read);
        })
        .map_err(|e| (None, format!("cannot start the Parquet reader: {e}")))?;
    let answer = rx.recv_timeout(deadline);
    if answer.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    match answer {
        Ok(read) => read,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err((
            None,
            format!(
                "not a readable Parquet file: the Parquet reader was still reading its {} bytes after {:.0} s (2 s plus 1 s per MB allowed; a well-formed file reads far faster)",
                bytes.len(),
                deadline.as_secs_f64()
            ),
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err((
            None,
            "not a readable Parquet file: the Parquet reader stopped without an answer".into(),
        )),
    }
}

/// How long a Parquet file of `len` bytes may take to read: 2 s plus 1 s per MB.
fn parquet_deadline(len: usize) -> std::time::Duration {
    std::time::Duration::from_secs_f64(2.0 + len as f64 / 1e6)
}

thread_local! {
    /// See [`pause_parquet_reads_on_this_thread`].
    static READ_PAUSE: std::cell::Cell<std::time::Duration> =
        const { std::cell::Cell::new(std::time::Duration::ZERO) };
}

/// Tests: every read of a Parquet file's bytes by a reader this thread starts pauses for
/// `pause` first, so that a file which keeps the reader busy does so past its deadline
/// however fast the build is (an input slow to read in a debug build can take
/// milliseconds in an optimised one).
#[doc(hidden)]
pub fn pause_parquet_reads_on_this_thread(pause: std::time::Duration) {
    READ_PAUSE.with(|p| p.set(pause));
}

/// Parquet readers running now, the ones told to stop included.
static PARQUET_READERS: AtomicUsize = AtomicUsize::new(0);

/// How many Parquet reader threads are running (tests: a reader past its deadline ends).
#[doc(hidden)]
pub fn parquet_readers_running() -> usize {
    PARQUET_READERS.load(Ordering::SeqCst)
}

/// Counts a reader thread while it lives.
struct Running;

impl Running {
    fn start() -> Running {
        PARQUET_READERS.fetch_add(1, Ordering::SeqCst);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        PARQUET_READERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A Parquet file's bytes whose every read fails once `stop` is set (and pauses for
/// `pause` first: zero but in tests).
struct Guarded {
    bytes: bytes::Bytes,
    stop: Arc<AtomicBool>,
    pause: std::time::Duration,
}

impl Guarded {
    fn check(stop: &AtomicBool, pause: std::time::Duration) -> std::io::Result<()> {
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if stop.load(Ordering::Relaxed) {
            Err(std::io::Error::other("stopped: past the reading deadline"))
        } else {
            Ok(())
        }
    }
}

impl parquet::file::reader::Length for Guarded {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

impl parquet::file::reader::ChunkReader for Guarded {
    type T = GuardedRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<GuardedRead> {
        Guarded::check(&self.stop, self.pause)?;
        Ok(GuardedRead {
            inner: parquet::file::reader::ChunkReader::get_read(&self.bytes, start)?,
            stop: self.stop.clone(),
            pause: self.pause,
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        Guarded::check(&self.stop, self.pause)?;
        parquet::file::reader::ChunkReader::get_bytes(&self.bytes, start, length)
    }
}

struct GuardedRead {
    inner: bytes::buf::Reader<bytes::Bytes>,
    stop: Arc<AtomicBool>,
    pause: std::time::Duration,
}

impl std::io::Read for GuardedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Guarded::check(&self.stop, self.pause)?;
        std::io::Read::read(&mut self.inner, buf)
    }
}

fn parquet_rows_unguarded(bytes: Guarded) -> Result<Vec<Row>, (Option<usize>, String)> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let stop = bytes.stop.clone();
    let reader = SerializedFileReader::new(bytes)
        .map_err(|e| (None, format!("not a readable Parquet file: {e}")))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| (None, format!("cannot read the Parquet rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Err((None, "stopped: past the reading deadline".into()));
        }
        let row = row.map_err(|e| (Some(i + 1), format!("unreadable row: {e}")))?;
        match row.to_json_value() {
            Value::Object(o) => out.push((i + 1, o)),
            other => return Err((Some(i + 1), format!("not a record: {other}"))),
        }
    }
    Ok(out)
}

/// A record's line (or index) and its fields.
type Row = (usize, Map<String, Value>);

/// Bad records kept for the report (all are counted).
const KEEP_BAD: usize = 20;

impl FieldMap {
    fn name<'a>(&'a self, set: &'a Option<String>, default: &'a str) -> &'a str {
        set.as_deref().unwrap_or(default)
    }

    /// The record in `obj`, or why it does not fit.
    pub fn record(&self, obj: &Map<String, Value>) -> Result<Record, String> {
        // An empty string counts as absent: CSV has no other way to leave a field out.
        let string = |key: &str| -> Result<Option<String>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("field {key:?} must be a string, found {other}")),
            }
        };
        if let Some(text) = string(self.name(&self.text, "text"))? {
            return Ok(Record::Text { text });
        }
        let messages_key = self.name(&self.messages, "messages");
        if let Some(m) = obj.get(messages_key).filter(|v| !v.is_null()) {
            return messages_record(m, messages_key);
        }
        let instruction = match self.instruction.as_deref() {
            Some(k) => string(k)?,
            None => match string("prompt")? {
                Some(p) => Some(p),
                None => string("instruction")?,
            },
        };
        let output = match self.output.as_deref() {
            Some(k) => string(k)?,
            None => match string("response")? {
                Some(r) => Some(r),
                None => string("output")?,
            },
        };
        let input = string(self.name(&self.input, "input"))?.filter(|s| !s.is_empty());
        let system = string(self.name(&self.system, "system"))?.filter(|s| !s.is_empty());
        match (instruction, output) {
            (Some(instr), Some(response)) => {
                let mut prompt = instr;
                if let Some(i) = input {
                    prompt.push('\n');
                    prompt.push_str(&i);
                }
                Ok(match system {
                    Some(s) => Record::Chat {
                        messages: vec![
                            Turn::new("system", s),
                            Turn::new("user", prompt),
                            Turn::new("assistant", response),
                        ],
                    },
                    None => Record::Instruction { prompt, response },
                })
            }
            (Some(_), None) => Err(match &self.output {
                Some(k) => format!("has an instruction but no output (field {k:?})"),
                None => "has an instruction but no output (\"response\" or \"output\")".into(),
            }),
            (None, Some(_)) => Err(match &self.instruction {
                Some(k) => format!("has an output but no instruction (field {k:?})"),
                None => "has an output but no instruction (\"prompt\" or \"instruction\")".into(),
            }),
            (None, None) => Err(format!(
                "has none of the mapped fields (text {:?}, instruction, output, messages {:?})",
                self.name(&self.text, "text"),
                messages_key
            )),
        }
    }
}

/// A chat record: its turns, each a `role` and `content` string, with at least one
/// assistant turn (the turns trained on).
fn messages_record(m: &Value, key: &str) -> Result<Record, String> {
    let Value::Array(turns) = m else {
        return Err(format!("field {key:?} must be a list of turns"));
    };
    let mut messages = Vec::with_capacity(turns.len());
    for (i, t) in turns.iter().enumerate() {
        let role = t.get("role").and_then(Value::as_str);
        let content = t.get("content").and_then(Value::as_str);
        match (role, content) {
            (Some(r), Some(c)) if !r.is_empty() => messages.push(Turn::new(r, c)),
            _ => {
                return Err(format!(
                    "turn {} of {key:?} needs \"role\" and \"content\" strings",
                    i + 1
                ));
            }
        }
    }
    if !messages.iter().any(|t| t.role == "assistant") {
        return Err(format!("{key:?} has no assistant turn to train on"));
    }
    Ok(Record::Chat { messages })
}

/// Reads a dataset file, its format from the extension (`.jsonl`, `.json`, `.csv`,
/// `.parquet`).
pub fn load_dataset(path: &Path, map: &FieldMap) -> Result<DatasetLoad, MlError> {
    let bytes = std::fs::read(path).map_err(|e| MlError::io("cannot read dataset", path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "jsonl" | "ndjson" => "jsonl",
        "json" => "json",
        "csv" => "csv",
        "parquet" => "parquet",
        other => {
            return Err(MlError::Invalid(format!(
                "{}: unknown dataset format {other:?}; use .jsonl, .json, .csv or .parquet",
                path.display()
            )));
        }
    };
    parse_dataset(&bytes, format, map, &path.display().to_string())
}

/// Parses dataset bytes in `format` ("jsonl", "json", "csv", "parquet"); see
/// [`load_dataset`].
pub fn parse_dataset(
    bytes: &[u8],
    format: &'static str,
    map: &FieldMap,
    source: &str,
) -> Result<DatasetLoad, MlError> {
    let invalid = |s: String| MlError::Invalid(format!("{source}: {s}"));
    let malformed = |line: usize, problem: String| MlError::Dataset {
        source_name: source.to_string(),
        line,
        problem,
    };
    let mut rows: Vec<Row> = Vec::new();
    if format == "parquet" {
        rows = parquet_rows(bytes).map_err(|(row, p)| match row {
            Some(r) => invalid(format!("row {r}: {p}")),
            None => invalid(p),
        })?;
    }
    let text = match format {
        "parquet" => "",
        _ => std::str::from_utf8(bytes).map_err(|e| invalid(format!("not UTF-8: {e}")))?,
    };
    match format {
        "parquet" => {}
        "jsonl" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(line) {
                    Ok(Value::Object(o)) => rows.push((i + 1, o)),
                    Ok(_) => return Err(malformed(i + 1, "not a JSON object".into())),
                    Err(e) => return Err(malformed(i + 1, format!("not valid JSON: {e}"))),
                }
            }
        }
        "json" => {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| malformed(e.line(), format!("not valid JSON: {e}")))?;
            let Value::Array(items) = v else {
                return Err(invalid("a JSON dataset must be an array of records".into()));
            };
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::Object(o) => rows.push((i + 1, o)),
                    _ => {
                        return Err(invalid(format!(
                            "record {} of the array is not a JSON object",
                            i + 1
                        )));
                    }
                }
            }
        }
        "csv" => rows = csv_rows(text).map_err(|(line, p)| malformed(line, p))?,
        other => return Err(invalid(format!("unknown format {other:?}"))),
    }
    let mut out = DatasetLoad {
        records: Vec::with_capacity(rows.len()),
        bad: Vec::new(),
        bad_count: 0,
        format,
    };
    for (at, row) in rows {
        match map.record(&row) {
            Ok(r) => out.records.push(r),
            Err(problem) => {
                out.bad_count += 1;
                if out.bad.len() < KEEP_BAD {
                    out.bad.push(BadRecord { at, problem });
                }
            }
        }
    }
    if out.records.is_empty() {
        let first = out
            .bad
            .first()
            .map(|b| format!("; the first, {} {}: {}", out.unit(), b.at, b.problem))
            .unwrap_or_default();
        return Err(invalid(format!(
            "no record fits the field mapping ({} did not{first})",
            out.bad_count
        )));
    }
    Ok(out)
}

/// CSV (RFC 4180: a header row, fields separated by commas, quoted with `"` when they
/// hold commas, quotes or line breaks) into one object per row, keyed by the header.
fn csv_rows(text: &str) -> Result<Vec<Row>, (usize, String)> {
    let mut records: Vec<(usize, Vec<String>)> = Vec::new();
    let (mut field, mut row) = (String::new(), Vec::new());
    let (mut quoted, mut line, mut row_line) = (false, 1usize, 1usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                let done = std::mem::take(&mut row);
                if !(done.len() == 1 && done[0].is_empty()) {
                    records.push((row_line, done));
                }
                line += 1;
                row_line = line;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err((row_line, "a quoted field is never closed".into()));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        records.push((row_line, row));
    }
    let mut it = records.into_iter();
    let (_, header) = it
        .next()
        .ok_or((1, "an empty CSV file (no header row)".to_string()))?;
    it.map(|(at, cells)| {
        if cells.len() != header.len() {
            return Err((
                at,
                format!(
                    "{} fields where the header has {}",
                    cells.len(),
                    header.len()
                ),
            ));
        }
        let obj: Map<String, Value> = header
            .iter()
            .cloned()
            .zip(cells.into_iter().map(Value::String))
            .collect();
        Ok((at, obj))
    })
    .collect()
}
