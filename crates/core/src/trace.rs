//! W3C Trace Context: the `traceparent` header (`00-<trace id>-<parent id>-<flags>`) that ties a job to the
//! distributed trace of the request that submitted it. The gateway takes it from the request (or starts a
//! trace), stores it with the job, and the worker carries its trace id into the job's spans, as with the
//! correlation id.

use std::fmt;

/// A parsed, valid `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

impl TraceParent {
    /// Parse a header value; `None` for anything the spec says to ignore (bad version 0xff, wrong lengths,
    /// upper-case hex, all-zero ids).
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; a later version may append more, which we may ignore.
        if version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let mut v = [0u8; 1];
        hex_into(version, &mut v)?;
        let mut t = Self {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        hex_into(trace, &mut t.trace_id)?;
        hex_into(parent, &mut t.parent_id)?;
        let mut f = [0u8; 1];
        hex_into(flags, &mut f)?;
        t.flags = f[0];
        if t.trace_id == [0; 16] || t.parent_id == [0; 8] {
            return None;
        }
        Some(t)
    }

    /// A new trace (sampled), for a request that came without one.
    pub fn start() -> Self {
        let a = uuid::Uuid::now_v7().into_bytes();
        let b = uuid::Uuid::now_v7().into_bytes();
        let mut t = Self {
            trace_id: a,
            parent_id: [0; 8],
            flags: 1,
        };
        t.parent_id.copy_from_slice(&b[8..]);
        t.parent_id[0] |= 1; // never all zero
        t
    }

    /// The trace id as 32 lower-case hex digits (what log lines carry).
    pub fn trace_id_hex(&self) -> String {
        self.trace_id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-", self.trace_id_hex())?;
        for b in self.parent_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_examples_and_refuses_bad_ones() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(s).unwrap();
        assert_eq!(t.to_string(), s);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        let fresh = TraceParent::start();
        assert_eq!(TraceParent::parse(&fresh.to_string()), Some(fresh));
        assert_ne!(TraceParent::start().trace_id, fresh.trace_id);
    }
}
