//! Credit-based flow control, both ends, as plain state machines.
//!
//! The aggregator grants credit in batches; the agent may have at most that many unacknowledged batches in
//! flight. Acks are cumulative (every batch up to `through` is durable). The aggregator withholds credit to push
//! back on agents when its write path is saturated, which bounds the memory any number of agents can pin.

use std::collections::VecDeque;

/// A peer broke the flow-control rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The agent tried to send without credit.
    #[error("no credit left: wait for a credit grant before sending")]
    NoCredit,
    /// A batch arrived that exceeds the granted credit.
    #[error("batch {seq} exceeds the granted credit")]
    CreditExceeded {
        /// Offending batch.
        seq: u64,
    },
    /// A batch arrived out of sequence.
    #[error("batch {got} arrived out of order (expected {expected})")]
    OutOfOrder {
        /// Sequence on the wire.
        got: u64,
        /// Sequence expected.
        expected: u64,
    },
    /// An ack names a batch that was never sent.
    #[error("ack through {through} but only {last_sent} batches were sent")]
    AckBeyondSent {
        /// Acked sequence.
        through: u64,
        /// Last sent sequence.
        last_sent: u64,
    },
}

/// The agent's side: sequence numbers, credit and the batches awaiting acknowledgement.
#[derive(Debug)]
pub struct SendWindow<T> {
    credit: u64,
    next_seq: u64,
    acked_through: u64,
    in_flight: VecDeque<(u64, T)>,
}

impl<T> Default for SendWindow<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<T> SendWindow<T> {
    /// A window with the credit from the Welcome.
    pub fn new(initial_credit: u32) -> Self {
        Self { credit: u64::from(initial_credit), next_seq: 1, acked_through: 0, in_flight: VecDeque::new() }
    }

    /// Adds granted credit.
    pub fn grant(&mut self, batches: u32) {
        self.credit = self.credit.saturating_add(u64::from(batches));
    }

    /// Whether a batch may be sent now.
    pub fn can_send(&self) -> bool {
        self.credit > 0
    }

    /// Credit left.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// Registers a batch as sent and returns its sequence number.
    pub fn send(&mut self, batch: T) -> Result<u64, FlowError> {
        if self.credit == 0 {
            return Err(FlowError::NoCredit);
        }
        self.credit -= 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back((seq, batch));
        Ok(seq)
    }

    /// Applies a cumulative ack and returns the batches it covers, oldest first. Repeated acks return nothing.
    pub fn ack(&mut self, through: u64) -> Result<Vec<T>, FlowError> {
        let last_sent = self.next_seq - 1;
        if through > last_sent {
            return Err(FlowError::AckBeyondSent { through, last_sent });
        }
        self.acked_through = self.acked_through.max(through);
        let mut done = Vec::new();
        while self.in_flight.front().is_some_and(|(seq, _)| *seq <= through) {
            if let Some((_, batch)) = self.in_flight.pop_front() {
                done.push(batch);
            }
        }
        Ok(done)
    }

    /// Takes one in-flight batch out of the window (the peer rejected it for good).
    pub fn reject(&mut self, seq: u64) -> Option<T> {
        let pos = self.in_flight.iter().position(|(s, _)| *s == seq)?;
        self.in_flight.remove(pos).map(|(_, batch)| batch)
    }

    /// Number of unacknowledged batches.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Ends the session: every unacknowledged batch is handed back for resending.
    pub fn into_unacked(self) -> Vec<T> {
        self.in_flight.into_iter().map(|(_, batch)| batch).collect()
    }
}

/// The aggregator's side: checks the agent's sequence and credit, and decides when to grant more.
#[derive(Debug)]
pub struct ReceiveWindow {
    window: u32,
    outstanding: u32,
    expected_seq: u64,
    completed_ungranted: u32,
}

impl ReceiveWindow {
    /// A window of `window` batches, all granted up front in the Welcome.
    pub fn new(window: u32) -> Self {
        Self { window, outstanding: window, expected_seq: 1, completed_ungranted: 0 }
    }

    /// Checks an arriving batch.
    pub fn on_batch(&mut self, seq: u64) -> Result<(), FlowError> {
        if seq != self.expected_seq {
            return Err(FlowError::OutOfOrder { got: seq, expected: self.expected_seq });
        }
        if self.outstanding == 0 {
            return Err(FlowError::CreditExceeded { seq });
        }
        self.outstanding -= 1;
        self.expected_seq += 1;
        Ok(())
    }

    /// A batch has been fully handled (stored or rejected); its credit can be given back.
    pub fn on_completed(&mut self) {
        self.completed_ungranted = self.completed_ungranted.saturating_add(1);
    }

    /// Credit to grant now. `admit` is false when the aggregator wants the agent to slow down: credit is then
    /// withheld, except that an agent with nothing outstanding always gets one batch so it cannot stall forever.
    pub fn take_grant(&mut self, admit: bool) -> Option<u32> {
        let grant = if admit {
            self.completed_ungranted
        } else if self.outstanding == 0 && self.completed_ungranted > 0 {
            1
        } else {
            0
        };
        if grant == 0 {
            return None;
        }
        self.completed_ungranted -= grant;
        self.outstanding += grant;
        debug_assert!(self.outstanding <= self.window);
        Some(grant)
    }

    /// The sequence number the next batch must carry.
    pub fn expected_seq(&self) -> u64 {
        self.expected_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn send_ack_and_resend() {
        let mut w = SendWindow::new(2);
        assert_eq!(w.send("a"), Ok(1));
        assert_eq!(w.send("b"), Ok(2));
        assert_eq!(w.send("c"), Err(FlowError::NoCredit));
        assert_eq!(w.ack(1).unwrap(), vec!["a"]);
        assert!(w.ack(1).unwrap().is_empty());
        assert!(matches!(w.ack(5), Err(FlowError::AckBeyondSent { .. })));
        w.grant(1);
        assert_eq!(w.send("c"), Ok(3));
        assert_eq!(w.reject(3), Some("c"));
        assert_eq!(w.into_unacked(), vec!["b"]);
    }

    #[test]
    fn receiver_rejects_out_of_order_and_overdraft() {
        let mut r = ReceiveWindow::new(1);
        assert_eq!(r.on_batch(2), Err(FlowError::OutOfOrder { got: 2, expected: 1 }));
        r.on_batch(1).unwrap();
        assert_eq!(r.on_batch(2), Err(FlowError::CreditExceeded { seq: 2 }));
    }

    #[test]
    fn withheld_credit_never_starves_an_idle_agent() {
        let mut r = ReceiveWindow::new(2);
        r.on_batch(1).unwrap();
        r.on_batch(2).unwrap();
        r.on_completed();
        r.on_completed();
        assert_eq!(r.take_grant(false), Some(1));
        assert_eq!(r.take_grant(false), None);
        assert_eq!(r.take_grant(true), Some(1));
    }

    proptest! {
        /// Driving both windows together: the agent never exceeds credit, every batch is acked exactly once.
        #[test]
        fn windows_agree(window in 1u32..8, steps in proptest::collection::vec((any::<bool>(), any::<bool>()), 1..200)) {
            let mut tx = SendWindow::new(window);
            let mut rx = ReceiveWindow::new(window);
            let mut pending_acks = VecDeque::new();
            let mut sent = 0u64;
            let mut acked = Vec::new();
            for (send, admit) in steps {
                if send && tx.can_send() {
                    sent += 1;
                    let seq = tx.send(sent).unwrap();
                    rx.on_batch(seq).unwrap();
                    pending_acks.push_back(seq);
                } else if let Some(seq) = pending_acks.pop_front() {
                    rx.on_completed();
                    acked.extend(tx.ack(seq).unwrap());
                    if let Some(n) = rx.take_grant(admit) {
                        tx.grant(n);
                    }
                }
                prop_assert!(tx.in_flight() as u32 <= window);
            }
            prop_assert_eq!(acked, (1..=sent - pending_acks.len() as u64).collect::<Vec<_>>());
        }
    }
}
