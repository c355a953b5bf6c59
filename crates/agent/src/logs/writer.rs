//! The log writer thread: owns every open log file of the node, appends,
//! rotates at the size cap, and broadcasts each line once it is written.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use berth_model::{InstanceKey, LogLine, LogStream};
use tokio::sync::{broadcast, mpsc};

use super::{LogConfig, LogError, Msg};

/// File name of the file being written.
pub(crate) const CURRENT: &str = "current.log";

/// `<dir>/<ns>/<stack>/<service>.<slot>`
pub(crate) fn instance_dir(dir: &Path, key: &InstanceKey) -> PathBuf {
    dir.join(&key.namespace)
        .join(&key.stack)
        .join(format!("{}.{}", key.service, key.slot))
}

pub(crate) fn stream_char(s: LogStream) -> char {
    match s {
        LogStream::Stdout => 'o',
        LogStream::Stderr => 'e',
        LogStream::System => 's',
    }
}

struct Rotating {
    dir: PathBuf,
    file: BufWriter<File>,
    size: u64,
    dirty: bool,
}

impl Rotating {
    fn open(dir: PathBuf) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(CURRENT))?;
        let size = file.metadata()?.len();
        Ok(Self {
            dir,
            file: BufWriter::with_capacity(64 * 1024, file),
            size,
            dirty: false,
        })
    }

    fn rotate(&mut self, max_files: u32) -> std::io::Result<()> {
        self.file.flush()?;
        if max_files > 1 {
            let oldest = self.dir.join(format!("{}.log", max_files - 1));
            match fs::remove_file(&oldest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            for i in (1..max_files - 1).rev() {
                let from = self.dir.join(format!("{i}.log"));
                if from.exists() {
                    fs::rename(&from, self.dir.join(format!("{}.log", i + 1)))?;
                }
            }
            fs::rename(self.dir.join(CURRENT), self.dir.join("1.log"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(CURRENT))?;
        self.file = BufWriter::with_capacity(64 * 1024, file);
        self.size = 0;
        Ok(())
    }

    fn write(&mut self, record: &[u8], cfg: &LogConfig) -> std::io::Result<()> {
        if self.size > 0 && self.size + record.len() as u64 > cfg.max_file_bytes {
            self.rotate(cfg.max_files)?;
        }
        self.file.write_all(record)?;
        self.size += record.len() as u64;
        self.dirty = true;
        Ok(())
    }

    fn flush(&mut self) {
        if self.dirty {
            if let Err(e) = self.file.flush() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "log flush failed");
            }
            self.dirty = false;
        }
    }
}

struct Writer {
    dir: PathBuf,
    cfg: LogConfig,
    files: HashMap<InstanceKey, Rotating>,
    live: broadcast::Sender<LogLine>,
}

impl Writer {
    fn line(&mut self, line: LogLine) {
        let record = format!(
            "{} {} {}\n",
            line.ts_us,
            stream_char(line.stream),
            line.line
        );
        let file = match self.files.entry(line.key.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => Some(o.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => {
                match Rotating::open(instance_dir(&self.dir, &line.key)) {
                    Ok(r) => Some(v.insert(r)),
                    Err(e) => {
                        tracing::warn!(instance = %line.key, error = %e, "cannot open log file; line kept only in the live stream");
                        None
                    }
                }
            }
        };
        if let Some(file) = file
            && let Err(e) = file.write(record.as_bytes(), &self.cfg)
        {
            tracing::warn!(instance = %line.key, error = %e, "log write failed");
        }
        // Nobody listening is fine.
        let _ = self.live.send(line);
    }

    fn remove_stack(&mut self, ns: &str, stack: &str) -> Result<(), LogError> {
        self.files
            .retain(|k, _| !(k.namespace == ns && k.stack == stack));
        let path = self.dir.join(ns).join(stack);
        match fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LogError::Io { path, source }),
        }
    }

    fn flush_all(&mut self) {
        for f in self.files.values_mut() {
            f.flush();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(l) => self.line(l),
            Msg::Close(k) => {
                if let Some(mut f) = self.files.remove(&k) {
                    f.flush();
                }
            }
            Msg::RemoveStack {
                namespace,
                stack,
                done,
            } => {
                let _ = done.send(self.remove_stack(&namespace, &stack));
            }
            Msg::Flush(done) => {
                self.flush_all();
                let _ = done.send(());
            }
        }
    }
}

/// Start the writer thread; it ends when every sender is gone.
pub(crate) fn spawn(
    dir: PathBuf,
    cfg: LogConfig,
    mut rx: mpsc::Receiver<Msg>,
    live: broadcast::Sender<LogLine>,
) -> std::io::Result<()> {
    let mut w = Writer {
        dir,
        cfg,
        files: HashMap::new(),
        live,
    };
    std::thread::Builder::new()
        .name("berth-logs".into())
        .spawn(move || {
            while let Some(msg) = rx.blocking_recv() {
                w.handle(msg);
                // Drain what is queued, then flush once: batches under load,
                // no latency when idle.
                while let Ok(msg) = rx.try_recv() {
                    w.handle(msg);
                }
                w.flush_all();
            }
            w.flush_all();
        })
        .map(|_| ())
}
