//! `/debug/pprof/profile`: a CPU profile of the whole process, in the pprof protobuf format
//! (`go tool pprof` reads it), as ztunnel serves it: sampled by `pprof-rs` (`SIGPROF` at
//! [`FREQUENCY`] Hz of CPU time, every thread) for [`DEFAULT_SECONDS`] seconds, or `?seconds=N`
//! (1 to [`MAX_SECONDS`]). One profile at a time: a second request while one runs is refused.
//!
//! The messages are perftools' `profile.proto`, declared here with `prost`'s derive (its field
//! numbers), so that no protobuf compiler is needed to build.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;

/// Samples per second of CPU time (ztunnel's).
pub const FREQUENCY: i32 = 1000;
/// How long a profile samples without `?seconds=` (ztunnel's fixed duration).
pub const DEFAULT_SECONDS: u64 = 10;
/// The longest profile a request may ask for.
pub const MAX_SECONDS: u64 = 120;

/// perftools' `Profile` message.
#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    /// What each value of a sample is (`samples`/`count`, `cpu`/`nanoseconds`).
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The stacks sampled.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// The code locations of the stacks.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// The functions of the locations.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string, referred to by index; the first is empty.
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// When sampling started (nanoseconds since the epoch).
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// How long it sampled.
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// What the sampling period counts.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// The sampling period.
    #[prost(int64, tag = "12")]
    pub period: i64,
}

/// perftools' `ValueType`: a type and a unit, as string table indexes.
#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    /// The type's name.
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// The unit's name.
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// perftools' `Sample`: a stack (leaf first) and its values.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// The locations, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// The thread's name.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// perftools' `Label`.
#[derive(Clone, PartialEq, Message)]
pub struct Label {
    /// The key.
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// The string value.
    #[prost(int64, tag = "2")]
    pub str: i64,
}

/// perftools' `Location`.
#[derive(Clone, PartialEq, Message)]
pub struct Location {
    /// The location's id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The function and line.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// perftools' `Line`.
#[derive(Clone, PartialEq, Message)]
pub struct Line {
    /// The function.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// The source line, 0 when unknown.
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// perftools' `Function`.
#[derive(Clone, PartialEq, Message)]
pub struct Function {
    /// The function's id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The demangled name.
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// The symbol's name.
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// The source file.
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// The string table of a profile being built.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut strings = Strings::default();
        strings.get("");
        strings
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = i64::try_from(self.table.len()).unwrap_or(i64::MAX);
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// The profile of `report` in perftools' format: one location per symbol (inlined frames
/// included), samples labelled with their thread's name.
pub fn encode(report: &pprof::Report) -> Profile {
    let mut strings = Strings::new();
    let samples_type = ValueType {
        r#type: strings.get("samples"),
        unit: strings.get("count"),
    };
    let cpu_type = ValueType {
        r#type: strings.get("cpu"),
        unit: strings.get("nanoseconds"),
    };
    let thread_key = strings.get("thread");
    let frequency = i64::from(report.timing.frequency.max(1));
    let period = 1_000_000_000 / frequency;
    let mut functions: HashMap<String, u64> = HashMap::new();
    let mut profile = Profile {
        sample_type: vec![samples_type, cpu_type.clone()],
        time_nanos: report
            .timing
            .start_time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        duration_nanos: i64::try_from(report.timing.duration.as_nanos()).unwrap_or(i64::MAX),
        period_type: Some(cpu_type),
        period,
        ..Profile::default()
    };
    for (frames, count) in &report.data {
        let mut location_id = Vec::new();
        for symbol in frames.frames.iter().flatten() {
            let name = symbol.name();
            let id = match functions.get(&name) {
                Some(&id) => id,
                None => {
                    let id = profile.function.len() as u64 + 1;
                    profile.function.push(Function {
                        id,
                        name: strings.get(&name),
                        system_name: strings.get(&symbol.sys_name()),
                        filename: strings.get(&symbol.filename()),
                    });
                    profile.location.push(Location {
                        id,
                        line: vec![Line {
                            function_id: id,
                            line: i64::from(symbol.lineno()),
                        }],
                    });
                    functions.insert(name, id);
                    id
                }
            };
            location_id.push(id);
        }
        let count = i64::try_from(*count).unwrap_or(i64::MAX);
        profile.sample.push(Sample {
            location_id,
            value: vec![count, count.saturating_mul(period)],
            label: vec![Label {
                key: thread_key,
                str: strings.get(&frames.thread_name_or_id()),
            }],
        });
    }
    profile.string_table = strings.table;
    profile
}

/// Samples the process's CPU for `duration` (on a thread of its own: the caller's runtime keeps
/// running) and returns the encoded profile; `Err` says why it could not (another profile
/// running, the timer refused).
pub async fn cpu_profile(duration: Duration) -> Result<Vec<u8>, String> {
    let sampled = tokio::task::spawn_blocking(move || {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| format!("starting the profiler: {e}"))?;
        std::thread::sleep(duration);
        let report = guard
            .report()
            .build()
            .map_err(|e| format!("building the profile: {e}"))?;
        Ok::<_, String>(encode(&report).encode_to_vec())
    });
    sampled.await.map_err(|e| format!("the profiling thread failed: {e}"))?
}

/// The duration `?seconds=` asks for: [`DEFAULT_SECONDS`] without one; `Err` names a bad one.
pub fn requested_seconds(query: Option<&str>) -> Result<Duration, String> {
    let Some(value) = query else {
        return Ok(Duration::from_secs(DEFAULT_SECONDS));
    };
    match value.parse::<u64>() {
        Ok(seconds) if (1..=MAX_SECONDS).contains(&seconds) => Ok(Duration::from_secs(seconds)),
        _ => Err(format!(
            "seconds={value}: a whole number from 1 to {MAX_SECONDS} was expected"
        )),
    }
}
