//! Byte layouts of the rows the embedded store keeps in redb.
//!
//! Hand-rolled rather than serde: the rows are tiny, written hundreds of times
//! a second, and their layout must stay readable by later versions of berth,
//! so each encoding starts with a format byte.

use bytes::Bytes;

use crate::{KeyValue, Revision, WatchBatch, WatchEvent};

/// Format byte of a `kv` row.
const KV_FORMAT: u8 = 1;
/// Format byte of a `history` row.
const HISTORY_FORMAT: u8 = 1;

const TAG_PUT: u8 = 0;
const TAG_DELETE: u8 = 1;

/// A row that cannot be decoded: the file was damaged or written by an
/// incompatible version.
#[derive(Debug)]
pub(super) struct Corrupt(pub(super) String);

/// The metadata of a `kv` row, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Row {
    pub(super) create_revision: Revision,
    pub(super) mod_revision: Revision,
    pub(super) version: i64,
    pub(super) lease: i64,
}

/// `format, create_revision, mod_revision, version, lease, value...`
pub(super) fn encode_kv(row: Row, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 32 + value.len());
    out.push(KV_FORMAT);
    out.extend_from_slice(&row.create_revision.to_le_bytes());
    out.extend_from_slice(&row.mod_revision.to_le_bytes());
    out.extend_from_slice(&row.version.to_le_bytes());
    out.extend_from_slice(&row.lease.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// The metadata of a `kv` row and the offset of its value.
fn decode_row_at(key: &str, bytes: &[u8]) -> Result<(Row, usize), Corrupt> {
    let mut cur = Cursor::new(bytes);
    let format = cur.u8()?;
    if format != KV_FORMAT {
        return Err(Corrupt(format!("key {key}: unknown row format {format}")));
    }
    let row = Row {
        create_revision: cur.i64()?,
        mod_revision: cur.i64()?,
        version: cur.i64()?,
        lease: cur.i64()?,
    };
    Ok((row, cur.pos))
}

/// The metadata of a `kv` row.
pub(super) fn decode_row(key: &str, bytes: &[u8]) -> Result<Row, Corrupt> {
    decode_row_at(key, bytes).map(|(row, _)| row)
}

/// A whole `kv` row.
pub(super) fn decode_kv(key: &str, bytes: &[u8]) -> Result<KeyValue, Corrupt> {
    let (row, at) = decode_row_at(key, bytes)?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(&bytes[at..]),
        create_revision: row.create_revision,
        mod_revision: row.mod_revision,
        version: row.version,
        lease: row.lease,
    })
}

/// The events of one revision. Their revision is the row's key, so it is not
/// repeated inside.
pub(super) fn encode_events(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * events.len());
    out.push(HISTORY_FORMAT);
    for event in events {
        match event {
            WatchEvent::Put(kv) => {
                out.push(TAG_PUT);
                put_bytes(&mut out, kv.key.as_bytes());
                out.extend_from_slice(&kv.create_revision.to_le_bytes());
                out.extend_from_slice(&kv.version.to_le_bytes());
                out.extend_from_slice(&kv.lease.to_le_bytes());
                put_bytes(&mut out, &kv.value);
            }
            WatchEvent::Delete { key, .. } => {
                out.push(TAG_DELETE);
                put_bytes(&mut out, key.as_bytes());
            }
        }
    }
    out
}

/// Decode the events of `revision`.
pub(super) fn decode_events(revision: Revision, bytes: &[u8]) -> Result<WatchBatch, Corrupt> {
    let mut cur = Cursor::new(bytes);
    let format = cur.u8()?;
    if format != HISTORY_FORMAT {
        return Err(Corrupt(format!(
            "history of revision {revision}: unknown format {format}"
        )));
    }
    let mut events = Vec::new();
    while !cur.at_end() {
        let tag = cur.u8()?;
        let key = cur.string()?;
        match tag {
            TAG_PUT => {
                let create_revision = cur.i64()?;
                let version = cur.i64()?;
                let lease = cur.i64()?;
                let value = Bytes::copy_from_slice(cur.bytes()?);
                events.push(WatchEvent::Put(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: revision,
                    version,
                    lease,
                }));
            }
            TAG_DELETE => events.push(WatchEvent::Delete {
                key,
                mod_revision: revision,
            }),
            other => {
                return Err(Corrupt(format!(
                    "history of revision {revision}: unknown event tag {other}"
                )));
            }
        }
    }
    Ok(events)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are bounded by redb's own limits (< 4 GiB).
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end = self.pos.checked_add(n).filter(|end| *end <= self.buf.len());
        match end {
            Some(end) => {
                let out = &self.buf[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(Corrupt(format!(
                "truncated row: wanted {n} bytes at offset {} of {}",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, Corrupt> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(raw))
    }

    fn bytes(&mut self) -> Result<&'a [u8], Corrupt> {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(self.take(4)?);
        let len = u32::from_le_bytes(raw) as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, Corrupt> {
        let raw = self.bytes()?;
        String::from_utf8(raw.to_vec()).map_err(|_| Corrupt("key is not UTF-8".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_round_trips() {
        let row = Row {
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: 7,
        };
        let bytes = encode_kv(row, b"hello");
        assert_eq!(decode_row("k", &bytes).unwrap(), row);
        let kv = decode_kv("k", &bytes).unwrap();
        assert_eq!(kv.value.as_ref(), b"hello");
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
            (3, 9, 4, 7)
        );
    }

    #[test]
    fn events_round_trip_and_truncation_is_detected() {
        let events = vec![
            WatchEvent::Put(KeyValue {
                key: "/a".into(),
                value: Bytes::from_static(b"v"),
                create_revision: 2,
                mod_revision: 5,
                version: 2,
                lease: 0,
            }),
            WatchEvent::Delete {
                key: "/b".into(),
                mod_revision: 5,
            },
        ];
        let bytes = encode_events(&events);
        assert_eq!(decode_events(5, &bytes).unwrap(), events);
        assert!(decode_events(5, &bytes[..bytes.len() - 1]).is_err());
        assert!(
            decode_kv(
                "k",
                &encode_kv(
                    Row {
                        create_revision: 1,
                        mod_revision: 1,
                        version: 1,
                        lease: 0
                    },
                    b""
                )[..10]
            )
            .is_err()
        );
    }
}
