//! Splits a byte stream into newline-terminated lines, without I/O.

use thiserror::Error;

/// Longest line accepted by default (1 MiB), so a peer cannot make us buffer without bound.
pub const MAX_LINE: usize = 1 << 20;

/// A line exceeded the limit. Its bytes are dropped up to the next newline, so the stream can
/// go on with the following line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("line longer than {limit} bytes")]
pub struct LineTooLong {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// Accumulates bytes as they arrive and hands out complete lines.
///
/// Push whatever a read returned, then call [`next_line`](Self::next_line) until it answers
/// `Ok(None)` ("need more bytes", never an error). Lines come without their `\n` and without a
/// trailing `\r`.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the first line not yet handed out.
    start: usize,
    /// Bytes from `start` up to here are known to contain no newline.
    scanned: usize,
    limit: usize,
    /// Dropping an over-long line until its newline arrives.
    discarding: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    /// A buffer accepting lines up to [`MAX_LINE`] bytes.
    pub fn new() -> Self {
        Self::with_limit(MAX_LINE)
    }

    /// A buffer accepting lines up to `limit` bytes (newline excluded).
    pub fn with_limit(limit: usize) -> Self {
        Self { buf: Vec::new(), start: 0, scanned: 0, limit, discarding: false }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.discarding {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.discarding = false;
                    bytes = &bytes[i + 1..];
                }
                None => return,
            }
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line, `Ok(None)` if more bytes are needed, or `Err` once for a line
    /// longer than the limit (which is then skipped).
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
            self.scanned = self.buf.len();
            if self.buf.len() - self.start > self.limit {
                self.buf.clear();
                (self.start, self.scanned, self.discarding) = (0, 0, true);
                return Err(LineTooLong { limit: self.limit });
            }
            return Ok(None);
        };
        let end = self.scanned + i;
        let line = &self.buf[self.start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let result =
            if line.len() > self.limit { Err(LineTooLong { limit: self.limit }) } else { Ok(Some(line.to_vec())) };
        self.start = end + 1;
        self.scanned = self.start;
        if self.start == self.buf.len() {
            self.buf.clear();
            (self.start, self.scanned) = (0, 0);
        }
        result
    }

    /// At end of stream: the unterminated last line, if any bytes are left (and it is not being
    /// discarded). Empties the buffer.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let rest = &self.buf[self.start..];
        let rest = (!self.discarding && !rest.is_empty() && rest.len() <= self.limit).then(|| rest.to_vec());
        self.buf.clear();
        (self.start, self.scanned, self.discarding) = (0, 0, false);
        rest
    }

    /// Bytes buffered that do not yet form a complete line.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(lb: &mut LineBuffer) -> Vec<Result<Vec<u8>, LineTooLong>> {
        let mut out = Vec::new();
        loop {
            match lb.next_line() {
                Ok(None) => return out,
                Ok(Some(l)) => out.push(Ok(l)),
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn splits_lines_across_pushes() {
        let mut lb = LineBuffer::new();
        lb.push(b"ab");
        assert_eq!(lb.next_line(), Ok(None));
        lb.push(b"c\r\nde\n\nf");
        assert_eq!(drain(&mut lb), vec![Ok(b"abc".to_vec()), Ok(b"de".to_vec()), Ok(vec![])]);
        assert_eq!(lb.pending(), 1);
        lb.push(b"g\n");
        assert_eq!(drain(&mut lb), vec![Ok(b"fg".to_vec())]);
        assert_eq!(lb.pending(), 0);
    }

    #[test]
    fn byte_at_a_time() {
        let mut lb = LineBuffer::new();
        let mut lines = Vec::new();
        for &b in b"one\ntwo\nthree\n" {
            lb.push(&[b]);
            lines.extend(drain(&mut lb));
        }
        assert_eq!(lines, vec![Ok(b"one".to_vec()), Ok(b"two".to_vec()), Ok(b"three".to_vec())]);
    }

    #[test]
    fn overlong_unterminated_line_is_reported_once_and_skipped() {
        let mut lb = LineBuffer::with_limit(4);
        lb.push(b"12345");
        assert_eq!(lb.next_line(), Err(LineTooLong { limit: 4 }));
        assert_eq!(lb.next_line(), Ok(None));
        lb.push(b"678");
        assert_eq!(lb.next_line(), Ok(None));
        lb.push(b"9\nok\n");
        assert_eq!(drain(&mut lb), vec![Ok(b"ok".to_vec())]);
    }

    #[test]
    fn overlong_terminated_line_is_reported_and_skipped() {
        let mut lb = LineBuffer::with_limit(4);
        lb.push(b"1234\n12345\nabcd\r\n");
        assert_eq!(drain(&mut lb), vec![Ok(b"1234".to_vec()), Err(LineTooLong { limit: 4 }), Ok(b"abcd".to_vec())]);
    }

    #[test]
    fn default_limit_is_one_mib() {
        let mut lb = LineBuffer::new();
        lb.push(&vec![b'x'; MAX_LINE]);
        assert_eq!(lb.next_line(), Ok(None));
        lb.push(b"x");
        assert_eq!(lb.next_line(), Err(LineTooLong { limit: MAX_LINE }));
    }

    #[test]
    fn finish_returns_unterminated_tail() {
        let mut lb = LineBuffer::new();
        lb.push(b"a\nbc");
        assert_eq!(drain(&mut lb), vec![Ok(b"a".to_vec())]);
        assert_eq!(lb.finish(), Some(b"bc".to_vec()));
        assert_eq!(lb.finish(), None);
    }
}
