//! The Rust side's logs into Python's `logging`: a `tracing` subscriber that hands each
//! event Python would keep to the logger `transportd.native.<target>` (`libtransport::client`
//! logs to `transportd.native.libtransport.client`), and drops the rest without taking the
//! GIL.
//!
//! Why a subscriber of our own rather than tracing's `log` compatibility with `pyo3-log`:
//! that bridge learns a Python logger's level the first time each target logs (taking the
//! GIL even for a record Python then discards) and keeps it until told to forget, so a
//! level set in Python later goes unseen; it also turns span activity into records and
//! flattens fields into the text. Here the threshold is one atomic, [`refresh`]ed from
//! Python's loggers at the start of every client call (the GIL is held there anyway): an
//! event below it costs a load and a compare. Spans are never enabled, so they cost
//! nothing; an event's own fields follow its message as `key=value`.
//!
//! What reaches Python is what libtransport logs: identities, dataset names, object
//! digests, sizes, counts and outcomes, never an object's path, payload or key material
//! (its style guide's rule; the package's log-leak test checks the records).
//!
//! A forwarded event takes the GIL on the thread that logs it (a runtime worker, mostly),
//! maybe holding a lock as it does (quinn logs under its connection's lock). So no thread
//! holding the GIL may wait for such a lock: every call that waits runs with the GIL
//! released (`runtime::block_on`, or off the event loop for the asyncio client), `close`
//! too, and the last holder of a client drops it on a blocking thread (`ops::Shared`).

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// The Python logger the Rust side's records go under, one child per tracing target.
pub(crate) const LOGGER: &str = "transportd.native";

/// Installs the forwarder as this extension's tracing subscriber (each extension module
/// links its own copy of tracing, so this is ours alone) and reads Python's levels.
pub(crate) fn install(py: Python<'_>) {
    // Fails only if a subscriber is already set, which would be one of ours.
    let _ = tracing::subscriber::set_global_default(Forwarder);
    refresh(py);
}

/// Reads the lowest level any logger under [`LOGGER`] would handle (their effective
/// levels, and `logging.disable`) into the threshold events are checked against. On a
/// failure the threshold stays as it was.
pub(crate) fn refresh(py: Python<'_>) {
    if let Ok(level) = python_threshold(py) {
        THRESHOLD.store(level, Ordering::Relaxed);
    }
}

fn python_threshold(py: Python<'_>) -> PyResult<u8> {
    let logging = py.import("logging")?;
    let manager = logging.getattr("Logger")?.getattr("manager")?;
    let disabled: i64 = manager.getattr("disable")?.extract()?;
    let mut lowest: i64 = logging
        .call_method1("getLogger", (LOGGER,))?
        .call_method0("getEffectiveLevel")?
        .extract()?;
    // Child loggers may be set lower than their parent: the ones made so far (ours, on
    // their target's first record, or the application's) are in the manager's dictionary.
    let prefix = format!("{LOGGER}.");
    let loggers = manager.getattr("loggerDict")?;
    let loggers = loggers.cast::<PyDict>()?;
    for (name, logger) in loggers.iter() {
        let Ok(name) = name.cast::<PyString>() else {
            continue;
        };
        if !name.to_cow()?.starts_with(&prefix) {
            continue;
        }
        // Placeholders (a name only ever named as a parent) have no level.
        if let Ok(level) = logger.call_method0("getEffectiveLevel") {
            lowest = lowest.min(level.extract()?);
        }
    }
    let lowest = lowest.max(disabled.saturating_add(1));
    Ok(u8::try_from(lowest.clamp(0, i64::from(u8::MAX))).unwrap_or(u8::MAX))
}

/// How many events have taken the GIL to reach Python so far (`_native._forwarded_events`):
/// the package's tests check that events Python would discard never do.
#[pyfunction]
#[pyo3(name = "_forwarded_events")]
pub(crate) fn forwarded_events() -> u64 {
    FORWARDED.load(Ordering::Relaxed)
}

/// Python's number for a tracing level (Python has no TRACE; 5 is the customary one).
fn python_level(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// The subscriber: events at or above [`THRESHOLD`] go to Python, nothing else is kept.
struct Forwarder;

impl Subscriber for Forwarder {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_event() {
            // Asked again at each event: Python's levels change while we run.
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && python_level(meta.level()) >= THRESHOLD.load(Ordering::Relaxed)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Never called: no span is enabled. Any non-zero id will do.
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        // None while the interpreter shuts down: the record is dropped.
        let _ = Python::try_attach(|py| {
            FORWARDED.fetch_add(1, Ordering::Relaxed);
            // Keep an exception this thread is raising (a record may be logged while one
            // is being made) apart from anything logging does.
            let pending = PyErr::take(py);
            let _ = forward(py, event);
            if let Some(e) = pending {
                e.restore(py);
            }
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Makes and handles the record, if the target's logger would keep it.
fn forward(py: Python<'_>, event: &Event<'_>) -> PyResult<()> {
    let meta = event.metadata();
    let name = format!("{LOGGER}.{}", meta.target().replace("::", "."));
    let level = python_level(meta.level());
    let logger = py
        .import("logging")?
        .call_method1("getLogger", (name.as_str(),))?;
    if !logger.call_method1("isEnabledFor", (level,))?.is_truthy()? {
        return Ok(());
    }
    let mut text = Text::default();
    event.record(&mut text);
    if !text.fields.is_empty() {
        text.message.push_str(&text.fields);
    }
    let extra = PyDict::new(py);
    extra.set_item("rust_target", meta.target())?;
    let record = logger.call_method1(
        "makeRecord",
        (
            name,
            level,
            meta.file().unwrap_or("<rust>"),
            meta.line().unwrap_or(0),
            text.message,
            PyTuple::empty(py),
            py.None(),
            py.None(),
            extra,
        ),
    )?;
    logger.call_method1("handle", (record,))?;
    Ok(())
}

/// An event's message, then its other fields as ` key=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

/// The lowest Python level some logger under [`LOGGER`] handles; above every level until
/// the module reads Python's.
static THRESHOLD: AtomicU8 = AtomicU8::new(u8::MAX);

/// Events that took the GIL (see [`forwarded_events`]).
static FORWARDED: AtomicU64 = AtomicU64::new(0);
