//! When a receiving destination knows its VM manager abandoned the migration: the destination
//! QEMU (a client that stayed attached to the live export) left before its guest wrote, and no
//! client came back. An armed source then disarms by itself; until then it would stay armed
//! (and pay for the overlay) until someone sent `migrate-cancel`.
//!
//! Probes (`nbdinfo`, `qemu-img info`) attach for tens of milliseconds, though a read that goes
//! through to a busy source right after arming has taken 0.73 s; a destination QEMU stays
//! attached from its start to the end of the memory migration (under libvirt, a job aborted as
//! soon as memory moved still kept it attached 1.8 s). So a client counts as the destination's
//! QEMU once it stayed attached [`QEMU_ATTACHED`], and the migration counts as
//! abandoned once the last such client left, nothing wrote, and no client was attached for the
//! watch's `after`. A write (a claim) ends the watch for the session: the guest runs here.

use std::time::{Duration, Instant};

/// How long a client must stay attached to count as the destination's QEMU.
pub const QEMU_ATTACHED: Duration = Duration::from_secs(1);

/// The watch of one incoming session's live-export clients; see the module's documentation.
#[derive(Debug, Clone, Default)]
pub struct AbandonWatch {
    after: Duration,
    attached: usize,
    /// A client counted as the destination's QEMU has come and gone.
    qemu_left: bool,
    /// Since when no client is attached.
    empty_since: Option<Instant>,
    /// The guest wrote (or the verdict was given): nothing more to watch.
    over: bool,
}

impl AbandonWatch {
    /// A watch that gives its verdict once no client was attached for `after`.
    pub fn new(after: Duration) -> Self {
        Self { after, attached: 0, qemu_left: false, empty_since: None, over: false }
    }

    /// The same watch for a new session: the clients attached now stay counted, what they did
    /// before does not.
    pub fn renew(&mut self) {
        *self = Self { attached: self.attached, ..Self::new(self.after) };
    }

    /// A client entered its transmission phase.
    pub fn attach(&mut self) {
        self.attached += 1;
        self.empty_since = None;
    }

    /// A client left after `attached_for`.
    pub fn detach(&mut self, now: Instant, attached_for: Duration) {
        self.attached = self.attached.saturating_sub(1);
        self.qemu_left |= attached_for >= QEMU_ATTACHED;
        if self.attached == 0 {
            self.empty_since = Some(now);
        }
    }

    /// The guest here wants to write: the migration was not abandoned.
    pub fn wrote(&mut self) {
        self.over = true;
    }

    /// When to look again: the moment the verdict would be due, if one could be.
    pub fn due(&self) -> Option<Instant> {
        if self.over || !self.qemu_left || self.after.is_zero() {
            return None;
        }
        self.empty_since.map(|since| since + self.after)
    }

    /// Whether the migration is abandoned at `now`; says so once.
    pub fn abandoned(&mut self, now: Instant) -> bool {
        let due = self.due().is_some_and(|due| now >= due);
        if due {
            self.over = true;
        }
        due
    }

    /// The reason sent to the source.
    pub fn reason(&self) -> String {
        format!(
            "the destination's QEMU left before its guest wrote, and no client came back within {}",
            humantime::format_duration(self.after)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(10);

    #[test]
    fn a_qemu_that_leaves_without_writing_abandons_the_migration_after_the_wait() {
        let t0 = Instant::now();
        let mut w = AbandonWatch::new(AFTER);
        w.attach();
        assert_eq!(w.due(), None, "attached: nothing is due");
        let left = t0 + Duration::from_secs(60);
        w.detach(left, Duration::from_secs(60));
        assert_eq!(w.due(), Some(left + AFTER));
        assert!(!w.abandoned(left + AFTER - Duration::from_millis(1)));
        assert!(w.abandoned(left + AFTER));
        assert!(!w.abandoned(left + AFTER * 2), "the verdict is given once");
    }

    #[test]
    fn probes_alone_never_abandon() {
        let t0 = Instant::now();
        let mut w = AbandonWatch::new(AFTER);
        for i in 0..5 {
            w.attach();
            w.detach(t0 + Duration::from_secs(i), Duration::from_millis(100));
        }
        assert_eq!(w.due(), None);
        assert!(!w.abandoned(t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn a_client_that_comes_back_or_a_write_keeps_the_migration() {
        let t0 = Instant::now();
        let mut w = AbandonWatch::new(AFTER);
        w.attach();
        w.detach(t0, QEMU_ATTACHED);
        // A client attaches again (QEMU reconnecting, or another QEMU) before the wait is over.
        w.attach();
        assert!(!w.abandoned(t0 + AFTER * 2));
        w.wrote();
        w.detach(t0 + AFTER * 3, Duration::from_secs(30));
        assert_eq!(w.due(), None, "the guest wrote here: the migration was not abandoned");
        assert!(!w.abandoned(t0 + AFTER * 10));
    }

    #[test]
    fn the_wait_counts_from_the_last_client_leaving_and_zero_turns_it_off() {
        let t0 = Instant::now();
        let mut w = AbandonWatch::new(AFTER);
        w.attach();
        w.attach();
        w.detach(t0, Duration::from_secs(30));
        assert_eq!(w.due(), None, "one client is still attached");
        let last = t0 + Duration::from_secs(5);
        w.detach(last, Duration::from_secs(1));
        assert_eq!(w.due(), Some(last + AFTER), "a QEMU left earlier; the wait starts when the last client left");
        let mut off = AbandonWatch::new(Duration::ZERO);
        off.attach();
        off.detach(t0, Duration::from_secs(60));
        assert!(!off.abandoned(t0 + Duration::from_secs(3600)));
    }
}
