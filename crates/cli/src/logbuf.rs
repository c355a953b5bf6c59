//! The log writer of `berth server` and `berth agent`: stderr, buffered.
//!
//! The router logs one access line per request. Written straight to
//! stderr that is one `write` system call per request, which cost the
//! router about 3 µs of system time per request (BENCHMARKS.md, router).
//! Here every event is appended to one in-memory buffer, in the order the
//! events happened, and the buffer goes to stderr
//! - every [`FLUSH_EVERY`], from a thread started by [`buffered_stderr`],
//! - at once when it holds [`MAX_BUFFERED`] bytes,
//! - at once after a warning or an error, so that problems are never late,
//! - when the returned [`FlushGuard`] is dropped (the process stops), and
//!   before a panic message is printed.
//!
//! What a `kill -9` loses is the last [`FLUSH_EVERY`] of
//! info and debug lines.

use std::io::Write;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How often buffered lines are written out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written out at once.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// One buffer per process, as there is one stderr.
static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn lock() -> std::sync::MutexGuard<'static, Vec<u8>> {
    // A panic while appending leaves at worst a partial line.
    BUFFER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Write out what is buffered. The lock is held while writing so that
/// concurrent flushes cannot reorder lines.
pub fn flush() {
    let mut buf = lock();
    if !buf.is_empty() {
        // Nowhere to report a failing stderr.
        let _ = std::io::stderr().write_all(&buf);
        buf.clear();
    }
}

/// Log to buffered stderr, at the level `BERTH_LOG` sets (default
/// `info`), in colour when stderr is a terminal (an autostarted server
/// writes to `server.log`: no colour codes there). Keep the guard for as
/// long as the process logs.
pub fn init_tracing() -> FlushGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = buffered_stderr();
    // Only the first call installs a subscriber (tests may run several).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    guard
}

/// The `MakeWriter` for the log subscriber, and the guard that stops the
/// flushing thread and writes out the rest when dropped. Also installs a
/// panic hook that flushes before the panic message.
pub fn buffered_stderr() -> (BufferedStderr, FlushGuard) {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("berth-log-flush".into())
        .spawn(move || {
            // Ends when the guard drops its sender.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                flush();
            }
            flush();
        })
        .ok();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
    (
        BufferedStderr,
        FlushGuard {
            stop: Some(stop),
            thread,
        },
    )
}

/// Stops the flushing thread and writes out what is left.
pub struct FlushGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        flush();
    }
}

/// Hands out [`EventWriter`]s appending to the process's log buffer.
#[derive(Clone, Copy, Debug, Default)]
pub struct BufferedStderr;

/// Appends one event to the buffer; a warning or an error is written out
/// when the writer is dropped (after the whole event is in).
pub struct EventWriter {
    urgent: bool,
}

impl Write for EventWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = lock();
        buf.extend_from_slice(data);
        if buf.len() >= MAX_BUFFERED {
            let _ = std::io::stderr().write_all(&buf);
            buf.clear();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.urgent {
            flush();
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        EventWriter {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}
